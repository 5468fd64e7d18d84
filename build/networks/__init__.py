"""Reference architectures, by the name a manifest's ``source.architecture`` uses."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from imgpipe.build.networks import colorizer, face_regressor, recognizer, segmenter, swapper

ARCHITECTURES: dict[str, Callable[[int], nn.Module]] = {
    "segmenter": segmenter.build,
    "recognizer": recognizer.build,
    "swapper": swapper.build,
    "colorizer": colorizer.build,
    "face_regressor": face_regressor.build,
}


def build_reference(architecture: str, width: int, seed: int) -> nn.Module:
    """The architecture with seeded (untrained) weights, in eval mode."""
    try:
        factory = ARCHITECTURES[architecture]
    except KeyError:
        raise ValueError(
            f"unknown reference architecture {architecture!r} (have: {', '.join(ARCHITECTURES)})"
        ) from None
    torch.manual_seed(seed)
    model = factory(width) if width else factory()  # type: ignore[call-arg]
    return model.eval()


def count_flops(model: nn.Module, *examples: torch.Tensor) -> int:
    """Multiply-adds ×2 of the convolutions and linear layers for one forward pass on ``examples``."""
    total = 0

    def conv_hook(module: nn.Conv2d, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        kernel = module.kernel_size[0] * module.kernel_size[1] * (module.in_channels // module.groups)
        total += 2 * output.numel() * kernel

    def linear_hook(module: nn.Linear, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        total += 2 * output.numel() * module.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    try:
        with torch.inference_mode():
            model(*examples)
    finally:
        for h in handles:
            h.remove()
    return total
