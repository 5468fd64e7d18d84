"""Client for the ``remove_background`` pipeline (contract: :mod:`imgpipe.pipelines.remove_background`)."""

from __future__ import annotations

from typing import Literal

from imgpipe.clients.triton import TritonClient, bytes_tensor
from imgpipe.pipelines.remove_background import CONTRACT

MODEL = CONTRACT.model
Mode = Literal["rgba", "mask", "composite"]


def remove_background(client: TritonClient, image: bytes, mode: Mode = "rgba", background: str | None = None) -> bytes:
    """The cut-out as PNG bytes: RGBA (``rgba``), the mask alone (``mask``, greyscale) or the image
    composited on ``background`` (``composite``, RGB; a colour such as ``'#00ff00'`` or ``'white'``).
    """
    inputs = {"IMAGE": bytes_tensor(image), "MODE": bytes_tensor(mode)}
    if background is not None:
        inputs["BACKGROUND"] = bytes_tensor(background)
    (output,) = (o.name for o in CONTRACT.outputs)
    return bytes(client.infer(MODEL, inputs, [output])[output].reshape(-1)[0])
