"""The published service over real HTTP: tiny real models -> MLflow champions -> Bento -> serve.

Model files are made in subprocesses (TensorFlow in one, torch in another: never in pytest's
process); logging and registering them with the project's own pyfunc classes needs neither.
Then the publish steps run as the DAG runs them (import the champions, build the Bento,
``bentoml serve <bento>`` on loopback) and the tests talk to the server over HTTP.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import mlflow
import psutil
import pytest
from PIL import Image

from serving.auth import create_key, list_keys
from training.config import load_config
from training.errors import PublishError
from training.publish.bento import (
    _child_env,
    build_bento,
    import_champions,
    import_champions_detail,
    publish,
    serve,
    smoke_image,
    smoke_test,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
CLASSES = ["all", "hem"]
MAX_INFLIGHT = 4
IMAGE_SIZE = 32

_KERAS_SCRIPT = textwrap.dedent("""
    import sys, keras
    inp = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 255)(inp)
    x = keras.layers.Conv2D(4, 3, activation="relu", name="last_conv")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(2, activation="softmax")(x)
    keras.Model(inp, out).save(sys.argv[1])
""")

_YOLO_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from training.detector.predict import configure_ultralytics
    configure_ultralytics(Path(sys.argv[2]))
    from ultralytics import YOLO
    YOLO("yolov8n.yaml").save(sys.argv[1])  # untrained: boxes may be empty, shape is the point
""")


def _make_model_files(work: Path) -> tuple[Path, Path]:
    """Run both model-making scripts in parallel subprocesses."""
    keras_path, yolo_path = work / "model.keras", work / "best.pt"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2"}
    procs = [
        subprocess.Popen([sys.executable, "-c", _KERAS_SCRIPT, str(keras_path)], cwd=ROOT,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT),
        subprocess.Popen([sys.executable, "-c", _YOLO_SCRIPT, str(yolo_path), str(work)],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT),
    ]
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out.decode(errors="replace")[-3000:]
    return keras_path, yolo_path


def _register(cfg: Any, keras_path: Path, yolo_path: Path) -> dict[str, str]:
    """Log both models in the pyfunc contract format, register them, alias them champion."""
    from mlflow import MlflowClient

    from training.classifier.pyfunc import KerasClassifierModel
    from training.detector.pyfunc import DetectorModel
    from training.preprocess import PreprocessParams
    from training.tracking import configure_mlflow

    experiment_id = configure_mlflow(cfg)
    client = MlflowClient(tracking_uri=cfg.tracking_uri, registry_uri=cfg.tracking_uri)
    specs = [
        (cfg.mlflow.classifier_name,
         KerasClassifierModel(classes=CLASSES, preprocess=PreprocessParams(IMAGE_SIZE).to_dict()),
         {"keras_model": str(keras_path)},
         {"family": "classifier", "architecture": "tiny_cnn", "classes": CLASSES,
          "preprocess": PreprocessParams(IMAGE_SIZE).to_dict(), "positive_class": "all"}),
        (cfg.mlflow.detector_name, DetectorModel(imgsz=64, classes=["WBC"]),
         {"weights": str(yolo_path)},
         {"family": "detector", "architecture": "yolov8n", "classes": ["WBC"], "imgsz": 64}),
    ]
    versions = {}
    for name, python_model, artifacts, metadata in specs:
        with mlflow.start_run(experiment_id=experiment_id, run_name=f"test-{name}"):
            info = mlflow.pyfunc.log_model(name="model", python_model=python_model,
                                           artifacts=artifacts, metadata=metadata,
                                           pip_requirements=["mlflow"])
        version = str(mlflow.register_model(info.model_uri, name).version)
        client.set_registered_model_alias(name, "champion", version)
        versions[name] = version
    return versions


