"""Tests for paddlefsl.datasets.MiniImageNet on tiny synthetic trees in both layouts."""
import numpy as np
import pytest
from PIL import Image

from paddlefsl.datasets import (IMAGENET_MEAN, IMAGENET_STD, CorruptDatasetError, DatasetNotFoundError,
                                MiniImageNet)
from paddlefsl.episodes import EpisodeSampler, make_task
from tests.datasets.conftest import make_miniimagenet_pickle

CLASSES = ["n02", "n01", "n03"]  # deliberately unsorted
PER_CLASS = 4


def _pixels(size=84):
    """Image i of class c: constant colour (10*c, 20*i, 200) so identity survives any resize."""
    out = {}
    for c, name in enumerate(CLASSES):
        for i in range(PER_CLASS):
            out[(name, i)] = np.full((size, size, 3), (10 * c, 20 * i, 200), dtype=np.uint8)
    return out


def _make_pickle(root, mode):
    pix = _pixels()
    keys = sorted(pix, key=lambda k: (k[1], k[0]))  # interleave classes
    make_miniimagenet_pickle(root, mode, np.stack([pix[k] for k in keys]),
                             {n: [j for j, k in enumerate(keys) if k[0] == n] for n in CLASSES})
    return keys


def _make_csv(root, mode):
    (root / "images").mkdir(exist_ok=True)
    keys = []
    lines = ["filename,label"]
    for (name, i), img in _pixels().items():
        fname = f"{name}{i:08d}.jpg" if i % 2 else f"{name}{i:08d}.png"
        Image.fromarray(img).save(root / "images" / fname)
        lines.append(f"{fname},{name}")
        keys.append((name, i))
    (root / f"{mode}.csv").write_text("\n".join(lines) + "\n")
    return keys


def _expected(name, i):
    rgb = np.array([10 * CLASSES.index(name), 20 * i, 200], dtype=np.float32) / 255
    return (rgb - IMAGENET_MEAN) / IMAGENET_STD


@pytest.mark.parametrize("layout", ["pickle", "csv"])
@pytest.mark.parametrize("image_size", [84, 32])
@pytest.mark.parametrize("mode", ["train", "test"])
def test_layouts(tmp_path, layout, image_size, mode):
    keys = (_make_pickle if layout == "pickle" else _make_csv)(tmp_path, mode)
    ds = MiniImageNet(tmp_path, mode, image_size=image_size)
    assert ds.layout == layout and len(ds) == len(CLASSES) * PER_CLASS
    assert ds.class_names == sorted(CLASSES) and ds.num_classes == 3
    assert ds.labels.dtype == np.int64 and np.array_equal(np.bincount(ds.labels), [PER_CLASS] * 3)
    assert ds.images.shape == (len(ds), 3, image_size, image_size)
    atol = 1e-6 if layout == "pickle" else 0.05  # JPEG is lossy
    for j, (name, i) in enumerate(keys):
        image, label = ds[j]
        assert image.shape == (3, image_size, image_size) and image.dtype == np.float32
        assert ds.class_names[label] == name
        np.testing.assert_allclose(image.astype(np.float64).mean(axis=(1, 2)), _expected(name, i), atol=atol)
    task = EpisodeSampler(ds.labels, 3, 1, 2, seed=0).sample()
    xs, ys, xq, yq = make_task(ds.images, ds.labels, task)
    assert xs.shape == (3, 3, image_size, image_size) and xq.shape == (6, 3, image_size, image_size)
    np.testing.assert_array_equal(xs[1], ds[int(task.support_indices[1])][0])


def test_pickle_preferred_and_transform(tmp_path):
    _make_pickle(tmp_path, "val")
    _make_csv(tmp_path, "val")
    ds = MiniImageNet(tmp_path, "val", transform=lambda x: x[:1])
    assert ds.layout == "pickle" and ds[0][0].shape == (1, 84, 84)
    assert ds.images[-1].shape == (3, 84, 84)
    with pytest.raises(IndexError):
        ds.images[len(ds)]


def test_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="mini-imagenet-cache-train.pkl.*train.csv"):
        MiniImageNet(tmp_path, "train")
    with pytest.raises(ValueError, match="mode"):
        MiniImageNet(tmp_path, "dev")
    (tmp_path / "train.csv").write_text("filename,label\nmissing.jpg,n01\n")
    with pytest.raises(DatasetNotFoundError, match="missing.jpg"):
        MiniImageNet(tmp_path, "train")
    (tmp_path / "mini-imagenet-cache-test.pkl").write_bytes(b"garbage")
    with pytest.raises(CorruptDatasetError, match="not a valid miniImageNet pickle"):
        MiniImageNet(tmp_path, "test")
    make_miniimagenet_pickle(tmp_path, "val", np.zeros((2, 8, 8, 3), np.uint8), {"a": [0]})
    with pytest.raises(CorruptDatasetError, match="belong to no class"):
        MiniImageNet(tmp_path, "val")
