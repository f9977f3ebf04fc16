"""Tests for paddlefsl.datasets.omniglot on synthetic zips and on the real shared zips."""
import os
import zipfile

import numpy as np
import paddle
import pytest

import paddlefsl.datasets._imagecache as imagecache
import paddlefsl.datasets.omniglot as omniglot_mod
from paddlefsl.datasets import (CorruptDatasetError, DatasetNotFoundError, Omniglot, OmniglotOneShotRuns,
                                RotatedImages, evaluate_one_shot_runs, file_digests, verify_file)
from paddlefsl.episodes import EpisodeSampler, make_task

from .conftest import decode_glyph, make_omniglot_zip, make_runs_zip, png_bytes, real_file


def _check_identity(ds, ids, rotated):
    """Every image shows the character its label claims (rot0 copy) and rotations are exact."""
    images = np.asarray(ds.images)
    for label, name in enumerate(ds.class_names):
        members = np.flatnonzero(ds.labels == label)
        rot = 0
        if rotated:
            rot = label % 4
            base_label = label - rot
            base_members = np.flatnonzero(ds.labels == base_label)
            np.testing.assert_array_equal(images[members], np.rot90(images[base_members], rot, axes=(2, 3)))
            continue
        chars = {decode_glyph(images[m])[0] for m in members}
        assert len(chars) == 1
        alphabet, character = ids[chars.pop()]
        assert name == f"{alphabet}/{character}"
        assert sorted(decode_glyph(images[m])[1] for m in members) == list(range(len(members)))


@pytest.mark.parametrize("rotations", [True, False])
def test_minimal_train(minimal_root, tmp_path, rotations):
    root, ids1, _ = minimal_root
    ds = Omniglot(root, "minimal", "train", image_size=16, rotations=rotations, cache_dir=tmp_path / "c")
    n_classes = 5 * (4 if rotations else 1)
    assert ds.num_classes == n_classes and len(ds) == n_classes * 4
    assert ds.labels.dtype == np.int64 and set(ds.labels.tolist()) == set(range(n_classes))
    assert isinstance(ds.images, RotatedImages) == rotations
    assert ds.images.shape == (len(ds), 1, 16, 16)
    image, label = ds[len(ds) - 1]
    assert image.shape == (1, 16, 16) and image.dtype == np.float32 and 0 <= label < n_classes
    assert image.min() >= 0 and image.max() == 1.0
    if rotations:
        assert ds.class_names[:4] == ["A/character01", "A/character01/rot90", "A/character01/rot180",
                                      "A/character01/rot270"]
        _check_identity(ds, ids1, rotated=True)
    plain = Omniglot(root, "minimal", "train", image_size=16, rotations=False, cache_dir=tmp_path / "c")
    _check_identity(plain, ids1, rotated=False)


def test_minimal_test_excludes_train_alphabets(minimal_root, tmp_path):
    root, _, ids2 = minimal_root
    ds = Omniglot(root, "minimal", "test", image_size=16, cache_dir=tmp_path / "c")
    assert ds.class_names == ["C/character01", "C/character02", "D/character01"]
    assert not isinstance(ds.images, RotatedImages) and len(ds) == 12
    _check_identity(ds, ids2, rotated=False)


@pytest.mark.parametrize("split", ["minimal", "standard"])
@pytest.mark.parametrize("val_classes", [1, 2])
def test_val_hold_out(minimal_root, standard_root, tmp_path, split, val_classes):
    root = (minimal_root if split == "minimal" else standard_root)[0]
    kw = dict(image_size=16, cache_dir=tmp_path / "c", val_classes=val_classes, num_train_characters=6)
    train = Omniglot(root, split, "train", **kw)
    val = Omniglot(root, split, "val", **kw)
    everything = Omniglot(root, split, "train", **{**kw, "val_classes": 0})
    assert len(val.characters) == val_classes and val.num_classes == val_classes  # val is never rotated
    assert set(train.characters).isdisjoint(val.characters)
    assert set(train.characters) | set(val.characters) == set(everything.characters)
    assert Omniglot(root, split, "val", **kw).characters == val.characters  # fixed seed


def test_standard_split(standard_root, tmp_path):
    root, ids = standard_root
    kw = dict(image_size=16, cache_dir=tmp_path / "c", num_train_characters=6)
    train = Omniglot(root, "standard", "train", **kw)
    test = Omniglot(root, "standard", "test", **kw)
    assert train.num_classes == 24 and len(train.characters) == 6 and test.num_classes == 4
    assert set(train.characters).isdisjoint(test.characters)
    assert len(set(train.characters) | set(test.characters)) == 10  # background + evaluation pooled
    _check_identity(test, ids, rotated=False)
    _check_identity(train, ids, rotated=True)
    splits = {tuple(Omniglot(root, "standard", "test", seed=s, **kw).characters) for s in range(6)}
    assert len(splits) > 1  # the shuffle depends on the seed
    assert Omniglot(root, "standard", "test", seed=3, **kw).characters == \
        Omniglot(root, "standard", "test", seed=3, **kw).characters
    with pytest.raises(ValueError, match="leaves no test characters"):
        Omniglot(root, "standard", "test", image_size=16, cache_dir=tmp_path / "c", num_train_characters=10)


