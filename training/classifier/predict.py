"""The classifier's predict side: load a logged model, preprocess, infer. Nothing else.

Serving (the Bento's classifier service), the MLflow pyfunc and evaluation import this module;
the training loop (:mod:`training.classifier.train`) uses it too, so what is measured at
training time is what is served. TensorFlow/Keras are imported inside functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from training.errors import RegistryError
from training.families import read_logged_model
from training.preprocess import PreprocessParams, preprocess_image

__all__ = ["PREDICT_BATCH", "apply_temperature", "load_classifier", "load_keras_model",
           "model_temperature", "predict_array", "predict_proba"]

PREDICT_BATCH = 32  # images per forward pass when predicting arrays


def load_keras_model(path: str | Path) -> Any:
    """Load a saved ``.keras`` classifier for inference (custom layers registered first)."""
    import keras

    import training.classifier.layers  # noqa: F401  (registers CaffePreprocess for deserialising)

    return keras.saving.load_model(str(path), compile=False)


def load_classifier(model_dir: Path) -> tuple[Any, dict[str, Any]]:
    """A logged classifier's Keras model and MLmodel metadata (classes, preprocess, ...).

    ``model_dir`` is a downloaded MLflow model dir (``MLmodel`` + ``artifacts/model.keras``);
    the metadata is read as YAML, so no MLflow call is made.
    """
    keras_path, meta = read_logged_model(model_dir, "classifier", "model.keras")
    missing = {"classes", "preprocess"} - set(meta)
    if missing:
        raise RegistryError(f"{Path(model_dir) / 'MLmodel'} metadata lacks {sorted(missing)}")
    return load_keras_model(keras_path), meta


def predict_array(model: Any, x: Any, batch_size: int = PREDICT_BATCH) -> np.ndarray:
    """Probabilities ``(n, k)`` of preprocessed pixels ``(n, size, size, 3)`` (or one image)."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 3:
        x = x[None]
    want = tuple(model.input_shape[1:])
    if x.ndim != 4 or any(w is not None and w != g for w, g in zip(want, x.shape[1:],
                                                                   strict=True)):
        raise ValueError(f"expected preprocessed images of shape (n, {', '.join(map(str, want))})"
                         f" in 0-255, got an array of shape {x.shape}")
    n_classes = int(model.output_shape[-1])
    if len(x) == 0:
        return np.zeros((0, n_classes), dtype=np.float32)
    out = [np.asarray(model.predict_on_batch(x[i:i + batch_size]))
           for i in range(0, len(x), batch_size)]
    return np.concatenate(out).astype(np.float32)


def apply_temperature(probs: Any, temperature: float = 1.0) -> np.ndarray:
    """``softmax(log p / T)`` row by row: the model's probabilities with its fitted temperature.

    The one post-processing step of every classifier output (Keras, pyfunc, serving), so all
    runtimes serve the same calibrated numbers. ``log p`` of a softmax output equals the logits
    up to a per-row constant, so this is ``softmax(logits / T)``; ``T = 1`` returns ``probs``
    unchanged, and the argmax never changes.
    """
    probs = np.asarray(probs, dtype=np.float32)
    t = float(temperature)
    if not t > 0 or not np.isfinite(t):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if t == 1.0 or probs.size == 0:
        return probs
    z = np.log(np.clip(probs.astype(np.float64), 1e-12, 1.0)) / t
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def model_temperature(meta: dict[str, Any]) -> float:
    """The temperature stored in a logged model's metadata; 1.0 for models logged without one."""
    return float(meta.get("temperature") or 1.0)


def predict_proba(model: Any, images: list[Image.Image], params: PreprocessParams,
                  temperature: float = 1.0) -> np.ndarray:
    """Class probabilities ``(n, k)`` of PIL images, through the one preprocessing function,
    scaled by the model's ``temperature`` (:func:`apply_temperature`)."""
    if not images:
        return predict_array(model, np.zeros((0, params.image_size, params.image_size, 3)))
    return apply_temperature(
        predict_array(model, np.stack([preprocess_image(im, params) for im in images])),
        temperature)
