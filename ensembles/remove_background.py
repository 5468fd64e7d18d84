"""The Python-backend steps of the ``remove_background`` ensemble (declared in
:mod:`imgpipe.pipelines.remove_background`).

``bg_preprocess``: IMAGE bytes (+ MODE, BACKGROUND, validated here so a bad option fails before the
segmenter runs) → PIXELS for the segmenter, the decoded ORIGINAL (zero-padded to the largest image of
the request) and its SIZE, on the instance's device. ``bg_postprocess``: MASK + ORIGINAL + SIZE +
options → an encoded PNG (mask upsampling and compositing on the device, PNG encoding on CPU).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from imgpipe.ensembles import background
from imgpipe.ensembles.step import Outputs, Step
from imgpipe.imaging import decode_image, encode_png
from imgpipe.pipelines.remove_background import MASK, ORIGINAL, PIXELS, SIZE, Settings


class Preprocess(Step):
    settings_type = Settings

    def setup(self) -> None:
        height, width = self.parameters.get("input_size", "1024x1024").split("x")
        self.size = (int(height), int(width))

    def handle(self, request: Any) -> Outputs:
        background.parse_options(self.optional_string(request, "MODE"), self.optional_string(request, "BACKGROUND"))
        images = [
            torch.from_numpy(decode_image(data, self.settings.max_pixels)).to(self.device)
            for data in self.bytes_items(request, "IMAGE")
        ]
        height = max(im.shape[0] for im in images)
        width = max(im.shape[1] for im in images)
        original = torch.zeros((len(images), height, width, 3), dtype=torch.uint8, device=self.device)
        for i, im in enumerate(images):
            original[i, : im.shape[0], : im.shape[1]] = im
        pixels = torch.stack([background.preprocess(im, self.size) for im in images])
        sizes = torch.tensor([im.shape[:2] for im in images], dtype=torch.int32, device=self.device)
        return {PIXELS: pixels, ORIGINAL: original, SIZE: sizes}


class Postprocess(Step):
    settings_type = Settings

    def setup(self) -> None:
        self.activation = self.parameters.get("mask_activation", "sigmoid")

    def handle(self, request: Any) -> Outputs:
        options = background.parse_options(
            self.optional_string(request, "MODE"), self.optional_string(request, "BACKGROUND")
        )
        masks = self.tensor(request, MASK)
        originals = self.tensor(request, ORIGINAL)
        sizes = self.tensor(request, SIZE).cpu().tolist()
        encoded = []
        for mask, original, (height, width) in zip(masks, originals, sizes, strict=True):
            rgb = original[:height, :width]
            alpha = background.mask_to_alpha(mask, height, width, self.activation)
            encoded.append(encode_png(background.compose(rgb, alpha, options)))
        return {"OUTPUT": np.array(encoded, dtype=object).reshape(-1, 1)}
