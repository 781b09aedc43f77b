"""Publish-time export of the champions to ONNX, and the infra-validation that gates it.

    export_champions  (publish process)  per champion, in a child process of its framework
                      (TensorFlow and torch never share one): export, or re-check an export
                      already stored, against the framework model; a mismatch is a PublishError,
                      so the publish step rolls the aliases back as for any failed publish
    main              (child: ``python -m training.publish.export``) the export and the check

Classifier: Keras -> ``tf2onnx.convert.from_function`` (opset 17). Keras' ``Normalization``
(EfficientNet has one inside) keeps mean and variance as captured tensors that tf2onnx turns
into extra graph *inputs*; they are folded back into initializers here, so the ONNX graph takes
the pixels only. Detector: Ultralytics' own ``export(format="onnx")``; its post-processing runs
in numpy (:mod:`training.detector.onnx_runtime`). The export is stored inside the BentoML model
(``onnx/model.onnx``), so a Bento carries it and serving needs neither framework.

The check runs on the candidate's own test images (the frozen test split of the dataset version
its run was trained on, at most ``serving.onnx_validation_images``), or, where the run has no
curated data (a model registered by hand), on synthetic images, which the report says.
Classifier: the largest absolute probability difference and the predicted labels; detector: the
raw output tensor on the same letterboxed input, and the final boxes of Ultralytics' own
predict and of ours on that same input (same label, IoU and score within tolerance). A
non-Keras classifier (e.g. a scikit-learn one) is left unexported and served as it is.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from training.config import Config
from training.errors import PublishError

__all__ = ["OPSET", "compare_boxes", "export_champions", "fold_captured_inputs", "main",
           "validation_images"]

log = logging.getLogger(__name__)

OPSET = 17
_SYNTHETIC = 8  # images made up when the run has no curated test images


# ------------------------------------------------------------------------ parent side
def validation_images(cfg: Config, family_name: str, run_id: str, work: Path) -> dict[str, Any]:
    """``{"paths": [...], "source": ...}``: the candidate's test images, else synthetic ones."""
    from training.families import get_family

    family = get_family(family_name)
    limit = cfg.serving.onnx_validation_images
    try:
        from mlflow import MlflowClient

        from training.data.dataset import load_manifest, materialize

        tags = MlflowClient(tracking_uri=cfg.tracking_uri).get_run(run_id).data.tags
        version = int(tags["dataset_version"])
        df, _ = load_manifest(cfg, version)
        test = df[(df["split"] == "test") & (df["kind"] == family.kind)].head(limit)
        if len(test):
            test = materialize(cfg, test, cfg.home / "cache" / "curated")
            paths = [p for p in test["path"] if p]
            if paths:
                return {"paths": paths, "source": f"test split of dataset v{version}"}
    except Exception as exc:  # no run, no tag, no manifest: a hand-registered model
        log.info("no curated test images for %s run %s (%s): synthetic ones", family_name,
                 run_id, exc)
    return {"paths": _synthetic(work, min(limit, _SYNTHETIC)), "source": "synthetic"}


