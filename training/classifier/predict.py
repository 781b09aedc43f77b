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

__all__ = ["PREDICT_BATCH", "load_classifier", "load_keras_model", "predict_array",
           "predict_proba"]

PREDICT_BATCH = 32  # images per forward pass when predicting arrays


def load_keras_model(path: str | Path) -> Any:
    """Load a saved ``.keras`` classifier for inference (custom layers registered first)."""
    import keras

    import training.classifier.layers  # noqa: F401  (registers CaffePreprocess for deserialising)

    return keras.saving.load_model(str(path), compile=False)


def load_classifier(model_dir: Path) -> tuple[Any, dict[str, Any]]:
    """A logged classifier's model and MLmodel metadata (classes, preprocess, ...).

    ``model_dir`` is a downloaded MLflow model dir (``MLmodel`` + ``artifacts/model.keras``,
    or ``artifacts/baseline.joblib`` for the hand-crafted kind: metadata ``model_kind``);
    the metadata is read as YAML, so no MLflow call is made.
    """
    if _kind(model_dir) == "handcrafted":
        from training.classifier.handcrafted import load_handcrafted

        return load_handcrafted(Path(model_dir))
    keras_path, meta = read_logged_model(model_dir, "classifier", "model.keras")
    missing = {"classes", "preprocess"} - set(meta)
    if missing:
        raise RegistryError(f"{Path(model_dir) / 'MLmodel'} metadata lacks {sorted(missing)}")
    return load_keras_model(keras_path), meta


def _kind(model_dir: Path) -> str:
    """``model_kind`` of a logged classifier's metadata ("keras" when absent: older models)."""
    import yaml

    mlmodel = Path(model_dir) / "MLmodel"
    if not mlmodel.is_file():
        return "keras"
    meta = (yaml.safe_load(mlmodel.read_text()) or {}).get("metadata") or {}
    return str(meta.get("model_kind") or "keras")


def predict_array(model: Any, x: Any, batch_size: int = PREDICT_BATCH) -> np.ndarray:
    """Probabilities ``(n, k)`` of preprocessed pixels ``(n, size, size, 3)`` (or one image)."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 3:
        x = x[None]
    if getattr(model, "kind", None) == "handcrafted":  # features + scikit-learn, no graph
        return model.predict_array(x)
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


def predict_proba(model: Any, images: list[Image.Image], params: PreprocessParams) -> np.ndarray:
    """Class probabilities ``(n, k)`` of PIL images, through the one preprocessing function."""
    if not images:
        return predict_array(model, np.zeros((0, params.image_size, params.image_size, 3)))
    return predict_array(model, np.stack([preprocess_image(im, params) for im in images]))
