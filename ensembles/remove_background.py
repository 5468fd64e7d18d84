"""The Python-backend steps of the ``remove_background`` ensemble.

``bg_preprocess``: IMAGE bytes (+ MODE, BACKGROUND, validated here so a bad option fails before the
segmenter runs) → PIXELS for the segmenter, the decoded ORIGINAL (zero-padded to the largest image of
the request) and its SIZE. ``bg_postprocess``: MASK + ORIGINAL + SIZE + options → an encoded PNG.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from imgpipe.ensembles import background
from imgpipe.ensembles.step import PythonStep
from imgpipe.imaging import DEFAULT_MAX_PIXELS, decode_image, encode_png


class Preprocess(PythonStep):
    def __init__(self, pb_utils: Any, args: dict[str, str]) -> None:
        super().__init__(pb_utils, args)
        self.max_pixels = int(self.parameters.get("max_pixels", DEFAULT_MAX_PIXELS))
        height, width = self.parameters.get("input_size", "1024x1024").split("x")
        self.size = (int(height), int(width))
        self.device = torch.device(
            "cuda" if torch.cuda.is_available() and args.get("model_instance_kind") == "GPU" else "cpu"
        )

    def handle(self, request: Any) -> dict[str, np.ndarray | torch.Tensor]:
        background.parse_options(self.optional_string(request, "MODE"), self.optional_string(request, "BACKGROUND"))
        images = [decode_image(data, self.max_pixels) for data in self.bytes_items(request, "IMAGE")]
        height = max(im.shape[0] for im in images)
        width = max(im.shape[1] for im in images)
        original = np.zeros((len(images), height, width, 3), dtype=np.uint8)
        pixels = []
        for i, im in enumerate(images):
            original[i, : im.shape[0], : im.shape[1]] = im
            pixels.append(background.preprocess(torch.from_numpy(im).to(self.device), self.size))
        sizes = np.array([im.shape[:2] for im in images], dtype=np.int32)
        return {"PIXELS": torch.stack(pixels), "ORIGINAL": original, "SIZE": sizes}


class Postprocess(PythonStep):
    def __init__(self, pb_utils: Any, args: dict[str, str]) -> None:
        super().__init__(pb_utils, args)
        self.activation = self.parameters.get("mask_activation", "sigmoid")

    def handle(self, request: Any) -> dict[str, np.ndarray | torch.Tensor]:
        options = background.parse_options(
            self.optional_string(request, "MODE"), self.optional_string(request, "BACKGROUND")
        )
        masks = self.tensor(request, "MASK")
        originals = self.tensor(request, "ORIGINAL")
        sizes = self.tensor(request, "SIZE").cpu().tolist()
        encoded = []
        for mask, original, (height, width) in zip(masks, originals, sizes, strict=True):
            rgb = original[:height, :width]
            alpha = background.mask_to_alpha(mask.to(rgb.device), height, width, self.activation)
            encoded.append(encode_png(background.compose(rgb, alpha, options)))
        return {"OUTPUT": np.array(encoded, dtype=object).reshape(-1, 1)}