def _png(size: tuple[int, int] = (48, 48), colour: tuple[int, int, int] = (120, 60, 160)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _noisy_png(side: int = 64) -> bytes:
    """A PNG whose pixel data does not compress away, so half of it is a truncated image."""
    buf = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    work = tmp_path_factory.mktemp("service_http")
    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in os.environ if k.startswith("LEUKOFLOW_")]:
            mp.delenv(key)
        # a small in-flight limit, so a test can fill the queue with a handful of requests
        cfg = load_config(home=work / "home",
                          serving={"startup_timeout_s": 240, "max_inflight": MAX_INFLIGHT})
        keras_path, yolo_path = _make_model_files(work)
        versions = _register(cfg, keras_path, yolo_path)
        models = import_champions_detail(cfg)
        tag = build_bento(cfg, models)
        keys = {
            "all": create_key(cfg.api_keys_file, "tester", ["classify", "detect", "explain"]),
            "detect_only": create_key(cfg.api_keys_file, "detector-app", ["detect"]),
        }
        started = time.monotonic()
        with serve(cfg, target=tag) as url:
            startup_s = time.monotonic() - started
            print(f"\nbentoml serve {tag}: ready after {startup_s:.1f}s")
            with httpx.Client(base_url=url, timeout=120.0) as client:
                yield SimpleNamespace(cfg=cfg, url=url, client=client, keys=keys, tag=tag,
                                      versions=versions, models=models, startup_s=startup_s)


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _post(server: Any, route: str, data: bytes | None = _png(), key: str | None = "all",
          filename: str = "cell.png") -> httpx.Response:
    headers = _auth(server.keys[key]) if key else {}
    files = {"image": (filename, data, "image/png")} if data is not None else None
    return server.client.post(route, files=files, headers=headers)


# ------------------------------------------------------------------------------ tests
def test_probes_and_metrics_are_open(server: Any) -> None:
    for route in ("/livez", "/readyz", "/healthz"):
        assert server.client.get(route).status_code == 200, route
    metrics = server.client.get("/metrics")
    assert metrics.status_code == 200
    assert "# TYPE" in metrics.text


def test_no_key_is_401_with_a_bearer_challenge(server: Any) -> None:
    resp = _post(server, "/classify", key=None)
    assert resp.status_code == 401
    assert resp.headers["www-authenticate"].startswith("Bearer")
    assert "Authorization: Bearer" in resp.json()["error"]
    wrong = server.client.post("/classify", files={"image": ("c.png", _png(), "image/png")},
                               headers=_auth("lf_not-a-real-key"))
    assert wrong.status_code == 401
    assert "unknown" in wrong.json()["error"]


def test_a_key_without_the_scope_is_403(server: Any) -> None:
    resp = _post(server, "/classify", key="detect_only")
    assert resp.status_code == 403
    assert "classify" in resp.json()["error"]
    assert _post(server, "/detect", key="detect_only").status_code == 200


def test_classify_names_the_registered_version(server: Any) -> None:
    resp = _post(server, "/classify")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert set(body["probabilities"]) == set(CLASSES)
    assert abs(sum(body["probabilities"].values()) - 1.0) < 1e-4
    assert body["label"] == max(body["probabilities"], key=body["probabilities"].get)
    name = server.cfg.mlflow.classifier_name
    assert body["model"] == {"name": name, "version": server.versions[name]}


def test_detect_returns_boxes_and_the_model(server: Any) -> None:
    resp = _post(server, "/detect", data=smoke_image())
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert isinstance(body["boxes"], list)
    for box in body["boxes"]:
        assert set(box) == {"x1", "y1", "x2", "y2", "label", "confidence"}
        assert 0 <= box["x1"] <= box["x2"] <= 160 and 0 <= box["y1"] <= box["y2"] <= 160
    name = server.cfg.mlflow.detector_name
    assert body["model"] == {"name": name, "version": server.versions[name]}


