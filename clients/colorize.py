"""Client for the ``colorize`` pipeline (contract: :mod:`imgpipe.pipelines.colorize`)."""

from __future__ import annotations

from typing import Literal

from imgpipe.clients.triton import TritonClient, bytes_tensor
from imgpipe.pipelines.colorize import CONTRACT

MODEL = CONTRACT.model
Format = Literal["png", "webp", "jpeg"]
SUFFIXES: dict[str, str] = {"png": ".png", "webp": ".webp", "jpeg": ".jpg"}  # a result file's name


def colorize(client: TritonClient, *images: bytes, fmt: Format = "png", size: int = 512) -> list[bytes]:
    """The colour version of each image, encoded as ``fmt``, in one request (one batch).

    ``fmt``: ``png`` (default), ``webp`` or ``jpeg`` (not for an image with an alpha channel: the alpha
    is kept, JPEG cannot hold it, and the server refuses with INVALID_ARG). ``size``: the colorizer's
    input side, 512 (DDColor's) or 256 (4× cheaper). A greyscale image comes back as RGB, an RGBA one as
    RGBA with its alpha unchanged; each result has its input's size.
    """
    if not images:
        return []
    inputs = {
        "IMAGE": bytes_tensor(*images),
        "FORMAT": bytes_tensor(*([fmt] * len(images))),
        "SIZE": bytes_tensor(*([str(size)] * len(images))),
    }
    (output,) = (o.name for o in CONTRACT.outputs)
    return [bytes(r) for r in client.infer(MODEL, inputs, [output])[output].reshape(-1)]


def colorize_one(client: TritonClient, image: bytes, fmt: Format = "png", size: int = 512) -> bytes:
    """:func:`colorize` for one image."""
    return colorize(client, image, fmt=fmt, size=size)[0]
