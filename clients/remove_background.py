"""Client for the ``remove_background`` pipeline."""

from __future__ import annotations

from typing import Literal

from imgpipe.clients.triton import TritonClient, bytes_tensor

MODEL = "remove_background"
Mode = Literal["rgba", "mask", "composite"]


def remove_background(client: TritonClient, image: bytes, mode: Mode = "rgba", background: str | None = None) -> bytes:
    """The cut-out as PNG bytes: RGBA (``rgba``), the mask alone (``mask``, greyscale) or the image
    composited on ``background`` (``composite``, RGB; a colour such as ``'#00ff00'`` or ``'white'``).
    """
    inputs = {"IMAGE": bytes_tensor(image), "MODE": bytes_tensor(mode)}
    if background is not None:
        inputs["BACKGROUND"] = bytes_tensor(background)
    return bytes(client.infer(MODEL, inputs, ["OUTPUT"])["OUTPUT"].reshape(-1)[0])
