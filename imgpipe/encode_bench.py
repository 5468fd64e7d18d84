"""How long encoding a ``remove_background`` result takes, per format and setting, and how large it is.

``python -m imgpipe.encode_bench [--repeats N] [--width W --height H]`` encodes the three kinds of result
at 1024×768 — the RGBA cut-out, the greyscale mask and the RGB composite — with every variant below
through :func:`imgpipe.imaging.encode_image` (the encoder the pipeline uses), one thread, and prints
the median milliseconds per image and the bytes. The pictures are scikit-image's astronaut resized
and a mask made here with soft, antialiased edges like a segmenter's (a hard binary mask would flatter
every codec). The pipeline's defaults (``imgpipe.pipelines.remove_background.Settings``) come from it.
"""

from __future__ import annotations

import argparse
import io
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from imgpipe.imaging import encode_image

KINDS = ("rgba", "mask", "composite")


@dataclass(frozen=True)
class Variant:
    """One encoder setting: a label, the format and the keyword arguments of ``encode_image``."""

    label: str
    fmt: str
    options: dict[str, Any] = field(default_factory=dict)
    lossless: bool = True


VARIANTS: tuple[Variant, ...] = (
    *(Variant(f"png level {n}", "png", {"png_level": n}) for n in (0, 1, 3, 6, 9)),
    *(Variant(f"webp lossless, method {m}", "webp", {"lossless": True, "webp_method": m}) for m in (0, 1, 4)),
    *(
        Variant(f"webp q{q}, method {m}", "webp", {"quality": q, "webp_method": m}, lossless=False)
        for q, m in ((80, 0), (80, 4), (90, 0), (90, 2), (90, 4))
    ),
    *(Variant(f"jpeg q{q}", "jpeg", {"quality": q}, lossless=False) for q in (80, 90, 95)),
)


def _mask(height: int, width: int) -> np.ndarray:
    """A person-like silhouette (head and shoulders) with soft edges: drawn 4× larger, downsampled
    (antialiased) and blurred by ~1.5 px, so the edge has the partial alphas a segmenter produces."""
    scale = 4
    canvas = Image.new("L", (width * scale, height * scale), 0)
    draw = ImageDraw.Draw(canvas)
    w, h = width * scale, height * scale
    draw.ellipse((0.33 * w, 0.08 * h, 0.67 * w, 0.58 * h), fill=255)  # head / helmet
    draw.rounded_rectangle((0.12 * w, 0.52 * h, 0.88 * w, 1.2 * h), radius=int(0.18 * w), fill=255)  # shoulders
    draw.polygon([(0.05 * w, h), (0.2 * w, 0.7 * h), (0.3 * w, h)], fill=255)  # an arm
    small = canvas.resize((width, height), Image.Resampling.BOX).filter(ImageFilter.GaussianBlur(1.5))
    return np.asarray(small, dtype=np.uint8)


def bench_images(width: int = 1024, height: int = 768) -> dict[str, np.ndarray]:
    """The three results of remove_background for the astronaut at ``width``×``height``."""
    from skimage import data

    rgb = np.asarray(Image.fromarray(data.astronaut()).resize((width, height), Image.Resampling.BICUBIC))
    alpha = _mask(height, width)
    a = alpha[..., None].astype(np.float32) / 255.0
    composite = (rgb * a + 255.0 * (1.0 - a)).round().clip(0, 255).astype(np.uint8)  # on white
    return {"rgba": np.dstack([rgb, alpha]), "mask": alpha, "composite": composite}


@dataclass(frozen=True)
class Result:
    variant: Variant
    kind: str
    ms: float  # median per image
    size: int  # bytes
    psnr: float  # dB of what is visible (colour premultiplied by alpha, and alpha) against the input; inf if exact


def visible_psnr(original: np.ndarray, encoded: bytes) -> float:
    """PSNR (dB) of the decoded image against ``original``, over what a viewer sees: for RGBA the colour
    premultiplied by alpha and the alpha itself (the colour under transparent pixels does not count); a
    greyscale image that came back as RGB (WebP) is compared through its first channel."""
    decoded = np.asarray(Image.open(io.BytesIO(encoded)), dtype=np.float64)
    reference = original.astype(np.float64)
    if reference.ndim == 2 and decoded.ndim == 3:
        decoded = decoded[..., 0]
    if reference.ndim == 3 and reference.shape[2] == 4:
        reference = np.dstack([reference[..., :3] * reference[..., 3:] / 255.0, reference[..., 3]])
        decoded = np.dstack([decoded[..., :3] * decoded[..., 3:] / 255.0, decoded[..., 3]])
    mse = float(np.mean((decoded - reference) ** 2))
    return math.inf if mse < 1e-6 else 10.0 * math.log10(255.0**2 / mse)


