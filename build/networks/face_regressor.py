"""Reference face regressor honouring the Deep3DFaceRecon contract (DESIGN §4).

Input ``N×3×224×224``: the 224×224 crop made by Deep3DFaceRecon's ``align_img`` (5 landmarks fitted to
its standard 3D landmarks, scale 102/s), RGB /255, no mean or std. Output ``N×257`` coefficients: id 80,
exp 64, tex 80, angles 3 (radians), SH lighting 27, translation 3.

The architecture is Deep3DFaceRecon's ``ReconNetWrapper`` around torchvision's ``resnet50`` (ResNet v1.5:
Bottleneck blocks [3, 4, 6, 3], the stride on the 3×3 convolution), cut after the global average pool,
with seven 1×1-convolution heads (id 80, exp 64, tex 80, angle 3, gamma 27, tx/ty 2, tz 1) whose outputs
are concatenated. The module and parameter names are theirs (``backbone.layer1.0.conv1.weight``,
``final_layers.0.bias``, …), so the ``net_recon`` state dict of a Deep3DFaceRecon checkpoint loads into
:func:`build` at width 64 (:func:`load_deep3d_checkpoint`) and exports to ONNX like any reference network.

``width`` scales every layer (the stem's and each stage's channels are ``width``, 2·, 4·, 8·``width``,
×4 after each bottleneck); 64 is ResNet-50 exactly: 4.1 G multiply-adds at 224² (``count_flops``: 8.2
GFLOP). Smaller widths keep the CPU tests quick.

UNTRAINED, seeded weights: the backbone is initialised as torchvision initialises it (Kaiming normal,
fan-out), the heads with small seeded weights (Deep3DFaceRecon initialises them to zero; small non-zero
values keep the network's output depending on its input, so a broken input path shows). Its coefficients
are near zero — the 3DMM's mean face, frontal, with its mean colour — and carry nothing of the photo until
a trained Deep3DFaceRecon network is configured.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

# Deep3DFaceRecon's heads, in the order of the 257 outputs.
HEADS = (("id", 80), ("exp", 64), ("tex", 80), ("angle", 3), ("gamma", 27), ("txy", 2), ("tz", 1))
OUTPUTS = sum(n for _, n in HEADS)  # 257
HEAD_STD = 1e-3  # the heads' seeded weights, × 1/√(features); outputs stay within a few hundredths


def _conv1x1(cin: int, cout: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=bias)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (ResNet v1.5: the stride on the 3×3 convolution)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50Backbone(nn.Module):
    """torchvision's ``resnet50`` without its ``fc``: N×3×H×W → N×(32·width)×1×1."""

    def __init__(self, width: int = 64, layers: tuple[int, ...] = (3, 4, 6, 3)) -> None:
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(8 * width, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.features = 8 * width * Bottleneck.expansion
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * Bottleneck.expansion, stride),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.avgpool(x)


class FaceRegressor(nn.Module):
    """Deep3DFaceRecon's ``ReconNetWrapper`` (``net_recon = resnet50``, ``use_last_fc = False``)."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.backbone = ResNet50Backbone(width)
        features = self.backbone.features
        self.final_layers = nn.ModuleList([_conv1x1(features, n, bias=True) for _, n in HEADS])
        for layer in self.final_layers:
            nn.init.normal_(layer.weight, std=HEAD_STD / features**0.5)
            nn.init.constant_(layer.bias, 0.0)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.backbone(image)
        return torch.flatten(torch.cat([layer(x) for layer in self.final_layers], dim=1), 1)


def build(width: int = 64) -> nn.Module:
    return FaceRegressor(width=width)


def load_deep3d_checkpoint(module: nn.Module, checkpoint: str | Path) -> nn.Module:
    """Load a Deep3DFaceRecon checkpoint (``epoch_20.pth``: a dict whose ``net_recon`` is the regressor's
    state dict) into a width-64 :class:`FaceRegressor`, strictly (every name and shape must match)."""
    state = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "net_recon" in state:
        state = state["net_recon"]
    module.load_state_dict(state, strict=True)
    return module.eval()
