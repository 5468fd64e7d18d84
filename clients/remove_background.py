"""Client for the ``remove_background`` pipeline (contract: :mod:`imgpipe.pipelines.remove_background`)."""

from __future__ import annotations

from typing import Literal

from imgpipe.clients.triton import TritonClient, bytes_tensor
from imgpipe.pipelines.remove_background import CONTRACT

MODEL = CONTRACT.model
Mode = Literal["rgba", "mask", "composite"]
Format = Literal["png", "webp", "jpeg"]
SUFFIXES: dict[str, str] = {"png": ".png", "webp": ".webp", "jpeg": ".jpg"}  # a result file's name


def remove_background(
    client: TritonClient,
    image: bytes,
    mode: Mode = "rgba",
    background: str | None = None,
    fmt: Format = "png",
) -> bytes:
    """The cut-out as encoded bytes: RGBA (``rgba``), the mask alone (``mask``, greyscale) or the image
    composited on ``background`` (``composite``, RGB; a colour such as ``'#00ff00'`` or ``'white'``).

    ``fmt`` is the encoding: ``png`` (default), ``webp`` (lossless by default; a mask comes back as RGB
    with equal channels, WebP has no greyscale) or ``jpeg`` (``composite`` and ``mask`` only: JPEG has no
    alpha, and the server refuses ``rgba`` with INVALID_ARG). The server's manifest sets the PNG level,
    the qualities and WebP's mode (``[pipelines.remove_background]``).
    """
    inputs = {"IMAGE": bytes_tensor(image), "MODE": bytes_tensor(mode), "FORMAT": bytes_tensor(fmt)}
    if background is not None:
        inputs["BACKGROUND"] = bytes_tensor(background)
    (output,) = (o.name for o in CONTRACT.outputs)
    return bytes(client.infer(MODEL, inputs, [output])[output].reshape(-1)[0])
