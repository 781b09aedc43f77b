"""Re-estimate BatchNorm statistics after training ("precise BN").

Keras' BatchNormalization keeps exponential moving averages (momentum 0.99) of the batch
statistics seen *while the weights were changing*. After few steps - small curated sets, short
runs, training from scratch offline - they still lean on their initial values (mean 0,
variance 1), and inference collapses to one class while training-mode outputs are right
(measured: EfficientNetB0 from scratch, 120 steps, val accuracy 0.98 in training mode vs 0.50
in inference mode). Averaging the statistics of the final weights over training batches fixes
that without touching a single trained weight; with many steps it changes little.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["recalibrate_batchnorm"]


def _batchnorm_layers(model: Any) -> list[Any]:
    import keras

    found = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable:
            found.append(layer)
        elif isinstance(layer, keras.Model):
            found.extend(_batchnorm_layers(layer))
    return found


def recalibrate_batchnorm(model: Any, batches: Iterable[Any], max_batches: int = 100) -> int:
    """Set every BatchNorm's moving mean/variance to the plain average over ``batches``.

    ``batches`` yields input arrays (un-augmented training images); returns how many were used
    (0 when the model has no BatchNorm). Batch ``k`` is given weight ``1/k`` through the
    layer's momentum, so the result is the exact mean of the per-batch statistics.
    """
    layers = _batchnorm_layers(model)
    if not layers:
        return 0
    saved = [layer.momentum for layer in layers]
    used = 0
    try:
        for x in batches:
            if used >= max_batches:
                break
            used += 1
            for layer in layers:
                layer.momentum = 1.0 - 1.0 / used
            model(x, training=True)
    finally:
        for layer, momentum in zip(layers, saved, strict=True):
            layer.momentum = momentum
    return used
