"""The one configuration schema of leukoflow.

Precedence, rightmost wins: schema defaults < YAML file < ``LEUKOFLOW_*`` environment variables
(nested keys joined by ``__``, e.g. ``LEUKOFLOW_CLASSIFIER__EPOCHS=3``) < explicit overrides
(CLI flags, Airflow DAG params). The YAML file is ``LEUKOFLOW_CONFIG`` or the ``path`` argument.
Classifier hyperparameters left ``null`` take the defaults of the chosen architecture, which
follow the papers (see ``training.classifier.architectures``); the resolved values are logged with
every run.
"""

from __future__ import annotations

import contextvars
import difflib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from training.errors import ConfigError

__all__ = ["Config", "load_config"]

_YAML_DATA: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "yaml", default=None
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StorageConfig(_Section):
    """Where batches arrive and where curated/quarantined files go (``file://`` or ``s3://``)."""

    landing_uri: str | None = None  # default file://{home}/landing
    curated_uri: str | None = None  # default file://{home}/curated
    quarantine_uri: str | None = None  # default file://{home}/quarantine
    reports_uri: str | None = None  # default file://{home}/reports: steward reports, Data Docs
    s3_endpoint_url: str | None = None  # MinIO / any S3-protocol server; None = AWS
    s3_region: str = "us-east-1"
    ready_markers: list[str] = ["_READY", "manifest.csv"]  # a batch is complete once one exists


class DataConfig(_Section):
    """The classification task: which labels exist and which one is 'positive'."""

    task: Literal["binary", "multiclass"] = "binary"
    classes: list[str] = ["all", "hem"]  # C-NMC: all = blast (ALL), hem = normal
    positive_class: str | None = "all"  # for specificity/ROC in binary tasks
    detector_classes: list[str] = ["WBC"]


class ValidationConfig(_Section):
    """Bounds of the batch expectation suite and the input contract (``training.contract``:
    the endpoint applies the same formats, modes and sides, with budgets of its own)."""

    allowed_formats: list[str] = ["PNG", "JPEG", "BMP", "TIFF"]
    allowed_modes: list[str] = ["RGB", "RGBA", "L"]  # each needs a conversion in CONVERSIONS
    min_side: int = Field(32, ge=1)
    max_side: int = Field(4096, ge=1)
    max_pixels: int = Field(40_000_000, ge=1)  # above this an image is a decompression bomb
    max_bytes: int = Field(50_000_000, ge=1)
    min_blur: float = Field(0.0, ge=0)  # variance of the Laplacian; lower = blurrier
    exposure_range: tuple[float, float] = (1.0, 250.0)  # mean grey level bounds
    mostly: float = Field(0.95, gt=0, le=1)  # share of images that must meet soft bounds
    max_failure_rate: float = Field(0.5, ge=0, le=1)  # above this the batch is rejected whole
    min_batch_size: int = Field(1, ge=1)
    class_share_range: tuple[float, float] = (0.0, 1.0)  # each cell class's share of a batch
    workers: int | None = None  # metadata extraction processes; None = all cores
    # pHash bits that may differ for two images to be near-duplicate candidates (then confirmed
    # by pixels): the test-leak check and the split's twin check (training.data.leakage)
    near_duplicate_hamming: int = Field(4, ge=0, le=64)
    # drift of a batch against the champion's training rows (training.data.drift): MMD² of image
    # statistics above the batch's threshold is a batch-level GX warning (never a quarantine).
    # calibrated: the threshold comes from the reference's own subjects (the quantile of MMD²
    # between subject-disjoint halves times the margin), never below drift_threshold; fixed:
    # drift_threshold itself, also the fallback below drift_calibration_min_subjects subjects
    drift_threshold_mode: Literal["calibrated", "fixed"] = "calibrated"
    drift_threshold: float = Field(0.1, ge=0)
    drift_calibration_splits: int = Field(200, ge=1)  # seeded subject splits of the null
    drift_calibration_quantile: float = Field(0.95, gt=0, le=1)
    drift_calibration_margin: float = Field(1.5, gt=0)
    drift_calibration_min_subjects: int = Field(4, ge=2)
    drift_reference_images: int = Field(200, ge=2)  # seeded sample of the champion's train rows
    drift_permutations: int = Field(200, ge=1)  # for the permutation p-value
    drift_embedding: bool = False  # also the champion's embedding (a TF child process a batch)

    @field_validator("allowed_modes")
    @classmethod
    def _modes_with_a_conversion(cls, v: list[str]) -> list[str]:
        from training.contract import CONVERSIONS

        unknown = [m for m in v if m not in CONVERSIONS]
        if unknown:
            raise ValueError(f"modes {unknown} have no documented conversion to RGB; "
                             f"choose from {sorted(CONVERSIONS)}")
        return v


