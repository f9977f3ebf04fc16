"""Arithmetic, reductions and shape ops whose stock Paddle double gradients are exact."""
from __future__ import annotations

from paddlefsl.metaopt.autodiff.registry import stock

stock(["add", "subtract", "multiply", "divide", "scale", "pow", "square", "sqrt", "log", "abs", "maximum",
       "minimum", "clip", "where", "cast", "assign", "sign", "sin", "cos", "rsqrt", "reciprocal", "elementwise_pow"],
      "tensor", "elementwise; Paddle's double gradient, checked against finite differences")
stock(["sum", "mean", "mean_all", "max", "min", "cumsum"], "tensor", "reduction")
stock(["reshape", "transpose", "squeeze", "unsqueeze", "concat", "stack", "split", "split_with_num", "slice",
       "strided_slice", "gather", "gather_nd", "index_select", "expand", "expand_as", "tile", "full_like",
       "zeros_like", "ones_like", "broadcast_tensors", "take_along_axis", "put_along_axis", "roll", "flip",
       "unbind", "unstack", "set_value_with_tensor"],
      "tensor", "shape or indexing (linear)")
stock(["matmul", "bmm", "dot", "linear", "einsum"], "linalg", "Paddle's double gradient, checked against "
      "finite differences")
