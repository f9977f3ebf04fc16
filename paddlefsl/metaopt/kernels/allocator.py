"""Reuse of freed memory: the C allocator keeps large freed blocks instead of returning them to the system.

Paddle's CPU kernels allocate every output with ``malloc``. glibc serves blocks above its mmap threshold (128 KiB,
raised dynamically to at most 32 MiB) with a fresh ``mmap`` and unmaps them on ``free``, so each large output
page-faults all its pages again and the kernel zeroes them: on a ``[75, 32, 84, 84]`` float32 tensor (68 MiB) a
ReLU takes 44 ms and ``zeros_like`` 39 ms this way, 11 ms and 8 ms when the memory is reused. Meta-learning
allocates and frees tensors of the same few shapes thousands of times per meta-iteration, so this is worth up to
a third of an iteration (``docs/speed.md``).

When the first task learner (any lease on the exact scope) is made, and the reuse is on, the thresholds are raised
with ``mallopt``: blocks up to `MMAP_THRESHOLD` come from the heap and up to `TRIM_THRESHOLD` of free memory stays
at its top. The cost is resident memory: freed blocks stay mapped (on W2 second order the peak RSS grows by about
30%). Nothing is changed where glibc is not the C library, or where the process already sets glibc's malloc
thresholds (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_`` or ``glibc.malloc``
tunables in ``GLIBC_TUNABLES``). ``PADDLEFSL_REUSE_MEMORY=0`` or `set_memory_reuse` turn it off.

Example:
    >>> from paddlefsl.metaopt import set_memory_reuse
    >>> previous = set_memory_reuse(False)   # keep glibc's own thresholds
    >>> _ = set_memory_reuse(previous)
"""
from __future__ import annotations

import ctypes
import os
import sys
import threading

__all__ = ["ENV", "MMAP_THRESHOLD", "TRIM_THRESHOLD", "memory_reuse_enabled", "memory_reuse_applied",
           "set_memory_reuse", "apply_memory_reuse"]

ENV = "PADDLEFSL_REUSE_MEMORY"
MMAP_THRESHOLD = 1 << 30
"""Blocks up to this many bytes are served from the heap (and reused) instead of a fresh ``mmap``."""
TRIM_THRESHOLD = 1 << 30
"""Up to this many bytes of free memory at the top of the heap are kept instead of being returned."""

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_GLIBC_DEFAULT = 128 * 1024
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")

_enabled = os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")
_applied = False
_lock = threading.Lock()


def _libc():
    """glibc's ``mallopt`` and ``malloc_trim``, or ``None`` where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
        return libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


def _user_tuned() -> bool:
    return any(name in os.environ for name in _USER_SETTINGS) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "")


def memory_reuse_enabled() -> bool:
    """Whether the allocator's thresholds may be raised (the switch only)."""
    return _enabled


def memory_reuse_applied() -> bool:
    """Whether the thresholds are raised now in this process."""
    return _applied


def apply_memory_reuse() -> bool:
    """Raise the allocator's thresholds once, if the reuse is on and the process allows it (the exact scope calls
    this when its first lease is taken).

    Returns:
        Whether the thresholds are raised after the call.
    """
    global _applied
    with _lock:
        if _applied or not _enabled or _user_tuned():
            return _applied
        calls = _libc()
        if calls is None:
            return False
        mallopt, _ = calls
        _applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD,
                                                                                    TRIM_THRESHOLD))
        return _applied


def set_memory_reuse(enabled: bool) -> bool:
    """Turn the reuse of freed memory on or off for the whole process; returns the previous setting.

    Turned on, the thresholds are raised when the next task learner is made. Turned off after they were raised,
    glibc's initial thresholds (128 KiB) are set again and the free memory is returned to the system. Gradients
    are the same either way; only speed and resident memory change.

    Args:
        enabled: ``True`` to let freed memory be reused, ``False`` for glibc's own thresholds.

    Returns:
        The previous setting.

    Raises:
        TypeError: if ``enabled`` is not a bool.

    Example:
        >>> previous = set_memory_reuse(False)
        >>> memory_reuse_applied()
        False
        >>> _ = set_memory_reuse(previous)
    """
    global _enabled, _applied
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be True or False, got {type(enabled).__name__} {enabled!r}")
    with _lock:
        previous, _enabled = _enabled, enabled
        if not enabled and _applied:
            calls = _libc()
            if calls is not None:
                mallopt, malloc_trim = calls
                mallopt(_M_MMAP_THRESHOLD, _GLIBC_DEFAULT)
                mallopt(_M_TRIM_THRESHOLD, _GLIBC_DEFAULT)
                malloc_trim(0)
            _applied = False
    return previous
