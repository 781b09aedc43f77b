"""Leave-subjects-out CV on a real dataset folder: the figures of docs/classifier-results.md.

    python bench/subject_cv_realdata.py --dataset cnmc_fold1 --home /tmp/lf-cv-cnmc \
        --variant plain --folds 3 --epochs 3 --image-size 64 \
        --feature-classifiers logistic_regression,svc,xgboost

Lands and curates the dataset folder (by symlink, idempotent) in ``--home``, a throw-away
``LEUKOFLOW_HOME``, then runs ``python -m training.classifier.cv`` in a child process with the
experiment's config plus ``--set key=value`` overrides (dotted keys, YAML values: the stain
and colour options), and writes ``<home>/cvbench/<variant>.json``: the CV summary, the command,
the resolved overrides, wall time, date, machine and the 1-minute load before and after.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from research.experiments import (  # noqa: E402
    DATASETS,
    DEFAULT_DATA_ROOT,
    _child_env,
    curate,
    experiment_config,
)


def _nested(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for k, v in extra.items():
        base[k] = _merge(dict(base.get(k) or {}), v) if isinstance(v, dict) else v
    return base


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="cnmc_fold1")
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    parser.add_argument("--variant", required=True, help="name of this configuration")
    parser.add_argument("--architecture", default="lightweight_efficientnet_b3")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--feature-classifiers", default="")
    parser.add_argument("--set", dest="sets", action="append", default=[],
                        help="config override key=value (dotted key, YAML value)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    spec = DATASETS[args.dataset]
    cfg = experiment_config(args.home, spec, "subject", [args.architecture],
                            image_size=args.image_size, epochs=args.epochs)
    _, version = curate(cfg, args.data_root / spec.folder, spec.name)
    overrides = _nested(args.sets)
    config = _merge(cfg.dump(), overrides)
    config_path = args.home / f"cv-{args.variant}.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    out = args.home / "cvbench" / f"{args.variant}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "training.classifier.cv", "--architecture", args.architecture,
           "--dataset-version", str(version), "--folds", str(args.folds),
           "--out", str(out.with_suffix(".cv.json"))]
    if args.feature_classifiers:
        cmd += ["--feature-classifiers", args.feature_classifiers]
    load_before, start = os.getloadavg()[0], time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=_child_env(config_path))
    wall = time.time() - start
    if proc.returncode != 0:
        return proc.returncode
    summary = json.loads(out.with_suffix(".cv.json").read_text())
    record = {"variant": args.variant, "dataset": args.dataset, "dataset_version": version,
              "command": " ".join(["python", *sys.argv]), "overrides": overrides,
              "architecture": args.architecture, "folds_requested": args.folds,
              "epochs": args.epochs, "image_size": args.image_size, "wall_s": wall,
              "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(start)),
              "load_1min_before": load_before, "load_1min_after": os.getloadavg()[0],
              "machine": f"{platform.processor() or platform.machine()}, "
                         f"{os.cpu_count()} CPUs, Python {platform.python_version()}",
              **summary}
    out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k not in ("folds_table",)},
                     default=str)[:2000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
