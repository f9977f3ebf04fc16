"""Fixtures for dataset tests: the shared data folder and synthetic archives."""
import io
import os
import pickle
import zipfile

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def data_root():
    """Folder of the real data (``$PADDLEFSL_DATA``, default ``../shared/data`` next to the repo)."""
    return os.environ.get("PADDLEFSL_DATA") or os.path.join(REPO, "..", "shared", "data")


def real_file(*parts):
    """Path of a real data file, or skip the test with a reason if it is absent."""
    path = os.path.join(data_root(), *parts)
    if not os.path.isfile(path):
        pytest.skip(f"real data file {path} not found (set PADDLEFSL_DATA to the data folder)")
    return path


def png_bytes(array_uint8):
    buf = io.BytesIO()
    Image.fromarray(array_uint8).save(buf, format="PNG")
    return buf.getvalue()


def glyph(char_id, example, size=16):
    """White image with a black pixel at (0, char_id) and one at (8, example): decodable identity."""
    img = np.full((size, size), 255, dtype=np.uint8)
    img[0, char_id] = 0
    img[8, example] = 0
    return img


def decode_glyph(image):
    """Inverse of :func:`glyph` for a decoded [1, S, S] stroke image (returns char_id, example)."""
    return int(np.argmax(image[0, 0])), int(np.argmax(image[0, 8]))


def make_omniglot_zip(path, top, alphabets, examples=4, start_id=0, size=16, image=None):
    """Write an Omniglot-style zip ``top/alphabet/characterNN/ID_EE.png``; returns {char_id: (alphabet, char)}.

    ``image(char_id, example)`` draws each uint8 image (default: :func:`glyph`, which needs ids below ``size``)."""
    ids = {}
    char_id = start_id
    with zipfile.ZipFile(path, "w") as zf:
        for alphabet, count in alphabets.items():
            for c in range(1, count + 1):
                ids[char_id] = (alphabet, f"character{c:02d}")
                for e in range(examples):
                    name = f"{top}/{alphabet}/character{c:02d}/{char_id:04d}_{e + 1:02d}.png"
                    zf.writestr(name, png_bytes(glyph(char_id, e, size) if image is None else image(char_id, e)))
                char_id += 1
    return ids


def make_runs_zip(path, n_runs=2, n_classes=3, size=16):
    """Write an ``all_runs.zip`` of Lake's layout with ``n_runs`` runs of ``n_classes`` glyphs; returns each run's
    query targets."""
    targets = {}
    with zipfile.ZipFile(path, "w") as zf:
        for r in range(1, n_runs + 1):
            run = f"run{r:02d}"
            perm = np.random.default_rng(r).permutation(n_classes)
            lines = []
            for c in range(n_classes):
                zf.writestr(f"{run}/training/class{c + 1:02d}.png", png_bytes(glyph(c, 0, size)))
            for q in range(n_classes):
                zf.writestr(f"{run}/test/item{q + 1:02d}.png", png_bytes(glyph(int(perm[q]), 1, size)))
                lines.append(f"{run}/test/item{q + 1:02d}.png {run}/training/class{perm[q] + 1:02d}.png")
            zf.writestr(f"{run}/class_labels.txt", "\n".join(lines) + "\n")
            targets[run] = perm
    return targets


def make_miniimagenet_pickle(root, mode, image_data, class_dict):
    """Write ``root/mini-imagenet-cache-{mode}.pkl`` in the common pickle layout: the uint8 images, (N, H, W, 3),
    and each class name's image indices."""
    with open(root / f"mini-imagenet-cache-{mode}.pkl", "wb") as f:
        pickle.dump({"image_data": image_data, "class_dict": class_dict}, f)


@pytest.fixture
def minimal_root(tmp_path):
    """Synthetic minimal split: small1 = A(3) B(2); small2 = A(2) C(2) D(1)."""
    root = tmp_path / "omniglot"
    root.mkdir()
    ids1 = make_omniglot_zip(root / "images_background_small1.zip", "images_background_small1", {"A": 3, "B": 2})
    ids2 = make_omniglot_zip(root / "images_background_small2.zip", "images_background_small2",
                             {"A": 2, "C": 2, "D": 1}, start_id=5)
    return root, ids1, ids2


@pytest.fixture
def standard_root(tmp_path):
    """Synthetic standard split: background = A(3) B(3); evaluation = C(2) D(2)."""
    root = tmp_path / "omniglot_std"
    root.mkdir()
    ids = make_omniglot_zip(root / "images_background.zip", "images_background", {"A": 3, "B": 3})
    ids.update(make_omniglot_zip(root / "images_evaluation.zip", "images_evaluation", {"C": 2, "D": 2}, start_id=6))
    return root, ids


@pytest.fixture(scope="session")
def real_omniglot_cache(tmp_path_factory):
    """One cache folder per session so the real small zips are decoded only once."""
    return str(tmp_path_factory.mktemp("omniglot_cache"))
