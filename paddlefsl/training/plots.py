"""Learning-curve plots written with matplotlib's Agg backend (no display needed)."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from paddlefsl.dependencies import require

from .metrics import read_jsonl

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["learning_curve_figure", "plot_learning_curve"]


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


def learning_curve_figure(records: Union[str, Sequence[Dict[str, Any]]], keys: Optional[Sequence[str]] = None,
                          x: str = "step", smoothing: Union[int, Mapping[str, int]] = 1, title: Optional[str] = None,
                          xlabel: Optional[str] = None, labels: Optional[Mapping[str, str]] = None) -> "Figure":
    """Draw metrics against ``x``, one panel per metric, the panels stacked on one shared x axis.

    Args:
        records: A JSONL path (see `JSONLLogger`) or a list of dicts.
        keys: Metrics to plot, one panel each; None plots every numeric key except ``x`` and ``time``.
        x: Key used for the horizontal axis (records lacking it use their position).
        smoothing: Trailing moving-average window (1 = raw) for every key, or a mapping from keys to windows
            (keys it does not name are drawn raw); the raw curve is drawn faintly behind a smoothed one. Series of
            at most 20 points (such as a test curve) are drawn with markers.
        title: Figure title.
        xlabel: Label of the shared x axis (default: ``x``), e.g. ``"meta-train iteration"``.
        labels: Panel titles by key, saying what each metric is (default: the key).

    Returns:
        A matplotlib ``Figure`` (Agg canvas, no display needed).

    Raises:
        ValueError: If there is nothing numeric to plot.

    Example:
        >>> fig = learning_curve_figure([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}], xlabel="iteration")
        >>> fig.axes[0].get_xlabel()
        'iteration'
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
    fig = Figure(figsize=(7, 2.6 * len(series) + 0.6), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(series), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (key, xs, ys) in zip(axes, series):
        window = smoothing.get(key, 1) if isinstance(smoothing, Mapping) else smoothing
        marker = "o" if len(xs) <= 20 else None
        if window > 1:
            ax.plot(xs, ys, alpha=0.3, color="C0", marker=marker)
            ax.plot(xs, _smooth(ys, window), color="C0", label=f"{key} (avg {window})")
        else:
            ax.plot(xs, ys, color="C0", marker=marker, label=key)
        ax.set_title((labels or {}).get(key, key), fontsize=10, loc="left")
        ax.set_ylabel(key)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    axes[-1].set_xlabel(xlabel or x)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_learning_curve(records: Union[str, Sequence[Dict[str, Any]]], out_path: str,
                        keys: Optional[Sequence[str]] = None, x: str = "step",
                        smoothing: Union[int, Mapping[str, int]] = 1, title: Optional[str] = None,
                        xlabel: Optional[str] = None, labels: Optional[Mapping[str, str]] = None) -> str:
    """Plot metrics against ``x`` and save a PNG (see `learning_curve_figure` for the arguments).

    Args:
        records: A JSONL path (see `JSONLLogger`) or a list of dicts.
        out_path: PNG file to write (parent folders are created).
        keys: Metrics to plot, one panel each; None plots every numeric key except ``x`` and ``time``.
        x: Key used for the horizontal axis.
        smoothing: Moving-average window for every key, or a mapping from keys to windows.
        title: Figure title.
        xlabel: Label of the shared x axis (default: ``x``).
        labels: Panel titles by key (default: the key).

    Returns:
        ``out_path``.

    Raises:
        ValueError: If there is nothing numeric to plot.
    """
    fig = learning_curve_figure(records, keys=keys, x=x, smoothing=smoothing, title=title, xlabel=xlabel,
                                labels=labels)
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(out_path))), exist_ok=True)
    fig.savefig(os.fspath(out_path), format="png")
    return os.fspath(out_path)
