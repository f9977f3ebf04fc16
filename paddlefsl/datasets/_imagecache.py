"""Decode the PNG images of a zip archive once and cache the result as ``.npy`` + ``.json``."""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zipfile
from typing import Callable, List, Optional, Tuple

import numpy as np

from .errors import CorruptDatasetError, DatasetNotFoundError

_CACHE_VERSION = 1


def default_cache_dir(root: str) -> str:
    """``<root>/paddlefsl_cache`` if writable, else a per-root folder under the user cache."""
    candidate = os.path.join(root, "paddlefsl_cache")
    probe = candidate if os.path.isdir(candidate) else root
    if os.path.isdir(probe) and os.access(probe, os.W_OK):
        return candidate
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    tag = hashlib.sha1(os.path.abspath(root).encode()).hexdigest()[:12]
    return os.path.join(base, "paddlefsl", tag)


def stroke_image(data: bytes, image_size: Optional[int]) -> np.ndarray:
    """Decode a black-on-white PNG to float32 ``[1, S, S]`` with 1 = stroke (antialiased resize)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("L")
        if image_size is not None and img.size != (image_size, image_size):
            img = img.resize((image_size, image_size), Image.Resampling.LANCZOS)
        arr = np.asarray(img, dtype=np.float32)
    return (1.0 - arr / 255.0)[None]


def _atomic_write(path: str, writer: Callable[[object], None], mode: str = "wb") -> None:
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            writer(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def decode_zip_images(zip_path: str, image_size: Optional[int], cache_dir: Optional[str],
                      how_to_get: str) -> Tuple[np.ndarray, List[str]]:
    """Decode every ``.png`` of a zip (sorted by member name), using a cache when possible.

    Args:
        zip_path: The archive.
        image_size: Output side length (None keeps the original size, which must be uniform).
        cache_dir: Folder for the cache files (None disables caching).
        how_to_get: Sentence appended to error messages explaining how to obtain the file.

    Returns:
        ``(images, names)``: float32 ``[N, 1, S, S]`` in [0, 1] (1 = stroke) and the member names.

    Raises:
        DatasetNotFoundError: If the zip does not exist.
        CorruptDatasetError: If it cannot be read or decoded.
    """
    if not os.path.isfile(zip_path):
        raise DatasetNotFoundError(f"{os.path.basename(zip_path)} not found: expected it at "
                                   f"{os.path.abspath(zip_path)}. {how_to_get}")
    stat = os.stat(zip_path)
    key = {"version": _CACHE_VERSION, "zip": os.path.basename(zip_path), "zip_size": stat.st_size,
           "zip_mtime_ns": stat.st_mtime_ns, "image_size": image_size}
    stem = f"{os.path.splitext(os.path.basename(zip_path))[0]}_{image_size or 'orig'}px"
    if cache_dir is not None:
        npy_path = os.path.join(cache_dir, stem + ".npy")
        meta_path = os.path.join(cache_dir, stem + ".json")
        if os.path.isfile(meta_path) and os.path.isfile(npy_path):
            try:
                with open(meta_path, encoding="utf-8") as f:
                    meta = json.load(f)
                if meta.get("key") == key:
                    images = np.load(npy_path)
                    if images.shape[0] == len(meta["names"]):
                        return images, list(meta["names"])
            except (OSError, ValueError, KeyError):
                pass  # unreadable cache: decode again
    try:
        with zipfile.ZipFile(zip_path) as zf:
            names = sorted(n for n in zf.namelist() if n.lower().endswith(".png"))
            if not names:
                raise CorruptDatasetError(f"{zip_path} contains no .png images. {how_to_get}")
            images = np.stack([stroke_image(zf.read(n), image_size) for n in names])
    except CorruptDatasetError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as err:
        raise CorruptDatasetError(f"{zip_path} is corrupt or unreadable ({err}). Delete it; {how_to_get}") from err
    if cache_dir is not None:
        os.makedirs(cache_dir, exist_ok=True)
        _atomic_write(npy_path, lambda f: np.save(f, images))
        _atomic_write(meta_path, lambda f: json.dump({"key": key, "names": names}, f), mode="w")
    return images, names
