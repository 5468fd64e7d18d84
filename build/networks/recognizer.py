"""Reference face recognizer honouring the ArcFace (w600k_r50) contract (DESIGN §4).

Input ``N×3×112×112`` (arcface_112_v2 crop, RGB, x/127.5 − 1), output a 512-d embedding. A ResNet of
basic blocks, about 4 GFLOP per face at width 64 (ArcFace R50: ≈6 GFLOP). Seeded, untrained weights:
its embeddings carry no identity until a real ArcFace ONNX is configured.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.skip(x))


class ReferenceRecognizer(nn.Module):
    def __init__(self, width: int = 64, embedding: int = 512) -> None:
        super().__init__()
        chans = [width, 2 * width, 4 * width, 8 * width]
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        blocks = []
        cin = width
        for c in chans:
            blocks += [BasicBlock(cin, c, 2), BasicBlock(c, c, 1)]
            cin = c
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.BatchNorm2d(cin), nn.Flatten(), nn.Linear(cin * 7 * 7, embedding), nn.BatchNorm1d(embedding)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def build(width: int = 64) -> nn.Module:
    return ReferenceRecognizer(width=width)
