"""Errors the caller caused. Python-backend adapters turn them into ``INVALID_ARG`` responses."""

from __future__ import annotations

from typing import Any

QUOTE_CHARS = 40  # the most of the caller's input a message repeats


class InvalidInputError(ValueError):
    """The request is wrong (bad bytes, bad option); the message says what, in one sentence."""


def quote(value: Any, limit: int = QUOTE_CHARS) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters: a message never echoes more than a
    few dozen characters of the caller's input (a 20,000-character option once made the gRPC trailer exceed
    its size limit)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 4]}...{text[-1]}"
