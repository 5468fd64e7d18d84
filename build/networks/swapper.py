"""Reference face swapper honouring the inswapper_128 contract (DESIGN §4).

Inputs ``target`` N×3×128×128 (arcface_128 crop, RGB /255) and ``source`` N×512 (the identity latent
``embedding · emap / ‖embedding‖``); output N×3×128×128 RGB in [0, 1]. An encoder, eight residual
blocks modulated by the source latent (AdaIN) at 32×32, and a decoder: ≈350 GFLOP per face at width
64, like inswapper_128. Like inswapper, the ONNX carries the 512×512 ``emap`` as the graph's last
initializer (unused by the graph; the pipeline reads it). Seeded, untrained weights: its output is
meaningless until a real inswapper ONNX is configured.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class StyleBlock(nn.Module):
    def __init__(self, channels: int, latent: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.style1 = nn.Linear(latent, 2 * channels)
        self.style2 = nn.Linear(latent, 2 * channels)

    @staticmethod
    def _adain(x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        gamma, beta = style.unsqueeze(-1).unsqueeze(-1).chunk(2, dim=1)
        return F.instance_norm(x) * (1 + gamma) + beta

    def forward(self, x: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        y = F.relu(self._adain(self.conv1(x), self.style1(latent)))
        y = self._adain(self.conv2(y), self.style2(latent))
        return x + y


class ReferenceSwapper(nn.Module):
    def __init__(self, width: int = 64, latent: int = 512, blocks: int = 8) -> None:
        super().__init__()
        core = 16 * width
        self.encoder = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(4 * width, core, 3, padding=1), nn.LeakyReLU(0.2),
        )  # fmt: skip
        self.blocks = nn.ModuleList(StyleBlock(core, latent) for _ in range(blocks))
        self.up1 = nn.Conv2d(core, 4 * width, 3, padding=1)
        self.up2 = nn.Conv2d(4 * width, 2 * width, 3, padding=1)
        self.up3 = nn.Conv2d(2 * width, width, 3, padding=1)
        self.head = nn.Conv2d(width, 3, 3, padding=1)
        generator = torch.Generator().manual_seed(1234)
        self.register_buffer("emap", torch.randn(latent, latent, generator=generator) / latent**0.5)

    def forward(self, target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        x = self.encoder(target)
        for block in self.blocks:
            x = block(x, source)
        x = F.leaky_relu(self.up1(F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)), 0.2)
        x = F.leaky_relu(self.up2(F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)), 0.2)
        x = F.leaky_relu(self.up3(x), 0.2)
        return torch.sigmoid(self.head(x))

    def onnx_initializers(self) -> dict[str, np.ndarray]:
        """Initializers appended to the exported graph, last one last (inswapper keeps emap there)."""
        return {"emap": self.emap.numpy().astype(np.float32)}


def build(width: int = 64) -> nn.Module:
    return ReferenceSwapper(width=width)