class SplitConfig(_Section):
    """Subject-aware, deterministic, stable train/val/test assignment."""

    val_fraction: float = Field(0.15, ge=0, lt=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    salt: str = "leukoflow-split-v1"  # changing it re-deals only never-assigned subjects
    level: Literal["subject", "image"] = "subject"  # image = the papers' random image split
    # A layout that names its splits (YOLO images/train|val|test/) keeps them for its new rows,
    # so a public benchmark is scored on its published test split; off: dealt like any batch.
    keep_given: bool = False


class AugmentationConfig(_Section):
    """Batool & Byun's augmentation (Keras ImageDataGenerator-equivalent ranges)."""

    enabled: bool = True
    rotation: float = 20.0  # degrees
    zoom: float = 0.2
    width_shift: float = 0.2
    height_shift: float = 0.2
    horizontal_flip: bool = True
    vertical_flip: bool = True
    # Colour jitter beside the paper's geometric augmentation, per training image. Off (0) by
    # default: the papers train without it, and whether it helps on unseen subjects is what
    # leave-subjects-out CV measures (docs/classifier-results.md); 0.02/0.1/0.1/0.1 is mild.
    hue: float = Field(0.0, ge=0, le=0.5)  # largest hue shift, fraction of the colour circle
    saturation: float = Field(0.0, ge=0, lt=1)  # factor drawn from [1 - v, 1 + v]
    brightness: float = Field(0.0, ge=0, lt=1)
    contrast: float = Field(0.0, ge=0, lt=1)


class ClassifierConfig(_Section):
    """Which architectures to train; ``null`` hyperparameters take the architecture's defaults."""

    architectures: list[str] = ["lightweight_efficientnet_b3"]
    weights: str | None = None  # "imagenet" (online only), a local .h5/.keras path, or None
    image_size: int | None = Field(None, ge=16)
    source_size: int | None = Field(None, ge=16)  # crop_and_resize from this size
    epochs: int | None = Field(None, ge=1)
    batch_size: int | None = Field(None, ge=1)
    learning_rate: float | None = Field(None, gt=0)
    learning_rate_after: float | None = Field(None, gt=0)
    lr_drop_epoch: int | None = Field(None, ge=0)
    optimizer: str | None = None
    loss: str | None = None  # categorical_crossentropy | mse
    dropout: float | None = Field(None, ge=0, lt=1)
    class_weights: bool = True
    # Weight images so each subject of a class counts equally (on top of class_weights); off
    # by default: the papers weight classes only.
    balance_subjects: bool = False
    segmentation: Literal["none", "otsu"] = "none"
    # Stain/colour normalisation of every image (training and serving) to a reference fitted
    # on `stain_fit_images` train cells and stored with the model. Off by default until
    # leave-subjects-out CV shows it helps (docs/classifier-results.md).
    stain_normalisation: Literal["none", "reinhard", "macenko"] = "none"
    stain_fit_images: int = Field(256, ge=1)
    # The hand-crafted baseline (training.classifier.handcrafted) is fitted and scored on the
    # train/test rows of every Keras candidate (`baseline/*` metrics; gate.must_beat_baseline)
    # with this classical classifier; it is also the architecture `handcrafted_baseline`.
    baseline: bool = True
    baseline_model: str = "logistic_regression"
    # fit one temperature T on the val rows after training, store it with the model, serve
    # softmax(log p / T): the argmax (hence every gated metric) is unchanged, only the
    # probabilities become calibrated (training.evaluation.calibration)
    temperature_scaling: bool = True
    augmentation: AugmentationConfig = AugmentationConfig()
    seed: int = 42


class DetectorConfig(_Section):
    """Ultralytics YOLO detector; the model yaml builds it offline, weights load if given."""

    # trained side by side, one child process each (training.detector.architectures):
    # yolov5nu | yolov5su | yolov8n | yolov8s
    architectures: list[str] = ["yolov8n"]
    weights: str | None = None  # a local .pt to start from (every architecture); None offline
    imgsz: int = Field(640, ge=32)
    epochs: int = Field(100, ge=1)
    batch: int = Field(16, ge=1)
    warmup_epochs: float = Field(3.0, ge=0)  # Ultralytics default; short runs need fewer
    # Nominal batch: gradients accumulate over round(nbs / batch) batches per optimizer step.
    # None = auto: Ultralytics' 64 when the train split fills 10+ steps per epoch (>= 640
    # fields), else `batch` (no accumulation; a tiny set would otherwise barely ever step).
    nbs: int | None = Field(None, ge=1)
    workers: int = Field(0, ge=0)
    seed: int = 42


class GateConfig(_Section):
    """Promotion gate: absolute floors, then no regression against the champion."""

    classifier_metric: str = "balanced_accuracy"
    # Non-zero floors: a first model must beat chance clearly before anything serves it
    # (binary balanced accuracy 0.5 and 4-class 0.25 are chance; mAP50 0.25 finds most cells).
    classifier_floor: float = Field(0.6, ge=0, le=1)
    detector_metric: str = "map50"
    detector_floor: float = Field(0.25, ge=0, le=1)
    max_regression: float = Field(0.0, ge=0, le=1)  # allowed drop vs champion
    # The paired test: candidate minus champion on the same test rows (subjects resampled when
    # the split is by subject). Off: its CI is reported in the reasons; on: the lower end of the
    # CI must exceed min_improvement, so noise alone never replaces a champion.
    require_paired_improvement: bool = False
    min_improvement: float = Field(0.0, ge=-1, le=1)
    # A candidate whose test split holds fewer distinct subjects of some class than this is not
    # promoted: its figures say how a few patients look, not how the model does on patients.
    # Counted from the candidate's n_subjects_test__<class> metrics (cell data with subject ids).
    min_test_subjects_per_class: int = Field(3, ge=0)
    allow_few_subjects: bool = False  # promote anyway (synthetic demo data), the reason says so
    # A classifier whose gated metric is not above the hand-crafted baseline's on the same
    # test rows is refused (the baseline itself is exempt).
    must_beat_baseline: bool = True


class CvConfig(_Section):
    """Leave-subjects-out CV of a classifier architecture (``training.classifier.cv``)."""

    folds: int = Field(5, ge=2)  # subject folds; no more subjects than this: leave one out
    # The retrain DAG runs the CV inside each classifier training when the smallest class has
    # fewer subjects than this (a frozen test split then holds a handful of patients); 0 = never.
    run_below_subjects_per_class: int = Field(10, ge=0)
    epochs: int | None = Field(None, ge=1)  # per-fold epochs; None = the candidate's own


class PipelineConfig(_Section):
    """Bounds and notifications of the DAG runs: nothing hangs forever, refusals are heard."""

    train_timeout_s: int = Field(6 * 3600, ge=1)  # one training child; killed when it passes
    task_timeout_s: int = Field(3600, ge=1)  # any other task (validate, promote, publish)
    registry_pool: str = "leukoflow_registry"  # one-slot Airflow pool serializing alias moves
    webhook_url: str | None = None  # POSTed a JSON event on a refusal, rollback or failure
    webhook_timeout_s: float = Field(5.0, gt=0)


class MlflowConfig(_Section):
    tracking_uri: str | None = None  # default sqlite:///{home}/mlflow.db
    artifact_root: str | None = None  # default {home}/mlartifacts
    experiment: str = "leukoflow"
    classifier_name: str = "leukemia-classifier"
    detector_name: str = "wbc-detector"


class ServingConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(3000, ge=1, le=65535)
    api_keys_file: str | None = None  # default {home}/api_keys.json (hashes only)
    max_image_bytes: int = Field(20_000_000, ge=1)
    # pixel budget of one request (decoded RGB: 3 bytes a pixel); 4096 x 4096 by default,
    # below validation.max_pixels: an image within validation.max_side always fits
    max_pixels: int = Field(16_777_216, ge=1)
    max_concurrent_decodes: int = Field(2, ge=1)  # uploads decoded at once in the API process
    startup_timeout_s: int = Field(300, ge=1)
    # image requests in the API process at once; one more is a 503 with Retry-After
    max_inflight: int = Field(256, ge=1)
    retry_after_s: int = Field(2, ge=1)  # the Retry-After of that 503
    max_header_bytes: int = Field(16_384, ge=256)  # all request headers together; above: 431
    body_timeout_s: float = Field(30.0, gt=0)  # to receive an upload's body; after it: 408
    readyz_timeout_s: float = Field(0.8, gt=0)  # per model service, so /readyz answers in 1 s
    # --- runtime and batching (training/publish/export.py, serving/service.py model services)
    onnx_export: bool = True  # export the champions to ONNX at publish time and serve those
    onnx_validation_images: int = Field(32, ge=1)  # test images the export is checked on
    # classifier: ONNX vs Keras probabilities (1e-4 refused a trained tiny-profile model at 1.05e-4)
    onnx_max_abs_prob_diff: float = Field(1e-3, ge=0)
    onnx_max_abs_raw_diff: float = Field(1e-2, ge=0)  # detector: raw output tensor difference
    onnx_box_iou: float = Field(0.9, ge=0, le=1)  # detector: a box's match needs this IoU
    onnx_box_score_diff: float = Field(0.01, ge=0, le=1)  # ... and a score this close
    onnx_threads: int = Field(0, ge=0)  # ONNX Runtime intra-op threads per worker (0: cores)
    batch_max_size: int = Field(32, ge=1)  # adaptive batching: images per classifier call
    # ... longest a request may wait for its batch (BentoML refuses it after that: a 503)
    batch_max_latency_ms: int = Field(60_000, ge=1)
    classifier_workers: int = Field(1, ge=1)  # worker processes of the classifier service
    detector_workers: int = Field(1, ge=1)  # worker processes of the detector service


class WebappConfig(_Section):
    """The web app at ``/app`` of the API service: accounts, classify/detect, steward pages."""

    database_url: str | None = None  # default sqlite:///{home}/webapp.db (compose: Postgres)
    secret_key_file: str | None = None  # default {home}/webapp_secret (made once, mode 0600)
    registration: Literal["open", "admin"] = "admin"  # open: anyone; admin: admins create users
    session_max_age_s: int = Field(8 * 3600, ge=60)
    secure_cookies: bool = False  # mark cookies Secure (set true behind HTTPS)
    max_failed_logins: int = Field(5, ge=1)  # per account, then locked for lockout_s
    lockout_s: int = Field(300, ge=1)
    min_password_length: int = Field(10, ge=1)


class Config(BaseSettings):
    """Everything leukoflow can be told; see ``configs/leukoflow.yaml`` for the documented file."""

    model_config = SettingsConfigDict(
        env_prefix="LEUKOFLOW_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_assignment=True,
    )

    home: Path = Path(".leukoflow")  # all local state: DBs, stores, reports, Bentos
    storage: StorageConfig = StorageConfig()
    data: DataConfig = DataConfig()
    validation: ValidationConfig = ValidationConfig()
    split: SplitConfig = SplitConfig()
    classifier: ClassifierConfig = ClassifierConfig()
    detector: DetectorConfig = DetectorConfig()
    gate: GateConfig = GateConfig()
    cv: CvConfig = CvConfig()
    pipeline: PipelineConfig = PipelineConfig()
    mlflow: MlflowConfig = MlflowConfig()
    serving: ServingConfig = ServingConfig()
    webapp: WebappConfig = WebappConfig()

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, v: Path) -> Path:
        return v.expanduser().resolve()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlSource(settings_cls))

    # Derived locations: one place for each path.
    def uri(self, area: Literal["landing", "curated", "quarantine", "reports"]) -> str:
        """The storage URI of an area, defaulting to a folder under ``home``."""
        explicit = getattr(self.storage, f"{area}_uri")
        return explicit or (self.home / area).as_uri()

    @property
    def reports_dir(self) -> Path:
        return self.home / "reports"

    @property
    def gx_dir(self) -> Path:
        return self.home / "gx"

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    @property
    def state_dir(self) -> Path:
        return self.home / "state"

    @property
    def bentoml_home(self) -> Path:
        return self.home / "bentoml"

    @property
    def tracking_uri(self) -> str:
        return self.mlflow.tracking_uri or f"sqlite:///{self.home / 'mlflow.db'}"

    @property
    def artifact_root(self) -> str:
        return self.mlflow.artifact_root or (self.home / "mlartifacts").as_uri()

    @property
    def webapp_database_url(self) -> str:
        return self.webapp.database_url or f"sqlite:///{self.home / 'webapp.db'}"

    @property
    def webapp_secret_file(self) -> Path:
        return Path(self.webapp.secret_key_file or self.home / "webapp_secret")

    @property
    def api_keys_file(self) -> Path:
        return Path(self.serving.api_keys_file or self.home / "api_keys.json")

    def dump(self) -> dict[str, Any]:
        """The resolved config as plain data (logged with every run)."""
        return self.model_dump(mode="json")


