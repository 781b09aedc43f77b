"""The hand-crafted baseline under leave-subjects-out CV on a C-NMC folder, with and without
stain normalisation (the reference refitted on each fold's train subjects).

    python bench/handcrafted_lso.py --data ../shared/data/cnmc_fold1 --folds 3 \
        --stain none reinhard macenko --out /tmp/lso.json

Folds are stratified groups of subjects (``StratifiedGroupKFold``): no subject is on both
sides, and with C-NMC fold 1's three healthy donors each fold tests on one of them. Prints
one markdown row per setting (mean and range over folds) and writes every fold to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.classifier.baseline import (  # noqa: E402
    baseline_hparams,
    fit_handcrafted,
    predict_paths,
)
from training.classifier.classical import grouped_folds  # noqa: E402
from training.config import load_config  # noqa: E402


def _cells(folder: Path) -> pd.DataFrame:
    rows = []
    for path in sorted(folder.glob("*/*.png")):
        parts = path.stem.split("_")  # UID_<subject>_<image>_<cell>_<all|hem>
        rows.append({"path": str(path), "subject_id": parts[1], "label": parts[-1]})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/cnmc_fold1")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--stain", nargs="+", default=["none", "reinhard"])
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--model", default="logistic_regression")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    cells = _cells(args.data)
    if cells.empty:
        raise SystemExit(f"no C-NMC cells under {args.data}")
    y = (cells["label"] == "hem").to_numpy(dtype=np.int64)  # 0 = all, 1 = hem
    folds = grouped_folds(y, cells["subject_id"].to_numpy(), args.folds)
    results = []
    with tempfile.TemporaryDirectory() as home:
        for stain in args.stain:
            cfg = load_config(home=home, classifier={
                "image_size": args.image_size, "stain_normalisation": stain,
                "baseline_model": args.model})
            hp = baseline_hparams(cfg)
            for i, (tr, te) in enumerate(folds):
                start = time.perf_counter()
                model, params, _ = fit_handcrafted(hp, cells.iloc[tr], y[tr], 2)
                prob = predict_paths(model, list(cells["path"].iloc[te]), params)
                test_subjects = sorted(cells["subject_id"].iloc[te].unique())
                results.append({
                    "stain": stain, "fold": i, "test_subjects": test_subjects,
                    "n_test": int(len(te)),
                    "balanced_accuracy": float(balanced_accuracy_score(
                        y[te], prob.argmax(axis=1))),
                    "roc_auc": float(roc_auc_score(y[te], prob[:, 1]))
                    if len(set(y[te])) == 2 else None,
                    "wall_s": time.perf_counter() - start})
                print(json.dumps(results[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    print("\n| baseline | stain | folds | balanced accuracy mean [min, max] | ROC AUC mean "
          "[min, max] |\n|---|---|---|---|---|")
    for stain in args.stain:
        r = [x for x in results if x["stain"] == stain]
        ba = np.array([x["balanced_accuracy"] for x in r])
        auc = np.array([x["roc_auc"] for x in r if x["roc_auc"] is not None])
        print(f"| handcrafted + {args.model} | {stain} | {len(r)} | {ba.mean():.3f} "
              f"[{ba.min():.3f}, {ba.max():.3f}] | {auc.mean():.3f} "
              f"[{auc.min():.3f}, {auc.max():.3f}] |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