def measure(images: dict[str, np.ndarray], variants: Sequence[Variant] = VARIANTS, repeats: int = 5) -> list[Result]:
    """Median wall time of ``repeats`` encodes (after one warm-up) and the size, for every variant and
    kind; JPEG skips the RGBA cut-out (it cannot hold alpha)."""
    results = []
    for variant in variants:
        for kind in KINDS:
            image = images[kind]
            if variant.fmt == "jpeg" and kind == "rgba":
                continue
            encoded = encode_image(image, variant.fmt, **variant.options)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                encode_image(image, variant.fmt, **variant.options)
                times.append(time.perf_counter() - start)
            ms = statistics.median(times) * 1000.0
            results.append(Result(variant, kind, ms, len(encoded), visible_psnr(image, encoded)))
    return results


def table(results: Sequence[Result], title: str) -> Any:
    """A rich table: one row per variant, ms and kB for each kind."""
    from rich.table import Table

    grid = Table(title=title, caption="dB: PSNR of what is visible (inf: exact); jpeg cannot hold the cut-out's alpha")
    grid.add_column("variant")
    grid.add_column("lossless")
    for kind in KINDS:
        grid.add_column(f"{kind} ms", justify="right")
        grid.add_column(f"{kind} kB", justify="right")
        grid.add_column(f"{kind} dB", justify="right")
    by_variant: dict[str, dict[str, Result]] = {}
    for r in results:
        by_variant.setdefault(r.variant.label, {})[r.kind] = r
    variants = {r.variant.label: r.variant for r in results}
    for variant in variants.values():
        cells = []
        for kind in KINDS:
            r = by_variant[variant.label].get(kind)
            cells += [f"{r.ms:.1f}", f"{r.size / 1000:.0f}", f"{r.psnr:.1f}"] if r else ["—", "—", "—"]
        grid.add_row(variant.label, "yes" if variant.lossless else "no", *cells)
    return grid


def decode_timings(device: str, batch: int = 8, repeats: int = 5, width: int = 1024, height: int = 768) -> Any:
    """Milliseconds per image to decode a batch of ``batch`` JPEGs (quality 92, the photo): Pillow one
    by one (:func:`imgpipe.imaging.decode_image`) and :func:`imgpipe.imaging.decode_images` on
    ``device`` (nvJPEG on a GPU with torchvision), waiting for the device; as a rich table."""
    import torch
    from rich.table import Table

    from imgpipe.imaging import decode_image, decode_images

    jpeg = encode_image(bench_images(width, height)["rgba"][..., :3], "jpeg", quality=92)  # the photo
    items = [jpeg] * batch
    target = torch.device(device)

    def pillow() -> None:
        _ = [decode_image(data) for data in items]  # kept, as decode_images keeps its batch: same allocations

    def batched() -> None:
        decode_images(items, device=target)
        if target.type == "cuda":
            torch.cuda.synchronize(target)

    title = f"decode {width}×{height} JPEG ({len(jpeg) // 1000} kB), batches of {batch}, median of {repeats}"
    grid = Table(title=title)
    grid.add_column("decoder")
    grid.add_column("ms per image", justify="right")
    for label, run in (("Pillow (decode_image)", pillow), (f"decode_images on {device}", batched)):
        run()  # warm-up: nvJPEG's handle, CUDA context
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        grid.add_row(label, f"{statistics.median(times) * 1000.0 / batch:.2f}")
    return grid


def main(argv: Sequence[str] | None = None) -> None:
    from rich.console import Console

    parser = argparse.ArgumentParser(prog="python -m imgpipe.encode_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="encodes per cell; the median is shown")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--decode", metavar="DEVICE", help="also time JPEG decoding: Pillow vs decode_images on DEVICE")
    args = parser.parse_args(argv)
    images = bench_images(args.width, args.height)
    results = measure(images, repeats=args.repeats)
    raw = {k: v.nbytes for k, v in images.items()}
    title = (
        f"encode {args.width}×{args.height}, median of {args.repeats}, one thread "
        f"(raw: rgba {raw['rgba'] // 1000} kB, mask {raw['mask'] // 1000} kB, composite {raw['composite'] // 1000} kB)"
    )
    console = Console(width=200)
    console.print(table(results, title))
    if args.decode:
        console.print(decode_timings(args.decode, repeats=args.repeats, width=args.width, height=args.height))


if __name__ == "__main__":
    main()