def test_cache_reused_and_invalidated(minimal_root, tmp_path, monkeypatch):
    root, _, _ = minimal_root
    cache = tmp_path / "cache"
    first = Omniglot(root, "minimal", "train", image_size=16, cache_dir=cache)
    files = sorted(os.listdir(cache))
    assert files == ["images_background_small1_16px.json", "images_background_small1_16px.npy"]

    def boom(*args, **kwargs):
        raise AssertionError("decoded again despite a valid cache")

    monkeypatch.setattr(imagecache, "stroke_image", boom)
    second = Omniglot(root, "minimal", "train", image_size=16, cache_dir=cache)
    np.testing.assert_array_equal(np.asarray(first.images), np.asarray(second.images))
    make_omniglot_zip(root / "images_background_small1.zip", "images_background_small1", {"A": 3, "B": 2},
                      examples=5)  # the zip changed: the cache must be rebuilt
    with pytest.raises(AssertionError, match="decoded again"):
        Omniglot(root, "minimal", "train", image_size=16, cache_dir=cache)


def test_default_cache_dir_under_root(minimal_root):
    root, _, _ = minimal_root
    Omniglot(root, "minimal", "train", image_size=16)
    assert os.path.isfile(root / "paddlefsl_cache" / "images_background_small1_16px.npy")


