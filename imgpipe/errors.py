"""Errors the caller caused. Python-backend adapters turn them into ``INVALID_ARG`` responses."""


class InvalidInputError(ValueError):
    """The request is wrong (bad bytes, bad option); the message says what, in one sentence."""
