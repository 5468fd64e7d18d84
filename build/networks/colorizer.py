"""Reference colorizer honouring the DDColor contract (DESIGN §4). UNTRAINED: its colours are meaningless.

Input ``N×3×H×W`` float32, the "grey RGB" in [0, 1] (the image's L with a = b = 0, back to RGB; DDColor
normalises it with ImageNet's mean and std inside the network, and so does this one). Output
``N×2×H×W``: a*b* in Lab units. DDColor's own output is unbounded (a 1×1 convolution); this one is
bounded, ``AB_RANGE · tanh(·)`` with ``AB_RANGE = 110`` (the sRGB gamut spans a* ≈ −86…98, b* ≈ −108…94),
and its last layer starts small, so the seeded colours are mild tints rather than saturated noise.

The shape follows DDColor-T: a 4-stage encoder at 1/4 … 1/32 of the input (ConvNeXt-T's strides,
residual 3×3 conv blocks here), a pixel decoder back to 1/4 with skip connections, a ×4 pixel-shuffle
to full resolution, per-pixel "colour query" features concatenated with the (normalised) input and a
1×1 refinement to two channels. Fully convolutional: H and W may be any multiple of 32 (256 and 512 are
the pipeline's sizes). At ``width = 64`` one 512² image costs ≈ 190 GFLOP (DDColor-T: 193); the cost
scales with width², so small widths keep the CPU demo and tests quick. The weights are seeded, not
trained.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from imgpipe.build.networks.segmenter import ConvBlock  # the same residual block

AB_RANGE = 110.0
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ReferenceColorizer(nn.Module):
    """Grey RGB ``N×3×H×W`` in [0, 1] → a*b* ``N×2×H×W`` in Lab units."""

    multipliers = (2, 4, 8, 16)  # encoder channels per stage, × width (ConvNeXt-T: 96, 192, 384, 768)
    depths = (2, 2, 3, 2)  # blocks per stage

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        chans = [width * m for m in self.multipliers]
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.stem = nn.Sequential(nn.Conv2d(3, chans[0], 4, stride=4, bias=False), nn.BatchNorm2d(chans[0]), nn.ReLU())
        self.stages = nn.ModuleList(
            nn.Sequential(*(ConvBlock(chans[max(i - 1, 0)] if j == 0 else c, c) for j in range(depth)))
            for i, (c, depth) in enumerate(zip(chans, self.depths, strict=True))
        )
        self.decoders = nn.ModuleList(
            ConvBlock(chans[i + 1] + chans[i], chans[i]) for i in reversed(range(len(chans) - 1))
        )
        # ×4 to full resolution (DDColor's last pixel shuffle), then the colour queries per pixel.
        features = width
        self.shuffle = nn.Sequential(nn.Conv2d(chans[0], 16 * features, 3, padding=1), nn.PixelShuffle(4), nn.ReLU())
        self.queries = nn.Conv2d(features, 2 * width, 1)
        self.refine = nn.Conv2d(2 * width + 3, 2, 1)
        with torch.no_grad():  # mild seeded tints, not saturated noise (see the module docstring)
            self.refine.weight.mul_(0.3)
            self.refine.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        y = self.stem(x)
        skips = []
        for i, stage in enumerate(self.stages):
            if i:
                y = F.max_pool2d(y, 2)
            y = stage(y)
            skips.append(y)
        for dec, skip in zip(self.decoders, reversed(skips[:-1]), strict=True):
            y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            y = dec(torch.cat([y, skip], dim=1))
        y = self.shuffle(y)
        if y.shape[-2:] != x.shape[-2:]:  # sides that are not multiples of 32
            y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        y = self.refine(torch.cat([self.queries(y), x], dim=1))
        return AB_RANGE * torch.tanh(y)


def build(width: int = 64) -> nn.Module:
    return ReferenceColorizer(width=width)
