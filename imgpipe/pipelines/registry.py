"""The pipeline registry: what a pipeline is, and the table of known pipelines.

A pipeline is declared once, in one module, by a :class:`Pipeline` subclass registered with
:func:`register`. It names its manifest settings (a frozen dataclass, validated strictly by the
manifest loader), its public I/O :class:`Contract` (tensor names, types, shapes, optional inputs,
request parameters with their types, ranges and defaults), the networks it uses (by settings key),
the Triton models it contributes to the repository, and the files (assets) those models need. The
manifest loader, the repository writer, the steps, the clients and the command line all read those
declarations; none of them names a pipeline.

Pipelines outside this package (a user's own, or a test's) are loaded from the manifest's top-level
``plugins`` list: module names, or ``.py`` files relative to the manifest. Importing the module
registers its pipelines.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from imgpipe.errors import InvalidInputError, quote
from imgpipe.guard import Visibility
from imgpipe.manifest import Instances

if TYPE_CHECKING:
    from imgpipe.build.triton_config import ModelSpec, Tensor
    from imgpipe.manifest import Manifest


# -- the public contract ------------------------------------------------------------------------


def _either(choices: tuple[str, ...]) -> str:
    return choices[0] if len(choices) == 1 else f"{', '.join(choices[:-1])} or {choices[-1]}"


@dataclass(frozen=True)
class IO:
    """One input or output of a pipeline's public model. ``dims`` exclude the batch dimension when the
    model is batched. A BYTES input with ``choices`` carries one option string per request."""

    name: str
    dtype: str
    dims: tuple[int, ...]
    description: str
    optional: bool = False
    choices: tuple[str, ...] = ()
    default: str | None = None

    def tensor(self) -> Tensor:
        from imgpipe.build.triton_config import Tensor

        return Tensor(self.name, self.dtype, self.dims, self.optional)

    def choose(self, value: str | None) -> str:
        """An option input's value (the default when absent), checked against its choices."""
        text = (value if value is not None else self.default or "").strip().lower()
        if self.choices and text not in self.choices:
            expected = ", ".join(self.choices)
            raise InvalidInputError(f"unsupported {self.name} {quote(value)}: expected one of {expected}")
        return text

    def describe(self, is_input: bool = True) -> str:
        words = [f"{self.dtype} {list(self.dims)}"]
        if is_input:
            words.append("optional" if self.optional else "required")
        elif self.optional:
            words.append("only when requested")
        words.append(self.description)
        if self.choices:
            words.append(f"one of {' | '.join(self.choices)}")
        if self.default is not None:
            words.append(f"default {self.default}")
        return "; ".join(words)


