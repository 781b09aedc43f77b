"""The MLflow pyfunc face of the Keras classifier, so any MLflow client can load and call it.

The logged model dir holds ``MLmodel`` (metadata: family, architecture, classes, preprocess,
positive_class) and ``artifacts/model.keras``. Input: float32 ``(n, size, size, 3)`` in 0-255,
i.e. ``training.preprocess.preprocess_image`` output; output: class probabilities ``(n, k)``
in the order of the metadata's ``classes``. TensorFlow is imported only in
:meth:`load_context`: pickling and logging the model never pulls TF into a process (such as a
DAG task or a detector run) that may hold torch.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc

__all__ = ["KerasClassifierModel"]


class KerasClassifierModel(mlflow.pyfunc.PythonModel):
    """Class probabilities of preprocessed cell images (see the module docstring)."""

    def __init__(self) -> None:
        self._model: Any = None

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from training.classifier import load_keras_model

        self._model = load_keras_model(context.artifacts["keras_model"])

    # No type hints on purpose: with hints MLflow infers a schema of its own and converts the
    # input; the logged signature (a float32 tensor) is what is enforced.
    def predict(self, context, model_input, params=None):
        """``(n, size, size, 3)`` (or one ``(size, size, 3)``) 0-255 pixels -> ``(n, k)``."""
        from training.classifier import predict_array

        return predict_array(self._model, model_input)
