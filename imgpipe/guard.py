"""Which models outside callers may call, and how an internal model tells its callers apart.

Triton has no per-model access control: every loaded model answers anyone who reaches the port. imgpipe's
public models are the pipelines (``remove_background``, ``detect_faces``, ...); the networks and steps
behind them are internal. Each model's config says which it is (parameter :data:`VISIBILITY_PARAM`,
written by the build):

- ``public``: a pipeline's model; anyone may call it.
- ``internal``: called only by imgpipe's BLS models. ``imgpipe serve`` (:class:`imgpipe.server.TritonServer`)
  gives every start a fresh random key in the environment of the Python-backend stubs
  (:data:`INTERNAL_KEY_ENV`); BLS requests carry it as the request parameter :data:`INTERNAL_KEY_PARAM` and an
  internal model refuses a request without it (INVALID_ARG naming the public models to call instead).
  Without the environment variable (a ``tritonserver`` started by hand) internal models stay callable.
- ``ensemble-step``: a step of an ensemble (``remove_background``'s ``bg_preprocess``, its segmenter and
  ``bg_postprocess``). Triton forwards the caller's request parameters to the steps unchanged, so a step
  cannot tell a direct call from the ensemble's; these steps take the pipeline's own intake limits and
  bounded shapes instead, so a direct call costs no more than a call of the pipeline.

Networks served by TensorRT or ONNX Runtime (the ``tensorrt``/``onnxruntime`` targets) run no imgpipe
code: there the guard is the network boundary (only the public pipelines' names in an ingress rule,
or the NetworkPolicy) -- README, "Running it safely".
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from typing import Any, Literal

from imgpipe.errors import InvalidInputError

INTERNAL_KEY_ENV = "IMGPIPE_INTERNAL_KEY"
INTERNAL_KEY_PARAM = "imgpipe.internal_key"
VISIBILITY_PARAM = "imgpipe.visibility"
Visibility = Literal["public", "internal", "ensemble-step"]


def internal_key() -> str | None:
    """This server's internal key (from the stub's environment), or None where none was set."""
    return os.environ.get(INTERNAL_KEY_ENV) or None


def check_internal(model: str, visibility: str, parameters: Mapping[str, Any], key: str | None) -> None:
    """Refuse a request to an ``internal`` model that does not carry ``key`` (a caller from outside); the key
    is compared in constant time."""
    if visibility == "internal" and not carries_key(parameters, key):
        raise InvalidInputError(
            f"model '{model}' is internal to imgpipe and not callable from outside; call a pipeline"
        )


def carries_key(parameters: Mapping[str, Any], key: str | None) -> bool:
    """Whether a request's parameters carry this server's internal key (True where no key is set)."""
    if key is None:
        return True
    given = parameters.get(INTERNAL_KEY_PARAM)
    return isinstance(given, str) and hmac.compare_digest(given.encode(), key.encode())
