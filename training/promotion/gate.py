"""The promotion gate: the verdict on one candidate, with its reasons (TFX's blessing).

Floors first (the gated metric; for classifiers the hand-crafted baseline measured on the same
rows, :func:`beats_baseline`; and enough test subjects per class for the figures to be about
patients), then non-regression against the champion scored on the same test rows. What metric
and floor apply comes from the family table (:mod:`training.families`), their values from the
config. The verdict is pure: registering and moving aliases is
:mod:`training.promotion.aliases`' job.
"""

from __future__ import annotations

from training.config import Config
from training.families import BASELINE_ARCHITECTURE, get_family
from training.records import Candidate

__all__ = ["beats_baseline", "gate"]


def gate(cfg: Config, candidate: Candidate) -> tuple[bool, list[str]]:
    """Floors first, then non-regression against the champion scored on the same test set."""
    family = get_family(candidate.family)
    metric, floor = family.gate_metric(cfg), family.gate_floor(cfg)
    if metric not in candidate.metrics:
        return False, [f"candidate has no metric '{metric}' (has {sorted(candidate.metrics)})"]
    value = candidate.metrics[metric]
    reasons = []
    ok = value >= floor
    reasons.append(f"{metric}={value:.4f} {'>=' if ok else '<'} floor {floor:.4f}")
    enough, subject_reasons = _subjects(cfg, candidate)
    ok = ok and enough
    reasons.extend(subject_reasons)
    above, why = beats_baseline(cfg, metric, candidate)
    ok = ok and above
    reasons.extend(why)
    champ = candidate.champion_metrics
    if candidate.champion_version is None or champ is None:
        reasons.append("no champion yet: the first version that passes the floor becomes champion")
        return ok, reasons
    if metric not in champ:
        return False, reasons + [f"champion v{candidate.champion_version} has no '{metric}'"]
    allowed = champ[metric] - cfg.gate.max_regression
    better = value >= allowed
    reasons.append(
        f"{metric}={value:.4f} {'>=' if better else '<'} champion v{candidate.champion_version} "
        f"{champ[metric]:.4f} - allowed regression {cfg.gate.max_regression:.4f} "
        f"(same test set {candidate.test_set_sha256[:12]}, split {candidate.split_kind})"
    )
    reasons.extend(_significance(metric, candidate.metrics, champ))
    paired_ok, paired = _paired(cfg, metric, candidate)
    reasons.extend(paired)
    return ok and better and paired_ok, reasons


def _subjects(cfg: Config, candidate: Candidate) -> tuple[bool, list[str]]:
    """How many patients the test figures rest on, per class; too few refuse the candidate
    unless ``gate.allow_few_subjects``. Candidates whose rows name no subjects report none."""
    prefix = "n_subjects_test__"
    counts = {k[len(prefix):]: int(v) for k, v in candidate.metrics.items()
              if k.startswith(prefix)}
    if not counts:
        return True, []
    need = cfg.gate.min_test_subjects_per_class
    listed = ", ".join(f"{c}: {n}" for c, n in sorted(counts.items()))
    few = sorted(c for c, n in counts.items() if n < need)
    if not few:
        return True, [f"test subjects per class ({listed}) >= minimum {need}"]
    text = (f"test subjects per class ({listed}): class(es) {', '.join(few)} below the minimum "
            f"{need}, so the test figures rest on too few patients to promote on")
    if cfg.gate.allow_few_subjects:
        return True, [text + " (allowed: gate.allow_few_subjects is on)"]
    return False, [text + " (gate.min_test_subjects_per_class)"]


def beats_baseline(cfg: Config, metric: str, candidate: Candidate) -> tuple[bool, list[str]]:
    """``gate.must_beat_baseline``: the candidate's gated metric must be above the hand-crafted
    baseline's, fitted on its train rows and scored on its test rows (``baseline/<metric>``).

    Classifiers only (detectors have no such baseline), and not the baseline itself. Every
    classifier trained with ``classifier.baseline`` on carries the measurement; one without
    it (the option off, or a record made elsewhere) passes this rule, and the reasons say
    that it was not measured.
    """
    if candidate.family != "classifier" or candidate.architecture == BASELINE_ARCHITECTURE:
        return True, []
    key = f"baseline/{metric}"
    if key not in candidate.metrics:
        return True, [f"hand-crafted baseline not measured on these rows (no '{key}'): "
                      "gate.must_beat_baseline not applied"]
    value, base = candidate.metrics[metric], candidate.metrics[key]
    above = value > base
    text = (f"{metric}={value:.4f} {'>' if above else '<='} hand-crafted baseline {base:.4f} "
            "on the same test rows")
    if not cfg.gate.must_beat_baseline:
        return True, [text + " (informational: gate.must_beat_baseline is off)"]
    return above, [text]


def _paired(cfg: Config, metric: str, candidate: Candidate) -> tuple[bool, list[str]]:
    """The paired test on the same rows: reported always, a condition when enabled."""
    keys = [f"paired_{metric}_{k}" for k in ("delta", "delta_ci_low", "delta_ci_high",
                                             "n_units")]
    if not all(k in candidate.metrics for k in keys):
        if cfg.gate.require_paired_improvement:
            return False, [f"the paired test is required but the candidate has no "
                           f"paired_{metric}_* metrics (no champion predictions on its rows)"]
        return True, []
    delta, low, high, units = (candidate.metrics[k] for k in keys)
    text = (f"paired {metric} difference vs champion v{candidate.champion_version} on the same "
            f"{units:.0f} resampling units: {delta:+.4f} [95% CI {low:+.4f}, {high:+.4f}]")
    if not cfg.gate.require_paired_improvement:
        return True, [text + " (informational: gate.require_paired_improvement is off)"]
    need = cfg.gate.min_improvement
    passed = low > need
    return passed, [text + (f"; lower end {'>' if passed else '<='} required "
                            f"improvement {need:+.4f}")]


def _significance(metric: str, cand: dict[str, float], champ: dict[str, float]) -> list[str]:
    """Say whether the bootstrap 95 % CIs of candidate and champion overlap (informational:
    with a small test set most differences are noise, and the reviewer should see that)."""
    keys = (f"{metric}_ci_low", f"{metric}_ci_high")
    if not all(k in cand and k in champ for k in keys):
        return []
    a, b = (cand[k] for k in keys)
    c, d = (champ[k] for k in keys)
    overlap = a <= d and c <= b
    verdict = "overlap: the difference is not significant" if overlap else \
        "do not overlap: the difference is significant"
    return [f"95% CIs candidate [{a:.3f}, {b:.3f}] vs champion [{c:.3f}, {d:.3f}] {verdict}"]
