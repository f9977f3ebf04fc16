"""Single kernels on the W2 shapes: Paddle's CPU kernel against oneDNN's (``paddlefsl.metaopt.kernels.onednn``).

    OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE python benchmarks/onednn_kernels.py --pairs 9

Float32 NCHW; batch norm in training mode (forward: value and batch statistics; backward: input, scale and shift
gradients), 2x2 max pooling (forward with the argmax; backward: the scatter to it), ReLU (forward; backward
``g * (x > 0)``). Each call allocates its output, as inside a model. The two kernels run in turn, A B A B ..., in one
process; the figures are medians, the ratio is the median of the pairwise ratios (below 1: oneDNN is faster).
"""
import argparse
import statistics
import time

import paddle
from paddle import _C_ops

from paddlefsl.metaopt.kernels import onednn

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--pairs", type=int, default=9, help="alternating pairs per kernel and shape")
parser.add_argument("--shapes", nargs="*", default=["75,32,84,84", "75,32,42,42", "5,32,84,84", "75,32,21,21",
                                                      "5,32,42,42", "5,32,21,21", "5,32,10,10"])
args = parser.parse_args()
if not onednn.available():
    parser.error(f"oneDNN not loadable: {onednn.load_error()}")


def pairs_for(shape):
    c = shape[1]
    x, g = paddle.randn(shape, "float32"), paddle.randn(shape, "float32")
    w, b = paddle.rand([c], "float32") + 0.5, paddle.randn([c], "float32")
    rm, rv = paddle.zeros([c], "float32"), paddle.ones([c], "float32")
    bn = lambda: _C_ops.batch_norm(x, rm, rv, w, b, False, 0.9, 1e-5, "NCHW", False, False)
    o = bn()
    _, mean, var = onednn.batch_norm_forward(x, w, b, 1e-5)
    pool = ([2, 2], [2, 2], [0, 0], False, False, False)
    y, mask = _C_ops.max_pool2d_with_index(x, *pool)
    _, ws = onednn.max_pool2d_forward(x, [2, 2], [2, 2], [0, 0, 0, 0])
    gy = paddle.randn(y.shape, "float32")
    return {
        "batch norm forward": (bn, lambda: onednn.batch_norm_forward(x, w, b, 1e-5)),
        "batch norm backward": (
            lambda: _C_ops.batch_norm_grad(x, w, b, o[1], o[2], o[3], o[4], o[5], g, 0.9, 1e-5, "NCHW", False, False,
                                           False),
            lambda: onednn.batch_norm_backward(x, g, w, mean, var, 1e-5)),
        "max-pool forward": (lambda: _C_ops.max_pool2d_with_index(x, *pool),
                             lambda: onednn.max_pool2d_forward(x, [2, 2], [2, 2], [0, 0, 0, 0])),
        "max-pool backward": (lambda: _C_ops.max_pool2d_with_index_grad(x, mask, gy, *pool),
                              lambda: onednn.max_pool2d_backward(gy, ws, shape, [2, 2], [2, 2], [0, 0, 0, 0])),
        "relu forward": (lambda: _C_ops.relu(x), lambda: onednn.relu_forward(x)),
        "relu backward": (lambda: _C_ops.relu_grad(x, g), lambda: onednn.relu_backward(x, g)),
    }


def seconds(f):
    start = time.perf_counter()
    f()
    return time.perf_counter() - start


print("| shape | kernel | Paddle ms | oneDNN ms | oneDNN / Paddle |")
print("|---|---|---|---|---|")
for text in args.shapes:
    shape = [int(s) for s in text.split(",")]
    for name, (paddle_kernel, onednn_kernel) in pairs_for(shape).items():
        paddle_kernel(), onednn_kernel()
        a, b = [], []
        for _ in range(args.pairs):
            a.append(seconds(paddle_kernel))
            b.append(seconds(onednn_kernel))
        ratio = statistics.median(q / p for p, q in zip(a, b))
        print(f"| {shape} | {name} | {statistics.median(a) * 1e3:.3f} | {statistics.median(b) * 1e3:.3f} | "
              f"{ratio:.2f} |", flush=True)
