"""Append-only JSON-lines metric logging."""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Dict, List, Optional

import numpy as np

__all__ = ["JSONLLogger", "read_jsonl"]


def _jsonable(value: Any) -> Any:
    if hasattr(value, "numpy") and callable(value.numpy):  # paddle.Tensor
        value = value.numpy()
    if isinstance(value, np.ndarray):
        return value.item() if value.size == 1 else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Infinity; keep the information as a string
    return value


class JSONLLogger:
    """Write one JSON object per line, flushed after every record.

    Args:
        path: Output file (parent folders are created).
        append: Append to an existing file instead of truncating it (use when resuming).
        timestamp: Add a ``"time"`` field (Unix seconds) to every record.

    Example:
        >>> with JSONLLogger("runs/log.jsonl") as log:
        ...     log.log(step=1, loss=0.5, accuracy=0.9)
    """

    def __init__(self, path: str, append: bool = True, timestamp: bool = False) -> None:
        self.path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self.timestamp = timestamp
        self._file = open(self.path, "a" if append else "w", encoding="utf-8")

    def log(self, step: Optional[int] = None, **metrics: Any) -> Dict[str, Any]:
        """Write a record; tensors and numpy values are converted. Returns the written record."""
        record: Dict[str, Any] = {}
        if step is not None:
            record["step"] = int(step)
        if self.timestamp:
            record["time"] = time.time()
        record.update({k: _jsonable(v) for k, v in metrics.items()})
        self._file.write(json.dumps(record, sort_keys=False) + "\n")
        self._file.flush()
        return record

    def close(self) -> None:
        """Close the file."""
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> "JSONLLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_jsonl(path: str) -> List[Dict[str, Any]]:
    """Read all records of a JSON-lines file, skipping blank lines and a truncated last line."""
    records = []
    with open(os.fspath(path), encoding="utf-8") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # a run killed mid-write
                break
            raise
    return records
