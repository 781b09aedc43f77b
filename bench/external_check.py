"""``leukoflow evaluate`` against the training run it should reproduce (C-NMC fold 1).

    export LEUKOFLOW_HOME=/tmp/lf-cnmc LEUKOFLOW_CONFIG=configs/demo.yaml
    leukoflow upload ../shared/data/cnmc_fold1 --batch-id cnmc-fold1 && leukoflow ingest
    leukoflow train classifier > candidate.json
    python bench/external_check.py promote candidate.json
    python bench/external_check.py folder ../shared/data/cnmc_fold1 /tmp/cnmc_fold1_test
    leukoflow evaluate leukemia-classifier/1 /tmp/cnmc_fold1_test
    python bench/external_check.py compare <training run id> <evaluate run id>
    python bench/external_check.py order <training run id> <evaluate run id>

``promote`` registers and gates the candidate as the retrain DAG's promote task does;
``folder`` copies the frozen manifest's test rows out of the original folder in its own layout
(the importers refuse symlinks that leave the folder); ``compare`` prints both runs' test
metrics from MLflow as a markdown table, so no figure of ``docs/classifier-results.md`` is
typed by hand; ``order`` rescores the evaluate run's logged predictions in the training run's
row order, to show whether the cell-level bootstrap CIs differ only by the order of the rows
(same seed, so resample index i picks another image when the rows come in another order).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

# The rows of the table, in the doc's order; ``--all`` prints every shared metric.
ROWS = ["n_test", "n_subjects", "n_subjects__all", "n_subjects__hem", "accuracy",
        "accuracy_ci_low", "accuracy_ci_high", "balanced_accuracy", "balanced_accuracy_ci_low",
        "balanced_accuracy_ci_high", "roc_auc", "roc_auc_ci_low", "roc_auc_ci_high",
        "f1_macro", "precision_macro", "recall__all", "recall__hem", "ece",
        "accuracy_cell_ci_low", "accuracy_cell_ci_high", "roc_auc_cell_ci_low",
        "roc_auc_cell_ci_high"]
# Training-only metrics (validation, champion, baseline, CV, training curves) are not compared.
_NOT_TEST = ("val/", "champion/", "cv/", "baseline/", "train")


def promote(candidate_json: Path) -> None:
    """Register the printed candidate and let the gate decide, with the DAG's tags."""
    from training.config import load_config
    from training.lineage import lineage_tags
    from training.stages import curated_dataset, promote_best

    cfg = load_config()
    candidate = json.loads(candidate_json.read_text())
    ds = curated_dataset(cfg, candidate.get("dataset_version"))
    tags = {**lineage_tags(), "dataset_manifest_sha256": ds["manifest_sha256"],
            "batch_ids": ",".join(ds["batch_ids"])}
    print(json.dumps(promote_best(cfg, [candidate], tags), indent=2, default=str))


def folder(source: Path, dest: Path, version: int | None) -> None:
    """Copy the test rows of the frozen manifest from ``source``, keeping its layout."""
    from training.config import load_config
    from training.data.dataset import load_manifest

    rows, _ = load_manifest(load_config(), version)
    test = rows[rows["split"] == "test"]
    for name in test["source"]:
        rel = Path(*Path(name).parts[1:])  # the manifest's source starts with the batch id
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / rel, dest / rel)
    print(f"{len(test)} test rows copied to {dest}")
    print(test.groupby(["label", "subject_id"]).size().to_string())


def compare(training_run: str, evaluate_run: str, every: bool) -> None:
    """Both runs' test metrics side by side with their absolute difference."""
    from mlflow import MlflowClient

    from training.config import load_config
    from training.tracking import configure_mlflow

    configure_mlflow(load_config())
    client = MlflowClient()
    a, b = client.get_run(training_run), client.get_run(evaluate_run)
    shared = set(a.data.metrics) & set(b.data.metrics)
    keys = (sorted(k for k in shared if not k.startswith(_NOT_TEST)) if every
            else [k for k in ROWS if k in shared])
    print(f"| metric | training run `{a.info.run_id[:8]}…` (`split_kind="
          f"{a.data.tags.get('split_kind')}`) | `leukoflow evaluate` run `{b.info.run_id[:8]}…` "
          f"(`split_kind={b.data.tags.get('split_kind')}`) | abs. difference |")
    print("|---|---|---|---|")
    for k in keys:
        x, y = a.data.metrics[k], b.data.metrics[k]
        print(f"| {k} | {x:.6f} | {y:.6f} | {abs(x - y):.2g} |")
    worst = max(abs(a.data.metrics[k] - b.data.metrics[k]) for k in keys)
    print(f"\nlargest abs. difference of these {len(keys)} metrics: {worst:.3g}")


def order(training_run: str, evaluate_run: str) -> None:
    """The evaluate run's cell-level CIs recomputed in its own and in the training run's order."""
    import numpy as np
    import pandas as pd
    from mlflow import MlflowClient

    from training.config import load_config
    from training.evaluation.metrics import classification_metrics
    from training.tracking import configure_mlflow

    configure_mlflow(load_config())
    client = MlflowClient()
    t = pd.read_csv(client.download_artifacts(training_run, "predictions/test.csv"))
    e = pd.read_csv(client.download_artifacts(evaluate_run, "predictions/external.csv"))
    if set(t["sha256"]) != set(e["sha256"]):
        raise SystemExit("the two runs did not score the same images")
    print("same row order:", list(t["sha256"]) == list(e["sha256"]))
    reordered = e.set_index("sha256").loc[t["sha256"]].reset_index()
    gap = np.abs(reordered["p_hem"].to_numpy() - t["p_hem"].to_numpy()).max()
    print(f"largest |p_hem| difference per image (logged CSVs): {gap:.2g}")
    classes = ["all", "hem"]
    for name, d in (("training run's predictions", t), ("evaluate run, its order", e),
                    ("evaluate run, training run's order", reordered)):
        m = classification_metrics(d["label"].map(classes.index).to_numpy(),
                                   d[["p_all", "p_hem"]].to_numpy(), classes,
                                   groups=d["subject_id"].astype(str).to_numpy())
        print(name, {k: round(v, 6) for k, v in m.items() if "_cell_ci_" in k})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("promote").add_argument("candidate_json", type=Path)
    f = sub.add_parser("folder")
    f.add_argument("source", type=Path)
    f.add_argument("dest", type=Path)
    f.add_argument("--dataset-version", type=int, default=None)
    c = sub.add_parser("compare")
    c.add_argument("training_run")
    c.add_argument("evaluate_run")
    c.add_argument("--all", action="store_true", help="Every test metric both runs logged.")
    o = sub.add_parser("order")
    o.add_argument("training_run")
    o.add_argument("evaluate_run")
    args = p.parse_args()
    if args.cmd == "promote":
        promote(args.candidate_json)
    elif args.cmd == "folder":
        folder(args.source, args.dest, args.dataset_version)
    elif args.cmd == "order":
        order(args.training_run, args.evaluate_run)
    else:
        compare(args.training_run, args.evaluate_run, args.all)


if __name__ == "__main__":
    main()
