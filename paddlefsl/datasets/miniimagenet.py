"""miniImageNet with the Ravi & Larochelle (2017) class split."""
from __future__ import annotations

import csv
import os
import pickle
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from .errors import CorruptDatasetError, DatasetNotFoundError
from .labelled import LabelledImages

__all__ = ["MiniImageNet", "IMAGENET_MEAN", "IMAGENET_STD", "NormalizedImages"]

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

_HOW_TO_GET = ("miniImageNet is not redistributable; build it from ILSVRC-2012 with the Ravi & Larochelle split "
               "files (train.csv/val.csv/test.csv + images/), or use the common pickle files "
               "mini-imagenet-cache-{train,val,test}.pkl.")


def _resize_rgb(image: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    if image.shape[0] == size and image.shape[1] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))


class NormalizedImages:
    """Array-like ``[N, 3, S, S]`` float32 view: loads uint8 HWC images, resizes, ImageNet-normalizes.

    Supports integer, slice and integer-array indexing (``supports_fancy_indexing``), so it can
    be passed to `paddlefsl.episodes.make_task()` without decoding the whole dataset.
    """

    supports_fancy_indexing = True

    def __init__(self, count: int, load: Callable[[int], np.ndarray], image_size: int) -> None:
        self._count, self._load, self.image_size = count, load, image_size

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        """Shape of the full view."""
        return (self._count, 3, self.image_size, self.image_size)

    def __len__(self) -> int:
        return self._count

    def _one(self, i: int) -> np.ndarray:
        img = _resize_rgb(self._load(int(i)), self.image_size).astype(np.float32) / 255.0
        return ((img - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1).astype(np.float32)

    def __getitem__(self, item: Any) -> np.ndarray:
        if isinstance(item, (int, np.integer)):
            if not -self._count <= item < self._count:
                raise IndexError(f"index {item} out of range for {self._count} images")
            return self._one(int(item) % self._count)
        idx = np.arange(self._count)[item]
        if len(idx) == 0:
            return np.zeros((0,) + self.shape[1:], dtype=np.float32)
        return np.stack([self._one(i) for i in idx])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        arr = self[:]
        return arr if dtype is None else arr.astype(dtype)


class MiniImageNet(LabelledImages):
    """miniImageNet (64/16/20 classes for train/val/test in the standard split).

    Two on-disk layouts are accepted (checked in this order):

    * ``<root>/mini-imagenet-cache-<mode>.pkl``: a pickle dict with ``image_data`` (uint8
      ``[N, 84, 84, 3]``) and ``class_dict`` (``{class_name: [indices]}``). Loaded fully in memory.
      Only load pickles you trust.
    * ``<root>/<mode>.csv`` (header ``filename,label``) and ``<root>/images/<filename>``; images are
      decoded lazily on access.

    Class names are sorted and numbered ``0..C-1``. Items are ``(image, label)`` with ``image``
    float32 ``[3, S, S]`` normalized with the ImageNet mean/std.

    Args:
        root: Dataset folder.
        mode: ``"train"``, ``"val"`` or ``"test"``.
        image_size: Output side length (bilinear resize when it differs from the stored size).
        transform: Optional callable applied to each normalized image.

    Attributes:
        images: `NormalizedImages` view ``[N, 3, S, S]``.
        labels: int64 ``[N]``.
        class_names: Class (WordNet id) of each label.
    """

    def __init__(self, root: str, mode: str = "train", image_size: int = 84,
                 transform: Optional[Callable[[np.ndarray], Any]] = None) -> None:
        super().__init__()
        if mode not in ("train", "val", "test"):
            raise ValueError(f"mode must be 'train', 'val' or 'test', got {mode!r}")
        self.root, self.mode, self.image_size, self.transform = os.fspath(root), mode, int(image_size), transform
        pkl = os.path.join(self.root, f"mini-imagenet-cache-{mode}.pkl")
        csv_path = os.path.join(self.root, f"{mode}.csv")
        if os.path.isfile(pkl):
            self.layout = "pickle"
            count, load = self._from_pickle(pkl)
        elif os.path.isfile(csv_path):
            self.layout = "csv"
            count, load = self._from_csv(csv_path)
        else:
            raise DatasetNotFoundError(f"miniImageNet {mode} split not found: expected {pkl} or {csv_path} "
                                       f"(with {os.path.join(self.root, 'images')}/). {_HOW_TO_GET}")
        self.images = NormalizedImages(count, load, self.image_size)

    def _from_pickle(self, path: str) -> Tuple[int, Callable[[int], np.ndarray]]:
        try:
            with open(path, "rb") as f:
                data = pickle.load(f)
            image_data = np.asarray(data["image_data"])
            class_dict: Dict[str, List[int]] = data["class_dict"]
        except (pickle.UnpicklingError, EOFError, KeyError, TypeError, AttributeError) as err:
            raise CorruptDatasetError(f"{path} is not a valid miniImageNet pickle ({err}). {_HOW_TO_GET}") from err
        if image_data.ndim != 4 or image_data.shape[-1] != 3 or image_data.dtype != np.uint8:
            raise CorruptDatasetError(f"{path}: image_data must be uint8 [N, H, W, 3], got "
                                      f"{image_data.dtype} {image_data.shape}")
        self.class_names = sorted(class_dict)
        labels = np.full(len(image_data), -1, dtype=np.int64)
        for label, name in enumerate(self.class_names):
            labels[np.asarray(class_dict[name], dtype=np.int64)] = label
        if (labels < 0).any():
            raise CorruptDatasetError(f"{path}: {(labels < 0).sum()} images belong to no class in class_dict")
        self.labels = labels
        self._raw = image_data
        return len(image_data), lambda i: image_data[i]

    def _from_csv(self, path: str) -> Tuple[int, Callable[[int], np.ndarray]]:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.reader(f) if r]
        if rows and [c.strip().lower() for c in rows[0][:2]] == ["filename", "label"]:
            rows = rows[1:]
        if not rows or any(len(r) < 2 for r in rows):
            raise CorruptDatasetError(f"{path} must contain 'filename,label' rows")
        files = [r[0].strip() for r in rows]
        names = [r[1].strip() for r in rows]
        self.class_names = sorted(set(names))
        lookup = {n: i for i, n in enumerate(self.class_names)}
        self.labels = np.array([lookup[n] for n in names], dtype=np.int64)
        folder = os.path.join(self.root, "images")
        missing = next((f for f in files if not os.path.isfile(os.path.join(folder, f))), None)
        if missing is not None:
            raise DatasetNotFoundError(f"miniImageNet image {missing} listed in {path} not found in {folder}. "
                                       f"{_HOW_TO_GET}")
        self._files = [os.path.join(folder, f) for f in files]

        def load(i: int) -> np.ndarray:
            from PIL import Image

            with Image.open(self._files[i]) as img:
                return np.asarray(img.convert("RGB"))

        return len(files), load