def _synthetic(work: Path, n: int) -> list[str]:
    """Smear-like PNGs of a few sizes (fixed seed): pink field, purple nuclei, noise."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    work.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        w, h = int(rng.integers(64, 400)), int(rng.integers(64, 400))
        noise = rng.normal(0, 12, (h, w, 3)) + np.array([236, 190, 200])
        img = Image.fromarray(np.clip(noise, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(1, 5))):
            x, y, r = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(8, 40))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=(90, 40, 130))
        path = work / f"synthetic-{i}.png"
        img.save(path)
        paths.append(str(path))
    return paths


def export_champions(cfg: Config, models: list[Any], run: Callable[..., str]
                     ) -> dict[str, dict[str, Any]]:
    """Export (or re-check) each champion's ONNX file; ``{registered name: report}``.

    ``models``: :class:`training.publish.bento.ChampionModel` records; ``run``: the publish
    step's child-process runner (``training.publish.bento._run``: its environment, a
    PublishError with the child's stderr on failure). Raises PublishError naming the model and
    the measured difference when an export disagrees with its model.
    """
    if not cfg.serving.onnx_export:
        return {}
    reports = {}
    with tempfile.TemporaryDirectory(prefix="leukoflow-export-") as tmp:
        for m in models:
            images = validation_images(cfg, m.family, m.run_id, Path(tmp) / m.family)
            listing = Path(tmp) / f"{m.family}-images.json"
            listing.write_text(json.dumps(images))
            cmd = [sys.executable, "-m", "training.publish.export", m.family,
                   "--bento-tag", m.bento_tag, "--images", str(listing)]
            out = run(cmd, cfg, f"ONNX export and check of {m.name} v{m.version}",
                       timeout=1800, extra_env={"CUDA_VISIBLE_DEVICES": ""})
            try:
                reports[m.name] = json.loads(out.strip().splitlines()[-1])
            except (ValueError, IndexError) as exc:
                raise PublishError(f"the ONNX check of {m.name} printed no result: "
                                   f"{out[-2000:]!r}") from exc
            log.info("ONNX check of %s v%s: %s", m.name, m.version, reports[m.name])
    return reports


# ------------------------------------------------------------------------- child side
class ExportMismatch(Exception):
    """The exported model does not answer like the framework model."""


def fold_captured_inputs(proto: Any, concrete: Any, keep: str) -> Any:
    """Turn every graph input but ``keep`` into an initializer holding its captured value.

    tf2onnx makes a graph input of each tensor a ``tf.function`` captured by value (Keras'
    ``Normalization`` mean and variance); the concrete function knows those values.
    """
    import tensorflow as tf
    from onnx import numpy_helper

    values = {placeholder.name: value.numpy() for value, placeholder
              in zip(concrete.captured_inputs, concrete.graph.internal_captures, strict=True)
              if value.dtype != tf.resource}
    for graph_input in [i for i in proto.graph.input if i.name != keep]:
        if graph_input.name not in values:
            raise ExportMismatch(f"the ONNX graph takes an input {graph_input.name!r} that is "
                                 "neither the pixels nor a captured constant")
        value = values[graph_input.name]
        if value.dtype == np.float64:
            value = value.astype(np.float32)
        proto.graph.initializer.append(numpy_helper.from_array(value, graph_input.name))
        proto.graph.input.remove(graph_input)
    return proto


def _export_classifier(keras_model: Any, target: Path) -> None:
    import tensorflow as tf
    import tf2onnx

    size = tuple(keras_model.input_shape[1:])
    spec = (tf.TensorSpec((None, *size), tf.float32, name="pixels"),)
    fn = tf.function(lambda x: keras_model(x, training=False))
    proto, _ = tf2onnx.convert.from_function(fn, input_signature=spec, opset=OPSET)
    proto = fold_captured_inputs(proto, fn.get_concrete_function(*spec), keep="pixels")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(proto.SerializeToString())


def check_classifier(model_dir: Path, images: list[Path], cfg: Config) -> dict[str, Any]:
    """Export (unless stored already) and compare on ``images``; raises ExportMismatch."""
    from training.classifier.predict import (
        OnnxClassifier,
        load_classifier,
        onnx_path,
        predict_proba,
    )
    from training.preprocess import PreprocessParams, decode_image

    if not (model_dir / "artifacts" / "model.keras").is_file():
        return {"exported": False, "reason": "not a Keras classifier: served as it is"}
    keras_model, meta = load_classifier(model_dir)
    target = onnx_path(model_dir)
    exported = not target.is_file()
    if exported:
        _export_classifier(keras_model, target)
    params = PreprocessParams.from_dict(meta["preprocess"])
    pil = [decode_image(Path(p).read_bytes()) for p in images]
    want = predict_proba(keras_model, pil, params)
    got = predict_proba(OnnxClassifier(target), pil, params)
    diff = float(np.abs(want - got).max()) if len(want) else 0.0
    same = int((want.argmax(1) == got.argmax(1)).sum())
    report = {"exported": exported, "file": str(target), "images": len(pil),
              "max_abs_prob_diff": diff, "same_labels": same,
              "tolerance": cfg.serving.onnx_max_abs_prob_diff}
    if diff > cfg.serving.onnx_max_abs_prob_diff or same != len(pil):
        raise ExportMismatch(
            f"the ONNX classifier disagrees with the Keras model on {len(pil)} test images: "
            f"max |probability difference| {diff:.3g} (tolerance serving.onnx_max_abs_prob_diff "
            f"= {cfg.serving.onnx_max_abs_prob_diff}), same label on {same}/{len(pil)}")
    return report


def compare_boxes(want: list[dict], got: list[dict], iou: float, score_diff: float,
                  conf: float) -> list[str]:
    """Why two box lists differ ([] when they agree): every box clearly above ``conf`` in one
    list needs a box in the other with the same label, IoU >= ``iou`` and a score within
    ``score_diff`` (boxes within ``score_diff`` of the threshold may be on one side only)."""
    from training.boxes import box_iou

    problems = []
    for name, these, others in (("framework", want, got), ("ONNX", got, want)):
        for box in these:
            if box["confidence"] < conf + score_diff:
                continue
            arr = np.array([[o["x1"], o["y1"], o["x2"], o["y2"]] for o in others]
                           ).reshape(-1, 4)
            ious = box_iou(np.array([box["x1"], box["y1"], box["x2"], box["y2"]]), arr)
            ok = [j for j, o in enumerate(others) if ious[j] >= iou and o["label"] == box[
                "label"] and abs(o["confidence"] - box["confidence"]) <= score_diff]
            if not ok:
                best = float(ious.max()) if len(ious) else 0.0
                problems.append(f"{name} box {box} has no match (best IoU {best:.3f})")
    return problems


def _unletterbox(boxes: list[dict], gain: float, pad: tuple[float, float],
                 size: tuple[int, int]) -> list[dict]:
    """Boxes found on a letterboxed square, in the original image's pixels (as serving maps)."""
    (pad_x, pad_y), (width, height) = pad, size
    out = []
    for b in boxes:
        xs = [min(max((b[k] - pad_x) / gain, 0.0), width) for k in ("x1", "x2")]
        ys = [min(max((b[k] - pad_y) / gain, 0.0), height) for k in ("y1", "y2")]
        out.append({**b, "x1": round(xs[0], 2), "x2": round(xs[1], 2), "y1": round(ys[0], 2),
                    "y2": round(ys[1], 2)})
    return out


