"""Drift of a batch against the champion's training rows: it must see a stain change, not noise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.unit.test_validation import _row
from training.config import load_config
from training.data.drift import FEATURES, _features, drift_score, threshold_for
from training.data.validation import prepare_frame, run_suite
from training.dev.synth import make_cell_batch


def _restained(files: list[Path], dest: Path, gain: tuple[float, float, float]) -> list[Path]:
    """The same cells with the colour balance of another stain/scanner (per-channel gain)."""
    out = []
    for f in files:
        px = np.asarray(Image.open(f).convert("RGB"), dtype=np.float64) * np.array(gain)
        target = dest / f.name
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(px, 0, 255).astype(np.uint8)).save(target)
        out.append(target)
    return out


@pytest.fixture(scope="module")
def features(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    root = tmp_path_factory.mktemp("drift")
    reference = make_cell_batch(root / "ref", n_subjects_per_class=3, images_per_subject=10,
                                size=64, seed=1)
    fresh = make_cell_batch(root / "fresh", n_subjects_per_class=2, images_per_subject=10,
                            size=64, seed=2)
    shifted = _restained(fresh, root / "shifted", (1.15, 0.95, 0.85))
    return {name: _features([str(p) for p in files]) for name, files in
            (("reference", reference), ("fresh", fresh), ("shifted", shifted))}


def test_a_restained_batch_drifts_and_a_fresh_one_of_the_same_source_does_not(features) -> None:
    # the fixed threshold (drift_threshold_mode: fixed; the calibrated rule's floor): the score
    # itself still orders a fresh batch below a restained one and sees what moved
    threshold = load_config().validation.drift_threshold
    fresh = drift_score(features["reference"], features["fresh"])
    shifted = drift_score(features["reference"], features["shifted"])
    assert fresh["score"] < threshold < shifted["score"]
    assert shifted["p_value"] < 0.01 < fresh["p_value"]
    # what moved is the colour: the blue mean falls, red rises, size does not move at all
    assert shifted["shift"]["mean_B"] < 0 < shifted["shift"]["mean_R"]
    assert shifted["shift"]["log_width"] == pytest.approx(0.0)
    assert features["reference"].shape[1] == len(FEATURES)


def test_too_few_images_are_refused_not_scored(features) -> None:
    with pytest.raises(ValueError, match="at least 2"):
        drift_score(features["reference"], features["fresh"][:1])


def test_drift_is_a_batch_warning_in_the_suite_never_a_quarantine(tmp_path: Path) -> None:
    cfg = load_config(home=tmp_path, validation={"drift_threshold": 0.1})
    rows = [_row(f"g{i}.png", label="all" if i % 2 else "hem") for i in range(6)]
    drifted = prepare_frame(pd.DataFrame(rows).assign(drift_score=0.4), cfg)
    out = run_suite(cfg, drifted, run_name="drifted")
    assert out.soft_failures == ["drift"]
    assert all(not r for r in out.reasons.values()) and out.table_failures == []
    assert all(not w for w in out.warnings.values())  # said once, of the batch, not per file
    same = run_suite(cfg, prepare_frame(pd.DataFrame(rows).assign(drift_score=0.02), cfg),
                     run_name="same")
    assert same.soft_failures == []
    # not measured (no champion yet): nothing is checked, nothing is claimed
    unmeasured = run_suite(cfg, prepare_frame(pd.DataFrame(rows), cfg), run_name="none")
    assert unmeasured.soft_failures == []
    entry = next(e for e in out.expectations if e["reason"] == "drift")
    assert entry["severity"] == "warning" and entry["level"] == "batch"


# ---------------------------------------------------------------- the calibrated threshold
def _subject(path: Path) -> str:
    return path.name.split("_")[1]  # UID_<subject>_<image>_<cell>_<label>


@pytest.fixture(scope="module")
def patients(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A reference of 8 synthetic patients (each its own tint: synth's per-subject colour
    offset), one new ALL patient of the same generator, and that patient under another stain."""
    root = tmp_path_factory.mktemp("patients")
    ref = make_cell_batch(root / "ref", n_subjects_per_class=4, images_per_subject=10, size=64,
                          seed=1)
    new = [f for f in make_cell_batch(root / "new", n_subjects_per_class=1,
                                      images_per_subject=16, size=64, seed=2)
           if f.parent.name == "all"]
    stained = _restained(new, root / "stained", (1.3, 0.9, 0.75))
    return {"reference": _features([str(p) for p in ref]),
            "subjects": [_subject(p) for p in ref], "labels": [p.parent.name for p in ref],
            "new": _features([str(p) for p in new]),
            "stained": _features([str(p) for p in stained]),
            "batch_labels": ["all"] * len(new)}


