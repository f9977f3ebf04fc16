"""The shared workload table (``WORKLOADS`` of ``workload.py`` in ``--bench-dir``, the file the peers' scripts
read), for the benchmark scripts; standard library only, so a parent process need not import Paddle."""
from __future__ import annotations

import importlib.util
import os


def load_workloads(bench_dir: str) -> dict:
    """``WORKLOADS`` of ``workload.py`` in ``bench_dir``.

    Raises:
        FileNotFoundError: if ``bench_dir`` has no ``workload.py``.
    """
    path = os.path.join(bench_dir, "workload.py")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no workload.py in --bench-dir {bench_dir}")
    spec = importlib.util.spec_from_file_location("workload", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.WORKLOADS
