"""Omniglot (Lake et al., 2015) for few-shot classification, read from the official zips."""
from __future__ import annotations

import os
import posixpath
import zipfile
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ._imagecache import decode_zip_images, default_cache_dir
from .download import download_file, verify_file
from .errors import CorruptDatasetError, DatasetNotFoundError
from .labelled import LabelledImages

__all__ = ["Omniglot", "OmniglotOneShotRuns", "evaluate_one_shot_runs", "RotatedImages", "OMNIGLOT_FILES"]

_BASE = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"

#: Official files with their URLs and checksums. The sha256 of the two full zips is not published
#: upstream; they are checked with torchvision's MD5 and the Git blob id of the upstream repository.
OMNIGLOT_FILES: Dict[str, Dict[str, str]] = {
    "images_background.zip": {"url": _BASE + "images_background.zip",
                              "md5": "68d2efa1b9178cc56df9314c21c6e718",
                              "git_blob_sha1": "71fd167eb6fdd312049395fbd247147a4b234231"},
    "images_evaluation.zip": {"url": _BASE + "images_evaluation.zip",
                              "md5": "6b91aef0f799c5bb55b94e3f2daec811",
                              "git_blob_sha1": "8ccde0ed1565641f1fa8c57cdc6ff634e15fc5c1"},
    "images_background_small1.zip": {
        "url": _BASE + "images_background_small1.zip",
        "sha256": "f38eb80f801274ac2b4dff5b24289016bfaba4a7d5bb50deebf27104ad6cb8a4",
        "md5": "e704a628b5459e08445c13499850abc4",
        "git_blob_sha1": "9f7a8841ab7aa328da78606307b624eeec5ba0a1"},
    "images_background_small2.zip": {
        "url": _BASE + "images_background_small2.zip",
        "sha256": "3ccaa407515a8778e5d0861875af38b17e418f301ad5bb3b5a6b65d901a41c7f",
        "md5": "b75a71a51d3b13f821f212756fe481fd",
        "git_blob_sha1": "8352587b51522d3881049c0c6452ccf865445341"},
    "all_runs.zip": {
        "url": _BASE + "one-shot-classification/all_runs.zip",
        "sha256": "437c1eeab0af8484112e1b4cc0f3d541ec727f7c47b9b202da738af9dfd6c325",
        "md5": "e8996daecdf12afeeb4a53a179f06b19",
        "git_blob_sha1": "3c49ffe2485e59b4852feb28ca9a12315d6a4ca4"},
}

_SPLIT_FILES = {"minimal": ("images_background_small1.zip", "images_background_small2.zip"),
                "standard": ("images_background.zip", "images_evaluation.zip")}


def _how_to_get(name: str, root: str) -> str:
    return (f"Download it from {OMNIGLOT_FILES[name]['url']} into {os.path.abspath(root)} "
            f"or pass download=True.")


def _ensure_file(root: str, name: str, download: bool) -> str:
    path = os.path.join(root, name)
    if download:
        if os.path.isfile(path) and verify_file(path, OMNIGLOT_FILES[name]) is None:
            return path
        download_file(OMNIGLOT_FILES[name]["url"], path, OMNIGLOT_FILES[name])
    if not os.path.isfile(path):
        raise DatasetNotFoundError(f"Omniglot file {name} not found: expected it at {os.path.abspath(path)}. "
                                   f"{_how_to_get(name, root)}")
    return path


