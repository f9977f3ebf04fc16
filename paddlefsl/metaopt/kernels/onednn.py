"""oneDNN kernels through ``ctypes``: the ``libdnnl.so.3`` that the Paddle CPU wheel ships.

Float32 NCHW kernels with plain (contiguous) Paddle tensors in and out:

* convolution: the convolution, its adjoint in the input (backward data, i.e. the transposed convolution) and its
  adjoint in the weight (backward weights). oneDNN picks its own (blocked) layouts; the plan for one shape reorders
  to and from them;
* 2-D max pooling: forward (the value and oneDNN's workspace, the position of each window's maximum) and backward
  (the output gradient scattered to those positions), on the plain layout;
* ReLU: forward and backward (``g * (x > 0)``), on the plain layout;
* batch normalization with batch statistics and an affine transform: forward (training) and backward, on the
  plain layout.

Plans are built once per shape and cached. No compiler and no extra dependency: only the C API that the library
exports.

These are raw kernels (no autograd). The convolutions compute the value of the conv rules of
`paddlefsl.metaopt.autodiff.conv`, whose gradients are written in differentiable ops; max pooling computes the
value, argmax and scatter of the max-pool rule of `paddlefsl.metaopt.autodiff.pool`. The batch-norm and ReLU
kernels are not used by any rule: on the W2 shapes they were slower than Paddle's or made no measurable difference
(``docs/speed.md``); ``benchmarks/onednn_kernels.py`` times them against Paddle's.
"""
from __future__ import annotations

import ctypes
import os
from typing import Sequence

import paddle

__all__ = ["available", "load_error", "ReferenceImplementation", "implementation", "is_reference", "Conv2dPlan",
           "MaxPool2dPlan", "ReluPlan", "conv2d_forward", "conv2d_backward_data", "conv2d_backward_weights",
           "max_pool2d_forward", "max_pool2d_backward", "relu_forward", "relu_backward", "BatchNormPlan",
           "batch_norm_forward", "batch_norm_backward", "version"]

_MAX_NDIMS = 12
_F32 = 3
_S32 = 4
_U8 = 6
_DTYPES = {_F32: "float32", _S32: "int32", _U8: "uint8"}
_FORMAT_ANY = 1
_CPU = 1
_STREAM_IN_ORDER = 1
_FORWARD_TRAINING = 64
_BACKWARD_DATA = 160
_BACKWARD_WEIGHTS = 192
_CONVOLUTION_DIRECT = 1
_ELTWISE_RELU = 0x20
_POOLING_MAX = 0x1FF
_QUERY = {"src": 129, "diff_src": 130, "weights": 131, "diff_weights": 132, "dst": 133, "diff_dst": 134,
          "workspace": 135}
_ARG = {"src": 1, "dst": 17, "weights": 33, "workspace": 64, "diff_src": 129, "diff_dst": 145, "diff_weights": 161}
_ARG.update({"mean": 49, "variance": 50, "scale": 51, "shift": 52, "diff_scale": 255, "diff_shift": 256})
_BACKWARD = 128
_QUERY_IMPL_INFO_STR = 8
_USE_SCALE_SHIFT = 0x2 | 0x4
_ARG_FROM, _ARG_TO = 1, 17

_Dims = ctypes.c_int64 * _MAX_NDIMS
_vp = ctypes.c_void_p


class _ExecArg(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_int), ("memory", _vp)]


class _Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int), ("patch", ctypes.c_int),
                ("hash", ctypes.c_char_p), ("cpu_runtime", ctypes.c_uint), ("gpu_runtime", ctypes.c_uint)]


