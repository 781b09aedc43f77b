"""The model families: one record per family, so that no other module branches on a family name.

What differs between the Keras cell classifier and the YOLO smear-field detector lives here,
in the spirit of Ultralytics' ``task_map`` and of the classifier's architecture table
(:mod:`training.classifier.architectures`): the registered model name and gate metric (as
config keys, so the YAML stays the one place for values), which manifest rows the family learns
from, the module that trains one candidate in a child process, the predict module that serving
and evaluation load, the MLflow pyfunc class, and the scorer of ``leukoflow evaluate``. Every
other module asks :func:`get_family` or iterates :data:`FAMILIES`.

Importing this module is cheap: module paths are strings, imported where they are used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from training.config import Config
from training.errors import ConfigError, RegistryError, lookup

__all__ = [
    "BASELINE_ARCHITECTURE", "FAMILIES", "Family", "family_of_model", "get_family",
    "read_logged_model",
]

# The classifier architecture that is the hand-crafted baseline (training.classifier.handcrafted):
# the gate's must_beat_baseline rule does not apply to the baseline itself.
BASELINE_ARCHITECTURE = "handcrafted_baseline"


@dataclass(frozen=True)
class Family:
    """One model family and every fact that differs per family."""

    name: str  # "classifier" | "detector": the Candidate's ``family`` and the MLflow run tag
    kind: str  # which manifest rows it learns from (``kind`` column): "cell" | "field"
    registered_name_key: str  # attribute of ``cfg.mlflow`` holding the registered model name
    gate_metric_key: str  # attribute of ``cfg.gate`` naming the gated metric
    gate_floor_key: str  # attribute of ``cfg.gate`` holding that metric's absolute floor
    higher_is_better: bool  # direction of the gated metric
    train_module: str  # ``python -m <train_module>`` trains one candidate (own process)
    predict_module: str  # load + preprocess + infer; what serving and evaluation import
    pyfunc: str  # "module:Class" of the logged MLflow pyfunc
    takes_architecture: bool  # whether the train entry takes ``--architecture`` (from the
    # list ``cfg.<name>.architectures``: the config section is named after the family)
    compare_architectures: bool  # log the papers' comparison table across candidates
    comparison: str  # "module:function" (rows, out_dir) -> paths: that table's writer
    route: str  # the HTTP route that serves it
    answer_fields: tuple[str, ...]  # what a good answer of that route holds (smoke test)
    evaluate: str  # "module:function" scoring a logged model on a labelled folder
    # (``leukoflow evaluate``; signature and result: training.external.Scored)
    count_metric: str  # the metric counting the scored images
    headline: tuple[str, ...]  # metrics an evaluation's version tag and CLI summary show
    intended_use: str = ""  # the model card's "intended use" (Mitchell et al.)
    out_of_scope: str = ""  # the model card's "out-of-scope use"

    def registered_name(self, cfg: Config) -> str:
        return str(getattr(cfg.mlflow, self.registered_name_key))

    def gate_metric(self, cfg: Config) -> str:
        return str(getattr(cfg.gate, self.gate_metric_key))

    def gate_floor(self, cfg: Config) -> float:
        return float(getattr(cfg.gate, self.gate_floor_key))

    def architectures(self, cfg: Config) -> list[str]:
        """The architectures a retrain trains side by side: ``<family>.architectures``."""
        return list(getattr(cfg, self.name).architectures) if self.takes_architecture else []

    def default_architecture(self, cfg: Config) -> str | None:
        """The architecture a run trains when none is named (None: the family has one model)."""
        return self.architectures(cfg)[0] if self.takes_architecture else None

    def better(self, a: float, b: float) -> bool:
        """Whether metric value ``a`` is at least as good as ``b``."""
        return a >= b if self.higher_is_better else a <= b

    def best_value(self) -> float:
        """The worst possible value, to rank candidates that lack the metric last."""
        return float("-inf") if self.higher_is_better else float("inf")

    @property
    def bento_arg(self) -> str:
        """Bento argument (``bentoml build --arg``) naming the BentoML model tag to serve."""
        return f"{self.name}_model"

    @property
    def bento_tag_env(self) -> str:
        """Environment variable naming that tag when no Bento argument is given."""
        return f"LEUKOFLOW_BENTO_{self.name.upper()}"


FAMILIES: dict[str, Family] = {
    "classifier": Family(
        name="classifier", kind="cell",
        registered_name_key="classifier_name",
        gate_metric_key="classifier_metric", gate_floor_key="classifier_floor",
        higher_is_better=True,
        train_module="training.classifier.train",
        predict_module="training.classifier.predict",
        pyfunc="training.classifier.pyfunc:KerasClassifierModel",
        takes_architecture=True, compare_architectures=True,
        comparison="training.evaluation.metrics:save_comparison",
        route="/classify", answer_fields=("label", "probabilities"),
        evaluate="training.classifier.external:score_folder", count_metric="n_test",
        headline=("balanced_accuracy", "accuracy", "f1_macro", "roc_auc", "ece", "n_subjects"),
        intended_use=(
            "Research and decision support: sort single segmented white-blood-cell images "
            "(C-NMC style crops) into the configured classes, as a second reader for a "
            "trained haematology professional who sees the probabilities and the Grad-CAM "
            "heatmap."),
        out_of_scope=(
            "Diagnosing a patient, or any use without a professional's review; whole smear "
            "fields or images that are not a single segmented cell; stains, scanners, "
            "magnifications or populations absent from the training batches; children vs "
            "adults or subtypes that the classes do not name."),
    ),
    "detector": Family(
        name="detector", kind="field",
        registered_name_key="detector_name",
        gate_metric_key="detector_metric", gate_floor_key="detector_floor",
        higher_is_better=True,
        train_module="training.detector.train",
        predict_module="training.detector.predict",
        pyfunc="training.detector.pyfunc:DetectorModel",
        takes_architecture=True, compare_architectures=True,
        comparison="training.evaluation.detection:save_detection_comparison",
        route="/detect", answer_fields=("boxes",),
        evaluate="training.detector.external:score_folder", count_metric="n_test_images",
        headline=("map50", "map50_95", "precision", "recall"),
        intended_use=(
            "Research and decision support: find and count white blood cells in a stained "
            "blood-smear field so that a professional can review them, or crop cells for the "
            "classifier."),
        out_of_scope=(
            "Counting for a clinical report without review; fields at magnifications, stains "
            "or resolutions absent from the training batches; telling cell types apart beyond "
            "the configured detector classes."),
    ),
}


def get_family(name: str) -> Family:
    """The family called ``name``; an unknown name gets the nearest valid one."""
    return lookup(FAMILIES, name, "model family")


def family_of_model(cfg: Config, registered_name: str) -> Family:
    """The family whose registered model is called ``registered_name``."""
    for family in FAMILIES.values():
        if family.registered_name(cfg) == registered_name:
            return family
    names = [f.registered_name(cfg) for f in FAMILIES.values()]
    raise ConfigError(f"'{registered_name}' is not a registered leukoflow model: "
                      f"valid names: {', '.join(names)}")


def read_logged_model(model_dir: Path, family: str, artifact: str) -> tuple[Path, dict]:
    """A logged leukoflow model's artifact path and MLmodel metadata, checked to be of
    ``family``. The metadata is read as YAML, so no MLflow call (or import) is made."""
    import yaml

    model_dir = Path(model_dir)
    path, mlmodel = model_dir / "artifacts" / artifact, model_dir / "MLmodel"
    if not path.is_file() or not mlmodel.is_file():
        raise RegistryError(f"{model_dir} is not a logged leukoflow {family}: it needs MLmodel "
                            f"and artifacts/{artifact}")
    meta = (yaml.safe_load(mlmodel.read_text()) or {}).get("metadata") or {}
    if meta.get("family") != family:
        raise RegistryError(f"{model_dir} holds a {meta.get('family')!r} model, not a {family}")
    return path, meta
