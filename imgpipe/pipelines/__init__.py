"""Pipelines: one module each declares a pipeline's settings, contract, models and assets.

See :mod:`imgpipe.pipelines.registry` for the declaration types and the registry itself.
"""

from imgpipe.pipelines.registry import PIPELINES, Contract, Pipeline, register, registry

__all__ = ["PIPELINES", "Contract", "Pipeline", "register", "registry"]
