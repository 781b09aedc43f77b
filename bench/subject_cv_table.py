"""The leave-subjects-out table of docs/classifier-results.md from bench/subject_cv_realdata.py's
``<home>/cvbench/*.json`` files (nothing typed in).

    python bench/subject_cv_table.py /tmp/lf-cv-cnmc/cvbench/*.json
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any


def _ci(m: dict[str, Any], key: str, cell: bool = False) -> str:
    value = m.get(key)
    if value is None or not math.isfinite(value):
        return "-"
    low = m.get(f"{key}{'_cell' if cell else ''}_ci_low")
    high = m.get(f"{key}{'_cell' if cell else ''}_ci_high")
    if low is None:
        return f"{value:.3f}"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def _rows(record: dict[str, Any]) -> list[tuple[str, dict[str, Any], bool]]:
    """(model label, metrics with plain ``<metric>`` keys) for the CNN and each feature model."""
    m = record["metrics"]
    cnn = {k[3:]: v for k, v in m.items() if k.startswith("cv/") and "/" not in k[3:]}
    arch, variant = record["architecture"], record["variant"]
    label = (f"hand-crafted baseline ({variant})" if arch == "handcrafted_baseline"
             else f"{arch} (CNN, {variant})")
    out = [(label, cnn, True)] if cnn.get("balanced_accuracy") is not None else []
    names = sorted({k.split("/")[2] for k in m if k.startswith("cv/features/")})
    for name in names:
        prefix = f"cv/features/{name}/"
        feats = {k[len(prefix):]: v for k, v in m.items() if k.startswith(prefix)}
        out.append((f"B3 features ({record['variant']} backbone) + {name}", feats, False))
    return out


def table(records: list[dict[str, Any]]) -> str:
    head = ["Model", "Scheme", "Subjects (all / hem)", "Balanced acc. [95% CI, subjects]",
            "ROC AUC [95% CI, subjects]", "Accuracy [95% CI, subjects]",
            "Balanced acc. CI over cells (for comparison)", "Fold mean ± sd (bal. acc.)",
            "Worst subject (accuracy)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for rec in records:
        top = rec["metrics"]
        for label, m, own_folds in _rows(rec):  # per-fold/subject spread: the CNN's own
            fold = (f"{top['cv/fold_mean_balanced_accuracy']:.3f} ± "
                    f"{top.get('cv/fold_std_balanced_accuracy', float('nan')):.3f}"
                    if own_folds and "cv/fold_mean_balanced_accuracy" in top else "-")
            worst = (f"{top['cv/subject_accuracy_min']:.3f}"
                     if own_folds and "cv/subject_accuracy_min" in top else "-")
            cell = m.get("balanced_accuracy_cell_ci_low")
            cell_text = (f"[{cell:.3f}, {m['balanced_accuracy_cell_ci_high']:.3f}]"
                         if cell is not None else "-")
            lines.append("| " + " | ".join([
                label, rec["scheme"],
                f"{int(m.get('n_subjects__all', 0))} / {int(m.get('n_subjects__hem', 0))}",
                _ci(m, "balanced_accuracy"), _ci(m, "roc_auc"), _ci(m, "accuracy"), cell_text,
                fold, worst]) + " |")
    return "\n".join(lines) + "\n"


def runs(records: list[dict[str, Any]]) -> str:
    lines = ["| Variant | Command | Started (UTC) | Wall (s) | 1-min load before / after |",
             "|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['variant']} | `{r['command']}` | {r['started_utc']} | "
                     f"{r['wall_s']:.0f} | {r['load_1min_before']:.1f} / "
                     f"{r['load_1min_after']:.1f} |")
    return "\n".join(lines) + "\n"


def main(paths: list[str]) -> int:
    records = [json.loads(Path(p).read_text()) for p in paths if not p.endswith(".cv.json")]
    print(table(records))
    print(runs(records))
    for r in records:
        for note in r.get("notes", []):
            print(f"- {r['variant']}: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
