"""The Python-backend steps of the ``remove_background`` ensemble (declared in
:mod:`imgpipe.pipelines.remove_background`).

``bg_preprocess``: IMAGE bytes (+ MODE, BACKGROUND, FORMAT, validated here so a bad option fails before
the segmenter runs) → PIXELS for the segmenter, the decoded ORIGINAL (zero-padded to the largest image
of the request) and its SIZE, on the instance's device (JPEGs decoded by nvJPEG on a GPU instance).
``bg_postprocess``: MASK + ORIGINAL + SIZE + options → the encoded result (mask upsampling and
compositing on the device; PNG/WebP/JPEG encoding on the CPU with the pipeline's encoder settings).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from imgpipe.ensembles import background
from imgpipe.ensembles.step import Outputs, Step
from imgpipe.errors import InvalidInputError
from imgpipe.imaging import decode_images, encode_image
from imgpipe.pipelines.remove_background import MASK, ORIGINAL, PIXELS, SIZE, Settings


def _options(step: Step, request: Any) -> background.Options:
    return background.parse_options(
        step.optional_string(request, "MODE"),
        step.optional_string(request, "BACKGROUND"),
        step.optional_string(request, "FORMAT"),
    )


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
            import io

            from PIL import Image

            buffer = io.BytesIO()
            Image.new("RGB", (64, 48), (120, 80, 40)).save(buffer, format="JPEG")
            (image,) = decode_images([buffer.getvalue()], self.settings.max_pixels, self.device)
            background.preprocess(image, self.size, self.preprocessing)
            torch.cuda.synchronize(self.device)

    def handle(self, request: Any) -> Outputs:
        _options(self, request)  # validated here too, so a bad option fails before the segmenter runs
        images = decode_images(self.bytes_items(request, "IMAGE"), self.settings.max_pixels, self.device)
        height = max(im.shape[0] for im in images)
        width = max(im.shape[1] for im in images)
        original = torch.zeros((len(images), height, width, 3), dtype=torch.uint8, device=self.device)
        for i, im in enumerate(images):
            original[i, : im.shape[0], : im.shape[1]] = im
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
        bound = originals.shape[1:3]
        for height, width in sizes:  # SIZE says where each image lies in the padded ORIGINAL
            if not (1 <= height <= bound[0] and 1 <= width <= bound[1]):
                raise InvalidInputError(f"{SIZE} {[height, width]} lies outside {ORIGINAL} of {list(bound)} pixels")
        encoded = []
        for mask, original, (height, width) in zip(masks, originals, sizes, strict=True):
            rgb = original[:height, :width]
            guide = rgb if self.settings.refine == "guided" else None
            alpha = background.mask_to_alpha(
                mask, height, width, self.activation, guide, self.settings.guided_radius, self.settings.guided_eps
            )
            encoded.append(encode_image(background.compose(rgb, alpha, options), options.format, **encoding))
        return {"OUTPUT": np.array(encoded, dtype=object).reshape(-1, 1)}
