"""Learning-curve plots written with matplotlib's Agg backend (no display needed)."""
from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from paddlefsl.dependencies import require

from .metrics import read_jsonl

__all__ = ["plot_learning_curve"]


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(values) < 2:
        return values
    window = min(window, len(values))
    csum = np.cumsum(np.insert(values, 0, 0.0))
    out = np.empty_like(values)
    for i in range(len(values)):  # trailing moving average
        lo = max(0, i + 1 - window)
        out[i] = (csum[i + 1] - csum[lo]) / (i + 1 - lo)
    return out


def plot_learning_curve(records: Union[str, Sequence[Dict[str, Any]]], out_path: str,
                        keys: Optional[Sequence[str]] = None, x: str = "step",
                        smoothing: Union[int, Mapping[str, int]] = 1, title: Optional[str] = None) -> str:
    """Plot metrics against ``x`` and save a PNG.

    Args:
        records: A JSONL path (see `JSONLLogger`) or a list of dicts.
        out_path: PNG file to write (parent folders are created).
        keys: Metrics to plot, one subplot each; None plots every numeric key except ``x`` and ``time``.
        x: Key used for the horizontal axis (records lacking it use their position).
        smoothing: Trailing moving-average window (1 = raw) for every key, or a mapping from keys to windows
            (keys it does not name are drawn raw); the raw curve is drawn faintly behind a smoothed one. Series of
            at most 20 points (such as a test curve) are drawn with markers.
        title: Figure title.

    Returns:
        ``out_path``.

    Raises:
        ValueError: If there is nothing numeric to plot.
    """
    require("matplotlib", "plot", "plot_learning_curve")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows: List[Dict[str, Any]] = read_jsonl(records) if isinstance(records, (str, os.PathLike)) else list(records)
    if keys is None:
        keys = []
        for row in rows:
            for k, v in row.items():
                if k not in (x, "time") and k not in keys and isinstance(v, (int, float)) and not isinstance(v, bool):
                    keys.append(k)
    series = []
    for key in keys:
        pts = [(row.get(x, i), row[key]) for i, row in enumerate(rows)
               if isinstance(row.get(key), (int, float)) and not isinstance(row.get(key), bool)]
        if pts:
            xs, ys = (np.asarray(v, dtype=np.float64) for v in zip(*pts))
            series.append((key, xs, ys))
    if not series:
        raise ValueError(f"no numeric values to plot for keys {list(keys)}")
    fig = Figure(figsize=(6, 2.6 * len(series)), dpi=100)
    FigureCanvasAgg(fig)
    for i, (key, xs, ys) in enumerate(series):
        ax = fig.add_subplot(len(series), 1, i + 1)
        window = smoothing.get(key, 1) if isinstance(smoothing, Mapping) else smoothing
        marker = "o" if len(xs) <= 20 else None
        if window > 1:
            ax.plot(xs, ys, alpha=0.3, color="C0", marker=marker)
            ax.plot(xs, _smooth(ys, window), color="C0", label=f"{key} (avg {window})")
        else:
            ax.plot(xs, ys, color="C0", marker=marker, label=key)
        ax.set_ylabel(key)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    fig.axes[-1].set_xlabel(x)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(out_path))), exist_ok=True)
    fig.savefig(os.fspath(out_path), format="png")
    return os.fspath(out_path)
