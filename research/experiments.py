"""Real-data classifier experiments: a public dataset, through the platform, against baselines.

One call of :func:`run_experiment` does what a reader of the papers wants to check:

1. land the dataset folder as a batch in a throw-away ``LEUKOFLOW_HOME`` (file-by-file
   symlinks plus ``_READY``: nothing is copied, nothing written beside the data) and run the
   real validation stage on it (:func:`training.data.curation.validate_batch`), with the split
   level asked for (``subject`` or the papers' ``image``);
2. measure the split instead of trusting it: images and subjects per split and class, and
   which test subjects also sit in train/val (the leak an image-level split makes);
3. train each architecture through ``python -m training.classifier.train`` (TensorFlow only ever in
   child processes; this process imports neither TF nor torch);
4. score the majority-class baseline on the same test rows;
5. run the deep-features + classical sweep (``python -m training.classifier.features``) on the first
   trained model's backbone, plus grouped k-fold CV;
6. write the papers' comparison table (:func:`training.evaluation.metrics.save_comparison`), a
   markdown report with every CI, and ``experiment.json``; log them to a parent MLflow run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from training.classifier.architectures import resolve_hparams
from training.classifier.features import measured_split_kind, sweep_markdown
from training.config import Config, load_config
from training.dev.localenv import cpu_model
from training.errors import ConfigError, DataValidationError, TrainingError
from training.records import Candidate

__all__ = [
    "DATASETS", "DEFAULT_CV_NAMES", "DEFAULT_DATA_ROOT", "DatasetSpec", "curate",
    "experiment_config", "land_folder", "majority_row", "report_markdown", "run_experiment",
    "split_summary",
]

log = logging.getLogger("leukoflow.experiments")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA_ROOT = REPO.parent / "shared" / "data"
DEFAULT_CV_NAMES = ("logistic_regression", "xgboost")  # 10 folds of every classifier cost much

CNMC_CITATION = (
    "C-NMC 2019 (ISBI challenge), training fold 1 sample; CC BY 3.0 (TCIA). Gupta, Gehlot, "
    "Gupta, 'C-NMC: B-lineage acute lymphoblastic leukaemia: a blood cancer dataset', "
    "Med. Eng. Phys. 103 (2022)")
ALL4_CITATION = (
    "Taleghani Hospital ALL peripheral-blood-smear set (Aria et al.), as published by its "
    "authors (Kaggle 'Acute Lymphoblastic Leukemia (ALL) image dataset'); no subject ids")


@dataclass(frozen=True)
class DatasetSpec:
    """A public dataset: its folder under the data root and the task it defines."""

    name: str
    folder: str
    data: dict[str, Any]  # the ``data`` config section for this task
    citation: str
    paper_accuracy: float | None = None  # what Batool & Byun report on it (image-level split)


DATASETS: dict[str, DatasetSpec] = {
    "cnmc_fold1": DatasetSpec(
        "cnmc_fold1", "cnmc_fold1",
        {"task": "binary", "classes": ["all", "hem"], "positive_class": "all"},
        CNMC_CITATION, paper_accuracy=0.9931),
    "all_4class": DatasetSpec(
        "all_4class", "all_4class",
        {"task": "multiclass", "classes": ["Benign", "Early", "Pre", "Pro"],
         "positive_class": None},
        ALL4_CITATION, paper_accuracy=0.9681),
}


@dataclass
class _Clock:
    """Wall time of each stage, in seconds."""

    times: dict[str, float] = field(default_factory=dict)

    def measure(self, name: str) -> _Timer:
        return _Timer(self, name)


class _Timer:
    def __init__(self, clock: _Clock, name: str) -> None:
        self.clock, self.name = clock, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.clock.times[self.name] = round(time.perf_counter() - self.start, 2)


# ------------------------------------------------------------------------------ config
def experiment_config(
    home: Path, spec: DatasetSpec, split_level: str, architectures: Sequence[str], *,
    image_size: int | None = None, epochs: int | None = None, batch_size: int | None = None,
) -> Config:
    """The resolved config of one experiment; ``None`` keeps the architecture's default."""
    classifier: dict[str, Any] = {"architectures": list(architectures)}
    for key, value in {"image_size": image_size, "epochs": epochs,
                       "batch_size": batch_size}.items():
        if value is not None:
            classifier[key] = value
    return load_config(home=Path(home), data=dict(spec.data), split={"level": split_level},
                       classifier=classifier)


