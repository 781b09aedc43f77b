"""The API service in-process, with fake model services (no TensorFlow, no torch, no server).

BentoML's middleware, routing and serialization are real (``LeukoflowAPI.to_asgi()``); only the
two model services are replaced, so response shapes and error statuses are checked in seconds.
``/metrics`` needs ``bentoml serve`` and is covered by the integration test.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from PIL import Image

import serving.service as svc
from serving.auth import create_key

with warnings.catch_warnings():  # starlette nudges towards httpx2; httpx is what we pin
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient


class FakeClassifier:
    """The classifier service's surface: info, batchable pixels -> probabilities, explain."""

    def __init__(self) -> None:
        self.seen: list[Any] = []

    def info(self) -> dict[str, Any]:
        return {"preprocess": {"image_size": 16}, "classes": ["all", "hem"],
                "model": {"name": "leukemia-classifier", "version": "7"}}

    def classify_pixels(self, pixels: np.ndarray) -> np.ndarray:
        self.seen.append(pixels)
        return np.tile(np.array([[0.75, 0.25]], dtype=np.float32), (len(pixels), 1))

    def explain(self, pixels: np.ndarray) -> dict[str, Any]:
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (255, 0, 0)).save(buf, format="PNG")
        return {"png": buf.getvalue(), "label": "all", "probability": 0.75,
                "model": {"name": "leukemia-classifier", "version": "7"}}

    def whoami(self) -> dict[str, Any]:
        return {"pid": -1}


class BrokenDetector:
    def detect(self, image: Image.Image) -> Any:
        from bentoml.exceptions import InternalServerError

        raise InternalServerError("model exploded")

    def whoami(self) -> dict[str, Any]:
        return {"pid": -2}


class FakeDetector(BrokenDetector):
    def detect(self, image: Image.Image) -> svc.Detection:
        box = svc.Box(x1=1, y1=2, x2=30, y2=40, label="WBC", confidence=0.9)
        return svc.Detection(boxes=[box], model=svc.ModelRef(name="wbc-detector", version="3"))


