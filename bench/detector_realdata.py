"""Real-data detector experiment: YOLOv5 beside YOLOv8 on TXL-PBC, then BCCD as an external set.

    export LEUKOFLOW_HOME=/tmp/lf-det LEUKOFLOW_CONFIG=bench/detector_txlpbc.yaml
    leukoflow upload ../shared/data/txlpbc_yolo --batch-id txlpbc && leukoflow ingest
    leukoflow upload ../shared/data/bccd_voc --batch-id bccd && leukoflow ingest  # rejected
    python bench/detector_realdata.py --bccd ../shared/data/bccd_voc --bccd-batch bccd \
        --out /tmp/lf-det/detector-results

The architectures train side by side (one child process each, at the same time, as the DAG's
mapped tasks do). The platform ingests both sets itself (TXL-PBC accepted with its given
train/val/test split, ``split.keep_given``; BCCD rejected, its quarantine list naming every
image already curated
from TXL-PBC). This script then does what the retrain DAG does without Airflow (one parent
run, one child process per ``detector.architectures`` entry, ``promote_best``: comparison table
on the parent run, best on validation, gate on test), and scores every candidate on the BCCD
images the validation stage did NOT find in TXL-PBC, with the trainer's own evaluation
(``training.detector.train.evaluate_weights``: Ultralytics' val on the set, bootstrap CIs over
images, latency), plus the paired difference of the first two architectures on those images.
Each BCCD score is logged as an MLflow run (``split_kind=external``) under the parent run.
Writes ``results.json`` and ``results.md`` under ``--out``; the write-up is
``docs/detector-results.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.config import load_config  # noqa: E402
from training.records import Candidate  # noqa: E402

log = logging.getLogger("bench.detector")


def _shared(cfg, batch_id: str) -> set[str]:
    """BCCD paths the validation stage found already curated (byte-identical to TXL-PBC)."""
    reasons = cfg.home / "quarantine" / batch_id / "reasons.csv"
    with reasons.open() as fh:
        return {r["path"] for r in csv.DictReader(fh)
                if "already_curated" in r["reasons"].split(";")}


def _external_set(cfg, root: Path, shared: set[str], dest: Path) -> tuple[Path, dict]:
    """A test-only YOLO dataset of the BCCD images not shared with the training data."""
    import yaml

    from training.data.importers import class_names, import_batch

    layout, records = import_batch(root, "bccd-external")
    names = class_names(root, layout)
    if names != list(cfg.data.detector_classes):
        raise SystemExit(f"BCCD classes {names} != data.detector_classes "
                         f"{cfg.data.detector_classes}: ids would not line up")
    kept = [r for r in records if r.path not in shared and not r.error]
    for sub in ("images/test", "labels/test"):
        (dest / sub).mkdir(parents=True, exist_ok=True)
    for r in kept:
        name = Path(r.path).name
        link = dest / "images" / "test" / name
        if not link.exists():
            link.symlink_to((root / r.path).resolve())
        (dest / "labels" / "test" / f"{Path(name).stem}.txt").write_text(
            r.yolo_labels + ("\n" if r.yolo_labels else ""))
    data = {"path": str(dest.resolve()), "train": "images/test", "val": "images/test",
            "test": "images/test", "nc": len(names), "names": dict(enumerate(names))}
    (dest / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    counts = {"images": len(records), "shared_with_training": len(shared),
              "bad_labels": sum(1 for r in records if r.error),
              "bad_labels_not_shared": sum(1 for r in records if r.error and r.path not in shared),
              "scored": len(kept)}
    return dest / "data.yaml", counts


def _ci(m: dict, key: str) -> str:
    low, high = m.get(f"{key}_ci_low"), m.get(f"{key}_ci_high")
    text = f"{m[key]:.3f}"
    return text + (f" [{low:.3f}, {high:.3f}]" if low is not None else "")


def _table(rows: dict[str, dict], classes: list[str], extra: bool) -> list[str]:
    head = ["architecture", "precision [95% CI]", "recall [95% CI]", "mAP50 [95% CI]",
            "mAP50-95 [95% CI]"]
    if extra:
        head += ["val mAP50", "params", "train time (s)"]
    head += ["latency (ms/image)", "images"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arch, m in rows.items():
        cells = [arch, _ci(m, "precision"), _ci(m, "recall"), _ci(m, "map50"),
                 _ci(m, "map50_95")]
        if extra:
            cells += [f"{m['val/map50']:.3f}", f"{m['total_params']:,.0f}",
                      f"{m['train_time_s']:.0f}"]
        cells += [f"{m['latency_ms_per_image']:.1f}", f"{m['n_test_images']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| architecture | " + " | ".join(
        f"{c} P / R / mAP50 / mAP50-95" for c in classes) + " |",
        "|---|" + "---|" * len(classes)]
    for arch, m in rows.items():
        lines.append(f"| {arch} | " + " | ".join(" / ".join(
            f"{m.get(f'{k}__{c}', float('nan')):.3f}"
            for k in ("precision", "recall", "map50", "map50_95")) for c in classes) + " |")
    return lines


def render(result: dict) -> str:
    """The results as markdown: every number read from ``result`` (what this run measured)."""
    classes = result["config"]["data"]["detector_classes"]
    txl = {c["architecture"]: c["metrics"] for c in result["candidates"]}
    lines = [f"Run {result['started']} - {result['finished']} UTC on {result['machine']}; "
             f"load average at the end {', '.join(f'{v:.1f}' for v in result['load_avg_end'])}.",
             "", "TXL-PBC test split (its published one):", ""]
    lines += _table(txl, classes, extra=True)
    lines += ["", "Wall time per training child (train + test + latency + MLflow): "
              + ", ".join(f"{a} {s:.0f} s" for a, s in result["train_wall_s"].items()), "",
              "Gate:", ""]
    lines += [f"- {p['model_name']} v{p['version']}: "
              f"{'promoted' if p['promoted'] else 'not promoted'} - {'; '.join(p['reasons'])}"
              for p in result["promotions"]]
    counts = result["external_counts"]
    lines += ["", f"BCCD minus the images shared with the training data: {counts['images']} "
              f"images, {counts['shared_with_training']} found already curated by the "
              f"validation stage, {counts['bad_labels_not_shared']} other(s) with bad labels; "
              f"{counts['scored']} scored:", ""]
    lines += _table(result["external"], classes, extra=False)
    for key, d in result["external_paired"].items():
        lines.append(f"\nPaired difference on the same BCCD images, {key}: {d['delta']:+.3f} "
                     f"[95% CI {d['delta_ci_low']:+.3f}, {d['delta_ci_high']:+.3f}] over "
                     f"{d['n_units']:.0f} images")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bccd", type=Path, required=True)
    parser.add_argument("--bccd-batch", default="bccd", help="its landing batch id")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--render", action="store_true",
                        help="only print <out>/results.json as markdown")
    parser.add_argument("--skip-training", action="store_true",
                        help="reuse <out>/candidates.json (score BCCD again only)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    if args.render:
        print(render(json.loads((args.out / "results.json").read_text())))
        return 0
    cfg = load_config()
    args.out.mkdir(parents=True, exist_ok=True)
    from training.stages import curated_dataset, promote_best, start_parent_run, train

    ds = curated_dataset(cfg)
    archs = list(cfg.detector.architectures)
    started = datetime.now(UTC).isoformat(timespec="seconds")
    walls: dict[str, float] = {}
    cand_file = args.out / "candidates.json"
    if args.skip_training:
        saved = json.loads(cand_file.read_text())
        parent, cands, promotions, walls = (saved["parent_run_id"], saved["candidates"],
                                            saved["promotions"], saved["wall_s"])
    else:
        from concurrent.futures import ThreadPoolExecutor

        parent = start_parent_run(cfg, f"bench-detector-{started}", ds)

        def one(arch: str) -> dict:  # side by side, as the DAG's mapped tasks run
            t0 = time.perf_counter()
            cand = train(cfg, "detector", architecture=arch, dataset_version=ds["version"],
                         parent_run_id=parent, tags={"bench": "detector_realdata"})
            walls[arch] = time.perf_counter() - t0
            (args.out / f"candidate-{arch}.json").write_text(json.dumps(cand, indent=2))
            return cand

        with ThreadPoolExecutor(max_workers=len(archs)) as pool:
            cands = list(pool.map(one, archs))
        promotions = promote_best(cfg, cands, {"bench": "detector_realdata"},
                                  parent_run_id=parent, expected={"detector": archs})
        cand_file.write_text(json.dumps({"parent_run_id": parent, "candidates": cands,
                                         "promotions": promotions, "wall_s": walls}, indent=2))

    import mlflow

    from training.detector.predict import configure_ultralytics
    from training.detector.train import _device, evaluate_weights
    from training.evaluation.detection import paired_detection_delta
    from training.tracking import configure_mlflow

    configure_ultralytics(cfg.home)
    exp = configure_mlflow(cfg)
    shared = _shared(cfg, args.bccd_batch)
    data_yaml, counts = _external_set(cfg, args.bccd, shared, args.out / "bccd_external")
    device = _device()
    external, matches = {}, {}
    for cand in map(Candidate.from_dict, cands):
        local = Path(mlflow.artifacts.download_artifacts(
            cand.model_uri, dst_path=str(args.out / "models" / cand.architecture)))
        t0 = time.perf_counter()
        metrics, matches[cand.architecture] = evaluate_weights(
            local / "artifacts" / "best.pt", data_yaml, imgsz=cfg.detector.imgsz,
            batch=cfg.detector.batch, device=device, classes=list(cfg.data.detector_classes),
            out_dir=args.out / "bccd_eval" / cand.architecture)
        metrics["eval_wall_s"] = time.perf_counter() - t0
        external[cand.architecture] = metrics
        with mlflow.start_run(experiment_id=exp, run_name=f"detector-{cand.architecture}-bccd",
                              nested=True, parent_run_id=parent, tags={
                                  "family": "detector", "architecture": cand.architecture,
                                  "split_kind": "external", "evaluated_run_id": cand.run_id,
                                  "evaluated_model_uri": cand.model_uri,
                                  "external_set": "bccd_voc minus the images shared with "
                                                  "the training data"}):
            mlflow.log_metrics(metrics)
            mlflow.log_dict(counts, "external_set.json")
    paired = {}
    if len(matches) >= 2:
        a, b = list(matches)[:2]
        for metric in ("map50", "map50_95"):
            paired[f"{a}-{b}/{metric}"] = paired_detection_delta(metric, matches[a], matches[b])
    result = {
        "started": started, "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpu(s), "
                   f"{platform.python_version()}",
        "load_avg_end": os.getloadavg(), "dataset_version": ds["version"],
        "config": {k: cfg.dump()[k] for k in ("detector", "data", "gate", "split")},
        "parent_run_id": parent, "train_wall_s": walls,
        "candidates": cands, "promotions": promotions, "external_counts": counts,
        "external": external, "external_paired": paired,
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    result = json.loads((args.out / "results.json").read_text())
    (args.out / "results.md").write_text(render(result))
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
