"""``remove_background``: an ensemble of bg_preprocess → the segmenter network → bg_postprocess.

RMBG-2.0 / BiRefNet contract for the segmenter (DESIGN §4). The steps live in
:mod:`imgpipe.ensembles.remove_background`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from imgpipe.manifest import Instances
from imgpipe.pipelines.registry import IO, BuildContext, Contract, Pipeline, python_model, register

MODES = ("rgba", "mask", "composite")

CONTRACT = Contract(
    model="remove_background",
    batched=True,
    summary="Background removal: an encoded image in, a PNG of the same size out (cut-out, mask or composite).",
    inputs=(
        IO("IMAGE", "BYTES", (1,), "encoded image: JPEG, PNG or WebP bytes, EXIF orientation applied"),
        IO("MODE", "BYTES", (1,), "what to return", optional=True, choices=MODES, default="rgba"),
        IO(
            "BACKGROUND",
            "BYTES",
            (1,),
            "colour for MODE composite: #rrggbb or a CSS colour name",
            optional=True,
            default="white",
        ),
    ),
    outputs=(
        IO(
            "OUTPUT",
            "BYTES",
            (1,),
            "PNG of the input's size: RGBA cut-out (rgba), greyscale mask (mask), RGB (composite)",
        ),
    ),
)

# Tensors between the steps (not part of the public contract).
PIXELS, ORIGINAL, SIZE, MASK = "PIXELS", "ORIGINAL", "SIZE", "MASK"


@dataclass(frozen=True)
class Settings:
    """``[pipelines.remove_background]``."""

    segmenter: str = "segmenter"  # the network (RMBG-2.0 / BiRefNet contract)
    max_pixels: int = 40_000_000  # decompression-bomb guard: larger images get INVALID_ARG
    max_batch_size: int = 8
    instances: Instances = field(default_factory=Instances)


@register
class RemoveBackground(Pipeline):
    name = "remove_background"
    settings = Settings
    contract = CONTRACT

    def networks(self, settings: Settings) -> dict[str, str]:
        return {"segmenter": settings.segmenter}

    def models(self, ctx: BuildContext, settings: Settings) -> list[Any]:
        from imgpipe.build.triton_config import ModelSpec, Step, Tensor
        from imgpipe.ensembles.remove_background import Postprocess, Preprocess

        seg = ctx.manifest.network(settings.segmenter)
        seg_in, seg_out = seg.input(), seg.output()
        height, width = seg_in.static_shape[-2:]
        batch = min(settings.max_batch_size, seg.batching.max_batch_size)
        image, mode, background = (t.tensor() for t in CONTRACT.inputs)
        output = CONTRACT.output("OUTPUT").tensor()
        original = Tensor(ORIGINAL, "UINT8", (-1, -1, 3))
        size = Tensor(SIZE, "INT32", (2,))
        common: dict[str, Any] = dict(
            settings=settings, instances=settings.instances, max_batch_size=batch, dynamic_batching=True
        )
        pre = python_model(
            "bg_preprocess",
            Preprocess,
            inputs=(image, mode, background),
            outputs=(Tensor(PIXELS, "FP32", seg_in.static_shape), original, size),
            extra={"input_size": f"{height}x{width}"},
            **common,
        )
        post = python_model(
            "bg_postprocess",
            Postprocess,
            inputs=(Tensor(MASK, "FP32", seg_out.static_shape), original, size, mode, background),
            outputs=(output,),
            extra={"mask_activation": seg_out.activation},
            **common,
        )
        options = {"MODE": "MODE", "BACKGROUND": "BACKGROUND"}
        ensemble = ModelSpec(
            name=CONTRACT.model,
            platform="ensemble",
            inputs=(image, mode, background),
            outputs=(output,),
            max_batch_size=batch,
            parameters=CONTRACT.config_parameters(),
            steps=(
                Step(
                    "bg_preprocess",
                    {"IMAGE": "IMAGE", **options},
                    {PIXELS: "pixels", ORIGINAL: "original", SIZE: "size"},
                ),
                Step(seg.name, {seg_in.name: "pixels"}, {seg_out.name: "mask"}),
                Step(
                    "bg_postprocess",
                    {MASK: "mask", ORIGINAL: "original", SIZE: "size", **options},
                    {"OUTPUT": "OUTPUT"},
                ),
            ),
        )
        return [pre, post, ensemble]