def test_default_cache_dir_read_only_root(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    path = imagecache.default_cache_dir(str(tmp_path / "ro"))
    assert path.startswith(str(tmp_path / "xdg" / "paddlefsl"))


@pytest.mark.parametrize("image_size", [28, 14])
def test_antialiased_resize(tmp_path, image_size):
    root = tmp_path / "r"
    root.mkdir()
    big = np.full((105, 105), 255, dtype=np.uint8)
    big[50:53, :] = 0  # a 3-pixel horizontal stroke
    with zipfile.ZipFile(root / "images_background_small1.zip", "w") as zf:
        for c in range(2):
            for e in range(2):
                zf.writestr(f"s/A/character{c + 1:02d}/x_{e}.png", png_bytes(big))
    ds = Omniglot(root, "minimal", "train", image_size=image_size, rotations=False, cache_dir=tmp_path / "c")
    img = ds[0][0]
    assert img.shape == (1, image_size, image_size)
    assert img[0, 0].max() == 0.0  # background is 0
    row = img[0, :, image_size // 2]
    assert row.max() > 0.3 and np.any((row > 0.01) & (row < 0.99))  # stroke is 1-ish, antialiased edges


def test_missing_zip_message(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        Omniglot(tmp_path, "minimal", "train")
    msg = str(info.value)
    assert "images_background_small1.zip" in msg and str(tmp_path) in msg
    assert "github" in msg and "download=True" in msg
    with pytest.raises(FileNotFoundError, match="images_evaluation.zip|images_background.zip"):
        Omniglot(tmp_path, "standard", "test")
    with pytest.raises(DatasetNotFoundError, match="all_runs.zip"):
        OmniglotOneShotRuns(tmp_path)


@pytest.mark.parametrize("content", [b"not a zip at all", b"PK\x03\x04truncated"])
def test_corrupt_zip_message(tmp_path, content):
    (tmp_path / "images_background_small1.zip").write_bytes(content)
    with pytest.raises(CorruptDatasetError, match="images_background_small1.zip.*corrupt"):
        Omniglot(tmp_path, "minimal", "train", cache_dir=tmp_path / "c")


@pytest.mark.parametrize("kwargs,match", [
    (dict(split="tiny"), "split"), (dict(mode="dev"), "mode"), (dict(mode="val"), "val_classes > 0"),
    (dict(mode="val", val_classes=5), "smaller than"),
])
def test_argument_errors(minimal_root, tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Omniglot(minimal_root[0], image_size=16, cache_dir=tmp_path / "c", **kwargs)


def test_download_verified_and_atomic(tmp_path, monkeypatch):
    source = tmp_path / "server"
    source.mkdir()
    make_omniglot_zip(source / "images_background_small1.zip", "images_background_small1", {"A": 2})
    digest = file_digests(str(source / "images_background_small1.zip"))["sha256"]
    files = {"images_background_small1.zip": {"url": (source / "images_background_small1.zip").as_uri(),
                                              "sha256": digest}}
    monkeypatch.setattr(omniglot_mod, "OMNIGLOT_FILES", files)
    root = tmp_path / "root"
    ds = Omniglot(root, "minimal", "train", image_size=16, download=True, cache_dir=tmp_path / "c")
    assert ds.num_classes == 8 and verify_file(str(root / "images_background_small1.zip"), {"sha256": digest}) is None
    files["images_background_small1.zip"]["url"] = (source / "nothing-here.zip").as_uri()
    Omniglot(root, "minimal", "train", image_size=16, download=True, cache_dir=tmp_path / "c")  # verified: no fetch

    bad_root = tmp_path / "bad"
    files["images_background_small1.zip"].update(url=(source / "images_background_small1.zip").as_uri(),
                                                  sha256="0" * 64)
    with pytest.raises(CorruptDatasetError, match="sha256 mismatch"):
        Omniglot(bad_root, "minimal", "train", image_size=16, download=True, cache_dir=tmp_path / "c")
    assert os.listdir(bad_root) == []  # neither a half-written nor an unverified file


def test_one_shot_runs_synthetic(tmp_path):
    targets = make_runs_zip(tmp_path / "all_runs.zip")
    runs = OmniglotOneShotRuns(tmp_path, image_size=16, cache_dir=tmp_path / "c")
    assert len(runs) == 2
    for run in runs.runs:
        np.testing.assert_array_equal(run["query_targets"], targets[run["name"]])
        assert run["support_images"].shape == (3, 1, 16, 16)
        for q, t in zip(run["query_images"], run["query_targets"]):
            assert decode_glyph(q)[0] == decode_glyph(run["support_images"][t])[0]

    def nearest(support, query):
        return paddle.to_tensor(np.argmax(query[:, 0, 0, :], axis=1))  # reads the class pixel

    assert runs.evaluate_one_shot_runs(nearest) == 0.0
    expected = np.mean([t != 0 for r in runs.runs for t in r["query_targets"]])
    assert evaluate_one_shot_runs(runs, lambda s, q: np.zeros(len(q), int)) == pytest.approx(expected)
    with pytest.raises(ValueError, match="predictions for"):
        runs.evaluate_one_shot_runs(lambda s, q: [0])
    with pytest.raises(ValueError, match="support indices"):
        runs.evaluate_one_shot_runs(lambda s, q: np.full(len(q), 7))


# ----------------------------------------------------------------------------- real shared zips


@pytest.fixture(scope="session")
def real_minimal(real_omniglot_cache):
    root = os.path.dirname(real_file("omniglot", "images_background_small1.zip"))
    real_file("omniglot", "images_background_small2.zip")
    return {mode: Omniglot(root, "minimal", mode, cache_dir=real_omniglot_cache) for mode in ("train", "test")}


@pytest.mark.parametrize("name", ["images_background_small1.zip", "images_background_small2.zip", "all_runs.zip"])
def test_real_zip_checksums(name):
    path = real_file("omniglot", name)
    assert verify_file(path, omniglot_mod.OMNIGLOT_FILES[name]) is None


def test_real_minimal_split(real_minimal):
    train, test = real_minimal["train"], real_minimal["test"]
    assert train.num_classes == 544 and len(train) == 544 * 20
    assert np.array_equal(np.bincount(train.labels), np.full(544, 20))
    assert {c.split("/")[0] for c in train.characters} == {"Balinese", "Early_Aramaic", "Greek", "Korean", "Latin"}
    assert {c.split("/")[0] for c in test.characters} == {"Japanese_(katakana)", "Sanskrit", "Tagalog"}
    assert test.num_classes == 106 and len(test) == 106 * 20
    sample = np.asarray(test.images[:50])
    assert sample.dtype == np.float32 and sample.shape == (50, 1, 28, 28)
    assert 0.0 <= sample.min() and sample.max() <= 1.0 and 0.02 < sample.mean() < 0.4  # sparse strokes


def test_real_minimal_episodes(real_minimal):
    train = real_minimal["train"]
    sampler = EpisodeSampler(train.labels, ways=5, shots=1, queries=5, seed=0)
    for _ in range(3):
        task = sampler.sample()
        xs, ys, xq, yq = make_task(train.images, train.labels, task)
        assert xs.shape == (5, 1, 28, 28) and xq.shape == (25, 1, 28, 28)
        for i, idx in enumerate(task.support_indices):
            np.testing.assert_array_equal(xs[i], train[int(idx)][0])


def test_real_one_shot_runs(real_omniglot_cache):
    root = os.path.dirname(real_file("omniglot", "all_runs.zip"))
    runs = OmniglotOneShotRuns(root, cache_dir=real_omniglot_cache)
    assert len(runs) == 20
    for run in runs.runs:
        assert run["support_images"].shape == (20, 1, 28, 28) and run["query_images"].shape == (20, 1, 28, 28)
        assert sorted(run["query_targets"].tolist()) == list(range(20))  # each class queried once
    assert runs.runs[0]["query_targets"][0] == 7  # run01/test/item01.png -> run01/training/class08.png
    oracle = iter([r["query_targets"] for r in runs.runs])
    assert runs.evaluate_one_shot_runs(lambda s, q: next(oracle)) == 0.0

    def pixel_nn(support, query):
        d = ((query.reshape(20, 1, -1) - support.reshape(1, 20, -1)) ** 2).sum(-1)
        return d.argmin(1)

    err = runs.evaluate_one_shot_runs(pixel_nn)
    assert 0.5 < err < 0.95  # pixel nearest neighbour is far better than chance (0.95) but poor