class RotatedImages:
    """Read-only array view ``[M, 1, H, W]`` whose item ``i`` is ``base[index[i]]`` rotated by ``rot[i]*90`` degrees.

    Supports integer, slice and integer-array indexing (as used by
    `paddlefsl.episodes.make_task()`) without materializing every rotated copy.
    """

    supports_fancy_indexing = True

    def __init__(self, base: np.ndarray, index: np.ndarray, rot: np.ndarray) -> None:
        self.base, self.index, self.rot = base, np.asarray(index, np.int64), np.asarray(rot, np.int64)

    @property
    def shape(self) -> Tuple[int, ...]:
        """Shape of the full view."""
        return (len(self.index),) + tuple(self.base.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        """Element type."""
        return self.base.dtype

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: Any) -> np.ndarray:
        if isinstance(item, (int, np.integer)):
            return np.ascontiguousarray(np.rot90(self.base[self.index[item]], int(self.rot[item]), axes=(1, 2)))
        idx = np.arange(len(self))[item]
        out = self.base[self.index[idx]]
        rot = self.rot[idx]
        for k in (1, 2, 3):
            sel = rot == k
            if sel.any():
                out[sel] = np.rot90(out[sel], k, axes=(2, 3))
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        arr = self[:]
        return arr if dtype is None else arr.astype(dtype)


def _characters(names: Sequence[str]) -> Tuple[List[Tuple[str, str]], np.ndarray]:
    """Map member names ``.../alphabet/character/file.png`` to sorted character keys and per-image ids."""
    keys = []
    for name in names:
        parts = name.split("/")
        if len(parts) < 3:
            raise CorruptDatasetError(f"unexpected Omniglot member {name!r} (need alphabet/character/file.png)")
        keys.append((parts[-3], parts[-2]))
    chars = sorted(set(keys))
    lookup = {c: i for i, c in enumerate(chars)}
    return chars, np.array([lookup[k] for k in keys], dtype=np.int64)


