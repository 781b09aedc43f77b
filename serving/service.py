"""The leukoflow HTTP API as three BentoML services, one process each under ``bentoml serve``.

    LeukoflowAPI  (HTTP, auth middleware, decoding + preprocessing, /classify /detect /explain)
      |-- bentoml.depends --> ClassifierService  (ONNX Runtime; Keras only for /explain)
      '-- bentoml.depends --> DetectorService    (ONNX Runtime, numpy letterbox + NMS)

Both champions are served from the ONNX exports that the publish step made and checked
(:mod:`training.publish.export`), so neither model service imports TensorFlow or torch to
answer /classify or /detect; a model without an export (published before exports existed, or
not a Keras model) is served by its framework, which is why the services stay apart: TensorFlow
and torch segfault in one process. The split also gives each model its own worker count
(``serving.classifier_workers`` / ``detector_workers``) and its own batching queue. Grad-CAM
needs TensorFlow's gradients: the classifier service loads the Keras model lazily, on the
first /explain, the cheapest place (no extra process; no TensorFlow unless someone explains).
Uploads are decoded, checked and preprocessed once, in the API process, so a bad file is a
4xx there and never reaches a model worker, and what crosses the sockets is uint8 arrays.

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
from serving.decode import BadImage, NotExplainable, UploadGuard, decode_upload, read_upload
from serving.front import CancelOnDisconnect, ServingFront
from serving.health import ReadinessCheck, is_transient, probes_for
from serving.observability import (
    bound_bentoml_labels,
    observe_batch,
    skip_abandoned_batch_jobs,
)
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
# BentoML 1.4.40's inter-service client (aiohttp) replaces its session every 100 requests or
# 300 s by closing the old one under the requests still using it: under 200 clients that is
# "Connector is closed" / "Server disconnected" for every request in flight at each refresh.
# Over loopback sockets nothing needs a fresh session: never refresh.
RUNNER_CONNECTION = {"max_requests": 2**31 - 1, "max_age": 1e9}

# Read at import: worker counts and batching limits are decorator arguments.
_SERVING = _config().serving


@bentoml.service(name="leukoflow-classifier", workers=_SERVING.classifier_workers,
                 traffic={"timeout": 120}, runner_connection=RUNNER_CONNECTION)
class ClassifierService:
    """The champion classifier: its ONNX export in ONNX Runtime (no TensorFlow), else Keras.

    It takes preprocessed uint8 pixels, never images: the API process decodes and preprocesses
    (the one :func:`training.preprocess.preprocess_image`), so what crosses the socket is a
    compact ``(n, size, size, 3)`` array, and BentoML's adaptive batching groups concurrent
    requests into one forward pass. Keras (TensorFlow) is loaded only by the first ``/explain``:
    Grad-CAM needs gradients, which ONNX Runtime does not give; loading it here, lazily, costs
    no extra process and no TensorFlow at all for a deployment that never explains.
    """

    bento_model = bentoml.models.BentoModel(CLASSIFIER_TAG) if CLASSIFIER_TAG else None

    def __init__(self) -> None:
        from training.classifier.predict import (
            apply_temperature,
            load_classifier_runtime,
            model_temperature,
            predict_array,
        )

        self._apply_temperature = apply_temperature
        self._predict_array = predict_array
        stored = self.bento_model
        self.model_dir = Path(stored.path)
        self.model, self.metadata = load_classifier_runtime(self.model_dir,
                                                            _SERVING.onnx_threads)
        self.runtime = "onnxruntime" if hasattr(self.model, "session") else "keras"
        self._keras: Any = None if self.runtime == "onnxruntime" else self.model
        self.params = PreprocessParams.from_dict(self.metadata["preprocess"])
        self.classes = [str(c) for c in self.metadata["classes"]]
        self.temperature = model_temperature(self.metadata)  # calibration fitted at training
        self.ref = _model_ref(stored, stored.tag.name)
        log.info("classifier %s v%s (%s) loaded from %s in pid %d", self.ref.name,
                 self.ref.version, self.runtime, stored.tag, os.getpid())

    def __is_ready__(self) -> bool:
        return self.model is not None

    @bentoml.api
    def info(self) -> dict[str, Any]:
        """What a caller needs to send pixels: preprocessing, classes, model, runtime."""
        kind = str(self.metadata.get("model_kind") or "keras")
        return {"preprocess": self.params.to_dict(), "classes": self.classes,
                "model": self.ref.model_dump(), "runtime": self.runtime, "pid": os.getpid(),
                "model_kind": kind, "explainable": kind != "handcrafted"}

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=_SERVING.batch_max_size,
                 max_latency_ms=_SERVING.batch_max_latency_ms)
    def classify_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Probabilities ``(n, k)`` of preprocessed uint8 pixels ``(n, size, size, 3)``."""
        observe_batch("classifier", int(len(pixels)))  # what adaptive batching really formed
        return self._apply_temperature(
            self._predict_array(self.model, pixels.astype(np.float32),
                                batch_size=_SERVING.batch_max_size), self.temperature)

    def _keras_model(self) -> Any:
        if self._keras is None:
            from training.classifier.predict import load_classifier

            self._keras, _ = load_classifier(self.model_dir)
        return self._keras

    @bentoml.api
    def explain(self, pixels: np.ndarray) -> dict[str, Any]:
        """Grad-CAM overlay of the predicted class of preprocessed uint8 pixels
        ``(size, size, 3)``: ``{"png", "label", "probability", "model"}``."""
        from training.classifier.gradcam import gradcam_heatmap, overlay_png

        probs = self._apply_temperature(
            self._predict_array(self.model, pixels.astype(np.float32)), self.temperature)[0]
        best = int(probs.argmax())
        heatmap = gradcam_heatmap(self._keras_model(), pixels.astype(np.float32),
                                  class_index=best, layer_name=self.metadata.get("gradcam_layer"))
        png = overlay_png(np.asarray(pixels, dtype=np.uint8), heatmap)
        return {"png": png, "label": self.classes[best], "probability": float(probs[best]),
                "model": self.ref.model_dump()}

    @bentoml.api
    def whoami(self) -> dict[str, Any]:
        """Process id and model (used to check the process layout)."""
        return {"pid": os.getpid(), "model": self.ref.model_dump(), "runtime": self.runtime}


