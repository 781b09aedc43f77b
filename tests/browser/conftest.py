"""A real headless Chromium against the web app, served by uvicorn on loopback.

The web app is the one :mod:`serving.service` mounts, mounted at ``/app`` the same way; only
the model services are fakes (same methods as ``ClassifierService``/``DetectorService``), so no
TensorFlow or torch starts. The registry (a scored version with its model card) and a steward
report (a real validation of a synthetic batch with bad files, published by the real stage)
are made once per session. Every request the browser makes to anywhere but this server is
aborted and recorded: the pages must work with no network.

Chromium is the system's (``apt-get install -y chromium``; Playwright's own download needs the
internet): the tests skip with the reason when ``/usr/bin/chromium`` is absent.
"""

from __future__ import annotations

import io
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[2]
# Screenshots go to docs/img/ only with UPDATE_DOCS_IMG=1 (a plain test run leaves the tree clean)
SHOTS = (REPO / "docs" / "img" if os.environ.get("UPDATE_DOCS_IMG") == "1"
         else Path(tempfile.gettempdir()) / "leukoflow-browser-shots")
PASSWORD = "correct horse battery"


class FakeClassifier:
    """``ClassifierService``'s methods: a fixed answer, a red-to-yellow 'heatmap' overlay."""

    def classify(self, image: Image.Image) -> dict[str, Any]:
        return {"label": "all", "probabilities": {"all": 0.83, "hem": 0.17},
                "model": {"name": "leukemia-classifier", "version": "1"}}

    explainable = True  # False: a hand-crafted champion, as the API's infer() refuses it

    def explain(self, image: Image.Image) -> dict[str, Any]:
        if not self.explainable:
            from serving.decode import NotExplainable

            raise NotExplainable("the classifier leukemia-classifier v1 is a handcrafted "
                                 "model: Grad-CAM explains neural networks only")
        base = image.convert("RGB").resize((128, 128))
        heat = Image.new("RGB", base.size, (0, 0, 0))
        draw = ImageDraw.Draw(heat)
        for r, colour in ((60, (40, 0, 120)), (40, (220, 40, 0)), (20, (255, 230, 0))):
            draw.ellipse((64 - r, 64 - r, 64 + r, 64 + r), fill=colour)
        buf = io.BytesIO()
        Image.blend(base, heat, 0.45).save(buf, format="PNG")
        return {"png": buf.getvalue(), "label": "all", "probability": 0.83,
                "model": {"name": "leukemia-classifier", "version": "1"}}


class FakeDetector:
    """``DetectorService.detect``: the field's own labelled boxes (normalised xywh) as answers."""

    def __init__(self) -> None:
        self.boxes: list[tuple[float, float, float, float]] = [(0.25, 0.3, 0.2, 0.25)]

    def detect(self, image: Image.Image) -> dict[str, Any]:
        w, h = image.size
        out = []
        for i, (cx, cy, bw, bh) in enumerate(self.boxes):
            out.append({"x1": (cx - bw / 2) * w, "y1": (cy - bh / 2) * h,
                        "x2": (cx + bw / 2) * w, "y2": (cy + bh / 2) * h, "label": "WBC",
                        "confidence": round(0.93 - 0.07 * i, 2)})
        return {"boxes": out, "model": {"name": "wbc-detector", "version": "2"}}


class FakeModels:
    classifier = FakeClassifier()
    detector = FakeDetector()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Site:
    url: str  # http://127.0.0.1:PORT/app
    cfg: Any
    home: Path
    batch_id: str
    cell: Path
    field_image: Path
    blocked: list[str] = field(default_factory=list)


def _steward_report(cfg: Any, home: Path) -> str:
    """A real validation of a synthetic batch with bad files, published by the real stage."""
    import shutil

    from training.dev.synth import make_bad_files, make_cell_batch, write_ready
    from training.stages import validate

    batch_id = "clinic-2026-12-01"
    root = home / "landing" / batch_id
    files = make_cell_batch(root, n_subjects_per_class=2, images_per_subject=6, size=64, seed=5)
    make_bad_files(root / "fold_0" / "all", seed=5)
    shutil.copyfile(files[0], root / "fold_0" / "all" / "zz_copy_all.png")  # a duplicate
    write_ready(root)
    result = validate(cfg, batch_id)
    assert result["quarantined"] > 0, result
    return batch_id


@pytest.fixture(scope="session")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent: apt-get install -y chromium (make test does, as "
                    "root)")
    pytest.importorskip("playwright", reason="pip install playwright (the test extra)")
    import uvicorn
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from serving.webapp import WEBAPP_PATH, create_app
    from tests.registry import register_scored_version
    from training.config import load_config
    from training.dev.synth import make_smear_batch
    from training.promotion.modelcard import log_card

    home = tmp_path_factory.mktemp("browser") / "home"
    cfg = load_config(home=home, validation={"workers": 1},
                      webapp={"registration": "open", "max_failed_logins": 3,
                              "lockout_s": 120})
    batch_id = _steward_report(cfg, home)
    for n, (arch, passed) in enumerate((("vgg16", True), ("lightweight_efficientnet_b3", False),
                                        ("resnet50", True)), start=1):
        name, version, _ = register_scored_version(cfg, arch, gate_passed=passed,
                                                   champion=n == 3, seed=n)
        log_card(cfg, name, version)
    cell = sorted((home / "landing" / batch_id / "fold_0" / "hem").glob("*.png"))[0]
    fields = make_smear_batch(home / "fields", n_images=1, seed=2)
    field_image = fields[0]
    labels = (field_image.parent.parent / "labels" / f"{field_image.stem}.txt").read_text()
    FakeModels.detector.boxes = [tuple(float(v) for v in line.split()[1:])
                                 for line in labels.splitlines() if line.strip()]

    app = Starlette(routes=[Mount(WEBAPP_PATH, app=create_app(cfg, lambda: FakeModels))])
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield Site(f"http://127.0.0.1:{port}{WEBAPP_PATH}", cfg, home, batch_id, cell,
                   field_image)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="package")  # not session: sync Playwright runs an event loop until it stops
def browser(site: Site) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM),
                              args=["--no-sandbox", "--disable-gpu"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Any, site: Site) -> Iterator[Any]:
    """A fresh browser context (no cookies) that can reach only the test server."""
    origin = site.url.rsplit("/app", 1)[0]
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    blocked: list[str] = []

    def only_loopback(route: Any) -> None:
        url = route.request.url
        if url.startswith(origin) or url.startswith("data:"):
            route.continue_()
        else:
            blocked.append(url)
            route.abort()

    context.route("**/*", only_loopback)
    pg = context.new_page()
    pg.set_default_timeout(15_000)
    pg.blocked = blocked  # type: ignore[attr-defined]
    try:
        yield pg
    finally:
        context.close()


def shot(page: Any, name: str) -> Path:
    """A full-page screenshot into docs/img/ (referenced from docs/webapp.md)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