def _png(size: tuple[int, int] = (40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (90, 40, 130)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One app per module: BentoML registers its Prometheus metrics once per process."""
    home = tmp_path_factory.mktemp("api") / "home"
    deps = {"classifier": FakeClassifier(), "detector": FakeDetector()}
    inner = svc.LeukoflowAPI.inner
    with pytest.MonkeyPatch.context() as mp:  # read once, when the app starts
        mp.setenv("LEUKOFLOW_HOME", str(home))
        mp.setenv("LEUKOFLOW_SERVING__MAX_IMAGE_BYTES", "50000")
        mp.setenv("LEUKOFLOW_WEBAPP__REGISTRATION", "open")  # the web app at /app
        key = create_key(home / "api_keys.json", "t", ["classify", "detect", "explain"])
        for name, fake in deps.items():
            inner.__dict__[name]._resolved = fake  # what bentoml.depends() hands the service
        try:
            with TestClient(svc.LeukoflowAPI.to_asgi()) as client:
                client.headers["Authorization"] = f"Bearer {key}"
                yield client, deps
        finally:
            for name in deps:
                inner.__dict__[name]._resolved = None


@pytest.fixture
def api(app: Any) -> Iterator[Any]:
    client, deps = app
    deps["classifier"].seen.clear()
    deps["detector"].__class__ = FakeDetector
    yield client, deps


def _upload(data: bytes) -> dict[str, Any]:
    return {"files": {"image": ("cell.png", data, "image/png")}}


def test_classify_shape(api: Any) -> None:
    client, deps = api
    resp = client.post("/classify", **_upload(_png()))
    assert resp.status_code == 200
    assert resp.json() == {"label": "all", "probabilities": {"all": 0.75, "hem": 0.25},
                           "model": {"name": "leukemia-classifier", "version": "7"}}
    pixels = deps["classifier"].seen[0]  # decoded and preprocessed once, in the API process,
    assert pixels.dtype == np.uint8 and pixels.shape == (1, 16, 16, 3)  # sent as uint8 pixels


def test_detect_shape(api: Any) -> None:
    client, _ = api
    resp = client.post("/detect", **_upload(_png()))
    assert resp.status_code == 200
    assert resp.json() == {"boxes": [{"x1": 1.0, "y1": 2.0, "x2": 30.0, "y2": 40.0,
                                      "label": "WBC", "confidence": 0.9}],
                           "model": {"name": "wbc-detector", "version": "3"}}


def test_explain_is_a_png_with_the_label_in_headers(api: Any) -> None:
    client, _ = api
    resp = client.post("/explain", **_upload(_png()))
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "image/png"
    assert resp.headers["x-leukoflow-label"] == "all"
    assert resp.headers["x-leukoflow-model"] == "leukemia-classifier:7"
    assert Image.open(io.BytesIO(resp.content)).size == (8, 8)


@pytest.mark.parametrize(("data", "status", "words"), [
    (b"", 400, "empty"),
    (b"GIF89a-not-really", 400, "cannot be read"),
    (b"%PDF-1.4 hello", 400, "not an image"),
    (_png((400, 400)) + b"\0" * 60_000, 413, "limit of 50000"),  # read_upload's check
    (b"\0" * 200_000, 413, "at most 50000"),  # UploadGuard's, before anything is parsed
])
def test_bad_uploads_are_4xx_and_never_reach_the_model(
    api: Any, data: bytes, status: int, words: str
) -> None:
    client, deps = api
    resp = client.post("/classify", **_upload(data))
    assert resp.status_code == status, resp.text
    assert words in resp.json()["error"]
    assert deps["classifier"].seen == []
    assert client.post("/classify", **_upload(_png())).status_code == 200


def test_a_path_in_json_is_refused_not_read(api: Any) -> None:
    client, deps = api
    resp = client.post("/classify", json={"image": "/etc/hosts"})
    assert resp.status_code == 415
    assert deps["classifier"].seen == []


def test_a_failing_model_is_a_502_with_a_message(api: Any) -> None:
    client, deps = api
    deps["detector"].__class__ = BrokenDetector
    resp = client.post("/detect", **_upload(_png()))
    assert resp.status_code == 502
    assert "detector failed" in resp.json()["error"]


def test_an_unreachable_model_service_is_a_503(api: Any) -> None:
    client, deps = api

    calls = []

    def down(pixels: np.ndarray) -> Any:
        calls.append(1)
        raise ConnectionRefusedError("no socket")

    deps["classifier"].classify_pixels = down
    try:
        resp = client.post("/classify", **_upload(_png()))
    finally:
        del deps["classifier"].classify_pixels
    assert resp.status_code == 503
    assert len(calls) == 2, "a dropped connection is retried once, then answered"
    body = resp.json()
    assert "could not be reached (also when retried once)" in body["error"]
    assert "ConnectionRefusedError: no socket" in body["error"]
    assert body["reason"] == "model_unavailable"
    assert resp.headers["retry-after"] == "5"


def test_a_transient_failure_is_retried_once_and_the_client_gets_the_answer(api: Any) -> None:
    client, deps = api
    real = deps["classifier"].classify_pixels
    calls = []

    def flaky(pixels: np.ndarray) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionResetError("Server disconnected")
        return real(pixels)

    deps["classifier"].classify_pixels = flaky
    try:
        resp = client.post("/classify", **_upload(_png()))
    finally:
        del deps["classifier"].classify_pixels
    assert resp.status_code == 200, resp.text
    assert len(calls) == 2


def test_an_overloaded_model_service_is_a_503_with_retry_after(api: Any) -> None:
    from bentoml.exceptions import ServiceUnavailable

    client, deps = api

    def busy(pixels: np.ndarray) -> Any:
        raise ServiceUnavailable("process is overloaded")

    deps["classifier"].classify_pixels = busy
    try:
        resp = client.post("/classify", **_upload(_png()))
    finally:
        del deps["classifier"].classify_pixels
    assert resp.status_code == 503, resp.text
    assert resp.json()["reason"] == "model_overloaded"
    assert "process is overloaded" in resp.json()["error"]
    assert resp.headers["retry-after"] == "2"


def test_auth_is_wired(api: Any) -> None:
    client, _ = api
    resp = client.post("/classify", headers={"Authorization": ""}, **_upload(_png()))
    assert resp.status_code == 401
    assert client.get("/readyz", headers={"Authorization": ""}).status_code == 200
    spec = client.get("/docs.json", headers={"Authorization": ""})
    assert spec.status_code == 200
    assert {"/classify", "/detect", "/explain"} <= set(spec.json()["paths"])


# ------------------------------------------------------- the malformed corpus, served
def test_every_malformed_upload_is_a_4xx_or_a_prediction_never_a_5xx(api: Any) -> None:
    """Each corpus file to /classify, /detect and /explain: a 4xx whose message names the
    contract's reason, or (for an accepted image) a prediction; the service stays up."""
    from training.dev.malformed import corpus

    client, deps = api
    statuses: dict[int, int] = {}
    for name, (data, reasons) in corpus().items():
        for route in ("/classify", "/detect", "/explain"):
            resp = client.post(route, files={"image": (name, data, "application/octet-stream")})
            statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
            assert resp.status_code < 500, (name, route, resp.text)
            if reasons:
                assert 400 <= resp.status_code < 500, (name, route)
                body = resp.json()
                assert sorted(body["reasons"]) == sorted(reasons), (name, body)
                assert all(code in body["error"] for code in reasons), body
            else:
                assert resp.status_code == 200, (name, route, resp.text)
        assert client.get("/readyz").status_code == 200  # still up after every file
    assert not any(code >= 500 for code in statuses)
    accepted = sum(1 for _, r in corpus().values() if not r)
    assert statuses[200] == 3 * accepted
    assert all(px.shape == (1, 16, 16, 3) for px in deps["classifier"].seen)  # RGB pixels
    assert client.post("/classify", **_upload(_png())).status_code == 200


def test_decodes_at_once_are_bounded_by_the_config(app: Any) -> None:
    """The API process decodes at most serving.max_concurrent_decodes uploads at a time."""
    import asyncio

    api_obj = svc.LeukoflowAPI.inner.__new__(svc.LeukoflowAPI.inner)
    api_obj.__init__()
    assert api_obj._decodes._value == svc.load_config().serving.max_concurrent_decodes
    inside, peak = 0, 0

    def slow_decode(image: Any) -> Image.Image:
        nonlocal inside, peak
        import time

        inside += 1
        peak = max(peak, inside)
        time.sleep(0.05)
        inside -= 1
        return Image.new("RGB", (40, 40))

    class Dep:
        def detect(self, image: Any) -> str:
            return "ok"

    api_obj._decode = slow_decode

    async def many() -> list[Any]:
        return await asyncio.gather(*[api_obj._run(None, Dep(), "detect", "detector")
                                      for _ in range(8)])

    assert asyncio.run(many()) == ["ok"] * 8
    assert peak == api_obj._decodes._value == svc.load_config().serving.max_concurrent_decodes


def _csrf(html: str) -> str:
    import re

    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def test_web_app_is_mounted_with_its_own_auth_and_the_same_models(api: Any) -> None:
    """/app is the web app's: no Bearer key needed (sessions instead), the API's routes still
    need one, and the pages call the service's own model dependencies."""
    client, deps = api
    no_key = {"Authorization": ""}
    assert client.post("/classify", headers=no_key, **_upload(_png())).status_code == 401
    resp = client.get("/app/classify", headers=no_key, follow_redirects=False)
    assert resp.status_code == 303 and resp.headers["location"] == "/app/login?next=/app/classify"
    page = client.get("/app/register", headers=no_key)
    assert page.status_code == 200
    form = {"csrf_token": _csrf(page.text), "username": "api-test", "password": "long password 1",
            "password2": "long password 1"}
    assert client.post("/app/register", headers=no_key, data=form,
                       follow_redirects=False).status_code == 303
    page = client.get("/app/login", headers=no_key)
    resp = client.post("/app/login", headers=no_key, follow_redirects=False, data={
        "csrf_token": _csrf(page.text), "username": "api-test", "password": "long password 1"})
    assert resp.status_code == 303 and "httponly" in resp.headers["set-cookie"].lower()
    page = client.get("/app/classify", headers=no_key)
    resp = client.post("/app/classify", headers=no_key, data={"csrf_token": _csrf(page.text)},
                       **_upload(_png()))
    assert resp.status_code == 200
    assert 'id="predicted-label">all<' in resp.text and "version <b>7</b>" in resp.text
    assert len(deps["classifier"].seen) == 1  # the API's own dependency answered
    client.cookies.clear()


def test_explain_of_a_handcrafted_champion_is_a_409_that_says_why(api: Any) -> None:
    """A hand-crafted champion has no gradients: /explain says so (not a 502), /classify
    still answers, and the lab's classify page shows the answer without a heatmap."""
    import gc

    client, deps = api
    instance = next(o for o in gc.get_objects() if isinstance(o, svc.LeukoflowAPI.inner))
    plain_info = deps["classifier"].info

    def handcrafted_info() -> dict[str, Any]:
        return {**plain_info(), "model_kind": "handcrafted", "explainable": False}

    deps["classifier"].info = handcrafted_info
    instance._classifier_meta = None  # the API caches the classifier's info()
    try:
        resp = client.post("/explain", **_upload(_png()))
        assert resp.status_code == 409, resp.text
        assert resp.json()["reason"] == "not_explainable"
        assert "handcrafted model: Grad-CAM explains neural networks only" in resp.json()["error"]
        assert client.post("/classify", **_upload(_png())).status_code == 200
    finally:
        del deps["classifier"].info
        instance._classifier_meta = None
