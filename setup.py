from setuptools import find_packages, setup

setup(
    name="paddlefsl",
    version="2.0.0",
    description="Exact gradient-based meta-learning (MAML, ANIL, Meta-SGD, differentiable inner loops) for PaddlePaddle",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(include=["paddlefsl", "paddlefsl.*"]),
    install_requires=["numpy", "pillow", "tqdm", "matplotlib"],
    extras_require={
        "cpu": ["paddlepaddle>=3.0"],
        "gpu": ["paddlepaddle-gpu>=3.0"],
        "test": ["pytest>=7"],
        "docs": ["mkdocs>=1.5", "mkdocstrings[python]>=0.24"],
        "nlp": ["paddlenlp"],
    },
)
