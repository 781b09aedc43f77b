"""What the model and steward pages show: read from the MLflow registry and the reports store.

Blocking calls (MLflow, boto3), run by the handlers in a worker thread. Model cards are the
``model_card/`` artifacts the promote stage logs on each version's run
(:mod:`training.promotion.modelcard`); steward reports are what the validate stage publishes to
``storage.reports_uri`` (:mod:`training.reports`).
"""

from __future__ import annotations

import html
import json
import mimetypes
import re
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

from training.config import Config
from training.families import FAMILIES
from training.reports import DOCS_PREFIX, batch_summaries, reports_storage

__all__ = ["batch", "batches", "card_html", "docs_file", "model_history", "quarantine_html",
           "registered_models"]

CARD_ARTIFACT = "model_card/model_card.html"
_BATCH_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+=-]{0,127}$")


def _client(cfg: Config) -> Any:
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(cfg.tracking_uri)
    mlflow.set_registry_uri(cfg.tracking_uri)
    return MlflowClient(tracking_uri=cfg.tracking_uri, registry_uri=cfg.tracking_uri)


def _names(cfg: Config) -> list[str]:
    return [f.registered_name(cfg) for f in FAMILIES.values()]


def _reasons(raw: str | None) -> list[str]:
    if not raw:
        return []
    try:
        value = json.loads(raw)
    except ValueError:
        return [raw]
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def _version_row(mv: Any, metric: str, aliases: dict[str, str]) -> dict[str, Any]:
    tags = dict(mv.tags or {})
    return {"version": str(mv.version),
            "aliases": sorted(a for a, v in aliases.items() if str(v) == str(mv.version)),
            "created": int(mv.creation_timestamp or 0) // 1000,
            "architecture": tags.get("architecture", ""),
            "dataset_version": tags.get("dataset_version", ""),
            "split_kind": tags.get("split_kind", ""), "metric": metric,
            "metric_value": tags.get(f"metric.{metric}", ""),
            "gate_passed": tags.get("gate_passed"), "gate_reasons": _reasons(
                tags.get("gate_reasons")),
            "rolled_back": tags.get("rolled_back", ""),
            "has_card": "model_card" in tags, "run_id": mv.run_id,
            # `leukoflow evaluate` runs on external folders (training.external tags them)
            "evaluations": [{"run_id": k.removeprefix("evaluation."), "summary": v}
                            for k, v in sorted(tags.items()) if k.startswith("evaluation.")]}


def registered_models(cfg: Config) -> list[dict[str, Any]]:
    """Each leukoflow model: its champion version and how many versions it has."""
    out = []
    for family in FAMILIES.values():
        name = family.registered_name(cfg)
        try:
            history = model_history(cfg, name)
        except LookupError:
            out.append({"name": name, "family": family.name, "versions": 0, "champion": None})
            continue
        out.append({"name": name, "family": family.name, "versions": len(history["versions"]),
                    "champion": history["champion"]})
    return out


def model_history(cfg: Config, name: str) -> dict[str, Any]:
    """A registered model's versions, newest first, with gate decisions and aliases."""
    from mlflow.exceptions import MlflowException

    if name not in _names(cfg):
        raise LookupError(f"{name!r} is not a leukoflow model ({', '.join(_names(cfg))})")
    family = next(f for f in FAMILIES.values() if f.registered_name(cfg) == name)
    client = _client(cfg)
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException as exc:
        raise LookupError(f"no registered model {name!r} yet: {exc}") from exc
    if not versions:
        raise LookupError(f"no version of {name!r} is registered yet")
    metric = family.gate_metric(cfg)
    # search_model_versions leaves aliases out; the registered model lists them all
    aliases = {str(k): str(v) for k, v in (client.get_registered_model(name).aliases or {}).items()}
    rows = sorted((_version_row(mv, metric, aliases) for mv in versions),
                  key=lambda r: int(r["version"]), reverse=True)
    champion = next((r for r in rows if "champion" in r["aliases"]), None)
    evaluations = [{"version": r["version"], **e} for r in rows for e in r["evaluations"]]
    return {"name": name, "family": family.name, "versions": rows, "champion": champion,
            "metric": metric, "evaluations": evaluations}


def card_html(cfg: Config, name: str, version: str) -> str:
    """The model card page logged for this version (self-contained HTML)."""
    from mlflow.exceptions import MlflowException

    if name not in _names(cfg) or not version.isdigit():
        raise LookupError(f"no model {name!r} version {version!r}")
    client = _client(cfg)
    try:
        mv = client.get_model_version(name, version)
        with tempfile.TemporaryDirectory(prefix="leukoflow-card-") as tmp:
            path = client.download_artifacts(mv.run_id, CARD_ARTIFACT, tmp)
            return Path(path).read_text()
    except (MlflowException, OSError) as exc:
        raise LookupError(f"{name} v{version} has no model card ({CARD_ARTIFACT}): {exc}") from exc


# ------------------------------------------------------------------------------ steward
def batches(cfg: Config) -> list[dict[str, Any]]:
    return batch_summaries(reports_storage(cfg))


def _check_batch(batch_id: str) -> str:
    if not _BATCH_ID.match(batch_id) or ".." in batch_id or batch_id == DOCS_PREFIX:
        raise LookupError(f"{batch_id!r} is not a batch id")
    return batch_id


def batch(cfg: Config, batch_id: str) -> dict[str, Any]:
    _check_batch(batch_id)
    for summary in batches(cfg):
        if summary["batch_id"] == batch_id:
            return summary
    raise LookupError(f"no report of batch {batch_id!r} has been published")


def quarantine_html(cfg: Config, batch_id: str, root: str) -> str:
    """The batch's quarantine page, its Data Docs link pointed at the web app's copy."""
    store = reports_storage(cfg)
    key = f"{_check_batch(batch_id)}/quarantine.html"
    if not store.exists(key):
        raise LookupError(f"batch {batch_id!r} has no quarantine page")
    page = store.read_text(key)
    info = batch(cfg, batch_id)
    docs = info.get("data_docs_page")
    link = (f'<a href="{html.escape(root)}/docs/{html.escape(docs)}" target="_top">GX Data Docs'
            "</a>" if docs else "GX Data Docs were not published")
    return re.sub(r'<a href="file://[^"]*">GX Data Docs</a>', lambda _: link, page)


def docs_file(cfg: Config, path: str) -> tuple[bytes, str]:
    """A file of the published Data Docs site: (bytes, media type)."""
    parts = PurePosixPath(path).parts
    if not parts or any(p in ("..", "") or p.startswith(".") for p in parts) or "\\" in path:
        raise LookupError(f"{path!r} is not a Data Docs path")
    store = reports_storage(cfg)
    key = f"{DOCS_PREFIX}/{PurePosixPath(*parts).as_posix()}"
    if not store.exists(key):
        raise LookupError(f"{path} is not in the published Data Docs")
    media = mimetypes.guess_type(path)[0] or "application/octet-stream"
    return store.read_bytes(key), media