@dataclass(frozen=True)
class Param:
    """One request parameter (Triton request parameters, sent with the request)."""

    name: str
    type: Literal["int", "float", "string"]
    default: Any
    description: str
    choices: tuple[str, ...] = ()
    low: float | None = None
    high: float | None = None
    or_index: bool = False  # a string parameter that may also be a non-negative integer index

    def parse(self, value: Any) -> Any:
        """The typed value of ``value`` (the default when ``None``); the caller's mistakes raise
        :class:`InvalidInputError` naming the parameter."""
        if value is None:
            return self.default
        if self.type == "string":
            text = str(value).strip().lower()
            if text in self.choices or (not self.choices and not self.or_index):
                return text
            if self.or_index:
                try:
                    index = int(text)
                except ValueError:
                    index = None
                if index is not None:
                    if index < 0:
                        raise InvalidInputError(
                            f"parameter {self.name!r} must be a non-negative index, got {quote(index)}"
                        )
                    return index
                raise InvalidInputError(
                    f"parameter {self.name!r} must be {', '.join(self.choices)} or a face index, got {quote(value)}"
                )
            raise InvalidInputError(f"parameter {self.name!r} must be {_either(self.choices)}, got {quote(value)}")
        if isinstance(value, bool):
            raise InvalidInputError(f"parameter {self.name!r} must be a number, got {quote(value)}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise InvalidInputError(f"parameter {self.name!r} must be a number, got {quote(value)}") from None
        if self.type == "int" and not (math.isnan(number) or math.isinf(number)) and number != int(number):
            raise InvalidInputError(f"parameter {self.name!r} must be a whole number, got {quote(value)}")
        low = -math.inf if self.low is None else self.low
        high = math.inf if self.high is None else self.high
        if math.isnan(number) or not low <= number <= high:
            raise InvalidInputError(f"parameter {self.name!r} must be within [{self.low}, {self.high}], got {number}")
        return int(number) if self.type == "int" else number

    def describe(self) -> str:
        words = [self.type, self.description]
        if self.choices:
            words.append(f"one of {' | '.join(self.choices)}{' | an index' if self.or_index else ''}")
        if self.low is not None or self.high is not None:
            words.append(f"range [{self.low}, {self.high}]")
        words.append(f"default {self.default if self.default is not None else 'the detector default'}")
        return "; ".join(words)


@dataclass(frozen=True)
class Contract:
    """What a caller of a pipeline's public model sends and gets back."""

    model: str
    inputs: tuple[IO, ...]
    outputs: tuple[IO, ...]
    parameters: tuple[Param, ...] = ()
    batched: bool = False  # the public model has a batch dimension (max_batch_size > 0)
    summary: str = ""

    def input(self, name: str) -> IO:
        return next(i for i in self.inputs if i.name == name)

    def output(self, name: str) -> IO:
        return next(o for o in self.outputs if o.name == name)

    def param(self, name: str) -> Param:
        return next(p for p in self.parameters if p.name == name)

    def parse_parameters(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        """Every declared parameter, typed (defaults filled in); an unknown one is the caller's mistake."""
        known = {p.name for p in self.parameters}
        unknown = sorted(set(raw) - known)
        if unknown:
            expected = ", ".join(sorted(known)) or "none"
            raise InvalidInputError(f"unknown parameter {quote(unknown[0])}: expected {expected}")
        return {p.name: p.parse(raw.get(p.name)) for p in self.parameters}

    def config_parameters(self) -> dict[str, str]:
        """The contract as model-config parameters, so a KServe client that reads only
        ``get_model_config`` learns it: one readable line per input, output and request parameter,
        and the whole contract as JSON under ``imgpipe.contract``."""
        lines = {"imgpipe.summary": self.summary} if self.summary else {}
        lines |= {f"input.{i.name}": i.describe() for i in self.inputs}
        lines |= {f"output.{o.name}": o.describe(is_input=False) for o in self.outputs}
        lines |= {f"request_parameter.{p.name}": p.describe() for p in self.parameters}
        lines["imgpipe.contract"] = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return lines


# -- pipelines ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildContext:
    """What a pipeline needs to describe its models: the manifest and a cache for exports."""

    manifest: Manifest
    cache_dir: Path

    def settings(self, pipeline: str) -> Any:
        return self.manifest.pipelines[pipeline]


class Pipeline:
    """Base of every pipeline declaration; subclasses set the class attributes and ``models``."""

    name: ClassVar[str]
    settings: ClassVar[type]  # frozen dataclass: what the manifest's [pipelines.<name>] table may hold
    contract: ClassVar[Contract]
    requires: ClassVar[tuple[str, ...]] = ()  # other pipelines whose settings this one reads
    # Models besides ``contract.model`` that outside callers may call; the pipeline's other models are internal
    # (imgpipe.guard).
    also_public: ClassVar[tuple[str, ...]] = ()

    def networks(self, settings: Any) -> dict[str, str]:
        """Settings key → network name of every manifest network this pipeline calls."""
        return {}

    def models(self, ctx: BuildContext, settings: Any) -> list[ModelSpec]:
        """The Triton models (Python steps, BLS models, ensembles) this pipeline adds to the repository."""
        raise NotImplementedError

    def assets(self, ctx: BuildContext, settings: Any) -> dict[str, dict[str, bytes]]:
        """Files the models need beside their code: model name → file name → bytes."""
        return {}

    def validate(self, manifest: Manifest, settings: Any) -> None:
        """Checks across tables, beyond what the settings dataclass validates; raise ManifestError."""


PIPELINES: dict[str, Pipeline] = {}
_BUILTIN = ("remove_background", "detect_faces", "swap_face", "colorize", "reconstruct_face")


def register(cls: type[Pipeline]) -> type[Pipeline]:
    """Class decorator: add a pipeline to the registry under its ``name``."""
    PIPELINES[cls.name] = cls()
    return cls


def registry() -> dict[str, Pipeline]:
    """Every registered pipeline (the built-in ones are imported on first use)."""
    for module in _BUILTIN:
        importlib.import_module(f"imgpipe.pipelines.{module}")
    return PIPELINES


def load_plugin(entry: str, base: Path) -> Path | None:
    """Import a plugin (a module name, or a ``.py`` file relative to ``base``) so its pipelines register.
    Returns the folder a server must add to ``sys.path`` to import it again (None for module names)."""
    if not entry.endswith(".py"):
        importlib.import_module(entry)
        return None
    path = (base / entry).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"plugin {entry}: {path} does not exist")
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    importlib.import_module(path.stem)
    return path.parent


def model_visibility(manifest: Manifest, cache_dir: Path | None = None) -> dict[str, Visibility]:
    """Who may call each model of the manifest's repository (:mod:`imgpipe.guard`): the pipelines' public
    models ``public``; the steps of an ensemble (which get the caller's request unchanged) ``ensemble-step``;
    every other model and network ``internal`` (networks no pipeline names are absent: internal too)."""
    from imgpipe.paths import CACHE_DIR

    ctx = BuildContext(manifest, cache_dir or CACHE_DIR)
    known = registry()
    visibility: dict[str, Visibility] = {}
    for name, settings in manifest.pipelines.items():
        for spec in known[name].models(ctx, settings):
            visibility.setdefault(spec.name, "internal")
            for step in spec.steps:  # an ensemble's
                visibility[step.model_name] = "ensemble-step"
    for name in manifest.pipelines:
        for model in (known[name].contract.model, *known[name].also_public):
            visibility[model] = "public"
    return visibility


# -- helpers for pipeline modules ---------------------------------------------------------------


def step_name(cls: type) -> str:
    """The ``module:Class`` path the generic adapter imports a step class from."""
    return f"{cls.__module__}:{cls.__qualname__}"


def settings_json(settings: Any) -> str:
    return json.dumps(dataclasses.asdict(settings), sort_keys=True)


def network_roles(manifest: Manifest, roles: Mapping[str, str]) -> str:
    """What a BLS model needs to call each network it uses (model name, I/O names, max batch), as JSON."""
    table = {}
    for role, name in roles.items():
        net = manifest.network(name)
        table[role] = {
            "model": net.name,
            "inputs": [i.name for i in net.inputs],
            "outputs": [o.name for o in net.outputs],
            "max_batch": net.batching.max_batch_size,
        }
    return json.dumps(table, sort_keys=True)


def python_model(
    name: str,
    step: type,
    settings: Any,
    inputs: tuple[Tensor, ...],
    outputs: tuple[Tensor, ...],
    instances: Instances,
    max_batch_size: int = 0,
    contract: Contract | None = None,
    networks: str | None = None,
    extra: Mapping[str, str] | None = None,
    queued: bool = True,
) -> ModelSpec:
    """A Python-backend model run by the generic adapter: the step class and its settings travel in
    the config's parameters.

    Every such model gets Triton's dynamic batcher; a ``queued`` one (a pipeline's entry model) the pipeline
    settings' queue policy (bounded, with a timeout; see imgpipe.manifest on why inner models get none):
    unbatched models too (``max_batch_size`` 0), where the batcher forms no
    batches but still bounds the queue; with ``max_batch_size`` > 0 it gathers concurrent requests into batches."""
    from imgpipe.build.triton_config import ModelSpec, instance_groups
    from imgpipe.manifest import Batching, pipeline_queue

    parameters = {"imgpipe.step": step_name(step), "imgpipe.settings": settings_json(settings)}
    if networks is not None:
        parameters["imgpipe.networks"] = networks
    if instances.kind != "cpu":
        # Inputs stay where the previous step left them (GPU tensors through DLPack, no host copy).
        parameters["FORCE_CPU_ONLY_INPUT_TENSORS"] = "no"
    if contract is not None:
        parameters |= contract.config_parameters()
    parameters |= dict(extra or {})
    return ModelSpec(
        name=name,
        backend="python",
        inputs=inputs,
        outputs=outputs,
        max_batch_size=max_batch_size,
        batching=Batching(
            max_batch_size=max(1, max_batch_size),
            queue=(getattr(settings, "queue", None) or pipeline_queue()) if queued else None,
        ),
        instance_groups=instance_groups(instances),
        parameters=parameters,
    )


def bls_model(
    contract: Contract,
    step: type,
    settings: Any,
    manifest: Manifest,
    roles: Mapping[str, str],
    served: Contract | None = None,
    **options: Any,
) -> ModelSpec:
    """The one Python-backend model of a BLS pipeline: its name and tensors from ``contract``, the
    contract a client sees from ``served`` (default ``contract``), the networks it calls by role, the
    settings' instances; ``options`` go to :func:`python_model` (``max_batch_size``, ``extra``, …)."""
    return python_model(
        contract.model,
        step,
        settings=settings,
        inputs=tuple(i.tensor() for i in contract.inputs),
        outputs=tuple(o.tensor() for o in contract.outputs),
        instances=settings.instances,
        contract=served or contract,
        networks=network_roles(manifest, roles),
        **options,
    )


def field_default(cls: type, name: str) -> Any:
    """The default of a settings field (for clients and CLIs that show it)."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
