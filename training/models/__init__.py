"""Classifier architectures (Keras). Importing this package does not import TensorFlow."""

from training.models.registry import (
    ARCHITECTURES,
    ArchitectureSpec,
    build_model,
    count_params,
    describe_architectures,
    get_spec,
    resolve_hparams,
)

__all__ = [
    "ARCHITECTURES", "ArchitectureSpec", "build_model", "count_params", "describe_architectures",
    "get_spec", "resolve_hparams",
]
