"""The first-order table: which exact rules a gradient that is never differentiated again still needs.

A first-order learner differentiates each graph once (``create_graph=False``), so an exact rule matters only where
Paddle's own *first-order* gradient is wrong (a few kernels are: `layer_norm` when only some inputs need a gradient,
`group_norm` without affine parameters, `batch_norm` in eval mode with batch statistics, soft-label and
``return_softmax`` cross entropy, bidirectional `rnn` with sequence lengths; see the ``test_stock_first_order_*``
tests). The kernels listed in `STOCK_AT_FIRST_ORDER` have a right stock first-order gradient (checked against the
exact rules by ``tests/metaopt/autodiff/test_first_order.py``), and they carry most of a convolutional model's
forward: while only first-order task learners hold the exact scope, they run as Paddle's own kernels, with no
PyLayer and no extra kernel, and so does every kernel without a rule (no tripwire: nothing differentiates twice).
A 2-D convolution that the fast kernels (`paddlefsl.metaopt.kernels`) would compute keeps its rule, whose value
and gradients then come from oneDNN, several times faster than Paddle's convolution kernels on large shapes; so
does a large 2-D max pooling (oneDNN's forward and scatter, 3 to 10 times faster than Paddle's ``pool2d`` and its
gradient on W2's shapes).
Every other exact rule stays installed. A ``create_graph=True`` gradient is still audited
(`paddlefsl.metaopt.autodiff.audit`), so a graph recorded here cannot give a silently wrong higher-order gradient.
"""
from __future__ import annotations

from typing import Any, Callable

from paddlefsl.metaopt import kernels
from paddlefsl.metaopt.autodiff import conv, pool, registry

__all__ = ["STOCK_AT_FIRST_ORDER", "patches"]


def _batch_norm_training(*args: Any, **kwargs: Any) -> bool:
    """True when ``_C_ops.batch_norm`` runs in training mode (``is_test`` False), where Paddle's first-order
    gradient is right; in eval mode with batch statistics it is not (it treats the statistics as constants)."""
    is_test = kwargs["is_test"] if "is_test" in kwargs else args[5] if len(args) > 5 else None
    return is_test is not None and not bool(is_test)


# A first-order convolution keeps its rule (a PyLayer around the oneDNN kernels) from this many multiply-adds on.
# Below it the PyLayer costs more than oneDNN saves: W1 (Omniglot Conv4, largest convolution 9.0 million
# multiply-adds) ran 0.69 / 0.61 / 0.68 s per first-order meta-iteration with the fast kernels off against
# 0.75 / 0.75 / 0.78 s with them on (alternating processes, 2 threads), while W2 (miniImageNet Conv4-32, 20 million
# to 1.2 billion) gained 0.74 to 0.90x from the rule.
FIRST_ORDER_MIN_MACS = 1 << 24


def _conv2d_not_fast(x, weight, strides, paddings, padding_algorithm, dilations, groups, data_format, *extra,
                     **kwargs) -> bool:
    """True unless the exact ``conv2d`` rule would compute this convolution with the fast kernels
    (`paddlefsl.metaopt.kernels`): then it is faster than Paddle's own kernel in all three directions, and worth
    its PyLayer; otherwise the stock kernel is the same work without the rule."""
    if extra or kwargs or not kernels.fast_kernels_enabled():
        return True
    geo, last = conv._geometry(x, weight, strides, paddings, padding_algorithm, dilations, groups, data_format)
    if last or x.ndim != 4:
        return True
    sizes = [(x.shape[2 + i] + geo.pads[2 * i] + geo.pads[2 * i + 1] - weight.shape[2 + i]) // geo.stride[i] + 1
             for i in range(2)]
    macs = conv._macs([x.shape[0], weight.shape[0]] + sizes, weight.shape)
    return macs < FIRST_ORDER_MIN_MACS or not kernels.conv2d_supported(x, weight, geo.dilation, geo.groups, last, macs)


def _max_pool2d_not_fast(x, kernel_size, strides, paddings, ceil_mode, exclusive, data_format, pooling_type,
                         global_pooling, adaptive, padding_algorithm, *extra, **kwargs) -> bool:
    """True unless the exact ``pool2d`` rule would compute this pooling with oneDNN (`pool.takes_onednn`): oneDNN's
    forward and backward are 3 to 10 times faster than Paddle's ``pool2d`` and its gradient kernel on W2's shapes,
    worth the rule's PyLayer."""
    return bool(extra or kwargs) or not pool.takes_onednn(x, kernel_size, strides, paddings, ceil_mode, data_format,
                                                          pooling_type, global_pooling, adaptive, padding_algorithm)


# kernel -> None (stock first order always right) or a predicate on the kernel's arguments (stock when True).
STOCK_AT_FIRST_ORDER: dict[str, Callable[..., bool] | None] = {
    "conv2d": _conv2d_not_fast,
    "depthwise_conv2d": None,
    "conv3d": None,
    "conv2d_transpose": None,
    "depthwise_conv2d_transpose": None,
    "conv3d_transpose": None,
    "relu": None,
    "pool2d": _max_pool2d_not_fast,
    "max_pool2d_with_index": None,
    "flatten": None,
    "batch_norm": _batch_norm_training,
}


def _choose(name: str, rule: Callable, stock_when: Callable[..., bool]) -> Callable:
    stock = registry.original(name)

    def chosen(*args: Any, **kwargs: Any) -> Any:
        return (stock if stock_when(*args, **kwargs) else rule)(*args, **kwargs)

    chosen.__name__ = name
    chosen.__qualname__ = f"first_order.{name}"
    return chosen


def patches() -> dict[str, Callable]:
    """Return the functions to install in ``paddle._C_ops`` while only first-order leases are held.

    Every exact rule of the registry, except the kernels of `STOCK_AT_FIRST_ORDER`, which are left out (stock) or
    wrapped to run stock when their predicate holds; kernels without a rule are not listed (stock, unguarded).
    """
    table: dict[str, Callable] = {}
    for name, rule in registry.rules().items():
        if rule.status != registry.EXACT:
            continue
        if name not in STOCK_AT_FIRST_ORDER:
            table[name] = rule.replacement
        elif STOCK_AT_FIRST_ORDER[name] is not None:
            table[name] = _choose(name, rule.replacement, STOCK_AT_FIRST_ORDER[name])
    return table
