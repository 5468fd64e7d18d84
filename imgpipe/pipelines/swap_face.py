"""``swap_face``: a BLS model that detects faces in both images (the detect_faces networks), embeds the
source's largest face (recognizer, ArcFace contract) and swaps the chosen target faces (swapper,
inswapper_128 contract). The step lives in :mod:`imgpipe.ensembles.swap_face`."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

from imgpipe.manifest import Instances
from imgpipe.pipelines import detect_faces
from imgpipe.pipelines.registry import (
    IO,
    BuildContext,
    Contract,
    Param,
    Pipeline,
    network_roles,
    python_model,
    register,
    settings_json,
)

FORMATS = ("png", "jpeg")
EMAP_FILE = "emap.npy"

CONTRACT = Contract(
    model="swap_face",
    summary="Face swap: the largest face of SOURCE replaces the chosen faces of TARGET.",
    inputs=(
        IO("SOURCE", "BYTES", (1,), "encoded image with the face to use: JPEG, PNG or WebP bytes"),
        IO("TARGET", "BYTES", (1,), "encoded image whose faces are replaced: JPEG, PNG or WebP bytes"),
    ),
    outputs=(
        IO("IMAGE", "BYTES", (1,), "the target with the faces swapped, encoded as the format parameter asks"),
        IO("SWAPPED", "INT32", (1,), "how many faces were replaced (0: no face in the target, returned unchanged)"),
    ),
    parameters=(
        Param(
            "faces",
            "string",
            "all",
            "target faces to replace: all, the largest, or an index in detection order (best score first)",
            choices=("all", "largest"),
            or_index=True,
        ),
        Param("format", "string", "png", "encoding of IMAGE", choices=FORMATS),
    ),
)


@dataclass(frozen=True)
class Settings:
    """``[pipelines.swap_face]`` (faces are found with the ``detect_faces`` pipeline's networks)."""

    recognizer: str = "recognizer"
    swapper: str = "swapper"
    max_pixels: int = 40_000_000
    instances: Instances = field(default_factory=Instances)
    mask_blur: float = 0.3  # feathering of the paste-back box mask, as a fraction of the crop width


def emap_of(onnx_path: Any, network: str) -> Any:
    """The swapper's emap: its ONNX graph's last initializer, 512×512 (inswapper contract)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from imgpipe.manifest import ManifestError

    initializers = onnx.load(str(onnx_path)).graph.initializer
    emap = numpy_helper.to_array(initializers[-1]) if initializers else None
    if emap is None or emap.shape != (512, 512):
        raise ManifestError(
            f"networks.{network}: the swapper's last ONNX initializer must be the 512×512 emap"
            f" (inswapper contract), found {None if emap is None else emap.shape}"
        )
    return emap.astype(np.float32)


@register
class SwapFace(Pipeline):
    name = "swap_face"
    settings = Settings
    contract = CONTRACT
    requires = ("detect_faces",)

    def networks(self, settings: Settings) -> dict[str, str]:
        return {"recognizer": settings.recognizer, "swapper": settings.swapper}

    def models(self, ctx: BuildContext, settings: Settings) -> list[Any]:
        from imgpipe.ensembles.swap_face import SwapFace as Step

        detect: detect_faces.Settings = ctx.settings("detect_faces")
        roles = {**detect_faces.detector_roles(detect), **self.networks(settings)}
        return [
            python_model(
                CONTRACT.model,
                Step,
                settings=settings,
                inputs=tuple(i.tensor() for i in CONTRACT.inputs),
                outputs=tuple(o.tensor() for o in CONTRACT.outputs),
                instances=settings.instances,
                contract=CONTRACT,
                networks=network_roles(ctx.manifest, roles),
                extra={"imgpipe.detector": settings_json(detect)},
            )
        ]

    def assets(self, ctx: BuildContext, settings: Settings) -> dict[str, dict[str, bytes]]:
        import numpy as np

        from imgpipe.build.export import onnx_for

        export = onnx_for(ctx.manifest, ctx.manifest.network(settings.swapper), cache_dir=ctx.cache_dir)
        buffer = io.BytesIO()
        np.save(buffer, emap_of(export.onnx_path, settings.swapper))
        return {CONTRACT.model: {EMAP_FILE: buffer.getvalue()}}
