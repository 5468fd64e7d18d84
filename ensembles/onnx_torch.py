"""Run an ONNX graph as a PyTorch module (the CUDA runner's path for ONNX networks: MTCNN, user files).

``onnx2torch`` 1.5 was tried first and refuses every network of the default manifest (Resize and Split
at opset 18, ``auto_pad = SAME_UPPER``, ``Reshape allowzero``), so this is a small interpreter of our
own: the graph's nodes, in their (topological) order, each mapped to torch operations. Float
initializers become buffers (``.to(device)``, ``.half()`` and channels-last move them); integer
initializers and shape arithmetic stay on the CPU as plain values, so running the module never reads
a GPU tensor back to the host (a CUDA graph can capture it). An operator outside :data:`OPS` is refused
when the module is made, naming the operator, the node and the file.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class UnsupportedOnnxError(ValueError):
    """The graph uses an operator (or attribute) the interpreter does not implement."""


Node = Any  # onnx.NodeProto
Values = dict[str, Any]  # tensor name -> torch.Tensor (data) or a CPU tensor of int64 (shapes, axes)


def _attrs(node: Node) -> dict[str, Any]:
    import onnx

    out = {}
    for a in node.attribute:
        value = onnx.helper.get_attribute_value(a)
        out[a.name] = value.decode() if isinstance(value, bytes) else value
    return out


def _ints(value: Any) -> list[int]:
    """A shape/axes operand (CPU int tensor, list or None) as a list of Python ints."""
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.reshape(-1).tolist()]
    return [int(v) for v in value]


def _same_pads(size: int, kernel: int, stride: int, dilation: int, upper: bool) -> tuple[int, int]:
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    small, big = total // 2, total - total // 2
    return (small, big) if upper else (big, small)


def _pad_for(x: torch.Tensor, attrs: dict[str, Any], kernel: Sequence[int], value: float = 0.0) -> torch.Tensor:
    """Apply ONNX padding (explicit ``pads`` or ``auto_pad``) to a 2-D spatial NCHW tensor."""
    auto = attrs.get("auto_pad", "NOTSET")
    strides = attrs.get("strides", [1] * len(kernel))
    dilations = attrs.get("dilations", [1] * len(kernel))
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pairs = [_same_pads(x.shape[2 + i], kernel[i], strides[i], dilations[i], auto == "SAME_UPPER")
                 for i in range(len(kernel))]  # fmt: skip
    elif auto == "VALID":
        return x
    else:
        pads = attrs.get("pads", [0] * 2 * len(kernel))
        pairs = [(pads[i], pads[i + len(kernel)]) for i in range(len(kernel))]
    flat = [p for pair in reversed(pairs) for p in pair]  # F.pad wants the last dimension first
    return F.pad(x, flat, value=value) if any(flat) else x


def _conv(m: OnnxModule, node: Node, a: dict, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None):
    kernel = list(w.shape[2:])
    x = _pad_for(x, a, kernel)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(kernel)]
    return conv(x, w, b, stride=a.get("strides", 1), dilation=a.get("dilations", 1), groups=a.get("group", 1))


def _conv_transpose(m: OnnxModule, node: Node, a: dict, x, w, b=None):  # type: ignore[no-untyped-def]
    if a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID") or a.get("output_shape"):
        raise UnsupportedOnnxError(f"ConvTranspose {node.name!r}: auto_pad/output_shape are not supported")
    pads = a.get("pads", [0, 0, 0, 0])
    if pads[:2] != pads[2:]:
        raise UnsupportedOnnxError(f"ConvTranspose {node.name!r}: asymmetric pads are not supported")
    return F.conv_transpose2d(x, w, b, stride=a.get("strides", 1), padding=pads[:2],
                              output_padding=a.get("output_padding", 0), groups=a.get("group", 1),
                              dilation=a.get("dilations", 1))  # fmt: skip


def _pool(kind: str) -> Callable[..., torch.Tensor]:
    def run(m: OnnxModule, node: Node, a: dict, x: torch.Tensor) -> torch.Tensor:
        kernel = a["kernel_shape"]
        if a.get("ceil_mode", 0):
            raise UnsupportedOnnxError(f"{node.op_type} {node.name!r}: ceil_mode is not supported")
        value = -math.inf if kind == "max" else 0.0
        padded = _pad_for(x, a, kernel, value)
        strides = a.get("strides", kernel)
        if kind == "max":
            return F.max_pool2d(padded, kernel, strides, dilation=a.get("dilations", 1))
        if a.get("count_include_pad", 0) == 0 and padded is not x:
            ones = _pad_for(torch.ones_like(x[:, :1]), a, kernel, 0.0)
            return F.avg_pool2d(padded, kernel, strides) / F.avg_pool2d(ones, kernel, strides)
        return F.avg_pool2d(padded, kernel, strides)

    return run


def _gemm(m: OnnxModule, node: Node, a: dict, x, w, c=None):  # type: ignore[no-untyped-def]
    if a.get("transA", 0):
        x = x.transpose(-1, -2)
    if a.get("transB", 0):
        w = w.transpose(-1, -2)
    y = (x @ w) * a.get("alpha", 1.0)
    return y if c is None else y + c * a.get("beta", 1.0)


def _reshape(m: OnnxModule, node: Node, a: dict, x, shape):  # type: ignore[no-untyped-def]
    dims = _ints(shape)
    if not a.get("allowzero", 0):
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _resize(m: OnnxModule, node: Node, a: dict, x, roi=None, scales=None, sizes=None):  # type: ignore[no-untyped-def]
    mode = a.get("mode", "nearest")
    transform = a.get("coordinate_transformation_mode", "half_pixel")
    size = _ints(sizes)[2:] if sizes is not None and _ints(sizes) else None
    factors = [float(s) for s in scales.reshape(-1).tolist()][2:] if scales is not None and scales.numel() else None
    if size is None and factors is not None:
        size = [math.floor(x.shape[2 + i] * f) for i, f in enumerate(factors)]
    if mode == "linear" and transform in ("half_pixel", "pytorch_half_pixel", "align_corners"):
        return F.interpolate(x, size=size, mode="bilinear", align_corners=transform == "align_corners")
    if mode == "nearest" and transform == "asymmetric" and a.get("nearest_mode", "round_prefer_floor") == "floor":
        return F.interpolate(x, size=size, mode="nearest")
    raise UnsupportedOnnxError(f"Resize {node.name!r}: mode {mode!r} with {transform!r} is not supported")


def _split(m: OnnxModule, node: Node, a: dict, x, split=None):  # type: ignore[no-untyped-def]
    axis = a.get("axis", 0)
    sizes = _ints(split) or a.get("split")
    if not sizes:
        parts = a.get("num_outputs", len(node.output))
        sizes = [x.shape[axis] // parts] * parts
    return tuple(torch.split(x, sizes, dim=axis))


def _axes(a: dict, axes: Any) -> list[int]:
    return _ints(axes) or list(a.get("axes", []))


def _unsqueeze(m: OnnxModule, node: Node, a: dict, x, axes=None):  # type: ignore[no-untyped-def]
    for axis in sorted(_axes(a, axes)):
        x = x.unsqueeze(axis)
    return x


def _squeeze(m: OnnxModule, node: Node, a: dict, x, axes=None):  # type: ignore[no-untyped-def]
    dims = _axes(a, axes)
    return x.squeeze(dims) if dims else x.squeeze()


def _slice(m: OnnxModule, node: Node, a: dict, x, starts, ends, axes=None, steps=None):  # type: ignore[no-untyped-def]
    starts, ends = _ints(starts), _ints(ends)
    axes_list = _ints(axes) or list(range(len(starts)))
    steps_list = _ints(steps) or [1] * len(starts)
    index = [slice(None)] * x.dim()
    for s, e, ax, st in zip(starts, ends, axes_list, steps_list, strict=True):
        if st < 0:
            raise UnsupportedOnnxError(f"Slice {node.name!r}: negative steps are not supported")
        index[ax] = slice(s, min(e, x.shape[ax]), st)
    return x[tuple(index)]


def _batch_norm(m: OnnxModule, node: Node, a: dict, x, scale, bias, mean, var):  # type: ignore[no-untyped-def]
    return F.batch_norm(x, mean, var, scale, bias, training=False, eps=a.get("epsilon", 1e-5))


def _instance_norm(m: OnnxModule, node: Node, a: dict, x, scale, bias):  # type: ignore[no-untyped-def]
    return F.instance_norm(x, weight=scale, bias=bias, eps=a.get("epsilon", 1e-5))


def _softmax(m: OnnxModule, node: Node, a: dict, x):  # type: ignore[no-untyped-def]
    return torch.softmax(x, dim=a.get("axis", -1))


def _concat(m: OnnxModule, node: Node, a: dict, *xs):  # type: ignore[no-untyped-def]
    if all(isinstance(v, torch.Tensor) and v.device.type == "cpu" and v.dtype == torch.int64 for v in xs):
        return torch.cat(xs, dim=a.get("axis", 0))  # shape arithmetic, on the CPU
    return torch.cat([v for v in xs], dim=a.get("axis", 0))


def _cast(m: OnnxModule, node: Node, a: dict, x):  # type: ignore[no-untyped-def]
    from imgpipe.dtypes import from_onnx, torch_dtype

    target = torch_dtype(from_onnx(a["to"]))
    if target.is_floating_point and x.is_floating_point() and m.is_half:
        return x  # a half-precision module keeps its working type
    return x.to(target)


def _pad(m: OnnxModule, node: Node, a: dict, x, pads=None, value=None, axes=None):  # type: ignore[no-untyped-def]
    if a.get("mode", "constant") != "constant" or axes is not None:
        raise UnsupportedOnnxError(f"Pad {node.name!r}: only constant padding over all axes is supported")
    p = _ints(pads) or a.get("pads", [])
    n = x.dim()
    flat = [q for i in reversed(range(n)) for q in (p[i], p[i + n])]
    fill = 0.0 if value is None or not value.numel() else float(value.reshape(-1)[0])
    return F.pad(x, flat, value=fill)


def _constant(m: OnnxModule, node: Node, a: dict):  # type: ignore[no-untyped-def]
    from onnx import numpy_helper

    if "value" in a:
        return m.constant(numpy_helper.to_array(a["value"]))
    for key in ("value_float", "value_int"):
        if key in a:
            return m.constant(np.array(a[key]))
    for key in ("value_floats", "value_ints"):
        if key in a:
            return m.constant(np.array(a[key]))
    raise UnsupportedOnnxError(f"Constant {node.name!r}: unsupported value kind")


def _binary(fn: Callable[[Any, Any], Any]) -> Callable[..., Any]:
    return lambda m, node, a, x, y: fn(x, y)


def _unary(fn: Callable[[Any], Any]) -> Callable[..., Any]:
    return lambda m, node, a, x: fn(x)


OPS: dict[str, Callable[..., Any]] = {
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "MaxPool": _pool("max"),
    "AveragePool": _pool("avg"),
    "GlobalAveragePool": _unary(lambda x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True)),
    "Relu": _unary(F.relu),
    "Sigmoid": _unary(torch.sigmoid),
    "Tanh": _unary(torch.tanh),
    "Erf": _unary(torch.erf),
    "Sqrt": _unary(torch.sqrt),
    "Exp": _unary(torch.exp),
    "Neg": _unary(torch.neg),
    "Identity": _unary(lambda x: x),
    "HardSwish": _unary(F.hardswish),
    "LeakyRelu": lambda m, node, a, x: F.leaky_relu(x, a.get("alpha", 0.01)),
    "HardSigmoid": lambda m, node, a, x: (x * a.get("alpha", 0.2) + a.get("beta", 0.5)).clamp(0, 1),
    "PRelu": lambda m, node, a, x, slope: torch.where(x >= 0, x, x * slope),
    "Clip": lambda m, node, a, x, low=None, high=None: x.clamp(
        None if low is None else float(low), None if high is None else float(high)
    ),
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _binary(torch.div),
    "Pow": _binary(torch.pow),
    "Equal": _binary(torch.eq),
    "Greater": _binary(torch.gt),
    "GreaterOrEqual": _binary(torch.ge),
    "Less": _binary(torch.lt),
    "LessOrEqual": _binary(torch.le),
    "Min": _binary(torch.minimum),
    "Max": _binary(torch.maximum),
    "Where": lambda m, node, a, cond, x, y: torch.where(cond.to(torch.bool), x, y),
    "MatMul": _binary(torch.matmul),
    "Gemm": _gemm,
    "Softmax": _softmax,
    "Flatten": lambda m, node, a, x: x.reshape(math.prod(x.shape[: a.get("axis", 1)]), -1),
    "Reshape": _reshape,
    "Transpose": lambda m, node, a, x: x.permute(a.get("perm", list(reversed(range(x.dim()))))),
    "Concat": _concat,
    "Split": _split,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Slice": _slice,
    "Shape": lambda m, node, a, x: torch.tensor(list(x.shape), dtype=torch.int64)[
        a.get("start", 0) : a.get("end", None)
    ],
    "Gather": lambda m, node, a, x, idx: torch.index_select(x, a.get("axis", 0), idx.reshape(-1).to(x.device)).reshape(
        *x.shape[: a.get("axis", 0)], *idx.shape, *x.shape[a.get("axis", 0) + 1 :]
    ),
    "Resize": _resize,
    "BatchNormalization": _batch_norm,
    "InstanceNormalization": _instance_norm,
    "ReduceMean": lambda m, node, a, x, axes=None: x.mean(
        dim=_axes(a, axes) or None, keepdim=bool(a.get("keepdims", 1))
    ),
    "Cast": _cast,
    "Pad": _pad,
    "Constant": _constant,
}


# Operand positions read as host values (sizes, scales, bounds): their initializers stay on the CPU
# even when they are floats, so a forward pass never reads the GPU back.
HOST_OPERANDS: dict[str, tuple[int, ...]] = {"Resize": (1, 2, 3), "Clip": (1, 2), "Pad": (1, 2, 3)}


class OnnxModule(nn.Module):
    """An ONNX graph as a module: ``forward(*inputs)`` returns the graph outputs as a tuple."""

    def __init__(self, path: str | Path) -> None:
        import onnx
        from onnx import numpy_helper

        super().__init__()
        model = onnx.load(str(path))
        graph = model.graph
        unknown = sorted({n.op_type for n in graph.node if n.domain not in ("", "ai.onnx") or n.op_type not in OPS})
        if unknown:
            first = next(n for n in graph.node if n.op_type in unknown)
            raise UnsupportedOnnxError(
                f"{Path(path).name}: operator(s) {', '.join(unknown)} not supported by the CUDA runner's ONNX"
                f" interpreter (first: node {first.name!r}); serve this network with the onnxruntime runner"
            )
        self.is_half = False
        self._constants: dict[str, torch.Tensor] = {}
        self._buffer_names: dict[str, str] = {}
        host = {n.input[i] for n in graph.node for i in HOST_OPERANDS.get(n.op_type, ()) if i < len(n.input)}
        for i, init in enumerate(graph.initializer):
            self._store(init.name, numpy_helper.to_array(init), f"w{i}", on_host=init.name in host)
        names = {init.name for init in graph.initializer}
        self.input_names = [v.name for v in graph.input if v.name not in names]
        self.output_names = [v.name for v in graph.output]
        self.nodes = [(n, _attrs(n)) for n in graph.node]

    def _store(self, name: str, array: np.ndarray, key: str, on_host: bool = False) -> None:
        if array.dtype.kind == "f" and not on_host:
            self.register_buffer(key, torch.from_numpy(array.copy()))
            self._buffer_names[name] = key
        else:  # shapes, axes, indices: stay on the CPU as given
            self._constants[name] = torch.from_numpy(array.copy())

    def constant(self, array: np.ndarray) -> torch.Tensor:
        """A Constant node's value: float data on the module's device and type, integers on the CPU."""
        tensor = torch.from_numpy(np.asarray(array).copy())
        if tensor.is_floating_point():
            reference = next(iter(self.buffers()), None)
            if reference is not None:
                tensor = tensor.to(reference.device, reference.dtype)
        return tensor

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> OnnxModule:  # type: ignore[override]
        module = super()._apply(fn, recurse)
        reference = next(iter(self.buffers()), None)
        self.is_half = reference is not None and reference.dtype == torch.float16
        return module  # type: ignore[return-value]

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        values: Values = dict(self._constants)
        values.update({name: getattr(self, key) for name, key in self._buffer_names.items()})
        values.update(zip(self.input_names, inputs, strict=True))
        for node, attrs in self.nodes:
            args = [values[name] if name else None for name in node.input]
            result = OPS[node.op_type](self, node, attrs, *args)
            if isinstance(result, tuple):
                values.update(zip(node.output, result, strict=False))
            else:
                values[node.output[0]] = result
        return tuple(values[name] for name in self.output_names)
