"""The detector's predict side: offline Ultralytics set-up, load a logged model, detect.

Serving (the Bento's detector service), the MLflow pyfunc and evaluation import this module;
the training loop (:mod:`training.detector.train`) uses it too. Ultralytics (and so torch) is
imported only inside functions, after :func:`configure_ultralytics`, which keeps it offline (no
hub, no analytics, no font or AMP-check downloads) and stops its MLflow callback, which would
otherwise call autolog and end our run.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from training.families import read_logged_model

__all__ = ["configure_ultralytics", "detect", "load_detector", "read_model_dir"]

log = logging.getLogger(__name__)

# Ultralytics integrations that would log elsewhere or phone home: all off.
_ULTRALYTICS_OFF = ("sync", "hub", "clearml", "comet", "dvc", "mlflow", "raytune",
                    "tensorboard", "wandb", "vscode_msg", "openvino_msg")


def configure_ultralytics(home: Path | None = None, *, verbose: bool | None = None) -> Path:
    """Make Ultralytics offline-safe and quiet; call before the first ``import ultralytics``.

    ``YOLO_CONFIG_DIR`` (settings, fonts, weights) goes to ``<home>/ultralytics`` (or an
    existing ``YOLO_CONFIG_DIR``, else a temp folder). ``YOLO_OFFLINE``/``YOLO_VERBOSE`` set in
    the environment win, so an online machine can opt back in. Returns the folder Ultralytics
    actually uses (it adds an ``Ultralytics`` sub-folder).
    """
    if home is not None:
        config_dir = Path(home) / "ultralytics"
    else:
        config_dir = Path(os.environ.get("YOLO_CONFIG_DIR")
                          or Path(tempfile.gettempdir()) / "leukoflow-ultralytics")
    config_dir.mkdir(parents=True, exist_ok=True)
    if "ultralytics" in sys.modules:
        from ultralytics.utils import USER_CONFIG_DIR

        if Path(USER_CONFIG_DIR).parent != config_dir:
            log.warning("ultralytics was imported before configure_ultralytics(): its config dir "
                        "stays %s (settings are still applied in memory)", USER_CONFIG_DIR)
    else:
        os.environ["YOLO_CONFIG_DIR"] = str(config_dir)
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "False")  # never pip-install at run time
    os.environ.setdefault("YOLO_VERBOSE", "True" if verbose else "False")

    from ultralytics import settings
    from ultralytics.utils import USER_CONFIG_DIR

    config_dir = Path(USER_CONFIG_DIR)  # Ultralytics adds its own sub-folder
    _ship_fonts(config_dir)

    off = {key: (False if isinstance(settings.defaults.get(key), bool) else "")
           for key in _ULTRALYTICS_OFF if key in settings.defaults}
    settings.update(
        off,
        api_key="",
        weights_dir=str(config_dir / "weights"),
        datasets_dir=str(config_dir / "datasets"),
        runs_dir=str(config_dir / "runs"),
    )
    return config_dir


def _ship_fonts(config_dir: Path) -> None:
    """Put the fonts Ultralytics asks for where it looks first, so it never goes online for them.

    ``check_det_dataset`` calls ``check_font('Arial.ttf')`` even with ``plots=False``, and a
    miss sends a HEAD request to GitHub. Matplotlib's DejaVu Sans (free licence, already
    installed) stands in; it is only ever used to draw labels on plots.
    """
    import matplotlib

    source = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        target = config_dir / name
        if not target.exists() and source.is_file():
            shutil.copyfile(source, target)


def read_model_dir(model_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The weights path and MLmodel metadata of a logged detector (read as YAML: no MLflow)."""
    return read_logged_model(model_dir, "detector", "best.pt")


def load_detector(model_dir: Path) -> tuple[object, dict]:
    """Load a logged detector for serving: the YOLO model and its metadata (classes, imgsz)."""
    weights, meta = read_model_dir(model_dir)
    configure_ultralytics()
    from ultralytics import YOLO

    return YOLO(str(weights), task="detect"), meta


def detect(model: Any, image: Any, imgsz: int, conf: float = 0.25) -> list[dict]:
    """Boxes of one PIL image, in that image's pixel coordinates, best first."""
    image = image.convert("RGB")
    width, height = image.size
    result = model.predict(image, imgsz=imgsz, conf=conf, verbose=False)[0]
    names = result.names
    boxes = []
    for (x1, y1, x2, y2), c, p in zip(result.boxes.xyxy.tolist(), result.boxes.cls.tolist(),
                                      result.boxes.conf.tolist(), strict=True):
        boxes.append({
            "x1": round(min(max(x1, 0.0), width), 2), "y1": round(min(max(y1, 0.0), height), 2),
            "x2": round(min(max(x2, 0.0), width), 2), "y2": round(min(max(y2, 0.0), height), 2),
            "label": str(names[int(c)]), "confidence": round(float(p), 4),
        })
    return sorted(boxes, key=lambda b: -b["confidence"])