class Omniglot(LabelledImages):
    """Omniglot characters as classes, decoded once and cached as ``.npy``.

    Splits:

    * ``"minimal"`` (``images_background_small1.zip`` / ``small2.zip``): train = all characters of
      small1 (136; x4 rotations = 544 classes) minus ``val_classes`` held-back characters (``val``);
      test = characters of small2 whose alphabet is not in small1 (106 characters).
    * ``"standard"`` (``images_background.zip`` + ``images_evaluation.zip``, as in MAML): the 1623
      characters are pooled, sorted, shuffled with ``seed``; the first ``num_train_characters``
      (1200) are meta-train (minus ``val_classes`` held back for ``val``), the rest (423) test.

    In ``train`` mode with ``rotations=True`` each character gives four classes (0/90/180/270 degree
    rotations); label ``4*c + r``. ``val``/``test`` are never rotated.

    Items are ``(image, label)`` with ``image`` float32 ``[1, S, S]`` in [0, 1] (1 = stroke).

    Args:
        root: Folder holding the zips.
        split: ``"minimal"`` or ``"standard"``.
        mode: ``"train"``, ``"val"`` or ``"test"``.
        image_size: Side length after antialiased (Lanczos) resizing; None keeps 105.
        rotations: Add rotated classes in train mode.
        download: Fetch missing zips from the official GitHub repository (checksummed).
        val_classes: Characters held back from the meta-train characters for ``val``.
        num_train_characters: Meta-train characters of the standard split.
        seed: Seed of the character shuffle/hold-out (fixed, so splits are reproducible).
        cache_dir: Cache folder (default ``<root>/paddlefsl_cache``, or the user cache if root is read-only).
        transform: Optional callable applied to each image in ``__getitem__``.

    Attributes:
        images: Array-like ``[N, 1, S, S]`` float32 (a `RotatedImages` view when rotated).
        labels: int64 ``[N]``.
        class_names: ``"alphabet/character"`` (+ ``"/rot90"`` etc.) for every label.
    """

    def __init__(self, root: str, split: str = "minimal", mode: str = "train", image_size: Optional[int] = 28,
                 rotations: bool = True, download: bool = False, val_classes: int = 0,
                 num_train_characters: int = 1200, seed: int = 0, cache_dir: Optional[str] = None,
                 transform: Optional[Callable[[np.ndarray], Any]] = None) -> None:
        super().__init__()
        if split not in _SPLIT_FILES:
            raise ValueError(f"split must be 'minimal' or 'standard', got {split!r}")
        if mode not in ("train", "val", "test"):
            raise ValueError(f"mode must be 'train', 'val' or 'test', got {mode!r}")
        if mode == "val" and val_classes <= 0:
            raise ValueError("mode='val' needs val_classes > 0 characters held back from meta-train")
        self.root, self.split, self.mode, self.transform = os.fspath(root), split, mode, transform
        cache_dir = default_cache_dir(self.root) if cache_dir is None else os.fspath(cache_dir)
        first, second = _SPLIT_FILES[split]
        need = (first,) if split == "minimal" and mode != "test" else (first, second)
        decoded = []
        for name in need:
            path = _ensure_file(self.root, name, download)
            decoded.append(decode_zip_images(path, image_size, cache_dir, _how_to_get(name, self.root)))

        if split == "minimal":
            images, names = decoded[-1]
            chars, char_of = _characters(names)
            if mode == "test":
                train_alphabets = {c[0] for c in _characters(decoded[0][1])[0]}
                selected = [i for i, c in enumerate(chars) if c[0] not in train_alphabets]
            else:
                selected = self._train_or_val(list(range(len(chars))), val_classes, seed, mode)
        else:
            images = np.concatenate([d[0] for d in decoded])
            names = decoded[0][1] + decoded[1][1]
            chars, char_of = _characters(names)
            if len(chars) <= num_train_characters:
                raise ValueError(f"num_train_characters={num_train_characters} leaves no test characters "
                                 f"(only {len(chars)} characters)")
            order = np.random.default_rng(seed).permutation(len(chars))
            pool = sorted(order[:num_train_characters].tolist())
            if mode == "test":
                selected = sorted(order[num_train_characters:].tolist())
            else:
                selected = self._train_or_val(pool, val_classes, seed, mode)

        base_index, char_label = [], []
        for new, c in enumerate(selected):
            members = np.flatnonzero(char_of == c)
            base_index.append(members)
            char_label.append(np.full(len(members), new, dtype=np.int64))
        base_index = np.concatenate(base_index)
        char_label = np.concatenate(char_label)
        self.characters = [f"{chars[c][0]}/{chars[c][1]}" for c in selected]
        if mode == "train" and rotations:
            n = len(base_index)
            self.images = RotatedImages(images, np.tile(base_index, 4), np.repeat(np.arange(4), n))
            rot = np.repeat(np.arange(4), n)
            self.labels = np.tile(char_label, 4) * 4 + rot
            self.class_names = [f"{c}{'' if r == 0 else f'/rot{90 * r}'}" for c in self.characters for r in range(4)]
        else:
            self.images = images[base_index]
            self.labels = char_label
            self.class_names = list(self.characters)
        self.labels = self.labels.astype(np.int64)

    @staticmethod
    def _train_or_val(pool: List[int], val_classes: int, seed: int, mode: str) -> List[int]:
        if val_classes >= len(pool):
            raise ValueError(f"val_classes={val_classes} must be smaller than the {len(pool)} meta-train characters")
        if val_classes <= 0:
            return pool
        held = set(np.random.default_rng(seed + 1).permutation(pool)[:val_classes].tolist())
        return sorted(c for c in pool if (c in held) == (mode == "val"))