def _threshold(cfg, patients: dict, batch: np.ndarray, keep: int | None = None):
    subjects = np.array(patients["subjects"])
    rows = np.isin(subjects, sorted(set(subjects))[:keep]) if keep else np.ones(len(subjects),
                                                                                  bool)
    return threshold_for(cfg, patients["reference"][rows], subjects[rows],
                         np.array(patients["labels"])[rows], n_batch=len(batch),
                         batch_subjects=1, batch_labels=patients["batch_labels"])


def test_a_new_patient_of_the_same_source_is_below_the_calibrated_threshold(patients) -> None:
    cfg = load_config()  # the shipped default: calibrated, floor 0.1
    assert cfg.validation.drift_threshold_mode == "calibrated"
    score = drift_score(patients["reference"], patients["new"])["score"]
    threshold, mode, how = _threshold(cfg, patients, patients["new"])
    assert mode == "calibrated" and how["n_subjects"] == 8 and how["n_splits"] == 200
    # the fix: a fixed 0.1 flagged one new patient of the very generator the reference came
    # from (one patient is one tint and one class, which 8 mixed patients are not) ...
    assert score > cfg.validation.drift_threshold
    # ... when the reference's own patients, one held out at a time, are that far from the
    # rest too: the typical split alone is past 0.1, the new patient is below the threshold
    assert how["null_median"] > cfg.validation.drift_threshold and score < threshold
    assert threshold == pytest.approx(how["null_quantile"] * how["margin"])
    assert how["split_subjects"] == 1 and how["split_images"][1] <= len(patients["new"])


def test_another_stain_is_above_the_calibrated_threshold(patients) -> None:
    threshold, mode, _ = _threshold(load_config(), patients, patients["stained"])
    shifted = drift_score(patients["reference"], patients["stained"])
    assert mode == "calibrated" and shifted["score"] > threshold
    same = drift_score(patients["reference"], patients["new"])["shift"]
    assert shifted["shift"]["mean_R"] > same["mean_R"]
    assert shifted["shift"]["mean_B"] < same["mean_B"]


def test_too_few_subjects_fall_back_to_the_fixed_threshold_and_say_so(patients) -> None:
    cfg = load_config(validation={"drift_threshold": 0.25})
    threshold, mode, how = _threshold(cfg, patients, patients["new"], keep=3)
    assert (threshold, mode, how["threshold"]) == (0.25, "fixed_fallback", None)
    assert how["n_subjects"] == 3 and "fewer than" in how["note"]
    # rows without any subject are no subjects at all: no split, same fallback
    _, mode, how = threshold_for(cfg, patients["reference"], [""] * len(patients["reference"]),
                                 n_batch=10)
    assert mode == "fixed_fallback" and how["n_subjects"] == 0
    # and the fixed mode never calibrates
    fixed = load_config(validation={"drift_threshold_mode": "fixed"})
    assert _threshold(fixed, patients, patients["new"])[:2] == (0.1, "fixed")


def test_the_calibrated_floor_is_drift_threshold(patients) -> None:
    cfg = load_config(validation={"drift_threshold": 50.0})
    threshold, mode, how = _threshold(cfg, patients, patients["new"])
    assert mode == "calibrated" and how["threshold"] < threshold == 50.0


def test_the_suite_reads_the_batch_own_threshold(tmp_path: Path) -> None:
    cfg = load_config(home=tmp_path)
    rows = [_row(f"g{i}.png", label="all" if i % 2 else "hem") for i in range(6)]
    calibrated = pd.DataFrame(rows).assign(drift_score=0.4, drift_threshold=0.6)
    assert run_suite(cfg, prepare_frame(calibrated, cfg), run_name="within").soft_failures == []
    tight = calibrated.assign(drift_threshold=0.3)
    assert run_suite(cfg, prepare_frame(tight, cfg), run_name="beyond").soft_failures == ["drift"]
