"""Checksummed, atomic file downloads with a progress bar."""
from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from typing import Dict, Optional

from .errors import CorruptDatasetError, DownloadError

__all__ = ["file_digests", "verify_file", "download_file"]

# What a failed transfer raises: no network, name resolution, refused or reset connections, HTTP errors, timeouts.
_TRANSFER_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError)

_ALGOS = ("sha256", "md5", "git_blob_sha1")


def file_digests(path: str, algos=_ALGOS) -> Dict[str, str]:
    """Hex digests of a file: ``sha256``, ``md5`` and/or ``git_blob_sha1`` (Git's blob object id)."""
    size = os.path.getsize(path)
    hashers = {}
    for algo in algos:
        if algo == "git_blob_sha1":
            h = hashlib.sha1()
            h.update(b"blob %d\0" % size)
            hashers[algo] = h
        else:
            hashers[algo] = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            for h in hashers.values():
                h.update(chunk)
    return {algo: h.hexdigest() for algo, h in hashers.items()}


def verify_file(path: str, checksums: Dict[str, str]) -> Optional[str]:
    """Check a file against the known digests in ``checksums``.

    Returns:
        None if every known digest matches, else a message describing the first mismatch.
    """
    known = {k: v.lower() for k, v in checksums.items() if k in _ALGOS and v}
    if not known:
        return None
    got = file_digests(path, tuple(known))
    for algo, expected in known.items():
        if got[algo] != expected:
            return f"{algo} mismatch: expected {expected}, got {got[algo]}"
    return None


def download_file(url: str, dest: str, checksums: Optional[Dict[str, str]] = None,
                  progress: bool = True, timeout: float = 60.0) -> str:
    """Download ``url`` to ``dest`` through a temporary file, verify it, then rename it into place.

    ``dest`` therefore never holds a partial or unverified file.

    Args:
        url: Source URL (``https://`` or ``file://``).
        dest: Destination path; its folder is created.
        checksums: Expected digests (keys ``sha256``, ``md5``, ``git_blob_sha1``).
        progress: Show a tqdm progress bar.
        timeout: Socket timeout in seconds.

    Returns:
        ``dest``.

    Raises:
        DownloadError: If the transfer fails (offline, unreachable host, HTTP error, timeout); the message names
            the URL, the file and how to place it by hand. Nothing is written to ``dest``.
        CorruptDatasetError: If the downloaded file fails a checksum (nothing is written to ``dest``).
        OSError: On file-system errors (nothing is written to ``dest``).
    """
    from tqdm.auto import tqdm

    dest = os.fspath(dest)
    folder = os.path.dirname(os.path.abspath(dest))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(dest) + ".", suffix=".part", dir=folder)
    try:
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                total = resp.headers.get("Content-Length")
                with tqdm(total=int(total) if total else None, unit="B", unit_scale=True, unit_divisor=1024,
                          desc=os.path.basename(dest), disable=not progress) as bar:
                    for chunk in iter(lambda: resp.read(1 << 16), b""):
                        out.write(chunk)
                        bar.update(len(chunk))
        except _TRANSFER_ERRORS as err:
            reason = getattr(err, "reason", None) or err
            raise DownloadError(
                f"could not download {os.path.basename(dest)} from {url}: {reason}. If this machine is offline, "
                f"fetch that URL on one that is not and place the file at {os.path.abspath(dest)} by hand (it is "
                f"checked against its checksum before use); then run again.") from err
        problem = verify_file(tmp, checksums or {})
        if problem:
            raise CorruptDatasetError(f"download of {url} failed its checksum ({problem}); "
                                      f"nothing was written to {dest}")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest
