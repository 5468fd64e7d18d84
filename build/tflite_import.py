"""Rebuild a float TFLite graph (MediaPipe's networks) as a torch module, so it exports to ONNX like a
reference network.

The flatbuffer is read with the ``tflite`` package; the module's ``forward`` runs the graph's operators
in their stored order with torch ops. Constant FP16 weights behind a ``DEQUANTIZE`` are folded into
float32 buffers at build time. The module takes and returns tensors in TFLite's layout (NHWC, float32)
with the first dimension as the batch, which may be larger than the file's (always 1): nothing bakes a
batch of 1 into reshapes.

Internally 4-D activations are kept in NCHW (what torch's convolutions want) and converted back to NHWC
only where an operator's semantics need it (``RESHAPE``, a concatenation mixing layouts, the graph's
outputs), so the exported graph carries few transposes.

TFLite semantics reproduced exactly: SAME padding puts the odd pixel at the end (bottom/right);
``AVERAGE_POOL_2D`` with SAME padding divides by the number of real (unpadded) pixels; fused activations;
``RESIZE_BILINEAR``'s ``align_corners``/``half_pixel_centers``; depthwise depth multipliers; MediaPipe's
custom ``Convolution2DTransposeBias`` (``mediapipe/util/tflite/operations/transpose_conv_bias.cc``:
the options are the raw bytes of ``TfLiteTransposeConvParams`` — padding enum, stride_w, stride_h —
SAME pads ``max(0, k - (in - 1) % s - 1)`` in total, ``floor(total / 2)`` at the start).
Anything else is refused at build time with :class:`TFLiteImportError` naming the operator and the file.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# TFLite enums (schema.fbs), spelled out so the importer does not depend on the parser's constant names.
_PADDING = {0: "SAME", 1: "VALID"}
_TFLITE_PADDING = {1: "SAME", 2: "VALID"}  # TfLitePadding (C API), used by the custom op's raw options
_NUMPY_TYPES = {0: np.float32, 1: np.float16, 2: np.int32, 3: np.uint8, 4: np.int64, 9: np.int8}

SUPPORTED_OPERATORS = (
    "ADD",
    "AVERAGE_POOL_2D",
    "CONCATENATION",
    "CONV_2D",
    "DEPTHWISE_CONV_2D",
    "DEQUANTIZE",
    "HARD_SWISH",
    "LOGISTIC",
    "MAX_POOL_2D",
    "MUL",
    "PAD",
    "PRELU",
    "RELU",
    "RELU6",
    "RESHAPE",
    "RESIZE_BILINEAR",
    "TANH",
    "CUSTOM:Convolution2DTransposeBias",
)


class TFLiteImportError(ValueError):
    """The TFLite file uses something the importer does not reproduce (named, with the file)."""


@dataclass
class _Value:
    """A runtime tensor and whether it is held as NCHW (a 4-D tensor whose TFLite layout is NHWC)."""

    tensor: torch.Tensor
    nchw: bool


def _to_nchw(v: _Value) -> torch.Tensor:
    if v.tensor.dim() != 4:
        return v.tensor
    # contiguous(): a channels-last strided input (a permuted NHWC tensor, or a convolution's output)
    # makes the exporter's choice of convolution backend guard on the batch size, pinning it to 1.
    return (v.tensor if v.nchw else v.tensor.permute(0, 3, 1, 2)).contiguous()


def _to_nhwc(v: _Value) -> torch.Tensor:
    return v.tensor.permute(0, 2, 3, 1) if v.nchw else v.tensor


def _same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TFLite SAME padding of one spatial axis: (before, after), the odd pixel after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _activation(code: int, op: str, path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    if code == 0:
        return lambda x: x
    if code == 1:
        return F.relu
    if code == 2:
        return lambda x: torch.clamp(x, -1.0, 1.0)
    if code == 3:
        return lambda x: torch.clamp(x, 0.0, 6.0)
    if code == 4:
        return torch.tanh
    raise TFLiteImportError(f"{path}: {op} has fused activation {code}, which the importer does not support")


class TFLiteModule(nn.Module):
    """The graph of one TFLite file as a torch module; build it with :func:`import_tflite`."""

    def __init__(self) -> None:
        super().__init__()
        self.input_tensors: list[int] = []
        self.output_tensors: list[int] = []
        self.input_names: list[str] = []
        self.output_names: list[str] = []
        self.input_shapes: list[tuple[int, ...]] = []  # NHWC, batch included (as in the file)
        self.output_shapes: list[tuple[int, ...]] = []
        self.operators: list[str] = []  # the operator names in graph order (DEQUANTIZE folds included)
        self._steps: list[Callable[[dict[int, _Value]], None]] = []
        self._n_consts = 0

    def constant(self, array: np.ndarray) -> str:
        """Register ``array`` as a float32 (or int64) buffer; returns its attribute name."""
        name = f"c{self._n_consts}"
        self._n_consts += 1
        value = torch.from_numpy(np.ascontiguousarray(array))
        self.register_buffer(name, value.float() if value.is_floating_point() else value.long())
        return name

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...] | torch.Tensor:
        """``x``: the graph's one input (NHWC float32, any batch); the outputs in the file's order."""
        env: dict[int, _Value] = {self.input_tensors[0]: _Value(x, nchw=False)}
        for step in self._steps:
            step(env)
        outputs = tuple(_to_nhwc(env[i]).contiguous() for i in self.output_tensors)
        return outputs[0] if len(outputs) == 1 else outputs


class _Builder:
    """Walks the flatbuffer once and turns each operator into a closure over registered buffers."""

    def __init__(self, path: Path, data: bytes) -> None:
        import tflite

        self.tflite = tflite
        self.path = path
        self.model = tflite.Model.GetRootAsModel(data, 0)
        if self.model.SubgraphsLength() != 1:
            raise TFLiteImportError(f"{path}: {self.model.SubgraphsLength()} subgraphs, only one is supported")
        self.graph = self.model.Subgraphs(0)
        self.module = TFLiteModule()
        self.consts: dict[int, np.ndarray] = {}  # tensor index -> value, for constants and folded dequantizes

    # --- tensors --------------------------------------------------------------------------------------

    def shape(self, index: int) -> tuple[int, ...]:
        tensor = self.graph.Tensors(index)
        return tuple(int(d) for d in tensor.ShapeAsNumpy()) if tensor.ShapeLength() else ()

    def name(self, index: int) -> str:
        return self.graph.Tensors(index).Name().decode()

    def const(self, index: int) -> np.ndarray | None:
        if index in self.consts:
            return self.consts[index]
        tensor = self.graph.Tensors(index)
        buffer = self.model.Buffers(tensor.Buffer())
        if buffer is None or buffer.DataLength() == 0:
            return None
        dtype = _NUMPY_TYPES.get(tensor.Type())
        if dtype is None:
            raise TFLiteImportError(f"{self.path}: constant tensor {self.name(index)!r} has unsupported type "
                                    f"{tensor.Type()}")
        if tensor.Quantization() is not None and tensor.Quantization().ScaleLength() > 0:
            raise TFLiteImportError(f"{self.path}: tensor {self.name(index)!r} is integer-quantized (not supported)")
        value = np.frombuffer(buffer.DataAsNumpy().tobytes(), dtype=dtype).reshape(self.shape(index))
        self.consts[index] = value
        return value

    def need_const(self, index: int, op: str) -> np.ndarray:
        value = self.const(index)
        if value is None:
            raise TFLiteImportError(f"{self.path}: {op} needs a constant tensor for {self.name(index)!r}")
        return value

    # --- operators ------------------------------------------------------------------------------------

    def options(self, op, cls):  # type: ignore[no-untyped-def]
        table = op.BuiltinOptions()
        opts = cls()
        if table is not None:
            opts.Init(table.Bytes, table.Pos)
        return opts

    def build(self) -> TFLiteModule:
        tfl, graph, module = self.tflite, self.graph, self.module
        module.input_tensors = [int(i) for i in graph.InputsAsNumpy()]
        module.output_tensors = [int(i) for i in graph.OutputsAsNumpy()]
        module.input_names = [self.name(i) for i in module.input_tensors]
        module.output_names = [self.name(i) for i in module.output_tensors]
        module.input_shapes = [self.shape(i) for i in module.input_tensors]
        module.output_shapes = [self.shape(i) for i in module.output_tensors]
        if len(module.input_tensors) != 1:  # one positional input keeps the dynamo export's signature plain
            raise TFLiteImportError(f"{self.path}: {len(module.input_tensors)} graph inputs, only one is supported")
        for index in module.input_tensors:
            if graph.Tensors(index).Type() != 0:
                raise TFLiteImportError(f"{self.path}: input {self.name(index)!r} is not float32")
        # Refuse every unsupported operator before building anything, naming all of them.
        names = [self.op_name(graph.Operators(j)) for j in range(graph.OperatorsLength())]
        unsupported = sorted({n for n in names if n not in SUPPORTED_OPERATORS})
        if unsupported:
            raise TFLiteImportError(f"{self.path}: unsupported TFLite operator(s) {', '.join(unsupported)}"
                                    f" (supported: {', '.join(SUPPORTED_OPERATORS)})")
        for j in range(graph.OperatorsLength()):
            op = graph.Operators(j)
            name = names[j]
            module.operators.append(name)
            ins = [int(i) for i in op.InputsAsNumpy()]
            outs = [int(i) for i in op.OutputsAsNumpy()]
            getattr(self, "op_" + name.removeprefix("CUSTOM:"))(op, ins, outs, tfl)
        return module

    def op_name(self, op) -> str:  # type: ignore[no-untyped-def]
        code = self.model.OperatorCodes(op.OpcodeIndex())
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        name = self.tflite.opcode2name(builtin)
        if name == "CUSTOM":
            return "CUSTOM:" + (code.CustomCode() or b"").decode()
        return name

    def add_step(self, step: Callable[[dict[int, _Value]], None]) -> None:
        self.module._steps.append(step)

    def buffer(self, array: np.ndarray) -> Callable[[], torch.Tensor]:
        name = self.module.constant(array)
        module = self.module
        return lambda: getattr(module, name)

    def op_DEQUANTIZE(self, op, ins, outs, tfl) -> None:  # type: ignore[no-untyped-def]
        value = self.const(ins[0])
        if value is None or value.dtype != np.float16:
            raise TFLiteImportError(f"{self.path}: DEQUANTIZE of {self.name(ins[0])!r} is not of a constant FP16 "
                                    "tensor (only FP16 weight dequantization is supported)")
        self.consts[outs[0]] = value.astype(np.float32)

    def _conv_common(self, op, ins, outs, depthwise: bool, tfl):  # type: ignore[no-untyped-def]
        kind = "DEPTHWISE_CONV_2D" if depthwise else "CONV_2D"
        opts = self.options(op, tfl.DepthwiseConv2DOptions if depthwise else tfl.Conv2DOptions)
        weight = self.need_const(ins[1], kind).astype(np.float32)
        bias = self.const(ins[2]) if len(ins) > 2 and ins[2] >= 0 else None
        in_shape = self.shape(ins[0])
        stride = (opts.StrideH(), opts.StrideW())
        dilation = (opts.DilationHFactor(), opts.DilationWFactor())
        if depthwise:  # [1, KH, KW, C*M] -> [C*M, 1, KH, KW], groups = C (output channel = c*M + m)
            groups = in_shape[3]
            w = weight.transpose(3, 0, 1, 2)
        else:  # OHWI -> OIHW
            groups = 1
            w = weight.transpose(0, 3, 1, 2)
            if weight.shape[3] != in_shape[3]:
                raise TFLiteImportError(f"{self.path}: grouped CONV_2D is not supported")
        kernel = (w.shape[2], w.shape[3])
        if _PADDING[opts.Padding()] == "SAME":
            ph = _same_padding(in_shape[1], kernel[0], stride[0], dilation[0])
            pw = _same_padding(in_shape[2], kernel[1], stride[1], dilation[1])
        else:
            ph = pw = (0, 0)
        get_b = self.buffer(bias.astype(np.float32)) if bias is not None else None
        act = _activation(opts.FusedActivationFunction(), kind, self.path)
        if in_shape[1] == in_shape[2] == 1 and self.shape(outs[0])[1:3] == (1, 1) and dilation == (1, 1):
            # A 1x1 image (squeeze-and-excitation branches): only the tap at the padding offset touches it,
            # so the convolution is a matrix product. Exact, and it keeps the exporter's convolution backend
            # choice (which guards on the batch size for 1x1 images) out of the graph.
            taps = w[:, :, ph[0], pw[0]]  # (out, in / groups)
            if groups == 1:
                dense = taps
            else:
                per_group = w.shape[0] // groups
                dense = np.zeros((w.shape[0], in_shape[3]), np.float32)
                dense[np.arange(w.shape[0]), np.arange(w.shape[0]) // per_group] = taps[:, 0]
            get_dense = self.buffer(np.ascontiguousarray(dense))
            out_c = w.shape[0]

            def matmul_step(env: dict[int, _Value]) -> None:
                x = _to_nchw(env[ins[0]]).flatten(1)
                y = F.linear(x, get_dense(), get_b() if get_b else None).reshape(-1, out_c, 1, 1)
                env[outs[0]] = _Value(act(y), nchw=True)

            self.add_step(matmul_step)
            return
        get_w = self.buffer(w)
        symmetric = ph[0] == ph[1] and pw[0] == pw[1]

        def step(env: dict[int, _Value]) -> None:
            x = _to_nchw(env[ins[0]])
            if symmetric:
                y = F.conv2d(x, get_w(), get_b() if get_b else None, stride, (ph[0], pw[0]), dilation, groups)
            else:
                x = F.pad(x, (pw[0], pw[1], ph[0], ph[1]))
                y = F.conv2d(x, get_w(), get_b() if get_b else None, stride, 0, dilation, groups)
            env[outs[0]] = _Value(act(y), nchw=True)

        self.add_step(step)

    def op_CONV_2D(self, op, ins, outs, tfl) -> None:  # type: ignore[no-untyped-def]
        self._conv_common(op, ins, outs, False, tfl)

    def op_DEPTHWISE_CONV_2D(self, op, ins, outs, tfl) -> None:  # type: ignore[no-untyped-def]
        self._conv_common(op, ins, outs, True, tfl)

    def op_Convolution2DTransposeBias(self, op, ins, outs, tfl) -> None:  # type: ignore[no-untyped-def]
        raw = op.CustomOptionsAsNumpy().tobytes() if op.CustomOptionsLength() else b""
        if len(raw) != 12:
            raise TFLiteImportError(f"{self.path}: Convolution2DTransposeBias options are {len(raw)} bytes, "
                                    "expected 12 (TfLiteTransposeConvParams)")
        padding, stride_w, stride_h = struct.unpack("<iii", raw)
        if padding not in _TFLITE_PADDING:
            raise TFLiteImportError(f"{self.path}: Convolution2DTransposeBias has unknown padding {padding}")
        weight = self.need_const(ins[1], "Convolution2DTransposeBias").astype(np.float32)  # OHWI
        bias = self.need_const(ins[2], "Convolution2DTransposeBias").astype(np.float32)
        _, in_h, in_w, _ = self.shape(ins[0])
        kh, kw = weight.shape[1], weight.shape[2]
        total_h = total_w = 0
        if _TFLITE_PADDING[padding] == "SAME":
            total_h = max(0, kh - (in_h - 1) % stride_h - 1)
            total_w = max(0, kw - (in_w - 1) % stride_w - 1)
        out_h = stride_h * (in_h - 1) + kh - total_h
        out_w = stride_w * (in_w - 1) + kw - total_w
        top, left = total_h // 2, total_w // 2
        get_w = self.buffer(weight.transpose(3, 0, 1, 2))  # OHWI -> (in, out, KH, KW), torch's layout
        get_b = self.buffer(bias)

        def step(env: dict[int, _Value]) -> None:
            x = _to_nchw(env[ins[0]])
            y = F.conv_transpose2d(x, get_w(), get_b(), (stride_h, stride_w))  # full output, then crop
            env[outs[0]] = _Value(y[:, :, top : top + out_h, left : left + out_w], nchw=True)

        self.add_step(step)

    def _pool(self, op, ins, outs, tfl, kind: str) -> None:  # type: ignore[no-untyped-def]
        opts = self.options(op, tfl.Pool2DOptions)
        _, in_h, in_w, _ = self.shape(ins[0])
        kernel = (opts.FilterHeight(), opts.FilterWidth())
        stride = (opts.StrideH(), opts.StrideW())
        if _PADDING[opts.Padding()] == "SAME":
            ph = _same_padding(in_h, kernel[0], stride[0])
            pw = _same_padding(in_w, kernel[1], stride[1])
        else:
            ph = pw = (0, 0)
        act = _activation(opts.FusedActivationFunction(), kind, self.path)
        padded = any(ph) or any(pw)
        get_count = None
        if kind == "AVERAGE_POOL_2D" and padded:
            # TFLite divides by the number of real pixels under the window, not the window's size.
            ones = torch.ones(1, 1, in_h, in_w)
            count = F.avg_pool2d(F.pad(ones, (pw[0], pw[1], ph[0], ph[1])), kernel, stride, divisor_override=1)
            get_count = self.buffer(count.numpy())

        def step(env: dict[int, _Value]) -> None:
            x = _to_nchw(env[ins[0]])
            if kind == "MAX_POOL_2D":
                if padded:
                    x = F.pad(x, (pw[0], pw[1], ph[0], ph[1]), value=float("-inf"))
                y = F.max_pool2d(x, kernel, stride)
            elif get_count is not None:
                y = F.avg_pool2d(F.pad(x, (pw[0], pw[1], ph[0], ph[1])), kernel, stride, divisor_override=1)
                y = y / get_count()
            else:
                y = F.avg_pool2d(x, kernel, stride)
            env[outs[0]] = _Value(act(y), nchw=True)

        self.add_step(step)

    def op_AVERAGE_POOL_2D(self, op, ins, outs, tfl) -> None:  # type: ignore[no-untyped-def]
        self._pool(op, ins, outs, tfl, "AVERAGE_POOL_2D")

    def op_MAX_POOL_2D(self, op, ins, outs, tfl) -> None:  # type: ignore[no-untyped-def]
        self._pool(op, ins, outs, tfl, "MAX_POOL_2D")

    def _operand(self, index: int) -> Callable[[dict[int, _Value], bool], torch.Tensor]:
        """A binary operand, in NCHW (``True``) or the TFLite layout; constants are laid out at build time."""
        value = self.const(index)
        if value is None:
            return lambda env, nchw: _to_nchw(env[index]) if nchw else _to_nhwc(env[index])
        value = value.astype(np.float32)
        plain = self.buffer(value)
        if value.ndim <= 4:
            as4 = value.reshape((1,) * (4 - value.ndim) + value.shape).transpose(0, 3, 1, 2)
            four = self.buffer(as4)
        else:
            four = plain
        return lambda env, nchw: four() if nchw else plain()

    def _binary(self, ins, outs, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], act) -> None:  # type: ignore[no-untyped-def]
        a, b = self._operand(ins[0]), self._operand(ins[1])
        const_a, const_b = self.const(ins[0]) is not None, self.const(ins[1]) is not None
        out_rank = len(self.shape(outs[0]))

        def step(env: dict[int, _Value]) -> None:
            dynamic = [env[i] for i, c in ((ins[0], const_a), (ins[1], const_b)) if not c]
            # NCHW when the result is 4-D, every dynamic operand is 4-D (broadcasts line up) and one is NCHW.
            nchw = out_rank == 4 and all(v.tensor.dim() == 4 for v in dynamic) and any(v.nchw for v in dynamic)
            env[outs[0]] = _Value(act(fn(a(env, nchw), b(env, nchw))), nchw=nchw)

        self.add_step(step)

    def op_ADD(self, op, ins, outs, tfl) -> None:  # type: ignore[no-untyped-def]
        opts = self.options(op, tfl.AddOptions)
        self._binary(ins, outs, torch.add, _activation(opts.FusedActivationFunction(), "ADD", self.path))

    def op_MUL(self, op, ins, outs, tfl) -> None:  # type: ignore[no-untyped-def]
        opts = self.options(op, tfl.MulOptions)
        self._binary(ins, outs, torch.mul, _activation(opts.FusedActivationFunction(), "MUL", self.path))

    def op_PRELU(self, op, ins, outs, tfl) -> None:  # type: ignore[no-untyped-def]
        # max(x, 0) + alpha * min(x, 0), alpha broadcast like TFLite (trailing axes), not torch's per-channel.
        self._binary(ins, outs, lambda x, alpha: torch.where(x >= 0, x, x * alpha), lambda y: y)

    def _unary(self, ins, outs, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:  # type: ignore[no-untyped-def]
        def step(env: dict[int, _Value]) -> None:
            v = env[ins[0]]
            env[outs[0]] = _Value(fn(v.tensor), v.nchw)

        self.add_step(step)

    def op_RELU(self, op, ins, outs, tfl) -> None:  # type: ignore[no-untyped-def]
        self._unary(ins, outs, F.relu)

    def op_RELU6(self, op, ins, outs, tfl) -> None:  # type: ignore[no-untyped-def]
        self._unary(ins, outs, lambda x: torch.clamp(x, 0.0, 6.0))

    def op_TANH(self, op, ins, outs, tfl) -> None:  # type: ignore[no-untyped-def]
        self._unary(ins, outs, torch.tanh)

    def op_LOGISTIC(self, op, ins, outs, tfl) -> None:  # type: ignore[no-untyped-def]
        self._unary(ins, outs, torch.sigmoid)

    def op_HARD_SWISH(self, op, ins, outs, tfl) -> None:  # type: ignore[no-untyped-def]
        self._unary(ins, outs, lambda x: x * torch.clamp(x + 3.0, 0.0, 6.0) / 6.0)

    def op_PAD(self, op, ins, outs, tfl) -> None:  # type: ignore[no-untyped-def]
        pads = self.need_const(ins[1], "PAD").astype(np.int64).reshape(-1, 2)
        if pads[0].any():
            raise TFLiteImportError(f"{self.path}: PAD of the batch dimension is not supported")
        rank = len(self.shape(ins[0]))

        def step(env: dict[int, _Value]) -> None:
            v = env[ins[0]]
            order = [0, 3, 1, 2] if (v.nchw and rank == 4) else list(range(rank))  # tensor axis -> TFLite axis
            spec: list[int] = []
            for axis in reversed(order):  # F.pad lists the last axis first
                spec += [int(pads[axis][0]), int(pads[axis][1])]
            env[outs[0]] = _Value(F.pad(v.tensor, spec), v.nchw)

        self.add_step(step)

    def op_RESHAPE(self, op, ins, outs, tfl) -> None:  # type: ignore[no-untyped-def]
        target = self.shape(outs[0])
        if not target:
            raise TFLiteImportError(f"{self.path}: RESHAPE to an unknown shape is not supported")
        tail = tuple(target[1:])  # the first axis is the batch, whatever the file says

        def step(env: dict[int, _Value]) -> None:
            env[outs[0]] = _Value(_to_nhwc(env[ins[0]]).reshape(-1, *tail), nchw=False)

        self.add_step(step)

    def op_CONCATENATION(self, op, ins, outs, tfl) -> None:  # type: ignore[no-untyped-def]
        opts = self.options(op, tfl.ConcatenationOptions)
        rank = len(self.shape(outs[0]))
        axis = opts.Axis() % rank
        if axis == 0:
            raise TFLiteImportError(f"{self.path}: CONCATENATION along the batch axis is not supported")
        act = _activation(opts.FusedActivationFunction(), "CONCATENATION", self.path)
        getters = [self._operand(i) for i in ins]

        def step(env: dict[int, _Value]) -> None:
            values = [env[i] for i in ins if i in env]
            nchw = rank == 4 and len(values) == len(ins) and all(v.nchw for v in values)
            dim = [0, 2, 3, 1][axis] if nchw else axis
            env[outs[0]] = _Value(act(torch.cat([g(env, nchw) for g in getters], dim=dim)), nchw=nchw)

        self.add_step(step)

    def op_RESIZE_BILINEAR(self, op, ins, outs, tfl) -> None:  # type: ignore[no-untyped-def]
        opts = self.options(op, tfl.ResizeBilinearOptions)
        size = tuple(int(s) for s in self.need_const(ins[1], "RESIZE_BILINEAR").reshape(-1))
        align, half = bool(opts.AlignCorners()), bool(opts.HalfPixelCenters())
        if not align and not half:
            # TF1's legacy sampling (src = dst * in / out) has no torch/ONNX-Resize twin we rely on here.
            raise TFLiteImportError(f"{self.path}: RESIZE_BILINEAR without align_corners or half_pixel_centers "
                                    "(legacy sampling) is not supported")
        if align and half:
            raise TFLiteImportError(f"{self.path}: RESIZE_BILINEAR with both align_corners and half_pixel_centers")

        def step(env: dict[int, _Value]) -> None:
            x = _to_nchw(env[ins[0]])
            env[outs[0]] = _Value(F.interpolate(x, size=size, mode="bilinear", align_corners=align), nchw=True)

        self.add_step(step)


def import_tflite(path: str | Path) -> TFLiteModule:
    """Read the TFLite file at ``path`` and return it as an eval-mode torch module (NHWC in and out)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TFLiteImportError(f"{path}: cannot read the TFLite file: {exc}") from None
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise TFLiteImportError(f"{path}: not a TFLite flatbuffer (no TFL3 identifier)")
    module = _Builder(path, data).build()
    return module.eval()


def operator_names(path: str | Path) -> list[str]:
    """The operator names of a TFLite file in graph order (custom operators as ``CUSTOM:<code>``)."""
    path = Path(path)
    builder = _Builder(path, path.read_bytes())
    return [builder.op_name(builder.graph.Operators(j)) for j in range(builder.graph.OperatorsLength())]


def check_io(module: TFLiteModule, inputs: Sequence[str], outputs: Sequence[str], path: Path) -> None:
    """The manifest's input/output names must be the TFLite graph's, in order."""
    if list(inputs) != module.input_names or list(outputs) != module.output_names:
        raise TFLiteImportError(
            f"{path}: the graph's inputs are {module.input_names} and outputs {module.output_names};"
            f" the manifest says {list(inputs)} and {list(outputs)}"
        )
