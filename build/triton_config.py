"""Typed Triton model configurations, rendered through ``model_config_pb2`` (never string templates).

Each :class:`ModelSpec` becomes one ``config.pbtxt``: :func:`to_proto` fills a
``tritonclient.grpc.model_config_pb2.ModelConfig`` and :func:`render` prints it with
``google.protobuf.text_format``; :func:`parse` reads one back (tests, ``imgpipe versions``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from imgpipe.manifest import Batching, Instances, Network, TensorSpec


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # Triton type name without TYPE_ ("FP32", "UINT8", "BYTES", ...)
    dims: tuple[int, ...]
    optional: bool = False

    @classmethod
    def of(cls, spec: TensorSpec) -> Tensor:
        return cls(spec.name, spec.dtype, spec.shape)


@dataclass(frozen=True)
class Warmup:
    """One warmup request: every input filled with zeros (or random data) at the given dims."""

    name: str
    inputs: tuple[Tensor, ...]
    batch_size: int = 1
    data: Literal["zero", "random"] = "zero"


@dataclass(frozen=True)
class Step:
    """One step of an ensemble: ``input_map``/``output_map`` map the model's names to ensemble tensors."""

    model_name: str
    input_map: dict[str, str]
    output_map: dict[str, str]
    model_version: int = -1


@dataclass(frozen=True)
class ModelSpec:
    name: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    backend: str = ""
    platform: str = ""
    max_batch_size: int = 0
    batching: Batching | None = None  # dynamic batching settings; None for no dynamic batcher
    instances: Instances | None = None
    parameters: dict[str, str] = field(default_factory=dict)
    warmup: tuple[Warmup, ...] = ()
    steps: tuple[Step, ...] = ()  # ensemble scheduling
    version_policy_latest: int = 0  # keep the latest N versions; 0: Triton's default (latest 1)


def _tensor_dtype(name: str) -> int:
    return mc.DataType.Value(f"TYPE_{'STRING' if name == 'BYTES' else name}")


def to_proto(spec: ModelSpec) -> mc.ModelConfig:
    config = mc.ModelConfig(name=spec.name, max_batch_size=spec.max_batch_size)
    if spec.backend:
        config.backend = spec.backend
    if spec.platform:
        config.platform = spec.platform
    for t in spec.inputs:
        config.input.append(
            mc.ModelInput(name=t.name, data_type=_tensor_dtype(t.dtype), dims=t.dims, optional=t.optional)
        )
    for t in spec.outputs:
        config.output.append(mc.ModelOutput(name=t.name, data_type=_tensor_dtype(t.dtype), dims=t.dims))
    if spec.batching is not None:
        b = spec.batching
        dyn = config.dynamic_batching
        dyn.preferred_batch_size.extend(b.preferred_batch_sizes)
        dyn.max_queue_delay_microseconds = b.max_queue_delay_us
        q = b.queue
        dyn.default_queue_policy.max_queue_size = q.max_queue_size
        dyn.default_queue_policy.timeout_action = mc.ModelQueuePolicy.TimeoutAction.Value(q.timeout_action)
        dyn.default_queue_policy.default_timeout_microseconds = q.default_timeout_us
        dyn.default_queue_policy.allow_timeout_override = q.allow_timeout_override
    if spec.instances is not None:
        kind = mc.ModelInstanceGroup.Kind.Value(f"KIND_{spec.instances.kind.upper()}")
        group = mc.ModelInstanceGroup(count=spec.instances.count, kind=kind)
        if spec.instances.kind == "gpu":
            group.gpus.extend(spec.instances.gpus)
        config.instance_group.append(group)
    for key, value in spec.parameters.items():
        config.parameters[key].string_value = value
    for w in spec.warmup:
        sample = mc.ModelWarmup(name=w.name, batch_size=w.batch_size)
        for t in w.inputs:
            inp = sample.inputs[t.name]
            inp.data_type = _tensor_dtype(t.dtype)
            inp.dims.extend(t.dims)
            if w.data == "zero":
                inp.zero_data = True
            else:
                inp.random_data = True
        config.model_warmup.append(sample)
    for s in spec.steps:
        step = config.ensemble_scheduling.step.add(model_name=s.model_name, model_version=s.model_version)
        step.input_map.update(s.input_map)
        step.output_map.update(s.output_map)
    if spec.version_policy_latest:
        config.version_policy.latest.num_versions = spec.version_policy_latest
    return config


def render(spec: ModelSpec) -> str:
    return text_format.MessageToString(to_proto(spec))


def parse(text: str) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())


def network_model(net: Network, backend: str, parameters: dict[str, str]) -> ModelSpec:
    """The Triton model of a manifest network: its I/O, dynamic batcher, instances and a zero warmup."""
    warmup = Warmup(
        name=f"{net.name}_zero",
        inputs=tuple(Tensor(s.name, s.dtype, s.static_shape) for s in net.inputs),
        batch_size=1,
    )
    return ModelSpec(
        name=net.name,
        backend=backend,
        inputs=tuple(Tensor.of(s) for s in net.inputs),
        outputs=tuple(Tensor.of(s) for s in net.outputs),
        max_batch_size=net.batching.max_batch_size,
        batching=net.batching,
        instances=net.instances,
        parameters=parameters,
        warmup=(warmup,),
    )
