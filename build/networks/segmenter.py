"""Reference segmenter honouring the RMBG-2.0 / BiRefNet contract (DESIGN §4).

Input ``1×3×1024×1024`` float32 (ImageNet-normalised RGB), output ``1×1×1024×1024`` logits. The
architecture is a U-Net of residual conv blocks whose cost at full width (64) is of the order of
ISNet's (≈300 GFLOP per 1024² image); ``width`` scales the cost quadratically so tests and the CPU demo
can run a small variant. The weights are seeded, not trained: the masks it predicts are meaningless.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class ConvBlock(nn.Module):
    """Two 3×3 conv-BN-ReLU layers with a residual shortcut."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.skip(x))


class ReferenceSegmenter(nn.Module):
    """Encoder at 1/2 … 1/32 of the input, decoder with skip connections, full-resolution logits."""

    multipliers = (1, 2, 4, 8, 8)

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        chans = [width * m for m in self.multipliers]
        self.stem = nn.Sequential(
            nn.Conv2d(3, chans[0], 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(chans[0]), nn.ReLU()
        )
        self.encoders = nn.ModuleList(ConvBlock(chans[max(i - 1, 0)], c) for i, c in enumerate(chans))
        self.decoders = nn.ModuleList(
            ConvBlock(chans[i + 1] + chans[i], chans[i]) for i in reversed(range(len(chans) - 1))
        )
        self.head = nn.Conv2d(chans[0], 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        y = self.stem(x)
        skips = []
        for i, enc in enumerate(self.encoders):
            if i:
                y = F.max_pool2d(y, 2)
            y = enc(y)
            skips.append(y)
        for dec, skip in zip(self.decoders, reversed(skips[:-1]), strict=True):
            y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            y = dec(torch.cat([y, skip], dim=1))
        y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        return self.head(y)


def build(width: int = 64) -> nn.Module:
    return ReferenceSegmenter(width=width)