@pytest.mark.parametrize(("data", "status", "words"), [
    (_noisy_png()[: len(_noisy_png()) // 2], 400, "truncated"),
    (_png()[:40], 400, "truncated or corrupt"),
    (b"this is not an image at all", 400, "not an image"),
    (b"", 400, "empty"),
])
def test_bad_uploads_are_4xx_and_the_worker_survives(
    server: Any, data: bytes, status: int, words: str
) -> None:
    resp = _post(server, "/classify", data=data)
    assert resp.status_code == status, resp.text
    assert words in resp.json()["error"]
    assert _post(server, "/classify").status_code == 200


def test_a_missing_image_field_is_400(server: Any) -> None:
    resp = server.client.post("/classify", files={"picture": ("c.png", _png(), "image/png")},
                              headers=_auth(server.keys["all"]))
    assert resp.status_code == 400, resp.text
    assert "no 'image' field" in resp.json()["error"]


def test_explain_returns_a_grad_cam_png(server: Any) -> None:
    resp = _post(server, "/explain")
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "image/png"
    assert resp.headers["x-leukoflow-label"] in CLASSES
    img = Image.open(io.BytesIO(resp.content))
    assert img.size == (IMAGE_SIZE, IMAGE_SIZE)


def test_models_run_in_separate_processes(server: Any) -> None:
    resp = server.client.post("/whoami", headers=_auth(server.keys["all"]), json={})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    pids = {body["api"]["pid"], body["classifier"]["pid"], body["detector"]["pid"]}
    assert len(pids) == 3, body

    def loaded(pid: int, lib: str) -> bool:
        return lib in Path(f"/proc/{pid}/maps").read_text()

    if Path("/proc").is_dir():
        cls, det, api = body["classifier"]["pid"], body["detector"]["pid"], body["api"]["pid"]
        assert loaded(cls, "tensorflow") and not loaded(cls, "libtorch")
        assert loaded(det, "libtorch") and not loaded(det, "tensorflow")
        assert not loaded(api, "tensorflow") and not loaded(api, "libtorch")


def test_smoke_test_passes_and_import_is_idempotent(server: Any) -> None:
    report = smoke_test(server.url, server.keys["all"], smoke_image(),
                        expected_versions=server.versions)
    assert report["unauthenticated_status"] == 401
    assert report["classify"]["model"]["version"] == server.versions["leukemia-classifier"]
    again = import_champions_detail(server.cfg)
    assert [m.bento_tag for m in again] == [m.bento_tag for m in server.models]
    assert not any(m.imported for m in again)


def test_json_naming_a_server_path_is_refused(server: Any) -> None:
    resp = server.client.post("/classify", json={"image": "/etc/hostname"},
                              headers=_auth(server.keys["all"]))
    assert resp.status_code == 415
    assert "multipart/form-data" in resp.json()["error"]


def test_metrics_count_the_requests(server: Any) -> None:
    _post(server, "/classify")
    text = server.client.get("/metrics").text
    assert "/classify" in text
    # the classifier worker's batch sizes reach the API's /metrics (one multiprocess registry)
    assert 'leukoflow_batch_size_count{model="classifier"}' in text


def test_a_300_byte_filename_gets_a_normal_answer(server: Any) -> None:
    name = "c" * 296 + ".png"  # BentoML put it in a temp file's name: ENAMETOOLONG, a 500
    assert _post(server, "/classify", filename=name).status_code == 200
    resp = _post(server, "/detect", data=smoke_image(), filename="../" * 80 + name)
    assert resp.status_code == 200, resp.text


def test_readyz_is_503_within_a_second_while_a_model_worker_is_stopped(server: Any) -> None:
    """SIGSTOP the classifier's worker: /readyz names it at once; image requests fill the
    bounded queue and one more is a 503 with Retry-After; SIGCONT and all is answered."""
    import concurrent.futures

    pid = server.client.post("/whoami", headers=_auth(server.keys["all"]),
                             json={}).json()["classifier"]["pid"]
    os.kill(pid, signal.SIGSTOP)
    pool = concurrent.futures.ThreadPoolExecutor(MAX_INFLIGHT)
    try:
        started = time.monotonic()
        ready = server.client.get("/readyz", timeout=5)
        took = time.monotonic() - started
        assert ready.status_code == 503, ready.text
        assert took < 1.0, f"/readyz took {took:.2f}s"
        body = ready.json()
        assert body["models"]["detector"] == "ready"
        assert f"pid {pid} is stopped" in body["models"]["classifier"], body
        assert "classifier" in body["error"]

        held = [pool.submit(_post, server, "/classify") for _ in range(MAX_INFLIGHT)]
        deadline = time.monotonic() + 30
        refused = None
        while time.monotonic() < deadline:  # the held requests reach the API one by one; a
            try:  # probe let in is held too (it stays in flight after its client gave up)
                refused = server.client.post(
                    "/classify", files={"image": ("c.png", _png(), "image/png")},
                    headers=_auth(server.keys["all"]), timeout=2)
            except httpx.TimeoutException:
                continue
            if refused.status_code == 503:
                break
        assert refused is not None and refused.status_code == 503, refused
        assert refused.json()["reason"] == "queue_full"
        assert int(refused.headers["retry-after"]) >= 1
        assert server.client.get("/livez", timeout=2).status_code == 200  # never queued
    finally:
        os.kill(pid, signal.SIGCONT)
    # held requests are answered once the worker runs again: a 200, or a 503 that says why
    # (the batching queue shed one that waited past its latency budget, or it reached the API
    # after a probe had taken the last slot: the bounded queue refusing it is the point)
    for answer in (f.result(timeout=120) for f in held):
        assert answer.status_code == 200 or (
            answer.status_code == 503
            and answer.json()["reason"] in ("model_overloaded", "queue_full")), answer.text
    pool.shutdown()
    assert server.client.get("/readyz", timeout=5).status_code == 200
    assert _post(server, "/classify").status_code == 200


def _metric(server: Any, sample: str) -> float:
    """The value of one sample line of the API's /metrics (0 if absent)."""
    for line in server.client.get("/metrics").text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_request_whose_client_hung_up_is_not_computed(server: Any) -> None:
    """Clients give up while the classifier's worker is stopped: their requests are cancelled
    in the API and in the worker's batch queue, so no row is computed for them."""
    rows = 'leukoflow_batch_size_sum{model="classifier"}'
    gone = 'leukoflow_abandoned_requests_total{route="/classify"}'
    assert _post(server, "/classify").status_code == 200
    rows_before, gone_before = _metric(server, rows), _metric(server, gone)
    pid = server.client.post("/whoami", headers=_auth(server.keys["all"]),
                             json={}).json()["classifier"]["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        for _ in range(3):
            with pytest.raises(httpx.TimeoutException):
                server.client.post("/classify", files={"image": ("c.png", _png(), "image/png")},
                                   headers=_auth(server.keys["all"]), timeout=1.5)
        deadline = time.monotonic() + 10
        while _metric(server, gone) < gone_before + 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _metric(server, gone) >= gone_before + 3
    finally:
        os.kill(pid, signal.SIGCONT)
    time.sleep(3)  # a worker that computed them anyway would have done so by now
    assert _metric(server, rows) == rows_before
    assert _post(server, "/classify").status_code == 200
    assert _metric(server, rows) == rows_before + 1


def test_unique_unauthenticated_paths_leave_the_metrics_bounded(server: Any) -> None:
    for i in range(20):
        server.client.get(f"/warm-{i}")
    before = len(server.client.get("/metrics").content)
    for i in range(1000):
        assert server.client.get(f"/scan-{i}/x").status_code == 401
    text = server.client.get("/metrics").text
    assert len(text) < before + 4096, f"/metrics grew from {before} to {len(text)} bytes"
    assert "scan-" not in text
    assert 'leukoflow_auth_refusals_total{route="other",status="401"}' in text
    assert 'leukoflow_requests_total{model_version="' in text


def test_openapi_declares_bearer_auth(server: Any) -> None:
    spec = server.client.get("/docs.json").json()
    assert spec["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert spec["paths"]["/classify"]["post"]["security"] == [{"bearerAuth": []}]


def test_sigterm_to_leukoflow_serve_leaves_no_process_of_it(server: Any, tmp_path: Path) -> None:
    """SIGTERM while its backend is still starting (models loading): before the fix the
    backend thread kept its ``bentoml serve`` tree running after the supervisor returned."""
    from tests.integration.conftest import free_port

    port = free_port()
    env = {**_child_env(server.cfg), "PYTHONPATH": str(ROOT)}
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "training.cli", "serve", "--port", str(port)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    seen: dict[int, psutil.Process] = {}
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(proc.pid).children(recursive=True):
                    seen.setdefault(child.pid, child)
            if sum("_bentoml_impl.worker.service" in " ".join(p.cmdline()) for p in seen.values()
                   if p.is_running()) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        assert len(seen) >= 3, "the backend's workers never started"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0, (tmp_path / "serve.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    _, alive = psutil.wait_procs(list(seen.values()), timeout=15)
    assert not alive, f"SIGTERM left {[p.cmdline()[:3] for p in alive]}"


def test_publish_end_to_end(server: Any) -> None:
    """The DAG's call: import (already there) + build + serve the Bento + smoke test."""
    pub = publish(server.cfg)
    assert pub.models == server.versions
    assert pub.bento_tag.startswith("leukoflow:")
    assert pub.smoke["unauthenticated_status"] == 401
    assert pub.smoke["imported"] == []  # idempotent: the fixture imported them already
    assert pub.smoke["classify"]["model"]["version"] == server.versions["leukemia-classifier"]
    names = [r.name for r in list_keys(server.cfg.api_keys_file)]
    assert not any(n.startswith("publish-smoke-") for n in names)  # its key was revoked


def test_a_missing_champion_is_a_publish_error(tmp_path: Path) -> None:
    cfg = load_config(home=tmp_path / "home")
    with pytest.raises(PublishError, match="no model has a 'champion' alias"):
        import_champions(cfg)


def test_a_dying_server_surfaces_its_log(tmp_path: Path) -> None:
    cfg = load_config(home=tmp_path / "home", serving={"startup_timeout_s": 90})
    with pytest.raises(PublishError, match="exited with code") as info:
        with serve(cfg, target="leukoflow:doesnotexist"):
            pass  # pragma: no cover - never ready
    assert "doesnotexist" in str(info.value)
    assert list((cfg.home / "logs").glob("bentoml-serve-*.log"))


def test_a_failed_publish_leaves_no_bento_and_no_key(
    server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import training.publish.bento as pub

    bentos = server.cfg.bentoml_home / "bentos" / "leukoflow"
    before = {p.name for p in bentos.iterdir()}
    latest = (bentos / "latest").read_text()

    @contextlib.contextmanager
    def dying_server(*args: Any, **kwargs: Any) -> Iterator[str]:
        raise PublishError("bentoml serve exited with code 1 (simulated)")
        yield ""  # pragma: no cover

    monkeypatch.setattr(pub, "serve", dying_server)
    with pytest.raises(PublishError, match="simulated"):
        pub.publish(server.cfg)
    assert {p.name for p in bentos.iterdir()} == before
    assert (bentos / "latest").read_text() == latest
    assert not any(r.name.startswith("publish-smoke-") for r in list_keys(server.cfg.api_keys_file))


@pytest.mark.browser
def test_web_app_under_bentoml_serve_classifies_in_a_browser(server: Any,
                                                             tmp_path: Path) -> None:
    """The web app mounted on the served Bento: log in and classify in headless Chromium; the
    page shows the label and version the API gives, and the Grad-CAM of the real model."""
    from serving.webapp.accounts import Accounts

    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        pytest.skip("/usr/bin/chromium is absent: apt-get install -y chromium")
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    password = "served web app password"
    Accounts(server.cfg.webapp_database_url).create("served", password)
    api = _post(server, "/classify").json()
    image = tmp_path / "cell.png"
    image.write_bytes(_png())
    assert server.client.get("/app/classify", follow_redirects=False).status_code == 303
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), args=["--no-sandbox"])
        page = browser.new_page()
        page.set_default_timeout(60_000)
        page.goto(f"{server.url}/app/login")
        page.fill("input[name=username]", "served")
        page.fill("input[name=password]", password)
        page.click("#login-form button[type=submit]")
        page.wait_for_url(f"{server.url}/app/classify")
        page.set_input_files("input[name=image]", str(image))
        page.click("#classify-form button[type=submit]")
        page.wait_for_selector("#classification")
        assert page.inner_text("#predicted-label") == api["label"]
        version = page.inner_text("#model-version")
        assert api["model"]["name"] in version and f"version {api['model']['version']}" in version
        assert page.locator("#probabilities svg g.bar").count() == len(CLASSES)
        assert page.eval_on_selector("#gradcam", "e => e.complete && e.naturalWidth > 0")
        browser.close()
