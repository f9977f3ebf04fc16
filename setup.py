from setuptools import find_packages, setup

# The exact op layer relies on Paddle internals; these are the tested major versions (paddlefsl/dependencies.py
# refuses older ones at import and warns for newer ones).
PADDLE = ">=3.0,<4"

setup(
    name="paddlefsl",
    version="2.0.0",
    description="Exact gradient-based meta-learning (MAML, ANIL, Meta-SGD, differentiable inner loops) for PaddlePaddle",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    author="paddlefsl maintainers",
    keywords=["meta-learning", "few-shot learning", "MAML", "ANIL", "Meta-SGD", "PaddlePaddle",
              "second-order gradients"],
    license="Apache-2.0",
    classifiers=[
        "Development Status :: 4 - Beta",
        "Intended Audience :: Science/Research",
        "License :: OSI Approved :: Apache Software License",
        "Operating System :: OS Independent",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.9",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    python_requires=">=3.9",
    packages=find_packages(include=["paddlefsl", "paddlefsl.*"]),
    install_requires=["numpy", "pillow", "tqdm"],
    extras_require={
        "cpu": [f"paddlepaddle{PADDLE}"],
        "gpu": [f"paddlepaddle-gpu{PADDLE}"],
        "plot": ["matplotlib"],
        "test": ["pytest>=7", "matplotlib"],
        "docs": ["mkdocs>=1.5", "mkdocstrings[python]>=0.24"],
        # PaddleNLP 2.8.1 (the newest) imports on Paddle 3.x only with these caps; it also requires the old PyPI
        # `paddlefsl` 1.1.0 by name, which this package (2.x) satisfies, so ours stays in place in either install order.
        "nlp": [
            "paddlenlp==2.8.1",
            "huggingface_hub<0.25",
            "aistudio-sdk==0.2.6",
            "datasets<3",
            "pyarrow<16",
            "numpy<2",
        ],
        # The lean PaddleSpeech install: the dependencies that `paddlespeech.kws` and `paddlespeech.vector` import.
        # PaddleSpeech itself goes in after, without its ~200 dependencies:
        #   pip install -e ".[cpu,speech]" && pip install --no-deps paddlespeech==1.5.0
        "speech": [
            "resampy",
            "soundfile",
            "scipy",
            "packaging",
            "colorlog",
            "pathos",
            "tqdm",
            "h5py",
            "kaldiio",
            "braceexpand",
            "pyyaml",
        ],
    },
)
