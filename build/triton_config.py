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

from imgpipe.dtypes import dtype
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
    """One warmup request: every input filled with zeros, random data, or a file in ``<model>/warmup/``
    named after the input (``sample``)."""

    name: str
    inputs: tuple[Tensor, ...]
    batch_size: int = 1
    data: Literal["zero", "random", "sample"] = "zero"


@dataclass(frozen=True)
class InstanceGroup:
    count: int = 1
    kind: Literal["cpu", "gpu", "auto"] = "cpu"
    gpus: tuple[int, ...] = ()
    profiles: tuple[int, ...] = ()  # TensorRT optimization profiles this group's contexts use


@dataclass(frozen=True)
class Accelerator:
    """An execution accelerator (e.g. ONNX Runtime's ``tensorrt``) with its string parameters."""

    name: str
    parameters: dict[str, str] = field(default_factory=dict)


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
    instance_groups: tuple[InstanceGroup, ...] = ()
    parameters: dict[str, str] = field(default_factory=dict)
    warmup: tuple[Warmup, ...] = ()
    steps: tuple[Step, ...] = ()  # ensemble scheduling
    version_policy_latest: int = 0  # serve the latest N versions; 0: Triton's default (latest 1)
    version_policy_specific: tuple[int, ...] = ()  # serve exactly these (a rollback)
    default_model_filename: str = ""
    cc_model_filenames: dict[str, str] = field(default_factory=dict)  # compute capability -> file
    cuda_graphs: bool = False
    gpu_accelerators: tuple[Accelerator, ...] = ()
    response_cache: bool = False


def instance_groups(instances: Instances, profiles: int = 0) -> tuple[InstanceGroup, ...]:
    """The manifest's instances as Triton instance groups; with ``profile_per_instance``, one group of
    one instance per optimization profile."""
    gpus = instances.gpus if instances.kind != "cpu" else ()
    if instances.profile_per_instance and profiles:
        return tuple(InstanceGroup(1, instances.kind, gpus, (i,)) for i in range(instances.count))
    return (InstanceGroup(instances.count, instances.kind, gpus),)


def _tensor_dtype(name: str) -> int:
    return mc.DataType.Value(dtype(name).config)


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
        if q is not None:
            dyn.default_queue_policy.max_queue_size = q.max_queue_size
            dyn.default_queue_policy.timeout_action = mc.ModelQueuePolicy.TimeoutAction.Value(q.timeout_action)
            dyn.default_queue_policy.default_timeout_microseconds = q.default_timeout_us
            dyn.default_queue_policy.allow_timeout_override = q.allow_timeout_override
    for g in spec.instance_groups:
        kind = mc.ModelInstanceGroup.Kind.Value(f"KIND_{g.kind.upper()}")
        group = mc.ModelInstanceGroup(count=g.count, kind=kind, gpus=g.gpus, profile=[str(p) for p in g.profiles])
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
            elif w.data == "random":
                inp.random_data = True
            else:
                inp.input_data_file = t.name
        config.model_warmup.append(sample)
    for s in spec.steps:
        step = config.ensemble_scheduling.step.add(model_name=s.model_name, model_version=s.model_version)
        step.input_map.update(s.input_map)
        step.output_map.update(s.output_map)
    if spec.version_policy_specific:
        config.version_policy.specific.versions.extend(spec.version_policy_specific)
    elif spec.version_policy_latest:
        config.version_policy.latest.num_versions = spec.version_policy_latest
    if spec.default_model_filename:
        config.default_model_filename = spec.default_model_filename
    for cc, filename in spec.cc_model_filenames.items():
        config.cc_model_filenames[cc] = filename
    if spec.cuda_graphs:
        config.optimization.cuda.graphs = True
    for acc in spec.gpu_accelerators:
        config.optimization.execution_accelerators.gpu_execution_accelerator.add(
            name=acc.name, parameters=acc.parameters
        )
    if spec.response_cache:
        config.response_cache.enable = True
    return config


def render_proto(config: mc.ModelConfig) -> str:
    return text_format.MessageToString(config)


def render(spec: ModelSpec) -> str:
    return render_proto(to_proto(spec))


def parse(text: str) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())


def network_model(net: Network, **fields: object) -> ModelSpec:
    """The Triton model of a manifest network: its I/O, dynamic batcher, instances, warmup and version
    policy. ``fields`` add the target's own (backend or platform, files, accelerators, ...)."""
    warmup: tuple[Warmup, ...] = ()
    if net.serving.warmup != "none":
        warmup = (
            Warmup(
                name=f"{net.name}_{net.serving.warmup}",
                inputs=tuple(Tensor(s.name, s.dtype, s.static_shape) for s in net.inputs),
                batch_size=1,
                data=net.serving.warmup,
            ),
        )
    base: dict[str, object] = dict(
        name=net.name,
        inputs=tuple(Tensor.of(s) for s in net.inputs),
        outputs=tuple(Tensor.of(s) for s in net.outputs),
        max_batch_size=net.batching.max_batch_size,
        batching=net.batching,
        instance_groups=instance_groups(net.instances),
        warmup=warmup,
        version_policy_latest=net.serving.keep_versions,
        response_cache=net.serving.response_cache,
    )
    base.update(fields)
    return ModelSpec(**base)  # type: ignore[arg-type]
