"""The MLflow pyfunc face of the YOLO detector, so any MLflow client can load and call it.

The logged model dir holds ``MLmodel`` (metadata: family, classes, imgsz) and
``artifacts/best.pt``. Ultralytics (and so torch) is imported only in :meth:`load_context`:
pickling and registering the model never pulls torch into a process that may hold TensorFlow.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc

__all__ = ["DetectorModel"]


class DetectorModel(mlflow.pyfunc.PythonModel):
    """Detect white cells; input: images, output: one list of box dicts per image.

    An image may be a ``PIL.Image``, an RGB ``uint8`` array (h, w, 3), encoded bytes or a file
    path; the input is a list of them, an array (n, h, w, 3), or a DataFrame whose ``image``
    column holds them. Boxes are ``{"x1","y1","x2","y2","label","confidence"}`` in the pixel
    coordinates of each input image.
    """

    def __init__(self, imgsz: int, classes: list[str], conf: float = 0.25) -> None:
        self.imgsz = int(imgsz)
        self.classes = list(classes)
        self.conf = float(conf)
        self._model: Any = None

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from training.detector.predict import configure_ultralytics

        configure_ultralytics()
        from ultralytics import YOLO

        self._model = YOLO(context.artifacts["weights"], task="detect")

    # No type hints on purpose: with hints MLflow infers a schema and converts the input (a
    # 4-D array is refused as "not a list", a DataFrame becomes a list of rows).
    def predict(self, context, model_input, params=None):
        """One list of box dicts per input image (see the class docstring)."""
        from training.detector.predict import detect
        from training.preprocess import as_images

        params = params or {}
        imgsz = int(params.get("imgsz", self.imgsz))
        conf = float(params.get("conf", self.conf))
        return [detect(self._model, image, imgsz, conf) for image in as_images(model_input)]

