"""Reuse of freed memory: the switch (function and environment variable), when the thresholds are raised, and
that a large block then comes from the heap instead of a fresh ``mmap`` (read from glibc's ``mallinfo2``)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from paddlefsl.metaopt import memory_reuse_applied, memory_reuse_enabled, set_memory_reuse
from paddlefsl.metaopt.kernels import allocator

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
glibc = pytest.mark.skipif(allocator._libc() is None, reason="the C library is not glibc")

# Prints, after a MAML task learner is made: whether reuse was applied, and the bytes glibc serves by mmap while
# a 64 MiB tensor is alive (mallinfo2: hblkhd).
_PROBE = """
import ctypes, paddle
from paddle import nn
import paddlefsl.metaopt as m
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                              "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None); libc.mallinfo2.restype = Info
task = m.MAML(nn.Linear(3, 2), 0.1).clone()
big = paddle.zeros([16, 1024, 1024], dtype="float32")
print(m.memory_reuse_applied(), libc.mallinfo2().hblkhd >= 64 * 2 ** 20)
"""


def _probe(**env_changes) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in (allocator.ENV,) + allocator._USER_SETTINGS}
    env.update(env_changes)
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True, cwd=ROOT)
    return out.stdout.split()[-2:]


@glibc
def test_a_task_learner_raises_the_thresholds_and_large_blocks_come_from_the_heap():
    assert _probe() == ["True", "False"]


@glibc
@pytest.mark.parametrize("env", [{allocator.ENV: "0"}, {"MALLOC_TRIM_THRESHOLD_": "131072"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"}])
def test_switched_off_or_tuned_by_the_user_leaves_glibc_alone(env):
    assert _probe(**env) == ["False", "True"]


def test_switch_returns_the_previous_setting_and_checks_its_argument():
    previous = set_memory_reuse(False)
    try:
        assert memory_reuse_enabled() is False and memory_reuse_applied() is False
        assert allocator.apply_memory_reuse() is False
        assert set_memory_reuse(True) is False and memory_reuse_enabled() is True
        with pytest.raises(TypeError, match="enabled must be True or False"):
            set_memory_reuse(1)
    finally:
        set_memory_reuse(previous)


def test_turning_it_off_restores_glibcs_thresholds_and_returns_free_memory(monkeypatch):
    calls = []
    monkeypatch.setattr(allocator, "_libc", lambda: (lambda *a: calls.append(("mallopt",) + a) or 1,
                                                     lambda *a: calls.append(("malloc_trim",) + a) or 1))
    monkeypatch.setattr(allocator, "_applied", False)
    monkeypatch.setattr(allocator, "_enabled", True)
    monkeypatch.setattr(allocator, "_user_tuned", lambda: False)
    assert allocator.apply_memory_reuse() is True
    assert calls == [("mallopt", -3, allocator.MMAP_THRESHOLD), ("mallopt", -1, allocator.TRIM_THRESHOLD)]
    assert allocator.apply_memory_reuse() is True and len(calls) == 2          # once per process
    calls.clear()
    assert set_memory_reuse(False) is True
    assert calls == [("mallopt", -3, 128 * 1024), ("mallopt", -1, 128 * 1024), ("malloc_trim", 0)]
    assert memory_reuse_applied() is False


def test_no_glibc_changes_nothing(monkeypatch):
    monkeypatch.setattr(allocator, "_libc", lambda: None)
    monkeypatch.setattr(allocator, "_applied", False)
    monkeypatch.setattr(allocator, "_enabled", True)
    monkeypatch.setattr(allocator, "_user_tuned", lambda: False)
    assert allocator.apply_memory_reuse() is False and memory_reuse_applied() is False


def test_other_platforms_are_left_alone(monkeypatch):
    monkeypatch.setattr(allocator.sys, "platform", "win32")
    assert allocator._libc() is None
