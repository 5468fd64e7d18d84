"""The Python-backend steps of the ``remove_background`` ensemble (declared in
:mod:`imgpipe.pipelines.remove_background`).

``bg_preprocess``: IMAGE bytes (+ MODE, BACKGROUND, FORMAT, validated here so a bad option fails before
the segmenter runs) → PIXELS for the segmenter, the decoded ORIGINAL and its SIZE, on the instance's device
(JPEGs decoded by nvJPEG on a GPU instance). ORIGINAL holds each image's pixels flattened, ``N×1×P×3``
with P the largest pixel count of the request (:func:`pack`): a batch of a 1×10000 and a 10000×1 image
takes 2×10000 pixels, not 2×10000×10000 as padding both sides to the largest would.
``bg_postprocess``: MASK + ORIGINAL + SIZE + options → the encoded result (mask upsampling and
compositing on the device; PNG/WebP/JPEG encoding on the CPU with the pipeline's encoder settings).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from imgpipe.ensembles import background
from imgpipe.ensembles.step import Outputs, Pending, Step
from imgpipe.errors import InvalidInputError
from imgpipe.imaging import IntakeLimits, decode_images, encode_image
from imgpipe.pipelines.remove_background import CONTRACT, MASK, ORIGINAL, PIXELS, SIZE, Settings
from imgpipe.samples import encode


def _options(step: Step, request: Any) -> background.Options:
    return background.parse_options(
        step.optional_string(request, "MODE"),
        step.optional_string(request, "BACKGROUND"),
        step.optional_string(request, "FORMAT"),
    )


def pack(images: list[torch.Tensor]) -> torch.Tensor:
    """``H×W×3`` images of any sizes → ORIGINAL, ``N×1×P×3`` uint8: image i's pixels in row-major order
    in ``[i, 0, :H·W]``, zeros after (P: the largest H·W). Memory grows with the largest image, never
    with the largest height times the largest width."""
    largest = max(im.shape[0] * im.shape[1] for im in images)
    original = torch.zeros((len(images), 1, largest, 3), dtype=torch.uint8, device=images[0].device)
    for i, im in enumerate(images):
        original[i, 0, : im.shape[0] * im.shape[1]] = im.reshape(-1, 3)
    return original


def unpack(original: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Image i of :func:`pack`'s ORIGINAL (``original[i]``, ``A×B×3``, A·B ≥ H·W) as ``H×W×3`` (a view)."""
    return original.reshape(-1, 3)[: height * width].view(height, width, 3)


class Preprocess(Step):
    settings_type = Settings

    def setup(self) -> None:
        height, width = self.parameters.get("input_size", "1024x1024").split("x")
        self.size = (int(height), int(width))
        self.preprocessing = self.parameters.get("preprocessing", "rmbg")

    def warm_up(self) -> None:
        """nvJPEG and the resize kernels start here, not in the first request (seconds on a GPU)."""
        super().warm_up()
        if self.device.type == "cuda":
            jpeg = encode(np.full((48, 64, 3), (120, 80, 40), dtype=np.uint8), "JPEG")
            (image,) = decode_images([jpeg], device=self.device, limits=IntakeLimits.of(self.settings))
            background.preprocess(image, self.size, self.preprocessing)
            torch.cuda.synchronize(self.device)

    def handle(self, request: Any) -> Outputs:
        CONTRACT.parse_parameters(self.request_parameters(request))  # it has none: an unknown one is refused
        _options(self, request)  # validated here too, so a bad option fails before the segmenter runs
        items = self.bytes_items(request, "IMAGE")
        if not items:
            raise InvalidInputError("input 'IMAGE' holds no image")
        images = decode_images(items, device=self.device, limits=IntakeLimits.of(self.settings))
        original = pack(images)  # each image flattened: never padded to max height × max width
        pixels = torch.stack([background.preprocess(im, self.size, self.preprocessing) for im in images])
        sizes = torch.tensor([im.shape[:2] for im in images], dtype=torch.int32)  # read on the host next
        return {PIXELS: pixels, ORIGINAL: original, SIZE: sizes}


class Postprocess(Step):
    settings_type = Settings

    def setup(self) -> None:
        self.activation = self.parameters.get("mask_activation", "sigmoid")

    def handle(self, request: Any) -> Outputs:
        options = _options(self, request)
        encoding = background.encoder_options(options, self.settings)
        masks = self.tensor(request, MASK)
        originals = self.tensor(request, ORIGINAL)
        sizes = self.tensor(request, SIZE).cpu().tolist()
        if not len(masks) == len(originals) == len(sizes):
            raise InvalidInputError(f"{MASK}, {ORIGINAL} and {SIZE} must have the same batch size")
        if originals.dim() != 4 or originals.shape[-1] != 3:
            raise InvalidInputError(f"{ORIGINAL} must be N×A×B×3 uint8 pixels, got shape {list(originals.shape)}")
        bound = originals.shape[1:3]
        for height, width in sizes:  # SIZE says how many of ORIGINAL's (flattened) pixels are the image's
            if not (1 <= height and 1 <= width and height * width <= bound[0] * bound[1]):
                raise InvalidInputError(f"{SIZE} {[height, width]} lies outside {ORIGINAL} of {list(bound)} pixels")
        encoded = []
        for mask, original, (height, width) in zip(masks, originals, sizes, strict=True):
            rgb = unpack(original, height, width)
            guide = rgb if self.settings.refine == "guided" else None
            alpha = background.mask_to_alpha(
                mask, height, width, self.activation, guide, self.settings.guided_radius, self.settings.guided_eps
            )
            encoded.append(
                self.encode(encode_image, background.compose(rgb, alpha, options), options.format, **encoding)
            )
        return {"OUTPUT": Pending(encoded, (-1, 1))}
