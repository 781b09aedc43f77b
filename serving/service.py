"""The leukoflow HTTP API as three BentoML services, one process each under ``bentoml serve``.

    LeukoflowAPI  (HTTP, auth middleware, decoding, /classify /detect /explain)
      |-- bentoml.depends --> ClassifierService  (TensorFlow: the champion classifier)
      '-- bentoml.depends --> DetectorService    (torch: the champion YOLO detector)

TensorFlow and torch segfault in one process, so each model lives in its own service; BentoML
runs each service in its own worker process and the API talks to them over Unix sockets.
This module imports neither: each model service imports its framework in ``__init__``, inside
its own process. Uploads are decoded and checked once, in the API process, so a bad file is a
4xx there and never reaches a model worker.

Which models: the BentoML models ``leukemia-classifier`` and ``wbc-detector`` (names from the
config), imported from the MLflow ``champion`` aliases by ``training.publish.bento``. The exact tags
are Bento arguments (``--arg classifier_model=TAG --arg detector_model=TAG``, which the publish
step passes to ``bentoml build``, so a rollback to an older version serves that version), else
``LEUKOFLOW_BENTO_CLASSIFIER`` / ``LEUKOFLOW_BENTO_DETECTOR``, else ``<name>:latest``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from http import HTTPStatus
from pathlib import Path
from typing import Annotated, Any

import bentoml
import numpy as np
from bentoml.exceptions import BentoMLException
from PIL import Image as PILImage
from pydantic import BaseModel, Field
from starlette.responses import JSONResponse, Response

from serving.auth import ApiKeyMiddleware
from serving.decode import BadImage, UploadGuard, decode_upload, read_upload
from serving.webapp import WEBAPP_PATH, create_app
from training.config import Config, load_config
from training.contract import InputContract
from training.families import get_family
from training.preprocess import PreprocessParams, preprocess_image

__all__ = [
    "Box", "ClassifierService", "Classification", "DetectorService", "Detection",
    "LeukoflowAPI", "ModelRef",
]

log = logging.getLogger("leukoflow.serving")

def _config() -> Config:
    return load_config()


NOT_DEPLOYED = "none"  # a tag value saying: this deployment serves no model of the family


def _model_tag(family_name: str) -> str | None:
    """The BentoML model tag a service declares (read at import: BentoML packages it), or None
    when this deployment serves no model of the family (a cells-only site has no detector).

    Precedence: the Bento argument ``<family>_model`` (``bentoml build/serve --arg``; a built
    Bento keeps it, so it always serves the versions it was built with) > the environment
    variable ``LEUKOFLOW_BENTO_<FAMILY>`` > ``<registered name>:latest``. The value ``none``
    means not deployed.
    """
    family = get_family(family_name)
    tag = getattr(bentoml.use_arguments(), family.bento_arg, None) or os.environ.get(
        family.bento_tag_env) or f"{family.registered_name(_config())}:latest"
    return None if str(tag).lower() == NOT_DEPLOYED else str(tag)


CLASSIFIER_TAG = _model_tag("classifier")
DETECTOR_TAG = _model_tag("detector")


# ----------------------------------------------------------------------------- schemas
class ModelRef(BaseModel):
    """Which registered model version answered."""

    name: str = Field(description="registered model name in MLflow")
    version: str = Field(description="registered model version in MLflow")


class Classification(BaseModel):
    label: str = Field(description="the most probable class")
    probabilities: dict[str, float] = Field(description="class -> probability, summing to 1")
    model: ModelRef


class Box(BaseModel):
    x1: float
    y1: float
    x2: float
    y2: float
    label: str
    confidence: float


class Detection(BaseModel):
    boxes: list[Box] = Field(description="in the uploaded image's pixel coordinates, best first")
    model: ModelRef


def _model_ref(stored: Any, fallback_name: str) -> ModelRef:
    labels = stored.info.labels
    return ModelRef(name=labels.get("registered_name", fallback_name),
                    version=labels.get("registered_version", str(stored.tag.version)))


# ----------------------------------------------------------------------- model services
@bentoml.service(name="leukoflow-classifier", workers=1, traffic={"timeout": 120})
class ClassifierService:
    """The champion Keras classifier (TensorFlow imported here only, in this process)."""

    bento_model = bentoml.models.BentoModel(CLASSIFIER_TAG) if CLASSIFIER_TAG else None

    def __init__(self) -> None:
        from training.classifier.predict import load_classifier, model_temperature, predict_proba

        self._predict_proba = predict_proba
        stored = self.bento_model
        self.model_dir = Path(stored.path)
        self.model, self.metadata = load_classifier(self.model_dir)
        self.params = PreprocessParams.from_dict(self.metadata["preprocess"])
        self.classes = [str(c) for c in self.metadata["classes"]]
        self.temperature = model_temperature(self.metadata)  # calibration fitted at training
        self.ref = _model_ref(stored, stored.tag.name)
        log.info("classifier %s v%s loaded from %s in pid %d", self.ref.name, self.ref.version,
                 stored.tag, os.getpid())

    def __is_ready__(self) -> bool:
        return self.model is not None

    @bentoml.api
    def classify(self, image: PILImage.Image) -> Classification:
        probs = self._predict_proba(self.model, [image], self.params, self.temperature)[0]
        best = int(probs.argmax())
        return Classification(
            label=self.classes[best],
            probabilities={c: float(p) for c, p in zip(self.classes, probs, strict=True)},
            model=self.ref,
        )

    @bentoml.api
    def explain(self, image: PILImage.Image) -> dict[str, Any]:
        """Grad-CAM overlay of the predicted class: ``{"png", "label", "probability", "model"}``."""
        from training.classifier.gradcam import gradcam_heatmap, overlay_png

        probs = self._predict_proba(self.model, [image], self.params, self.temperature)[0]
        best = int(probs.argmax())
        pixels = preprocess_image(image, self.params)  # (size, size, 3) in 0-255
        heatmap = gradcam_heatmap(self.model, pixels, class_index=best,  # (size, size)
                                  layer_name=self.metadata.get("gradcam_layer"))
        png = overlay_png(np.asarray(pixels, dtype=np.uint8), heatmap)
        return {"png": png, "label": self.classes[best], "probability": float(probs[best]),
                "model": self.ref.model_dump()}

    @bentoml.api
    def whoami(self) -> dict[str, Any]:
        """Process id and model (used to check the process layout)."""
        return {"pid": os.getpid(), "model": self.ref.model_dump()}


@bentoml.service(name="leukoflow-detector", workers=1, traffic={"timeout": 120})
class DetectorService:
    """The champion YOLO detector (torch/Ultralytics imported here only, in this process)."""

    bento_model = bentoml.models.BentoModel(DETECTOR_TAG) if DETECTOR_TAG else None

    def __init__(self) -> None:
        from training.detector.predict import load_detector

        stored = self.bento_model
        self.model, self.metadata = load_detector(Path(stored.path))
        self.imgsz = int(self.metadata.get("imgsz") or 640)
        self.ref = _model_ref(stored, stored.tag.name)
        log.info("detector %s v%s loaded from %s in pid %d", self.ref.name, self.ref.version,
                 stored.tag, os.getpid())

    def __is_ready__(self) -> bool:
        return self.model is not None

    @bentoml.api
    def detect(self, image: PILImage.Image) -> Detection:
        from training.detector.predict import detect

        boxes = detect(self.model, image, imgsz=self.imgsz)
        return Detection(boxes=[Box(**{k: b[k] for k in Box.model_fields}) for b in boxes],
                         model=self.ref)

    @bentoml.api
    def whoami(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "model": self.ref.model_dump()}


# ------------------------------------------------------------------------- public API
def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


@bentoml.service(name="leukoflow", workers=1, traffic={"timeout": 180})
class LeukoflowAPI:
    """Authenticated inference: upload an image as the multipart form field ``image``.

    Middleware, outermost first: ``ApiKeyMiddleware`` (401/403), then ``UploadGuard`` (multipart
    only, ``image`` must be a file, size limit), so unauthenticated bodies are never buffered.
    """

    # A family this deployment does not serve has no dependency: its route answers 503.
    classifier = bentoml.depends(ClassifierService) if CLASSIFIER_TAG else None
    detector = bentoml.depends(DetectorService) if DETECTOR_TAG else None

    def __init__(self) -> None:
        cfg = _config()
        self.contract = InputContract.for_serving(cfg)  # the rules the validation applies
        self.max_bytes = self.contract.max_bytes
        # decoded pixels in memory are bounded by decodes at once x the pixel budget
        self._decodes = asyncio.Semaphore(cfg.serving.max_concurrent_decodes)

    def _decode(self, image: Path | None) -> PILImage.Image:
        data = read_upload(image, self.max_bytes)
        return decode_upload(data, contract=self.contract)

    async def _call(self, dep: Any, method: str, **kwargs: Any) -> Any:
        """Call a model service (a remote proxy under ``bentoml serve``, else a local object)."""
        to_async = getattr(dep, "to_async", None)
        if to_async is not None:
            return await getattr(to_async, method)(**kwargs)
        return await asyncio.to_thread(getattr(dep, method), **kwargs)

    async def _run(self, image: Path | None, dep: Any, method: str, what: str) -> Any:
        if dep is None:
            return _error(HTTPStatus.SERVICE_UNAVAILABLE,
                          f"this deployment serves no {what} model (none has been promoted)")
        try:
            async with self._decodes:
                img = await asyncio.to_thread(self._decode, image)
        except BadImage as exc:
            return _error(exc.status, str(exc), reasons=list(exc.reasons))
        try:
            return await self._call(dep, method, image=img)
        except BentoMLException as exc:
            status = int(getattr(exc, "error_code", HTTPStatus.INTERNAL_SERVER_ERROR))
            log.error("%s failed: %s", what, exc)
            if status < 500:
                return _error(status, f"the {what} refused the image: {exc}")
            return _error(HTTPStatus.BAD_GATEWAY, f"the {what} failed on this image; "
                          "the server log has the details")
        except Exception:  # the model service is down or unreachable
            log.exception("%s call failed", what)
            return _error(HTTPStatus.SERVICE_UNAVAILABLE, f"the {what} is not available; "
                          "try again shortly")

    @bentoml.api(route="/classify")
    async def classify(self, image: Path) -> Classification:
        """Class probabilities of one cell image, and the model version that computed them.

        ``curl -H "Authorization: Bearer $KEY" -F image=@cell.png http://HOST:3000/classify``
        """
        return await self._run(image, self.classifier, "classify", "classifier")

    @bentoml.api(route="/detect")
    async def detect(self, image: Path) -> Detection:
        """White-cell boxes in one smear image, in its pixel coordinates.

        ``curl -H "Authorization: Bearer $KEY" -F image=@field.png http://HOST:3000/detect``
        """
        return await self._run(image, self.detector, "detect", "detector")

    @bentoml.api(route="/explain")
    async def explain(
        self, image: Path
    ) -> Annotated[Path, bentoml.validators.ContentType("image/png")]:
        """Grad-CAM overlay (PNG) of the predicted class; the class is in ``X-Leukoflow-Label``.

        ``curl -H "Authorization: Bearer $KEY" -F image=@cell.png -o cam.png HOST:3000/explain``
        """
        out = await self._run(image, self.classifier, "explain", "classifier")
        if isinstance(out, Response):
            return out
        model = out["model"]
        return Response(out["png"], media_type="image/png", headers={
            "X-Leukoflow-Label": out["label"],
            "X-Leukoflow-Probability": f"{out['probability']:.6f}",
            "X-Leukoflow-Model": f"{model['name']}:{model['version']}",
        })

    @bentoml.api(route="/whoami")
    async def whoami(self) -> dict[str, Any]:
        """Process ids of the API and the model services, and the models they serve."""
        out: dict[str, Any] = {"api": {"pid": os.getpid()}}
        for name, dep in (("classifier", self.classifier), ("detector", self.detector)):
            out[name] = None if dep is None else await self._call(dep, "whoami")
        return out


# The clinic web app and the steward's pages, same deployment and port (docs/webapp.md).
LeukoflowAPI.mount_asgi_app(create_app(), path=WEBAPP_PATH, name="webapp")
LeukoflowAPI.add_asgi_middleware(ApiKeyMiddleware)
LeukoflowAPI.add_asgi_middleware(UploadGuard)