def _write_config(cfg: Config) -> Path:
    """The config as YAML under home: child processes read exactly this (LEUKOFLOW_CONFIG)."""
    path = cfg.home / "experiment.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.dump(), sort_keys=False))
    return path


def _child_env(config_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEUKOFLOW_")}
    return {**env, "LEUKOFLOW_CONFIG": str(config_path), "TF_CPP_MIN_LOG_LEVEL": "2",
            "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


def _run_child(cmd: list[str], env: dict[str, str], label: str) -> None:
    """Run a module in a child process, streaming its output into our log."""
    log.info("starting %s", " ".join(cmd))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        log.info("[%s] %s", label, line.rstrip())
        tail = (tail + [line.rstrip()])[-25:]
    if proc.wait() != 0:
        raise TrainingError(f"{label} exited with {proc.returncode}; last lines:\n"
                            + "\n".join(tail))


# ------------------------------------------------------------------------------ data
def land_folder(cfg: Config, source: Path, batch_id: str) -> Path:
    """``landing/<batch_id>/`` made of symlinks to ``source``'s files, marker written last.

    The landing store must be a local folder; the dataset itself is never copied or touched.
    """
    from training.data.batches import check_batch_id

    check_batch_id(batch_id)
    if cfg.storage.landing_uri and not cfg.storage.landing_uri.startswith("file://"):
        raise ConfigError(f"experiments land by symlink: storage.landing_uri must be a local "
                          f"folder, got {cfg.storage.landing_uri!r}")
    source = Path(source).resolve()
    if not source.is_dir():
        raise DataValidationError(f"dataset folder {source} does not exist")
    dest = Path(cfg.uri("landing").removeprefix("file://")) / batch_id
    if (dest / "_READY").exists():
        return dest
    for dirpath, dirnames, files in os.walk(source):
        dirnames.sort()
        for name in sorted(files):
            src = Path(dirpath, name)
            link = dest / src.relative_to(source)
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.is_symlink():
                link.symlink_to(src)
    (dest / "_READY").write_bytes(b"")
    return dest


def curate(cfg: Config, source: Path, batch_id: str) -> tuple[dict[str, Any], int]:
    """Land + validate (idempotent); returns the verdict and the curated dataset version.

    A home curated earlier at another split level is refused: one home, one split level.
    """
    from training.data.curation import validate_batch
    from training.data.dataset import load_manifest

    land_folder(cfg, source, batch_id)
    result = validate_batch(cfg, batch_id)
    if result.status != "accepted":
        raise DataValidationError(f"batch {batch_id} was {result.status}: {result.message} "
                                  f"(report: {result.report_dir})")
    df, ds = load_manifest(cfg)
    has_subject = df["subject_id"].fillna("").astype(str).str.strip() != ""
    by_image = df["split_group"].str.startswith("image:")
    if cfg.split.level == "subject" and (has_subject & by_image).any():
        raise ConfigError(f"{cfg.home} was curated with an image-level split; use a fresh "
                          "--home for a subject-level experiment")
    if cfg.split.level == "image" and df["split_group"].str.startswith("subject:").any():
        raise ConfigError(f"{cfg.home} was curated with a subject-level split; use a fresh "
                          "--home for an image-level experiment")
    return result.to_dict(), ds.version


def _labelled(cfg: Config, version: int) -> pd.DataFrame:
    from training.data.dataset import load_manifest

    df, _ = load_manifest(cfg, version)
    return df[(df["kind"] == "cell") & df["label"].isin(cfg.data.classes)].reset_index(drop=True)


def split_summary(cfg: Config, version: int) -> dict[str, Any]:
    """Images and subjects per split and class, and the subjects a split leaks across."""
    cells = _labelled(cfg, version)
    subjects = cells["subject_id"].fillna("").astype(str).str.strip()
    out: dict[str, Any] = {"split_kind": measured_split_kind(cells),
                           "split_level": cfg.split.level, "n": {}, "subjects": {}}
    for split in ("train", "val", "test"):
        part = cells["split"] == split
        out["n"][split] = {c: int((part & (cells["label"] == c)).sum()) for c in cfg.data.classes}
        out["subjects"][split] = {
            c: sorted(set(subjects[part & (cells["label"] == c)]) - {""})
            for c in cfg.data.classes}
    test = cells["split"] == "test"
    seen = set(subjects[~test]) - {""}
    leaked = sorted(set(subjects[test]) & seen)
    out["test_subjects_also_in_train_val"] = leaked
    with_subject = test & (subjects != "")
    out["test_images_with_subject"] = int(with_subject.sum())
    out["test_images_of_leaked_subjects"] = int((test & subjects.isin(leaked)).sum())
    out["n_test"] = int(test.sum())
    return out


def majority_row(cfg: Config, version: int) -> dict[str, Any]:
    """The majority-class baseline on the experiment's test rows, with bootstrap CIs."""
    from training.evaluation.metrics import (
        classification_metrics,
        majority_baseline,
        subject_groups,
    )

    cells = _labelled(cfg, version)
    classes = list(cfg.data.classes)
    index = {c: i for i, c in enumerate(classes)}
    y = cells["label"].map(index).to_numpy(dtype=np.int64)
    train, test = (cells["split"] == "train").to_numpy(), (cells["split"] == "test").to_numpy()
    base = majority_baseline(y[train], y[test], classes)
    constant = np.zeros((int(test.sum()), len(classes)))
    constant[:, int(base["majority_class_index"])] = 1.0
    positive = cfg.data.positive_class if len(classes) == 2 else None
    metrics = classification_metrics(y[test], constant, classes, positive,
                                     groups=subject_groups(cells[test]))
    for key in ("accuracy", "balanced_accuracy", "f1_macro"):  # two routes, one answer
        if not math.isclose(metrics[key], base[key], abs_tol=1e-12):
            raise TrainingError(f"majority baseline disagrees with itself on {key}")
    return {"architecture": "majority-class baseline", "split_kind": measured_split_kind(cells),
            "majority_class": classes[int(base["majority_class_index"])],
            "trainable_params": 0, **metrics}


# ------------------------------------------------------------------------------ children
def _train(config_path: Path, architecture: str, version: int, parent_run_id: str,
           work: Path) -> Candidate:
    out = work / f"candidate-{architecture}.json"
    _run_child([sys.executable, "-m", "training.classifier.train", "--architecture", architecture,
                "--dataset-version", str(version), "--parent-run-id", parent_run_id,
                "--tags-json", json.dumps({"leukoflow_role": "experiment"}), "--out", str(out)],
               _child_env(config_path), f"train {architecture}")
    return Candidate.from_dict(json.loads(out.read_text()))


def _features(config_path: Path, candidate: Candidate, version: int, parent_run_id: str,
              names: Sequence[str] | None, cv_k: int, cv_names: Sequence[str] | None,
              work: Path) -> dict[str, Any]:
    out = work / "features.json"
    cmd = [sys.executable, "-m", "training.classifier.features",
           "--architecture", candidate.architecture,
           "--model", candidate.model_uri, "--dataset-version", str(version),
           "--parent-run-id", parent_run_id, "--cv-k", str(cv_k), "--out", str(out)]
    if names:
        cmd += ["--names", ",".join(names)]
    if cv_names:
        cmd += ["--cv-names", ",".join(cv_names)]
    _run_child(cmd, _child_env(config_path), "features")
    return json.loads(out.read_text())


# ------------------------------------------------------------------------------ report
def _ci(metrics: dict[str, Any], key: str) -> str:
    value = metrics.get(key)
    if value is None or not math.isfinite(float(value)):
        return "-"
    low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    if low is None or not math.isfinite(float(low)):
        return f"{value:.3f}"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def _detail_table(rows: list[dict[str, Any]]) -> str:
    head = ["Model", "Split", "n test", "Accuracy", "Balanced accuracy", "F1 macro", "ROC AUC"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        lines.append("| " + " | ".join([
            str(r["architecture"]), str(r.get("split_kind")), f"{int(r.get('n_test') or 0)}",
            _ci(r, "accuracy"), _ci(r, "balanced_accuracy"), _ci(r, "f1_macro"),
            _ci(r, "roc_auc")]) + " |")
    return "\n".join(lines) + "\n"


def _cv_table(cv: list[dict[str, Any]]) -> str:
    head = ["Classifier", "Folds", "Rows", "Groups", "Accuracy", "Balanced accuracy",
            "ROC AUC", "F1 macro"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]

    def ms(r: dict[str, Any], key: str) -> str:
        mean, std = r.get(f"{key}_mean"), r.get(f"{key}_std")
        if mean is None or not math.isfinite(float(mean)):
            return "-"
        return f"{mean:.3f} ± {std:.3f}" if std is not None and math.isfinite(std) else \
            f"{mean:.3f}"

    for r in cv:
        lines.append("| " + " | ".join([
            str(r["classifier"]), f"{int(r['k_used'])} ({r['cv_kind']}-grouped)",
            f"{r['cv_rows']} ({int(r['n_rows'])})", str(int(r["n_groups"])),
            ms(r, "accuracy"), ms(r, "balanced_accuracy"), ms(r, "roc_auc"),
            ms(r, "f1_macro")]) + " |")
    return "\n".join(lines) + "\n"


def _split_text(res: dict[str, Any]) -> list[str]:
    s = res["split"]
    lines = [f"- Split: level `{s['split_level']}` asked, measured kind **{s['split_kind']}**; "
             f"images train/val/test = " + " / ".join(
                 str(sum(s["n"][p].values())) for p in ("train", "val", "test"))
             + "; test per class " + ", ".join(f"{c} {n}" for c, n in s["n"]["test"].items())]
    subj = s["subjects"]
    if any(subj["test"].values()):
        lines.append("- Test subjects per class: " + "; ".join(
            f"{c}: {len(v)} ({', '.join(v)})" for c, v in subj["test"].items()))
        lines.append(f"- Test subjects that also have train/val images: "
                     f"{len(s['test_subjects_also_in_train_val'])} "
                     f"({s['test_images_of_leaked_subjects']} of {s['n_test']} test images)")
        thin = [c for c, v in subj["test"].items() if len(v) <= 1]
        if s["split_kind"] == "subject" and thin:
            lines.append(f"- Caution: class(es) {thin} have at most one subject in the test "
                         "split: their test scores describe that one donor, not the class.")
    else:
        lines.append("- No subject ids: the split is by image (duplicates were quarantined by "
                     "validation, near-duplicates checked against the test split).")
    return lines


def report_markdown(res: dict[str, Any]) -> str:
    """The experiment as markdown: context, comparison, every CI, CV, timings."""
    feats = res.get("features") or {}
    out = [f"## {res['dataset']} - {res['split']['split_kind']}-level split", "",
           f"- Data: {res['citation']}",
           f"- Validation: {res['validation']['images']} images, "
           f"{res['validation']['accepted']} accepted, {res['validation']['quarantined']} "
           f"quarantined {res['validation']['reasons']}",
           *_split_text(res),
           f"- Settings: {', '.join(res['architectures'])}; image size "
           f"{res['settings']['image_size']}, epochs {res['settings']['epochs']}, batch "
           f"{res['settings']['batch_size']}, weights {res['settings']['weights']}",
           f"- Machine: {res['machine']['cpu_model']}, {res['machine']['cpus']} CPUs (shared; "
           f"1-min load {res['machine']['load_before']} before, {res['machine']['load_after']} "
           f"after), {res['date']}", "",
           "### Comparison (the papers' table shape)", "", res["comparison_md"].strip(), "",
           "### All metrics with bootstrap 95 % CIs", "", _detail_table(res["rows"]).strip()]
    if feats:
        out += ["", f"### Deep features + classical classifiers ({feats['feature_dim']}-d, "
                    f"layer `{feats['feature_layer']}`)", "",
                f"Feature source: {feats['feature_source']}" + (
                    " (trained above on this train split: with no ImageNet weights offline "
                    "there is no independent backbone; grouped CV therefore uses only the rows "
                    "it never trained on)." if feats.get("backbone_saw_train") else "."), "",
                sweep_markdown(pd.DataFrame(feats["sweep"])).strip()]
        if feats.get("grouped_cv"):
            out += ["", "Grouped k-fold CV (mean ± std over folds):", "",
                    _cv_table(feats["grouped_cv"]).strip()]
        if feats.get("cv_note"):
            out += ["", f"Note: {feats['cv_note']}"]
    out += ["", "### Wall times (s)", "", "| stage | seconds |", "|---|---|"]
    out += [f"| {k} | {v:.1f} |" for k, v in res["timings"].items()]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------ front door
def run_experiment(
    spec: DatasetSpec,
    *,
    home: Path,
    split_level: str = "subject",
    architectures: Sequence[str] = ("lightweight_efficientnet_b3",),
    image_size: int | None = 64,
    epochs: int | None = 3,
    batch_size: int | None = None,
    source: Path | None = None,
    sweep_names: Sequence[str] | None = None,
    cv_k: int = 10,
    cv_names: Sequence[str] | None = DEFAULT_CV_NAMES,
    out_dir: Path | None = None,
) -> dict[str, Any]:
    """Validate, train, baseline, sweep and compare on one dataset; returns the result dict.

    ``source`` defaults to ``DEFAULT_DATA_ROOT / spec.folder``. Everything lands under
    ``home`` (a throw-away ``LEUKOFLOW_HOME``); the report files under ``out_dir``
    (default ``home/experiment``).
    """
    import mlflow

    from training.evaluation.metrics import save_comparison
    from training.tracking import configure_mlflow

    if not architectures:
        raise ConfigError("run_experiment needs at least one architecture")
    source = Path(source or DEFAULT_DATA_ROOT / spec.folder)
    home = Path(home).resolve()
    out_dir = Path(out_dir or home / "experiment")
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = experiment_config(home, spec, split_level, architectures, image_size=image_size,
                            epochs=epochs, batch_size=batch_size)
    hp = resolve_hparams(cfg, architectures[0])  # a bad name or size fails before any work
    config_path = _write_config(cfg)
    clock = _Clock()
    load_before = round(os.getloadavg()[0], 2)
    started = datetime.now(UTC)
    with clock.measure("total"):
        with clock.measure("validate + curate"):
            validation, version = curate(cfg, source, spec.name)
        split = split_summary(cfg, version)
        if split_level == "subject" and split["test_subjects_also_in_train_val"]:
            raise DataValidationError(
                f"subject-level split leaks subjects {split['test_subjects_also_in_train_val']}")
        experiment_id = configure_mlflow(cfg)
        tags = {"leukoflow_role": "experiment", "dataset": spec.name,
                "split_kind": split["split_kind"], "dataset_version": str(version)}
        with mlflow.start_run(experiment_id=experiment_id, tags=tags,
                              run_name=f"experiment {spec.name} {split['split_kind']}") as run:
            parent = run.info.run_id
            candidates = []
            with tempfile.TemporaryDirectory(prefix="leukoflow-exp-") as tmp:
                for arch in architectures:
                    with clock.measure(f"train {arch} (child process)"):
                        candidates.append(_train(config_path, arch, version, parent, Path(tmp)))
                with clock.measure("majority baseline"):
                    baseline = majority_row(cfg, version)
                with clock.measure("deep features + sweep + CV (child process)"):
                    feats = _features(config_path, candidates[0], version, parent, sweep_names,
                                      cv_k, cv_names, Path(tmp))
            rows = _comparison_rows(candidates, baseline, feats, split)
            files = save_comparison(rows, out_dir)
            result = {
                "dataset": spec.name, "citation": spec.citation,
                "paper_accuracy": spec.paper_accuracy, "source": str(source),
                "home": str(home), "dataset_version": version, "parent_run_id": parent,
                "architectures": list(architectures), "validation": validation,
                "split": split, "candidates": [c.to_dict() for c in candidates],
                "baseline": baseline, "features": feats, "rows": rows,
                "comparison_md": (out_dir / "comparison.md").read_text(),
                "settings": {"image_size": hp["image_size"], "epochs": hp["epochs"],
                             "batch_size": hp["batch_size"], "weights": hp["weights"],
                             "optimizer": hp["optimizer"], "sweep_names": sweep_names,
                             "cv_k": cv_k, "cv_names": list(cv_names or [])},
                "date": started.strftime("%Y-%m-%d %H:%M UTC"),
            }
            mlflow.log_metrics({f"baseline/{k}": float(v) for k, v in baseline.items()
                                if isinstance(v, float) and math.isfinite(v)})
    result["timings"] = clock.times
    result["machine"] = {"cpu_model": cpu_model(), "cpus": os.cpu_count(),
                         "load_before": load_before, "load_after": round(os.getloadavg()[0], 2),
                         "python": platform.python_version()}
    report = report_markdown(result)
    (out_dir / "experiment.md").write_text(report)
    (out_dir / "experiment.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    with mlflow.start_run(run_id=parent):
        for path in [*files, out_dir / "experiment.md", out_dir / "experiment.json"]:
            mlflow.log_artifact(str(path), artifact_path="comparison")
    result["files"] = [str(p) for p in files] + [str(out_dir / "experiment.md"),
                                                 str(out_dir / "experiment.json")]
    return result


def _comparison_rows(candidates: list[Candidate], baseline: dict[str, Any],
                     feats: dict[str, Any], split: dict[str, Any]) -> list[dict[str, Any]]:
    """Flat rows for ``save_comparison``: CNNs, the baseline, then each feature classifier.

    The split kind is the measured one; a candidate that labelled its split differently is
    corrected here and the disagreement logged.
    """
    rows: list[dict[str, Any]] = []
    for c in candidates:
        if c.split_kind != split["split_kind"]:
            log.warning("candidate %s says split_kind=%r but the measured split is %r "
                        "(test subjects also in train/val: %s): reporting the measured one",
                        c.architecture, c.split_kind, split["split_kind"],
                        split["test_subjects_also_in_train_val"])
        if int(c.metrics.get("n_test", -1)) != split["n_test"]:
            raise TrainingError(f"{c.architecture} was tested on {c.metrics.get('n_test')} rows,"
                                f" the manifest's test split has {split['n_test']}")
        rows.append({**c.metrics, "architecture": c.architecture,
                     "split_kind": split["split_kind"], "run_id": c.run_id,
                     "reported_split_kind": c.split_kind})
    rows.append(dict(baseline))
    for r in feats.get("sweep") or []:
        rows.append({**{k: v for k, v in r.items() if k not in ("fit_time_s",)},
                     "architecture": f"{r['backbone']} features + {r['classifier']}",
                     "split_kind": split["split_kind"], "train_time_s": r["fit_time_s"],
                     "n_test": r["n_test"]})
    return rows
