"""The packages paddlefsl needs and the extras that install them: clear messages when one is missing or untested.

PaddlePaddle is not a hard requirement of the wheel, because its CPU and GPU builds are different packages:
``pip install "paddlefsl[cpu]"`` or ``pip install "paddlefsl[gpu]"`` installs one. The exact op layer
(`paddlefsl.metaopt.autodiff`) relies on Paddle internals (``paddle._C_ops`` kernel signatures, PyLayer nodes), so
the tested major version range is pinned: older versions are refused, newer ones warn.
"""
from __future__ import annotations

import importlib
import re
import warnings
from types import ModuleType

__all__ = ["TESTED_PADDLE", "check_paddle_version", "import_paddle", "require"]

TESTED_PADDLE = ((3, 0), (4, 0))
"""The tested PaddlePaddle versions: ``>= 3.0`` and ``< 4.0`` (as in setup.py's extras)."""

_INSTALL_PADDLE = ('install it with the extra for your machine: pip install "paddlefsl[cpu]" (CPU) or '
                   'pip install "paddlefsl[gpu]" (CUDA); for other builds see https://www.paddlepaddle.org.cn/install')


def check_paddle_version(version: str) -> None:
    """Refuse a Paddle older than the tested range, warn for a newer or unrecognised one.

    Args:
        version: ``paddle.__version__``, e.g. ``"3.3.1"`` (``"0.0.0"`` is a source build of the develop branch).

    Raises:
        ImportError: for a version below 3.0.

    Example:
        ```python
        check_paddle_version(paddle.__version__)
        ```
    """
    match = re.match(r"(\d+)\.(\d+)", version)
    low, high = TESTED_PADDLE
    if match is None or version.startswith("0.0.0"):
        warnings.warn(f"paddlefsl is tested with PaddlePaddle >={low[0]}.{low[1]},<{high[0]}; cannot tell which "
                      f"version {version!r} is, so the exact op layer may not match its kernels", stacklevel=3)
        return
    found = (int(match.group(1)), int(match.group(2)))
    if found < low:
        raise ImportError(f"paddlefsl needs PaddlePaddle >={low[0]}.{low[1]},<{high[0]}, found {version}; "
                          f"upgrade: pip install \"paddlepaddle>={low[0]}.{low[1]},<{high[0]}\" (or "
                          "paddlepaddle-gpu)")
    if found >= high:
        warnings.warn(f"paddlefsl is tested with PaddlePaddle >={low[0]}.{low[1]},<{high[0]}, found {version}: the "
                      "exact op layer relies on Paddle internals that may have changed; run paddlefsl's test suite "
                      "(python -m pytest -q) before trusting meta-gradients", stacklevel=3)


def import_paddle() -> ModuleType:
    """Import ``paddle``, saying which extra installs it when it is missing, and check its version.

    Returns:
        The ``paddle`` module.

    Raises:
        ModuleNotFoundError: if PaddlePaddle is not installed (the message names the extras).
        ImportError: if its version is below the tested range.
    """
    try:
        import paddle
    except ModuleNotFoundError as err:
        if err.name != "paddle":
            raise
        raise ModuleNotFoundError(f"paddlefsl needs PaddlePaddle, which is not installed; {_INSTALL_PADDLE}",
                                  name="paddle") from None
    check_paddle_version(getattr(paddle, "__version__", "unknown"))
    return paddle


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import an optional dependency, or say which extra installs it.

    Args:
        module: the module to import, e.g. ``"matplotlib"``.
        extra: the paddlefsl extra that installs it, e.g. ``"plot"``.
        purpose: what needs it, for the message (e.g. ``"plot_learning_curve"``).

    Returns:
        The imported module.

    Raises:
        ModuleNotFoundError: if it is not installed (the message gives the pip command).

    Example:
        ```python
        require("matplotlib", "plot", "plot_learning_curve")
        ```
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        top = module.split(".")[0]
        if err.name is None or err.name.split(".")[0] != top:
            raise
        raise ModuleNotFoundError(f"{purpose} needs {top}, which is not installed: pip install \"paddlefsl[{extra}]\" "
                                  f"(or pip install {top})", name=top) from None