class OmniglotOneShotRuns:
    """The 20 one-shot classification runs of Lake et al. (``all_runs.zip``).

    Each run has 20 training images (one per class, ``classNN.png``) and 20 test images
    (``itemNN.png``); ``class_labels.txt`` gives the correct training image of each test image.

    Args:
        root: Folder holding ``all_runs.zip``.
        image_size: Side length after resizing (None keeps 105).
        download: Fetch the zip if missing (checksummed).
        cache_dir: Cache folder (see `Omniglot`).

    Attributes:
        runs: List of dicts with ``support_images`` ``[20, 1, S, S]``, ``query_images`` ``[20, 1, S, S]``
            and ``query_targets`` ``[20]`` (index into the support images).
    """

    def __init__(self, root: str, image_size: Optional[int] = 28, download: bool = False,
                 cache_dir: Optional[str] = None) -> None:
        root = os.fspath(root)
        name = "all_runs.zip"
        path = _ensure_file(root, name, download)
        cache_dir = default_cache_dir(root) if cache_dir is None else os.fspath(cache_dir)
        images, names = decode_zip_images(path, image_size, cache_dir, _how_to_get(name, root))
        position = {n: i for i, n in enumerate(names)}
        try:
            with zipfile.ZipFile(path) as zf:
                label_files = sorted(n for n in zf.namelist() if n.endswith("class_labels.txt"))
                texts = {n: zf.read(n).decode("utf-8") for n in label_files}
        except zipfile.BadZipFile as err:
            raise CorruptDatasetError(f"{path} is corrupt ({err}). {_how_to_get(name, root)}") from err
        if not label_files:
            raise CorruptDatasetError(f"{path} has no class_labels.txt. {_how_to_get(name, root)}")
        self.runs: List[Dict[str, np.ndarray]] = []
        for label_file in label_files:
            folder = posixpath.dirname(label_file)
            prefix = folder + "/" if folder else ""
            train = sorted(n for n in names if n.startswith(prefix + "training/"))
            pairs = [line.split() for line in texts[label_file].splitlines() if line.strip()]
            try:
                pairs = sorted((prefix + posixpath.basename(posixpath.dirname(q)) + "/" + posixpath.basename(q),
                                prefix + "training/" + posixpath.basename(s)) for q, s in pairs)
                targets = np.array([train.index(s) for _, s in pairs], dtype=np.int64)
                queries = [position[q] for q, _ in pairs]
            except (ValueError, KeyError) as err:
                raise CorruptDatasetError(f"{label_file} in {path} does not match the run's images ({err})") from err
            self.runs.append({"name": folder, "support_images": images[[position[s] for s in train]],
                              "query_images": images[queries], "query_targets": targets})

    def __len__(self) -> int:
        return len(self.runs)

    def evaluate_one_shot_runs(self, predict_fn: Callable[[np.ndarray, np.ndarray], Any]) -> float:
        """Error rate of ``predict_fn`` over all runs (see `evaluate_one_shot_runs()`)."""
        return evaluate_one_shot_runs(self, predict_fn)


def evaluate_one_shot_runs(runs: OmniglotOneShotRuns,
                           predict_fn: Callable[[np.ndarray, np.ndarray], Any]) -> float:
    """Error rate of a one-shot classifier on Lake et al.'s 20 runs.

    Args:
        runs: An `OmniglotOneShotRuns`.
        predict_fn: ``predict_fn(support_images, query_images)`` with numpy arrays ``[20, 1, S, S]``;
            returns the predicted support index for every query (array-like or tensor of 20 ints).

    Returns:
        Fraction of misclassified query images over all runs (0 = perfect).

    Raises:
        ValueError: If ``predict_fn`` returns the wrong number of predictions or out-of-range indices.
    """
    errors, total = 0, 0
    for run in runs.runs:
        pred = predict_fn(run["support_images"], run["query_images"])
        if hasattr(pred, "numpy"):
            pred = pred.numpy()
        pred = np.asarray(pred).reshape(-1)
        n_support = len(run["support_images"])
        if pred.shape != run["query_targets"].shape:
            raise ValueError(f"predict_fn returned {pred.shape[0]} predictions for {len(run['query_targets'])} queries")
        if pred.min() < 0 or pred.max() >= n_support:
            raise ValueError(f"predictions must be support indices in [0, {n_support})")
        errors += int((pred.astype(np.int64) != run["query_targets"]).sum())
        total += len(pred)
    return errors / total