class _Library:
    """The loaded library, one CPU engine and one in-order stream."""

    def __init__(self, path: str) -> None:
        lib = ctypes.CDLL(path)
        lib.dnnl_version.restype = ctypes.POINTER(_Version)
        v = lib.dnnl_version().contents
        self.version = (v.major, v.minor, v.patch)
        if v.major != 3:
            raise OSError(f"{path} is oneDNN {v.major}.{v.minor}.{v.patch}; the bindings need major version 3")
        for name in ("dnnl_primitive_desc_query_md",):
            getattr(lib, name).restype = _vp
        lib.dnnl_memory_desc_get_size.restype = ctypes.c_size_t
        lib.dnnl_memory_desc_equal.restype = ctypes.c_int
        self.lib = lib
        self.engine = _vp()
        self.check(lib.dnnl_engine_create(ctypes.byref(self.engine), _CPU, ctypes.c_size_t(0)), "engine_create")
        self.stream = _vp()
        self.check(lib.dnnl_stream_create(ctypes.byref(self.stream), self.engine, ctypes.c_uint(_STREAM_IN_ORDER)),
                   "stream_create")

    @staticmethod
    def check(status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"oneDNN {what} failed with status {status}")

    def plain_md(self, shape: Sequence[int], dtype: int = _F32) -> _vp:
        """A memory descriptor (float32 unless ``dtype`` says otherwise) of a contiguous row-major tensor."""
        dims, strides = _Dims(*shape), _Dims()
        step = 1
        for i in reversed(range(len(shape))):
            strides[i] = step
            step *= int(shape[i])
        md = _vp()
        self.check(self.lib.dnnl_memory_desc_create_with_strides(ctypes.byref(md), len(shape), dims, dtype, strides),
                   "memory_desc_create_with_strides")
        return md

    def any_md(self, shape: Sequence[int]) -> _vp:
        """A float32 memory descriptor whose layout the primitive chooses."""
        md = _vp()
        self.check(self.lib.dnnl_memory_desc_create_with_tag(ctypes.byref(md), len(shape), _Dims(*shape), _F32,
                                                             _FORMAT_ANY), "memory_desc_create_with_tag")
        return md

    def memory(self, md, handle=None) -> _vp:
        mem = _vp()
        allocate = _vp(ctypes.c_size_t(-1).value) if handle is None else _vp(handle)
        self.check(self.lib.dnnl_memory_create(ctypes.byref(mem), md, self.engine, allocate), "memory_create")
        return mem

    def primitive(self, pd) -> _vp:
        prim = _vp()
        self.check(self.lib.dnnl_primitive_create(ctypes.byref(prim), pd), "primitive_create")
        return prim

    def reorder(self, src_md, dst_md) -> _vp:
        pd = _vp()
        self.check(self.lib.dnnl_reorder_primitive_desc_create(ctypes.byref(pd), src_md, self.engine, dst_md,
                                                               self.engine, None), "reorder_primitive_desc_create")
        prim = self.primitive(pd)
        self.lib.dnnl_primitive_desc_destroy(pd)
        return prim

    def execute(self, prim, args: Sequence[tuple[int, _vp]]) -> None:
        arr = (_ExecArg * len(args))(*[_ExecArg(a, m) for a, m in args])
        self.check(self.lib.dnnl_primitive_execute(prim, self.stream, len(args), arr), "primitive_execute")


class _Operand:
    """One argument of a primitive: the user's plain memory and, when the primitive wants another layout, its own
    buffer with the reorder between the two."""

    def __init__(self, lib: _Library, plain_md, chosen_md, arg: int, is_input: bool) -> None:
        self.arg = arg
        self.user = lib.memory(plain_md, 0)
        if lib.lib.dnnl_memory_desc_equal(plain_md, chosen_md):
            self.inner, self.reorder = self.user, None
        else:
            self.inner = lib.memory(chosen_md)
            self.reorder = lib.reorder(plain_md, chosen_md) if is_input else lib.reorder(chosen_md, plain_md)
        self.is_input = is_input