@bentoml.service(name="leukoflow-detector", workers=_SERVING.detector_workers,
                 traffic={"timeout": 120}, runner_connection=RUNNER_CONNECTION)
class DetectorService:
    """The champion detector: its Ultralytics ONNX export in ONNX Runtime with numpy
    letterbox and NMS (no torch), else the YOLO model (torch, imported in this process only).

    Images arrive as decoded uint8 RGB arrays ``(h, w, 3)``; sizes differ, so no batching.
    """

    bento_model = bentoml.models.BentoModel(DETECTOR_TAG) if DETECTOR_TAG else None

    def __init__(self) -> None:
        from training.detector.onnx_runtime import OnnxDetector, onnx_path
        from training.detector.predict import load_detector, read_model_dir

        stored = self.bento_model
        model_dir = Path(stored.path)
        onnx_file = onnx_path(model_dir)
        if onnx_file.is_file():
            _, self.metadata = read_model_dir(model_dir)
            self.model: Any = OnnxDetector(onnx_file, self.metadata.get("classes"),
                                           _SERVING.onnx_threads)
            self.runtime = "onnxruntime"
        else:
            self.model, self.metadata = load_detector(model_dir)
            self.runtime = "torch"
        self.imgsz = int(self.metadata.get("imgsz") or 640)
        self.ref = _model_ref(stored, stored.tag.name)
        log.info("detector %s v%s (%s) loaded from %s in pid %d", self.ref.name,
                 self.ref.version, self.runtime, stored.tag, os.getpid())

    def __is_ready__(self) -> bool:
        return self.model is not None

    @bentoml.api
    def detect(self, image: np.ndarray) -> Detection:
        """Boxes of one decoded uint8 RGB image ``(h, w, 3)``, in its pixel coordinates."""
        if self.runtime == "onnxruntime":
            boxes = self.model.detect(image)
        else:
            from training.detector.predict import detect

            boxes = detect(self.model, PILImage.fromarray(image), imgsz=self.imgsz)
        return Detection(boxes=[Box(**{k: b[k] for k in Box.model_fields}) for b in boxes],
                         model=self.ref)

    @bentoml.api
    def whoami(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "model": self.ref.model_dump(), "runtime": self.runtime}


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
        self._classifier_meta: dict[str, Any] | None = None  # the classifier's info(), cached

    def _decode(self, image: Path | None) -> PILImage.Image:
        data = read_upload(image, self.max_bytes)
        return decode_upload(data, contract=self.contract)

    async def _call(self, dep: Any, method: str, **kwargs: Any) -> Any:
        """Call a model service (a remote proxy under ``bentoml serve``, else a local object);
        a transient failure (a dropped connection, :func:`serving.health.is_transient`) is
        retried once before it reaches the client."""
        from serving.observability import metrics

        to_async = getattr(dep, "to_async", None)
        for attempt in (1, 2):
            try:
                if to_async is not None:
                    out = await getattr(to_async, method)(**kwargs)
                else:
                    out = await asyncio.to_thread(getattr(dep, method), **kwargs)
            except Exception as exc:
                if attempt == 2 or not is_transient(exc):
                    if attempt == 2:
                        metrics().retries.labels(model=method, outcome="failed").inc()
                    raise
                log.warning("%s: transient failure, retrying once: %s: %s", method,
                            type(exc).__name__, exc)
                continue
            if attempt == 2:
                metrics().retries.labels(model=method, outcome="recovered").inc()
            return out
        raise AssertionError("unreachable")  # pragma: no cover

    async def _classifier_info(self, dep: Any) -> dict[str, Any]:
        """The classifier's preprocessing, classes and model (asked once per API process)."""
        if self._classifier_meta is None:
            self._classifier_meta = await self._call(dep, "info")
        return self._classifier_meta

    async def infer(self, dep: Any, method: str, img: PILImage.Image) -> Any:
        """One model call (``classify``, ``explain`` or ``detect`` of ``dep``; the web app's
        pages call it too), its image carried as a uint8 array (never a re-encoded image).

        The classifier gets preprocessed pixels ``(1, size, size, 3)``, made here by the one
        preprocessing function, and its batchable endpoint groups concurrent requests; the
        answer is built here from the probabilities it returns.
        """
        if method == "detect":
            return await self._call(dep, "detect", image=np.asarray(img, dtype=np.uint8))
        info = await self._classifier_info(dep)
        params = PreprocessParams.from_dict(info["preprocess"])
        pixels = (await asyncio.to_thread(preprocess_image, img, params)).astype(np.uint8)
        if method == "explain":
            if not info.get("explainable", True):
                model = info["model"]
                raise NotExplainable(
                    f"the classifier {model['name']} v{model['version']} is a "
                    f"{info.get('model_kind')} model: Grad-CAM explains neural networks only; "
                    "/classify answers for it")
            return await self._call(dep, "explain", pixels=pixels)
        probs = np.asarray(await self._call(dep, "classify_pixels", pixels=pixels[None]))[0]
        classes = [str(c) for c in info["classes"]]
        return Classification(
            label=classes[int(probs.argmax())],
            probabilities={c: float(p) for c, p in zip(classes, probs, strict=True)},
            model=ModelRef(**info["model"]),
        )

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
            return await self.infer(dep, method, img)
        except NotExplainable as exc:
            return _error(exc.status, str(exc), reason="not_explainable")
        except Exception as exc:
            if isinstance(exc, BentoMLException) and not is_transient(exc):
                status = int(getattr(exc, "error_code", HTTPStatus.INTERNAL_SERVER_ERROR))
                log.error("%s failed: %s", what, exc)
                if status in (HTTPStatus.SERVICE_UNAVAILABLE, HTTPStatus.TOO_MANY_REQUESTS):
                    busy = _error(HTTPStatus.SERVICE_UNAVAILABLE,  # its queue is full: say so
                                  f"the {what} is overloaded ({str(exc)[:200]}); try again "
                                  "shortly", reason="model_overloaded")
                    busy.headers["Retry-After"] = "2"
                    return busy
                if status < 500:
                    return _error(status, f"the {what} refused the image: {exc}")
                return _error(HTTPStatus.BAD_GATEWAY, f"the {what} failed on this image; "
                              "the server log has the details")
            log.exception("%s call failed", what)  # the model service is down or unreachable
            retried = " (also when retried once)" if is_transient(exc) else ""
            response = _error(HTTPStatus.SERVICE_UNAVAILABLE,
                              f"the {what} service could not be reached{retried}: "
                              f"{type(exc).__name__}: {str(exc)[:200] or 'no message'}; "
                              "/readyz says which model is down; try again shortly",
                              reason="model_unavailable")
            response.headers["Retry-After"] = "5"
            return response

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
# Outermost first: readiness, limits and metrics; then keys; then the upload checks.
bound_bentoml_labels()
skip_abandoned_batch_jobs()
LeukoflowAPI.add_asgi_middleware(
    ServingFront, readiness=lambda: ReadinessCheck(probes_for(LeukoflowAPI),
                                                   _config().serving.readyz_timeout_s))
LeukoflowAPI.add_asgi_middleware(ApiKeyMiddleware)
LeukoflowAPI.add_asgi_middleware(UploadGuard)
# A model call whose caller hung up is cancelled in the model's process too, batch queue included.
ClassifierService.add_asgi_middleware(CancelOnDisconnect)
DetectorService.add_asgi_middleware(CancelOnDisconnect)
