"""``remove_background``: an ensemble of bg_preprocess → the segmenter network → bg_postprocess.

Two segmenter contracts, told apart by the network's ``calibration.preprocessing`` (its own
preprocessing, one fact in the manifest): ``selfie`` — MediaPipe's selfie segmenter (the default, real
weights: 256×256 NHWC RGB in [0, 1] → 256×256×1 probability), and ``rmbg`` — RMBG-2.0 / BiRefNet
(DESIGN §4: 3×1024×1024 ImageNet-normalised → 1×1024×1024 mask), for users who configure such an ONNX.
The mask is brought to the image's full resolution by a guided filter (edge-aware) or bilinearly.
The steps live in :mod:`imgpipe.ensembles.remove_background`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from imgpipe.imaging import IntakeSettings
from imgpipe.manifest import Instances, Manifest, ManifestError
from imgpipe.pipelines.registry import IO, BuildContext, Contract, Pipeline, python_model, register

MODES = ("rgba", "mask", "composite")
FORMATS = ("png", "webp", "jpeg")  # imgpipe.imaging.OUTPUT_FORMATS; JPEG cannot hold MODE rgba's alpha

CONTRACT = Contract(
    model="remove_background",
    batched=True,
    summary=(
        "Background removal: an encoded image in, a PNG (or WebP, JPEG) of the same size out "
        "(cut-out, mask or composite)."
    ),
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
        IO(
            "FORMAT",
            "BYTES",
            (1,),
            "encoding of OUTPUT; jpeg has no alpha, so not with MODE rgba; WebP stores a mask as RGB",
            optional=True,
            choices=FORMATS,
            default="png",
        ),
    ),
    outputs=(
        IO(
            "OUTPUT",
            "BYTES",
            (1,),
            "the image in FORMAT at the input's size: RGBA cut-out (rgba), greyscale mask (mask), RGB (composite)",
        ),
    ),
)

# Tensors between the steps (not part of the public contract).
PIXELS, ORIGINAL, SIZE, MASK = "PIXELS", "ORIGINAL", "SIZE", "MASK"


@dataclass(frozen=True)
class Settings(IntakeSettings):
    """``[pipelines.remove_background]``.

    The encoder settings' defaults come from ``python -m imgpipe.encode_bench`` (1024×768 results, one
    core): encoding, not the network, bounds a served pipeline that returns PNG (DESIGN §8). PNG level 1
    took a fifth of the time of Pillow's default 6 on a cut-out for 17 % more bytes. Lossless WebP at
    method 0 was faster than PNG level 1 (about 5× on a cut-out, 2.5× on a composite) and smaller (40 %
    and 80 % of the bytes), exact wherever alpha > 0; higher methods cost 7-14× the time for 20 % fewer
    bytes. Lossy WebP (``webp_lossless = false``, quality 90) gives another 5-7× fewer bytes at 43-44 dB.
    JPEG takes under 2 ms at any quality; 90 matches lossy WebP 90 (43 dB on a composite), 95 costs 40 %
    more bytes for under 2 dB.
    """

    segmenter: str = "selfie_segmenter"  # the network; its calibration.preprocessing names its contract
    max_batch_size: int = 8
    instances: Instances = field(default_factory=Instances)
    png_compress_level: int = 1  # zlib level 0 (none, fastest) … 9 (smallest, slowest)
    jpeg_quality: int = 90  # 1-100
    webp_lossless: bool = True  # for rgba and composite; a mask is always lossless WebP (exact, and as fast)
    webp_quality: int = 90  # lossy WebP only, 1-100
    webp_method: int = 0  # libwebp effort, 0 (fastest) … 6 (smallest), lossless and lossy
    # Instances of bg_postprocess, where encoding runs on the CPU (0: instances.count). On the H100 the
    # encoder bounded the served pipeline (docs/benchmarks.md), so it may need more than the other steps.
    encode_instances: int = 0
    # The mask at full resolution: "guided" (edge-aware guided filter, radius in mask pixels, eps the
    # regularisation: larger is smoother) or "bilinear".
    refine: Literal["guided", "bilinear"] = "guided"
    guided_radius: int = 2
    guided_eps: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()  # the intake limits
        if self.encode_instances < 0:
            raise ManifestError(
                f"encode_instances: must be 0 (same as instances.count) or more, got {self.encode_instances}"
            )
        for key, low, high in (
            ("png_compress_level", 0, 9),
            ("jpeg_quality", 1, 100),
            ("webp_quality", 1, 100),
            ("webp_method", 0, 6),
            ("guided_radius", 1, 32),
            ("guided_eps", 1e-8, 1.0),
        ):
            value = getattr(self, key)
            if not low <= value <= high:
                raise ManifestError(f"{key}: must be within {low}..{high}, got {value}")


@register
class RemoveBackground(Pipeline):
    name = "remove_background"
    settings = Settings
    contract = CONTRACT

    def networks(self, settings: Settings) -> dict[str, str]:
        return {"segmenter": settings.segmenter}

    def validate(self, manifest: Manifest, settings: Settings) -> None:
        from imgpipe.ensembles.background import PREPROCESSING

        seg = manifest.network(settings.segmenter)
        if seg.calibration.preprocessing not in PREPROCESSING:
            raise ManifestError(
                f"networks.{seg.name}.calibration.preprocessing: the segmenter of remove_background must name"
                f" its contract, one of {', '.join(PREPROCESSING)} (rmbg: 3xHxW ImageNet-normalised, RMBG-2.0"
                f" and BiRefNet; selfie: HxWx3 in [0, 1], MediaPipe), got {seg.calibration.preprocessing!r}"
            )

    def models(self, ctx: BuildContext, settings: Settings) -> list[Any]:
        from imgpipe.build.triton_config import ModelSpec, Step, Tensor
        from imgpipe.ensembles.background import input_size
        from imgpipe.ensembles.remove_background import Postprocess, Preprocess

        seg = ctx.manifest.network(settings.segmenter)
        seg_in, seg_out = seg.input(), seg.output()
        preprocessing = seg.calibration.preprocessing
        height, width = input_size(preprocessing, seg_in.static_shape)
        batch = min(settings.max_batch_size, seg.batching.max_batch_size)
        image, mode, background, fmt = (CONTRACT.input(n).tensor() for n in ("IMAGE", "MODE", "BACKGROUND", "FORMAT"))
        output = CONTRACT.output("OUTPUT").tensor()
        original = Tensor(ORIGINAL, "UINT8", (-1, -1, 3))
        size = Tensor(SIZE, "INT32", (2,))
        common: dict[str, Any] = dict(settings=settings, instances=settings.instances, max_batch_size=batch)
        pre = python_model(
            "bg_preprocess",
            Preprocess,
            inputs=(image, mode, background, fmt),
            outputs=(Tensor(PIXELS, "FP32", seg_in.static_shape), original, size),
            extra={"input_size": f"{height}x{width}", "preprocessing": preprocessing},
            **common,
        )
        encoders = dataclasses.replace(settings.instances, count=settings.encode_instances or settings.instances.count)
        post = python_model(
            "bg_postprocess",
            Postprocess,
            inputs=(Tensor(MASK, "FP32", seg_out.static_shape), original, size, mode, background, fmt),
            outputs=(output,),
            extra={"mask_activation": seg_out.activation},
            # The pipeline's bounded queue is bg_preprocess's (requests are shed before any work); a request
            # that got past it is not refused after the segmenter ran.
            queued=False,
            **{**common, "instances": encoders},
        )
        # The options go to both steps: bg_preprocess validates them (a bad value fails before the network).
        options = {"MODE": "MODE", "BACKGROUND": "BACKGROUND", "FORMAT": "FORMAT"}
        ensemble = ModelSpec(
            name=CONTRACT.model,
            platform="ensemble",
            inputs=(image, mode, background, fmt),
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
