"""``colorize``: a grey or faded photo in, a colour photo out — DDColor's inference steps (DESIGN §4).

image/255 → Lab, keep the full-resolution L; the RGB resized to S×S (bilinear), its L with a = b = 0
back to RGB (the "grey RGB", 1×3×S×S in [0, 1]) → the colorizer network → ab (1×2×S×S, Lab units) →
resized to the image's size (bilinear), joined with the original L, Lab → RGB, encoded. An RGBA input
keeps its alpha channel unchanged; a greyscale one comes back as RGB.

One BLS model, not an ensemble: SIZE (256 or 512, the network's input side) picks the network per
request, which is control flow (DESIGN §5), and a real DDColor ONNX comes with a fixed input size (its
export script traces one ``input_size``), so each size is its own network in the manifest (``network``
for 512, ``network_256`` for 256). One network with a dynamic input ([3, -1, -1], min 256, max 512)
may serve both: set ``network_256 = ""``. The step lives in :mod:`imgpipe.ensembles.colorize`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from imgpipe.imaging import IntakeSettings
from imgpipe.manifest import Instances, Manifest, ManifestError, Network
from imgpipe.pipelines.registry import IO, BuildContext, Contract, Pipeline, bls_model, register

FORMATS = ("png", "webp", "jpeg")  # imgpipe.imaging.OUTPUT_FORMATS; JPEG cannot hold an RGBA input's alpha
SIZES = ("512", "256")  # the network's input side: DDColor's 512, FaceFusion's default 256

CONTRACT = Contract(
    model="colorize",
    batched=True,
    summary=(
        "Colorization (DDColor contract): an encoded grey or faded photo in, the colour photo of the same "
        "size out (its lightness L kept, a*b* from the colorizer network; an alpha channel kept unchanged)."
    ),
    inputs=(
        IO(
            "IMAGE",
            "BYTES",
            (1,),
            "encoded image: JPEG, PNG or WebP bytes, greyscale, RGB or RGBA, EXIF orientation applied",
        ),
        IO(
            "FORMAT",
            "BYTES",
            (1,),
            "encoding of OUTPUT; jpeg has no alpha, so not for an input with an alpha channel",
            optional=True,
            choices=FORMATS,
            default="png",
        ),
        IO(
            "SIZE",
            "BYTES",
            (1,),
            "the network's input side in pixels: 512 (DDColor's) or 256 (FaceFusion's default, 4x cheaper)",
            optional=True,
            choices=SIZES,
            default="512",
        ),
    ),
    outputs=(
        IO(
            "OUTPUT",
            "BYTES",
            (1,),
            "the colour image in FORMAT at the input's size: RGB, or RGBA with the input's alpha unchanged",
        ),
    ),
)


@dataclass(frozen=True)
class Settings(IntakeSettings):
    """``[pipelines.colorize]``. The encoder settings mean what they mean for remove_background."""

    network: str = "colorizer"  # SIZE 512: input [3, 512, 512] (or dynamic), output [2, 512, 512]
    network_256: str = "colorizer_256"  # SIZE 256; "" = `network` for both sizes (its input must be dynamic)
    max_batch_size: int = 8
    instances: Instances = field(default_factory=Instances)
    png_compress_level: int = 1  # zlib level 0 (none, fastest) … 9 (smallest, slowest)
    jpeg_quality: int = 90  # 1-100
    webp_lossless: bool = False  # a colour photo: lossy WebP by default (alpha stays exact either way)
    webp_quality: int = 90  # lossy WebP only, 1-100
    webp_method: int = 0  # libwebp effort, 0 (fastest) … 6 (smallest)

    def __post_init__(self) -> None:
        super().__post_init__()  # the intake limits
        for key, low, high in (
            ("png_compress_level", 0, 9),
            ("jpeg_quality", 1, 100),
            ("webp_quality", 1, 100),
            ("webp_method", 0, 6),
            ("max_batch_size", 1, 256),
        ):
            value = getattr(self, key)
            if not low <= value <= high:
                raise ManifestError(f"{key}: must be within {low}..{high}, got {value}")

    def networks_by_size(self) -> dict[int, str]:
        """Network name per SIZE."""
        return {512: self.network, 256: self.network_256 or self.network}

    def encoder_options(self, fmt: str) -> dict[str, Any]:
        """Keyword arguments of :func:`imgpipe.imaging.encode_image` for ``fmt``."""
        if fmt == "png":
            return {"png_level": self.png_compress_level}
        if fmt == "jpeg":
            return {"quality": self.jpeg_quality}
        return {"lossless": self.webp_lossless, "quality": self.webp_quality, "webp_method": self.webp_method}


def _fits(shape: tuple[int, ...], low: tuple[int, ...], high: tuple[int, ...], want: tuple[int, ...]) -> bool:
    """``shape`` (with -1 for dynamic dims, ranged by ``low``/``high`` where given) accepts ``want``."""
    for i, (dim, wanted) in enumerate(zip(shape, want, strict=True)):
        if dim == -1:
            if (low and wanted < low[i]) or (high and wanted > high[i]):
                return False
        elif dim != wanted:
            return False
    return True


def check_network(net: Network, size: int, key: str) -> None:
    """The DDColor contract at ``size``: one FP32 input [3, S, S], one FP32 output [2, S, S] (dynamic dims
    allowed where their min/max shapes cover S); else a ManifestError naming ``key``."""
    problems = []
    if len(net.inputs) != 1 or len(net.outputs) != 1:
        problems.append(f"has {len(net.inputs)} input(s) and {len(net.outputs)} output(s), expected one of each")
    else:
        spec_in, spec_out = net.input(), net.output()
        if (
            spec_in.dtype != "FP32"
            or len(spec_in.shape) != 3
            or not _fits(spec_in.shape, spec_in.min_shape, spec_in.max_shape, (3, size, size))
        ):
            problems.append(f"input {spec_in.name!r} is {spec_in.dtype} {list(spec_in.shape)}")
        if (
            spec_out.dtype != "FP32"
            or len(spec_out.shape) != 3
            or not _fits(spec_out.shape, spec_out.min_shape, spec_out.max_shape, (2, size, size))
        ):
            problems.append(f"output {spec_out.name!r} is {spec_out.dtype} {list(spec_out.shape)}")
    if problems:
        raise ManifestError(
            f"pipelines.colorize.{key}: {net.name!r} does not take SIZE {size} with the DDColor contract"
            f" (input FP32 [3, {size}, {size}] grey RGB, output FP32 [2, {size}, {size}] ab, or dynamic"
            f" dims covering {size}): {'; '.join(problems)}"
        )


@register
class Colorize(Pipeline):
    name = "colorize"
    settings = Settings
    contract = CONTRACT

    def networks(self, settings: Settings) -> dict[str, str]:
        return {"network": settings.network, **({"network_256": settings.network_256} if settings.network_256 else {})}

    def validate(self, manifest: Manifest, settings: Settings) -> None:
        check_network(manifest.network(settings.network), 512, "network")
        key = "network_256" if settings.network_256 else "network"
        check_network(manifest.network(settings.networks_by_size()[256]), 256, key)

    def models(self, ctx: BuildContext, settings: Settings) -> list[Any]:
        from imgpipe.ensembles.colorize import Colorize as Step

        roles = {str(size): name for size, name in settings.networks_by_size().items()}
        return [
            bls_model(
                CONTRACT,
                Step,
                settings,
                ctx.manifest,
                roles,
                max_batch_size=settings.max_batch_size,  # the network calls split at each one's own
            )
        ]
