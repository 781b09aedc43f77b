"""Publish-time ONNX export: the exports agree with their framework models on test images, and
a broken export stops the publish (``export_champions`` is the step ``publish`` runs before it
builds a Bento; a PublishError there rolls the aliases back, see test_publish_retry.py).

Real models (a Keras classifier with a ``Normalization`` layer, whose constants must be folded
into the graph, and an untrained YOLOv8n), real MLflow registry, real BentoML store; the export
and the comparison run in their framework's child process, as in a publish.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.integration.test_service_http import _YOLO_SCRIPT, ROOT, _register
from training.config import load_config
from training.errors import PublishError
from training.publish.bento import _run, import_champions_detail
from training.publish.export import export_champions

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

_KERAS_SCRIPT = textwrap.dedent("""
    import sys, keras
    inp = keras.Input((32, 32, 3))
    x = keras.layers.Normalization(mean=[120.0, 110.0, 100.0], variance=[900.0, 800.0, 700.0])(inp)
    x = keras.layers.Conv2D(4, 3, activation="relu", name="last_conv")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(2, activation="softmax")(x)
    keras.Model(inp, out).save(sys.argv[1])
""")


def _models(work: Path) -> tuple[Path, Path]:
    keras_path, yolo_path = work / "model.keras", work / "best.pt"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2"}
    procs = [subprocess.Popen([sys.executable, "-c", _KERAS_SCRIPT, str(keras_path)], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT),
             subprocess.Popen([sys.executable, "-c", _YOLO_SCRIPT, str(yolo_path), str(work)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)]
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out.decode(errors="replace")[-3000:]
    return keras_path, yolo_path


def _perturb(onnx_file: Path) -> None:
    """Shift every weight tensor of the stored export: what a broken exporter would write."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_file))
    for i, init in enumerate(model.graph.initializer):
        arr = numpy_helper.to_array(init)
        if arr.dtype == np.float32 and arr.size > 3:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(arr + 0.5, init.name))
    onnx.save(model, str(onnx_file))


def test_exports_agree_with_their_models_and_a_broken_one_blocks_publishing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in [k for k in os.environ if k.startswith("LEUKOFLOW_")]:
        monkeypatch.delenv(key)
    cfg = load_config(home=tmp_path / "home")
    _register(cfg, *_models(tmp_path))
    models = import_champions_detail(cfg)

    reports = export_champions(cfg, models, _run)
    cls = reports[cfg.mlflow.classifier_name]
    assert cls["exported"] and cls["images"] > 0
    assert cls["max_abs_prob_diff"] <= cfg.serving.onnx_max_abs_prob_diff
    assert cls["same_labels"] == cls["images"]
    det = reports[cfg.mlflow.detector_name]
    assert det["exported"] and det["max_abs_raw_diff"] <= cfg.serving.onnx_max_abs_raw_diff
    assert det["box_problems"] == []
    cls_file = Path(cls["file"])
    assert cls_file.is_file() and Path(det["file"]).is_file()  # inside the BentoML models

    import onnx

    graph = onnx.load(str(cls_file)).graph
    assert [i.name for i in graph.input] == ["pixels"]  # Normalization constants folded in

    _perturb(cls_file)  # a publish re-checks what is stored: a broken file does not pass
    classifier = [m for m in models if m.family == "classifier"]
    with pytest.raises(PublishError, match="ONNX classifier disagrees with the Keras model"):
        export_champions(cfg, classifier, _run)
    assert not cls_file.exists()  # the rejected export is never served
