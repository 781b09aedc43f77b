"""Typed records that stages hand to each other (as JSON-able dicts through Airflow XCom).

    Batch -> ValidationResult -> CuratedDataset -> Candidate -> Promotion -> Publication

Records carry ids, URIs and small numbers only, never images or models.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, TypeVar

__all__ = [
    "Batch", "Candidate", "CuratedDataset", "Promotion", "Publication", "ValidationResult",
]

R = TypeVar("R", bound="_Record")


class _Record:
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[R], data: dict[str, Any]) -> R:
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class Batch(_Record):
    """A complete batch in the landing zone (its completion marker exists)."""

    batch_id: str
    landing_uri: str  # the landing store's URI; the batch is the prefix ``<batch_id>/``
    marker: str  # which completion marker was found


@dataclass
class ValidationResult(_Record):
    """The verdict on one batch; ``status`` decides whether anything was curated.

    ``failed``: the batch could not be read at all (e.g. its keys cannot be laid out as files);
    nothing was curated or quarantined, ``message`` says why, and it is not retried.
    """

    batch_id: str
    status: Literal["accepted", "rejected", "skipped", "failed"]
    layout: str
    images: int
    accepted: int
    quarantined: int
    reasons: dict[str, int]  # reason -> number of files quarantined for it
    report_dir: str  # summary.json, quarantine.html
    data_docs: str | None  # GX Data Docs index.html
    message: str = ""
    # the near-duplicate check under the manifest lock (training.data.leakage), when curated
    leakage: dict[str, Any] | None = None


@dataclass
class CuratedDataset(_Record):
    """A version of the curated manifest (content hashes + frozen split per image)."""

    version: int
    manifest_uri: str
    manifest_sha256: str
    n_cells: int
    n_fields: int
    batch_ids: list[str] = field(default_factory=list)
    # counts of the version's near-duplicate check + the URI of its leakage.json (None: the
    # version was written before the check existed)
    leakage: dict[str, Any] | None = None


@dataclass
class Candidate(_Record):
    """A trained and evaluated model, plus the champion's score on the same test set."""

    family: Literal["classifier", "detector"]
    architecture: str
    run_id: str
    model_uri: str
    metrics: dict[str, float]
    split_kind: str  # "subject" or "image": how the test set was separated from training
    test_set_sha256: str
    dataset_version: int
    champion_version: str | None = None
    champion_metrics: dict[str, float] | None = None


@dataclass
class Promotion(_Record):
    """What the gate decided for one registered model version."""

    model_name: str
    version: str
    promoted: bool
    reasons: list[str]
    champion_version: str  # champion after the decision
    previous_champion: str | None
    before: dict[str, str | None] | None = None  # the three aliases before the decision


@dataclass
class Publication(_Record):
    """A Bento built from the champions, started on loopback and smoke-tested."""

    bento_tag: str
    models: dict[str, str]  # registered model name -> version served
    url: str
    smoke: dict[str, Any]
