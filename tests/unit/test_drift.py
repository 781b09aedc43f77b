"""Drift of a batch against the champion's training rows: it must see a stain change, not noise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.unit.test_validation import _row
from training.config import load_config
from training.data.drift import FEATURES, _features, drift_score
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
    threshold = load_config().validation.drift_threshold  # the shipped default
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