class Conv2dPlan:
    """A cached oneDNN primitive for one float32 NCHW convolution geometry and one direction.

    Args:
        direction: ``"forward"`` (``y = conv(x, w)``), ``"backward_data"`` (``gx = conv^T(gy, w)``) or
            ``"backward_weights"`` (``gw`` from ``x`` and ``gy``).
        x_shape: ``[N, C, H, W]``.
        w_shape: ``[O, C, kh, kw]``.
        y_shape: ``[N, O, h, w]``.
        stride: two strides.
        pads: ``[top, bottom, left, right]``.
        groups: the number of channel groups (``w_shape`` is then ``[O, C / groups, kh, kw]``, Paddle's layout,
            which is oneDNN's plain grouped layout ``[groups, O / groups, C / groups, kh, kw]`` in memory).

    Attributes:
        implementation: a one-element tuple, the name of the implementation oneDNN chose (see `is_reference`).

    Raises:
        RuntimeError: if oneDNN refuses the geometry.
    """

    def __init__(self, direction: str, x_shape, w_shape, y_shape, stride, pads, groups: int = 1) -> None:
        lib = _library()
        self.lib = lib
        self.direction = direction
        self.shapes = {"x": list(x_shape), "w": list(w_shape), "y": list(y_shape)}
        w_dims = list(w_shape) if groups == 1 else [groups, w_shape[0] // groups] + list(w_shape[1:])
        strides, dil = _Dims(*stride), _Dims(0, 0)
        pad_l, pad_r = _Dims(pads[0], pads[2]), _Dims(pads[1], pads[3])
        x_any, w_any, y_any = lib.any_md(x_shape), lib.any_md(w_dims), lib.any_md(y_shape)
        fwd = _vp()
        lib.check(lib.lib.dnnl_convolution_forward_primitive_desc_create(
            ctypes.byref(fwd), lib.engine, _FORWARD_TRAINING, _CONVOLUTION_DIRECT, x_any, w_any, None, y_any,
            strides, dil, pad_l, pad_r, None), "convolution_forward_primitive_desc_create")
        if direction == "forward":
            pd = fwd
            roles = [("x", "src", True), ("w", "weights", True), ("y", "dst", False)]
        elif direction == "backward_data":
            pd = _vp()
            lib.check(lib.lib.dnnl_convolution_backward_data_primitive_desc_create(
                ctypes.byref(pd), lib.engine, _CONVOLUTION_DIRECT, x_any, w_any, y_any, strides, dil, pad_l, pad_r,
                fwd, None), "convolution_backward_data_primitive_desc_create")
            roles = [("y", "diff_dst", True), ("w", "weights", True), ("x", "diff_src", False)]
        elif direction == "backward_weights":
            pd = _vp()
            lib.check(lib.lib.dnnl_convolution_backward_weights_primitive_desc_create(
                ctypes.byref(pd), lib.engine, _CONVOLUTION_DIRECT, x_any, w_any, None, y_any, strides, dil, pad_l,
                pad_r, fwd, None), "convolution_backward_weights_primitive_desc_create")
            roles = [("x", "src", True), ("y", "diff_dst", True), ("w", "diff_weights", False)]
        else:
            raise ValueError(f"direction must be forward, backward_data or backward_weights, got {direction!r}")
        self.implementation = (implementation(lib, pd),)
        self.operands = {}
        for key, role, is_input in roles:
            chosen = lib.lib.dnnl_primitive_desc_query_md(pd, _QUERY[role], 0)
            plain = lib.plain_md(w_dims if key == "w" else self.shapes[key])
            self.operands[key] = _Operand(lib, plain, _vp(chosen), _ARG[role], is_input)
        self.primitive = lib.primitive(pd)
        self.output = roles[-1][0]
        self.inputs = [r[0] for r in roles[:-1]]

    def __call__(self, **tensors: paddle.Tensor) -> paddle.Tensor:
        """Run on contiguous float32 CPU tensors named ``x``/``w``/``y`` (the two inputs of the direction)."""
        lib = self.lib
        out = paddle.empty(self.shapes[self.output], dtype="float32")
        for key in self.inputs:
            op = self.operands[key]
            lib.lib.dnnl_memory_set_data_handle(op.user, _vp(tensors[key].data_ptr()))
            if op.reorder is not None:
                lib.execute(op.reorder, [(_ARG_FROM, op.user), (_ARG_TO, op.inner)])
        op_out = self.operands[self.output]
        lib.lib.dnnl_memory_set_data_handle(op_out.user, _vp(out.data_ptr()))
        lib.execute(self.primitive, [(op.arg, op.inner) for op in self.operands.values()])
        if op_out.reorder is not None:
            lib.execute(op_out.reorder, [(_ARG_FROM, op_out.inner), (_ARG_TO, op_out.user)])
        lib.check(lib.lib.dnnl_stream_wait(lib.stream), "stream_wait")
        return out


class _PlainPrimitive:
    """A oneDNN primitive whose arguments all use the plain (contiguous row-major) layout of Paddle's tensors, so no
    reorder is needed: the memories are bound to the tensors' data at each call."""

    def __init__(self, lib: _Library, pd: _vp, args: dict[str, tuple[int, _vp]]) -> None:
        self.lib = lib
        self.memories = {name: (arg, lib.memory(md, 0)) for name, (arg, md) in args.items()}
        self.primitive = lib.primitive(pd)

    def __call__(self, **tensors: paddle.Tensor) -> None:
        lib = self.lib
        for name, (_, mem) in self.memories.items():
            lib.lib.dnnl_memory_set_data_handle(mem, _vp(tensors[name].data_ptr()))
        lib.execute(self.primitive, list(self.memories.values()))
        lib.check(lib.lib.dnnl_stream_wait(lib.stream), "stream_wait")


class ReferenceImplementation(RuntimeError):
    """oneDNN has only a reference implementation (not JIT-compiled for this CPU) of a primitive: a plain loop that
    can be several times slower than Paddle's own kernel (2-D max pooling on the plain NCHW layout of a CPU without
    AVX-512: 161 ms against Paddle's 42 ms at ``[75, 32, 84, 84]``), so the fast path declines it."""


def implementation(lib: _Library, pd: _vp) -> str:
    """The name oneDNN gives the implementation it chose for the primitive descriptor ``pd`` (``"jit:avx2"``,
    ``"brg_conv_fwd:avx512_core"``, ``"simple_nchw:any"``, ``"ref:any"``, ...)."""
    name = ctypes.c_char_p()
    lib.check(lib.lib.dnnl_primitive_desc_query(pd, _QUERY_IMPL_INFO_STR, 0, ctypes.byref(name)),
              "primitive_desc_query(impl_info_str)")
    return (name.value or b"").decode()


def is_reference(name: str) -> bool:
    """Whether an implementation name is one of oneDNN's reference (not JIT-compiled) implementations."""
    kind = name.split(":", 1)[0]
    return kind.startswith(("ref", "simple")) or name.endswith(":ref")


def _require_accelerated(plan: "Conv2dPlan | MaxPool2dPlan", what: str) -> None:
    """Raise `ReferenceImplementation` if one of ``plan``'s primitives is a reference implementation."""
    slow = [name for name in plan.implementation if is_reference(name)]
    if slow:
        raise ReferenceImplementation(f"oneDNN has only its reference implementation {slow[0]!r} of {what} here")


def _require_plain(lib: _Library, pd: _vp, role: str, plain_md: _vp) -> None:
    """Raise if the primitive ``pd`` wants another layout than the plain one for ``role``."""
    chosen = _vp(lib.lib.dnnl_primitive_desc_query_md(pd, _QUERY[role], 0))
    if not lib.lib.dnnl_memory_desc_equal(plain_md, chosen):
        raise RuntimeError(f"oneDNN wants a non-plain layout for {role}")


class MaxPool2dPlan:
    """Cached oneDNN primitives for one float32 NCHW 2-D max pooling geometry: forward (training, which also writes
    the workspace: each window's argmax as an offset inside the window) and backward (the output gradient scattered
    to those offsets). Windows that reach past the input (padding, ``ceil_mode``) never pick a padded position.

    Args:
        x_shape: ``[N, C, H, W]``.
        kernel: two kernel sizes.
        stride: two strides.
        pads: ``[top, bottom, left, right]`` (bottom and right may include the extra row and column of
            ``ceil_mode``).

    Attributes:
        implementation: the names of the implementations oneDNN chose (forward, backward), see `is_reference`.

    Raises:
        RuntimeError: if oneDNN refuses the geometry or wants another layout than the plain one.
    """

    def __init__(self, x_shape, kernel, stride, pads) -> None:
        lib = _library()
        n, c, h, w = (int(d) for d in x_shape)
        self.x_shape = [n, c, h, w]
        self.y_shape = [n, c, conv_out_size(h, kernel[0], stride[0], pads[0], pads[1]),
                        conv_out_size(w, kernel[1], stride[1], pads[2], pads[3])]
        x_md, y_md = lib.plain_md(self.x_shape), lib.plain_md(self.y_shape)
        geometry = (_Dims(*stride), _Dims(*kernel), _Dims(0, 0), _Dims(pads[0], pads[2]), _Dims(pads[1], pads[3]))
        fwd, bwd = _vp(), _vp()
        try:   # the descriptors are destroyed whether the plan is built or refused
            lib.check(lib.lib.dnnl_pooling_forward_primitive_desc_create(
                ctypes.byref(fwd), lib.engine, _FORWARD_TRAINING, _POOLING_MAX, x_md, y_md, *geometry, None),
                "pooling_forward_primitive_desc_create")
            for role, md in (("src", x_md), ("dst", y_md)):
                _require_plain(lib, fwd, role, md)
            forward_name = implementation(lib, fwd)
            ws_md = _vp(lib.lib.dnnl_primitive_desc_query_md(fwd, _QUERY["workspace"], 0))
            for code in (_U8, _S32):
                if lib.lib.dnnl_memory_desc_equal(ws_md, lib.plain_md(self.y_shape, code)):
                    self.workspace_dtype = _DTYPES[code]
                    break
            else:
                raise RuntimeError("oneDNN's max-pooling workspace is not a plain integer tensor shaped like the "
                                   "output")
            lib.check(lib.lib.dnnl_pooling_backward_primitive_desc_create(
                ctypes.byref(bwd), lib.engine, _POOLING_MAX, x_md, y_md, *geometry, fwd, None),
                "pooling_backward_primitive_desc_create")
            for role, md in (("diff_src", x_md), ("diff_dst", y_md)):
                _require_plain(lib, bwd, role, md)
            self.implementation = (forward_name, implementation(lib, bwd))
            self.forward = _PlainPrimitive(lib, fwd, {"x": (_ARG["src"], x_md), "y": (_ARG["dst"], y_md),
                                                      "ws": (_ARG["workspace"], ws_md)})
            self.backward = _PlainPrimitive(lib, bwd, {"gy": (_ARG["diff_dst"], y_md),
                                                       "ws": (_ARG["workspace"], ws_md),
                                                       "gx": (_ARG["diff_src"], x_md)})
        finally:
            for pd in (fwd, bwd):
                if pd.value:
                    lib.lib.dnnl_primitive_desc_destroy(pd)


class ReluPlan:
    """Cached oneDNN eltwise primitives for ReLU on one float32 shape (plain layout): ``max(x, 0)`` and
    ``g * (x > 0)``.

    Args:
        shape: the tensor shape.
    """

    def __init__(self, shape) -> None:
        lib = _library()
        md = lib.plain_md(shape)
        zero = ctypes.c_float(0.0)
        fwd = _vp()
        lib.check(lib.lib.dnnl_eltwise_forward_primitive_desc_create(
            ctypes.byref(fwd), lib.engine, _FORWARD_TRAINING, _ELTWISE_RELU, md, md, zero, zero, None),
            "eltwise_forward_primitive_desc_create")
        bwd = _vp()
        lib.check(lib.lib.dnnl_eltwise_backward_primitive_desc_create(
            ctypes.byref(bwd), lib.engine, _ELTWISE_RELU, md, md, md, zero, zero, fwd, None),
            "eltwise_backward_primitive_desc_create")
        self.shape = [int(d) for d in shape]
        self.forward = _PlainPrimitive(lib, fwd, {"x": (_ARG["src"], md), "y": (_ARG["dst"], md)})
        self.backward = _PlainPrimitive(lib, bwd, {"x": (_ARG["src"], md), "gy": (_ARG["diff_dst"], md),
                                                   "gx": (_ARG["diff_src"], md)})
        lib.lib.dnnl_primitive_desc_destroy(fwd)
        lib.lib.dnnl_primitive_desc_destroy(bwd)


class BatchNormPlan:
    """Cached oneDNN primitives for training-mode batch normalization of one float32 NCHW shape (batch statistics,
    biased variance, scale and shift), plain layout: forward (value, batch mean and variance) and backward (input,
    scale and shift gradients).

    Args:
        shape: ``[N, C, H, W]``.
        epsilon: added to the variance.
    """

    def __init__(self, shape, epsilon: float) -> None:
        lib = _library()
        self.shape = [int(d) for d in shape]
        md, c_md = lib.plain_md(self.shape), lib.plain_md([self.shape[1]])
        eps, flags = ctypes.c_float(epsilon), ctypes.c_uint(_USE_SCALE_SHIFT)
        fwd = _vp()
        lib.check(lib.lib.dnnl_batch_normalization_forward_primitive_desc_create(
            ctypes.byref(fwd), lib.engine, _FORWARD_TRAINING, md, md, eps, flags, None),
            "batch_normalization_forward_primitive_desc_create")
        bwd = _vp()
        lib.check(lib.lib.dnnl_batch_normalization_backward_primitive_desc_create(
            ctypes.byref(bwd), lib.engine, _BACKWARD, md, md, md, eps, flags, fwd, None),
            "batch_normalization_backward_primitive_desc_create")
        stat = {k: (_ARG[k], c_md) for k in ("scale", "mean", "variance")}
        self.forward = _PlainPrimitive(lib, fwd, {"x": (_ARG["src"], md), "y": (_ARG["dst"], md),
                                                  "shift": (_ARG["shift"], c_md), **stat})
        self.backward = _PlainPrimitive(lib, bwd, {"x": (_ARG["src"], md), "gy": (_ARG["diff_dst"], md),
                                                   "gx": (_ARG["diff_src"], md), "gscale": (_ARG["diff_scale"], c_md),
                                                   "gshift": (_ARG["diff_shift"], c_md), **stat})
        lib.lib.dnnl_primitive_desc_destroy(fwd)
        lib.lib.dnnl_primitive_desc_destroy(bwd)


_LIB: _Library | None = None
_LOAD_ERROR: str | None = None
_PLANS: dict = {}


def _library_path() -> str:
    return os.path.join(os.path.dirname(paddle.__file__), "libs", "libdnnl.so.3")


def _library() -> _Library:
    global _LIB, _LOAD_ERROR
    if _LIB is None and _LOAD_ERROR is None:
        try:
            _LIB = _Library(_library_path())
        except (OSError, AttributeError, RuntimeError) as error:  # missing library, other version, missing symbol
            _LOAD_ERROR = f"{type(error).__name__}: {error}"
    if _LIB is None:
        raise OSError(f"oneDNN is not available: {_LOAD_ERROR}")
    return _LIB


def available() -> bool:
    """Whether the oneDNN library loads (major version 3, the symbols the bindings use)."""
    try:
        _library()
    except OSError:
        return False
    return True


def load_error() -> str | None:
    """Why the library did not load (``None`` if it did or was not tried yet)."""
    return _LOAD_ERROR


def version() -> tuple[int, int, int] | None:
    """The loaded oneDNN version, or ``None``."""
    return _library().version if available() else None


def _plan(direction: str, x_shape, w_shape, y_shape, stride, pads, groups: int) -> Conv2dPlan:
    key = (direction, tuple(x_shape), tuple(w_shape), tuple(y_shape), tuple(stride), tuple(pads), groups)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = Conv2dPlan(direction, x_shape, w_shape, y_shape, stride, pads, groups)
    return plan


def conv_out_size(size: int, k: int, s: int, pad_before: int, pad_after: int) -> int:
    """Output size of a convolution along one axis (dilation 1)."""
    return (size + pad_before + pad_after - k) // s + 1


def _conv_plan(direction: str, x_shape, w_shape, y_shape, stride, pads, groups: int,
               accelerated_only: bool) -> Conv2dPlan:
    plan = _plan(direction, x_shape, w_shape, y_shape, stride, pads, groups)
    if accelerated_only:
        _require_accelerated(plan, f"the convolution's {direction}")
    return plan


def conv2d_forward(x: paddle.Tensor, w: paddle.Tensor, stride: Sequence[int], pads: Sequence[int],
                   groups: int = 1, accelerated_only: bool = False) -> paddle.Tensor:
    """``conv2d(x, w)``, NCHW float32, pads ``[top, bottom, left, right]``, dilation 1, ``groups`` channel groups
    (with ``accelerated_only``, `ReferenceImplementation` where oneDNN has only its reference implementation)."""
    n, _, h, wd = x.shape
    y_shape = [n, w.shape[0], conv_out_size(h, w.shape[2], stride[0], pads[0], pads[1]),
               conv_out_size(wd, w.shape[3], stride[1], pads[2], pads[3])]
    return _conv_plan("forward", x.shape, w.shape, y_shape, stride, pads, groups, accelerated_only)(x=x, w=w)


def conv2d_backward_data(gy: paddle.Tensor, w: paddle.Tensor, x_shape: Sequence[int], stride: Sequence[int],
                         pads: Sequence[int], groups: int = 1, accelerated_only: bool = False) -> paddle.Tensor:
    """The adjoint of ``conv2d(., w)`` applied to ``gy`` (a transposed convolution), of shape ``x_shape``."""
    return _conv_plan("backward_data", x_shape, w.shape, gy.shape, stride, pads, groups, accelerated_only)(y=gy, w=w)


def conv2d_backward_weights(x: paddle.Tensor, gy: paddle.Tensor, w_shape: Sequence[int], stride: Sequence[int],
                            pads: Sequence[int], groups: int = 1, accelerated_only: bool = False) -> paddle.Tensor:
    """The adjoint of ``conv2d(x, .)`` applied to ``gy`` (the weight gradient), of shape ``w_shape``."""
    return _conv_plan("backward_weights", x.shape, w_shape, gy.shape, stride, pads, groups,
                      accelerated_only)(x=x, y=gy)


def _cached(key: tuple, build):
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = build()
    return plan


def max_pool2d_plan(x_shape: Sequence[int], kernel: Sequence[int], stride: Sequence[int],
                    pads: Sequence[int]) -> MaxPool2dPlan:
    """The cached `MaxPool2dPlan` of one geometry."""
    key = ("max_pool2d", tuple(x_shape), tuple(kernel), tuple(stride), tuple(pads))
    return _cached(key, lambda: MaxPool2dPlan(x_shape, kernel, stride, pads))


def max_pool2d_forward(x: paddle.Tensor, kernel: Sequence[int], stride: Sequence[int],
                       pads: Sequence[int], accelerated_only: bool = False) -> tuple[paddle.Tensor, paddle.Tensor]:
    """2-D max pooling of a contiguous float32 NCHW ``x``; returns the value and oneDNN's workspace (each window's
    argmax as an offset ``kh_index * kernel[1] + kw_index`` inside the window, uint8 or int32, shaped like the
    value). With ``accelerated_only``, `ReferenceImplementation` where oneDNN has only its reference implementation
    of the forward or the backward."""
    plan = max_pool2d_plan(x.shape, kernel, stride, pads)
    if accelerated_only:
        _require_accelerated(plan, "max pooling")
    y = paddle.empty(plan.y_shape, dtype="float32")
    ws = paddle.empty(plan.y_shape, dtype=plan.workspace_dtype)
    plan.forward(x=x, y=y, ws=ws)
    return y, ws


def max_pool2d_backward(gy: paddle.Tensor, ws: paddle.Tensor, x_shape: Sequence[int], kernel: Sequence[int],
                        stride: Sequence[int], pads: Sequence[int]) -> paddle.Tensor:
    """The adjoint of max pooling: ``gy`` (contiguous float32) added into a zero tensor of ``x_shape`` at the
    positions of the workspace ``ws`` that `max_pool2d_forward` returned."""
    plan = max_pool2d_plan(x_shape, kernel, stride, pads)
    gx = paddle.empty(plan.x_shape, dtype="float32")
    plan.backward(gy=gy, ws=ws, gx=gx)
    return gx


def _relu_plan(shape: Sequence[int]) -> ReluPlan:
    return _cached(("relu", tuple(shape)), lambda: ReluPlan(shape))


def relu_forward(x: paddle.Tensor) -> paddle.Tensor:
    """``max(x, 0)`` of a contiguous float32 tensor."""
    y = paddle.empty(x.shape, dtype="float32")
    _relu_plan(x.shape).forward(x=x, y=y)
    return y


def relu_backward(x: paddle.Tensor, gy: paddle.Tensor) -> paddle.Tensor:
    """``gy * (x > 0)`` of two contiguous float32 tensors of one shape."""
    gx = paddle.empty(x.shape, dtype="float32")
    _relu_plan(x.shape).backward(x=x, gy=gy, gx=gx)
    return gx


def _batch_norm_plan(shape: Sequence[int], epsilon: float) -> BatchNormPlan:
    return _cached(("batch_norm", tuple(shape), float(epsilon)), lambda: BatchNormPlan(shape, epsilon))


def batch_norm_forward(x: paddle.Tensor, scale: paddle.Tensor, shift: paddle.Tensor,
                       epsilon: float) -> tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]:
    """Training-mode batch norm of a contiguous float32 NCHW ``x``: ``(y, batch mean, biased batch variance)``."""
    c = [int(x.shape[1])]
    y, mean, variance = paddle.empty(x.shape, "float32"), paddle.empty(c, "float32"), paddle.empty(c, "float32")
    _batch_norm_plan(x.shape, epsilon).forward(x=x, y=y, scale=scale, shift=shift, mean=mean, variance=variance)
    return y, mean, variance


def batch_norm_backward(x: paddle.Tensor, gy: paddle.Tensor, scale: paddle.Tensor, mean: paddle.Tensor,
                        variance: paddle.Tensor, epsilon: float) -> tuple[paddle.Tensor, ...]:
    """The gradients ``(gx, gscale, gshift)`` of training-mode batch norm for the output gradient ``gy``, given the
    batch statistics that `batch_norm_forward` returned."""
    c = [int(x.shape[1])]
    gx, gscale, gshift = paddle.empty(x.shape, "float32"), paddle.empty(c, "float32"), paddle.empty(c, "float32")
    _batch_norm_plan(x.shape, epsilon).backward(x=x, gy=gy, scale=scale, mean=mean, variance=variance, gx=gx,
                                                gscale=gscale, gshift=gshift)
    return gx, gscale, gshift