def check_detector(model_dir: Path, images: list[Path], cfg: Config) -> dict[str, Any]:
    """Export with Ultralytics (unless stored already) and compare; raises ExportMismatch."""
    from PIL import Image as PILImage

    from training.detector.onnx_runtime import OnnxDetector, letterbox, onnx_path
    from training.detector.predict import detect, load_detector, read_model_dir
    from training.preprocess import decode_image

    weights, meta = read_model_dir(model_dir)
    yolo, _ = load_detector(model_dir)
    imgsz = int(meta.get("imgsz") or 640)
    target = onnx_path(model_dir)
    exported = not target.is_file()
    if exported:
        with tempfile.TemporaryDirectory(prefix="leukoflow-yolo-export-") as tmp:
            copy = Path(tmp) / weights.name
            shutil.copyfile(weights, copy)
            from ultralytics import YOLO

            out = YOLO(str(copy), task="detect").export(
                format="onnx", imgsz=imgsz, opset=OPSET, simplify=False, dynamic=False,
                half=False, device="cpu", verbose=False)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(out), target)
    import torch

    onnx_model = OnnxDetector(target, meta.get("classes"))
    torch_model = yolo.model.float().eval()
    conf, iou, score_diff = 0.25, cfg.serving.onnx_box_iou, cfg.serving.onnx_box_score_diff
    raw_diff, problems, n_boxes = 0.0, [], 0
    for path in images:
        pil = decode_image(Path(path).read_bytes())
        x, gain, pad = letterbox(np.asarray(pil, dtype=np.uint8), onnx_model.imgsz)
        with torch.no_grad():
            y = torch_model(torch.from_numpy(x))
        y = (y[0] if isinstance(y, list | tuple) else y).numpy()
        o = onnx_model.session.run(None, {onnx_model.input_name: x})[0]
        raw_diff = max(raw_diff, float(np.abs(y - o).max()))
        # the framework's boxes on the same square letterboxed input (its own predict pads to
        # a stride multiple instead, which moves confidences by a few hundredths), mapped back
        square = PILImage.fromarray(np.rint(x[0].transpose(1, 2, 0) * 255).astype(np.uint8))
        want = _unletterbox(detect(yolo, square, imgsz=onnx_model.imgsz, conf=conf), gain, pad,
                            pil.size)
        got = onnx_model.detect(pil, conf=conf)
        n_boxes += len(want)
        problems += [f"{Path(path).name}: {p}" for p in compare_boxes(want, got, iou,
                                                                     score_diff, conf)]
    report = {"exported": exported, "file": str(target), "images": len(images),
              "boxes": n_boxes, "max_abs_raw_diff": raw_diff,
              "raw_tolerance": cfg.serving.onnx_max_abs_raw_diff, "box_problems": problems[:5]}
    if raw_diff > cfg.serving.onnx_max_abs_raw_diff or problems:
        raise ExportMismatch(
            f"the ONNX detector disagrees with the YOLO model on {len(images)} test images: "
            f"max |raw output difference| {raw_diff:.3g} (tolerance "
            f"serving.onnx_max_abs_raw_diff = {cfg.serving.onnx_max_abs_raw_diff}); "
            f"{len(problems)} unmatched boxes {problems[:3]}")
    return report


_CHECKS = {"classifier": check_classifier, "detector": check_detector}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.publish.export",
                                     description=__doc__)
    parser.add_argument("family", choices=sorted(_CHECKS))
    parser.add_argument("--bento-tag", help="a BentoML model (BENTOML_HOME from the env)")
    parser.add_argument("--model-dir", help="or a logged model dir")
    parser.add_argument("--images", required=True, help='JSON {"paths": [...], "source": ...}')
    args = parser.parse_args(argv)
    from training.config import load_config

    cfg = load_config()
    if args.family == "detector":
        from training.detector.predict import configure_ultralytics

        configure_ultralytics(cfg.home)
    if args.model_dir:
        model_dir = Path(args.model_dir)
    else:
        import bentoml

        model_dir = Path(bentoml.models.get(args.bento_tag).path)
    images = json.loads(Path(args.images).read_text())
    try:
        report = _CHECKS[args.family](model_dir, [Path(p) for p in images["paths"]], cfg)
    except ExportMismatch as exc:
        rejected = model_dir / "onnx"
        if rejected.is_dir():  # never served; the next publish exports afresh
            shutil.rmtree(rejected)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    report["image_source"] = images.get("source")
    buf = io.StringIO()
    json.dump(report, buf)
    print(buf.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
