"""The MLflow pyfunc face of the Keras classifier, so any MLflow client gets the served answer.

The logged model dir holds ``MLmodel`` (metadata: family, architecture, classes, preprocess,
positive_class) and ``artifacts/model.keras``. Input: raw images, in any shape
:func:`training.preprocess.as_images` accepts (the same as the detector's pyfunc); each goes
through the one preprocessing function with the model's own parameters, as in serving. Output:
a DataFrame with one row per image: ``label`` and ``p_<class>`` per class, in the order of the
metadata's ``classes``. TensorFlow is imported only in :meth:`load_context`: pickling and
logging the model never pulls TF into a process (such as a DAG task or a detector run) that may
hold torch.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc

__all__ = ["HandcraftedClassifierModel", "KerasClassifierModel"]


class KerasClassifierModel(mlflow.pyfunc.PythonModel):
    """Class probabilities of cell images (see the module docstring)."""

    def __init__(self, classes: list[str], preprocess: dict[str, Any],
                 temperature: float = 1.0) -> None:
        self.classes = [str(c) for c in classes]
        self.preprocess = dict(preprocess)
        self.temperature = float(temperature)  # fitted on validation rows; 1.0 = unscaled
        self._model: Any = None

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from training.classifier.predict import load_keras_model

        self._model = load_keras_model(context.artifacts["keras_model"])

    # No type hints on purpose: with hints MLflow infers a schema of its own and converts the
    # input (a 4-D array is refused as "not a list", a DataFrame becomes a list of rows).
    def predict(self, context, model_input, params=None):
        """One row per input image: the predicted ``label`` and ``p_<class>`` per class."""
        import pandas as pd

        from training.classifier.predict import predict_proba
        from training.preprocess import PreprocessParams, as_images

        probs = predict_proba(self._model, as_images(model_input),
                              PreprocessParams.from_dict(self.preprocess),
                              getattr(self, "temperature", 1.0))  # models pickled before T
        table = pd.DataFrame(probs, columns=[f"p_{c}" for c in self.classes])
        table.insert(0, "label", [self.classes[i] for i in probs.argmax(axis=1)]
                     if len(probs) else [])
        return table


class HandcraftedClassifierModel(KerasClassifierModel):
    """The hand-crafted baseline (``artifacts/baseline.joblib``): same input, same output."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from pathlib import Path

        from training.classifier.handcrafted import HandcraftedModel

        self._model = HandcraftedModel.load(Path(context.artifacts["baseline"]))