class _YamlSource(PydanticBaseSettingsSource):
    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_YAML_DATA.get() or {})


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top, got {type(data)}")
    return data


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    model: Any = Config
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type):
            return []
        model = field.annotation
        if not issubclass(model, BaseModel):
            return []
    return list(model.model_fields)


def _explain(exc: ValidationError, source: str) -> ConfigError:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            near = difflib.get_close_matches(str(err["loc"][-1]), _fields_at(err["loc"]), n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            lines.append(f"unknown key '{key}'{hint}")
        else:
            lines.append(f"'{key}' = {err.get('input')!r}: {err['msg']}")
    return ConfigError(f"invalid configuration ({source}):\n  " + "\n  ".join(lines))


def load_config(path: str | Path | None = None, **overrides: Any) -> Config:
    """Resolve the configuration once: defaults < YAML < env < ``overrides``.

    ``overrides`` take nested dicts (``classifier={"epochs": 2}``) as DAG params do.
    """
    path = path or os.environ.get("LEUKOFLOW_CONFIG")
    data = _read_yaml(Path(path)) if path else {}
    token = _YAML_DATA.set(data)
    try:
        return Config(**overrides)
    except ValidationError as exc:
        raise _explain(exc, f"file={path}, env LEUKOFLOW_*, overrides") from None
    finally:
        _YAML_DATA.reset(token)
