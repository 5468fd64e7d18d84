"""A toy pipeline added through the registry alone (a manifest ``plugins`` entry): it touches no
imgpipe module. ``invert``: an image in, its negative out (a Python step). ``invert_twice``: a BLS model
that calls ``invert`` twice, so an inner model's INVALID_ARG can be seen reaching the caller."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from imgpipe.ensembles.step import BlsStep, Outputs, Step
from imgpipe.imaging import decode_image, encode_png
from imgpipe.manifest import Instances
from imgpipe.pipelines.registry import IO, BuildContext, Contract, Pipeline, python_model, register

CONTRACT = Contract(
    model="invert",
    summary="Toy: the negative of an image.",
    inputs=(IO("IMAGE", "BYTES", (1,), "encoded image: JPEG, PNG or WebP bytes"),),
    outputs=(IO("IMAGE", "BYTES", (1,), "PNG of the negative"),),
)


@dataclass(frozen=True)
class Settings:
    max_pixels: int = 4_000_000
    instances: Instances = field(default_factory=Instances)


class Invert(Step):
    settings_type = Settings

    def handle(self, request: Any) -> Outputs:
        image = torch.from_numpy(decode_image(self.single_image(request), self.settings.max_pixels)).to(self.device)
        return {"IMAGE": np.array([encode_png((255 - image).cpu().numpy())], dtype=object)}


class InvertTwice(BlsStep):
    settings_type = Settings

    async def handle_async(self, request: Any) -> Outputs:
        data = np.array([self.single_image(request)], dtype=object)
        for _ in range(2):
            (data,) = await self.infer(CONTRACT.model, {"IMAGE": data}, ["IMAGE"])
        return {"IMAGE": data}


@register
class InvertPipeline(Pipeline):
    name = "invert"
    settings = Settings
    contract = CONTRACT
    also_public = ("invert_twice",)  # called from outside by the tests too

    def models(self, ctx: BuildContext, settings: Settings) -> list[Any]:
        io = (tuple(i.tensor() for i in CONTRACT.inputs), tuple(o.tensor() for o in CONTRACT.outputs))
        return [
            python_model(CONTRACT.model, Invert, settings, *io, settings.instances, contract=CONTRACT),
            python_model("invert_twice", InvertTwice, settings, *io, settings.instances),
        ]
