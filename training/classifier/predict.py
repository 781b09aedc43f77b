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

__all__ = ["ONNX_FILE", "PREDICT_BATCH", "OnnxClassifier", "apply_temperature", "load_classifier",
           "load_classifier_runtime", "load_keras_model", "model_temperature", "onnx_path",
           "postprocess_probs", "predict_array", "predict_proba"]

PREDICT_BATCH = 32  # images per forward pass when predicting arrays
ONNX_FILE = "onnx/model.onnx"  # inside a published model dir, written by training.publish.export


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


def postprocess_probs(raw: Any) -> np.ndarray:
    """The one numpy step every classifier probability passes through, whatever computed it
    (Keras in training and evaluation, ONNX Runtime in serving): ``(n, k)`` float32."""
    return np.asarray(raw, dtype=np.float32)


def onnx_path(model_dir: Path) -> Path:
    """Where the publish step puts a classifier's ONNX export (absent: not exported)."""
    return Path(model_dir) / ONNX_FILE


class OnnxClassifier:
    """An exported classifier run by ONNX Runtime, with the Keras surface that
    :func:`predict_array` uses (``input_shape``, ``output_shape``, ``predict_on_batch``), so
    every caller predicts through the same code whichever runtime holds the weights."""

    def __init__(self, path: str | Path, threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: ONNX Runtime's default (all cores)
        options.log_severity_level = 3  # errors only (not the unused-initializer notes)
        self.session = ort.InferenceSession(str(path), options,
                                            providers=["CPUExecutionProvider"])
        (inp,) = self.session.get_inputs()  # the export folds every constant into the graph
        self.input_name = inp.name
        self.input_shape = tuple(d if isinstance(d, int) else None for d in inp.shape)
        out = self.session.get_outputs()[0]
        self.output_shape = tuple(d if isinstance(d, int) else None for d in out.shape)

    def predict_on_batch(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.asarray(x, dtype=np.float32)})[0]


def load_classifier_runtime(model_dir: Path, threads: int = 0) -> tuple[Any, dict[str, Any]]:
    """What serving runs: the ONNX export when the publish step made one, else the Keras model.

    Loading the ONNX file imports no TensorFlow (the metadata is read as YAML).
    """
    path = onnx_path(model_dir)
    if not path.is_file():
        return load_classifier(model_dir)
    _, meta = read_logged_model(model_dir, "classifier", "model.keras")
    return OnnxClassifier(path, threads), meta
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
    return postprocess_probs(np.concatenate(out))


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
