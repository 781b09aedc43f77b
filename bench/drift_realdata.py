"""Drift of real batches against C-NMC training subjects: the table of docs/drift.md.

    python bench/drift_realdata.py [--data ../shared/data] [--out drift_realdata.json]

Calls :mod:`training.data.drift` directly (no model, no registry): the reference is a seeded
sample (``validation.drift_reference_images``, ``random_state=0`` as the ingest draws it) of
the C-NMC fold-1 images of the subjects dataset version 1 trained on (docs/classifier-results.md:
ALL 2, 30, 32, 33, 34, 38, 44; healthy H10, H14, H22); the batches are the other C-NMC subjects
of the same lab (the test subjects ALL 46 and 51, the val subjects ALL 16 and 23) and the ALL
4-class set of another hospital (the first 25 files of each class folder, as docs/drift.md's
first measurement took them). For each: MMD², permutation p-value, the fixed and the calibrated
threshold (shipped config) and how it was derived. Writes JSON with date, machine and load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.config import load_config  # noqa: E402
from training.data.drift import _features_of, drift_score, threshold_for  # noqa: E402

TRAIN = {"2", "30", "32", "33", "34", "38", "44", "H10", "H14", "H22"}
BATCHES = {"cnmc test subjects 46, 51 (same lab)": {"46", "51"},
           "cnmc val subjects 16, 23 (same lab)": {"16", "23"}}


def _cnmc(data: Path) -> pd.DataFrame:
    files = sorted((data / "cnmc_fold1").glob("*/*.png"))
    return pd.DataFrame({"path": [str(f) for f in files],
                         "subject_id": [f.name.split("_")[1] for f in files],
                         "label": [f.parent.name for f in files]})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=Path("drift_realdata.json"))
    args = parser.parse_args(argv)
    cfg = load_config()
    v = cfg.validation
    started, load_before = time.time(), os.getloadavg()[0]
    cnmc = _cnmc(args.data)
    ref = cnmc[cnmc["subject_id"].isin(TRAIN)]
    ref = ref.sample(n=min(v.drift_reference_images, len(ref)), random_state=0)
    reference, ref = _features_of(ref.reset_index(drop=True))
    batches = {name: cnmc[cnmc["subject_id"].isin(s)] for name, s in BATCHES.items()}
    other = sorted(p for p in (args.data / "all_4class").iterdir() if p.is_dir())
    batches["all_4class, first 25 of each class (another hospital)"] = pd.DataFrame(
        {"path": [str(f) for d in other for f in sorted(d.glob("*.jpg"))[:25]],
         "subject_id": "", "label": ""})
    rows = []
    for name, frame in batches.items():
        feats, frame = _features_of(frame.reset_index(drop=True))
        t0 = time.time()
        out = drift_score(reference, feats, n_permutations=v.drift_permutations)
        threshold, mode, how = threshold_for(
            cfg, reference, ref["subject_id"], ref["label"], n_batch=len(feats),
            batch_subjects=len(set(frame["subject_id"]) - {""}), batch_labels=frame["label"])
        rows.append({"batch": name, "n_batch": len(feats), "score": out["score"],
                     "p_value": out["p_value"], "fixed_threshold": v.drift_threshold,
                     "flagged_fixed": out["score"] > v.drift_threshold,
                     "threshold": threshold, "threshold_mode": mode,
                     "flagged_calibrated": out["score"] > threshold, "calibration": how,
                     "seconds": round(time.time() - t0, 2)})
        print(f"{name}: MMD² {out['score']:.3f} (p {out['p_value']:.3f}), threshold "
              f"{threshold:.3f} ({mode}; null median {how.get('null_median', float('nan')):.3f},"
              f" q{v.drift_calibration_quantile:g} {how.get('null_quantile', float('nan')):.3f})")
    report = {"command": " ".join([sys.executable, *sys.argv]),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
              "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores",
              "load_1min": [load_before, os.getloadavg()[0]],
              "wall_s": round(time.time() - started, 1),
              "reference": {"n": len(reference), "subjects": sorted(set(ref["subject_id"]))},
              "config": {k: getattr(v, k) for k in type(v).model_fields if k.startswith("drift")},
              "batches": rows}
    args.out.write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
