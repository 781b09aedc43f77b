"""The MLflow model registry: register candidates, move aliases, roll back.

The gate's verdict comes from :mod:`training.promotion.gate`; this module only acts on it.

Aliases: ``challenger`` = newest registered candidate; ``champion`` = what serving loads;
``previous_champion`` = the champion before it (rollback target). Alias moves are serialized by
a lock file under ``$LEUKOFLOW_HOME`` so two runs never interleave them on one host; a
multi-host deployment runs the promote task in a one-slot Airflow pool (see docs).
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from training.config import Config
from training.errors import RegistryError
from training.families import Family, get_family
from training.promotion.gate import gate
from training.records import Candidate, Promotion
from training.tracking import configure_mlflow

__all__ = [
    "ALIASES", "alias_version", "download_champion", "model_name", "promote", "register",
    "rollback", "undo_promotion",
]

ALIASES = ("champion", "challenger", "previous_champion")


def model_name(cfg: Config, family: str | Family) -> str:
    """The registered model name of a family (a name or a :class:`Family`)."""
    return (family if isinstance(family, Family) else get_family(family)).registered_name(cfg)


def _client(cfg: Config) -> Any:
    from mlflow import MlflowClient

    configure_mlflow(cfg)
    return MlflowClient(tracking_uri=cfg.tracking_uri, registry_uri=cfg.tracking_uri)


@contextmanager
def _alias_lock(cfg: Config) -> Iterator[None]:
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    with open(cfg.state_dir / "registry.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def alias_version(cfg: Config, name: str, alias: str) -> str | None:
    """The version an alias points at, or None when the model or alias does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return str(_client(cfg).get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def download_champion(cfg: Config, family: str | Family, dest: Path) -> tuple[str, Path] | None:
    """The champion's version and a local copy of its model dir; None when there is none yet."""
    import mlflow
    from mlflow.exceptions import MlflowException

    name = model_name(cfg, family)
    try:
        mv = _client(cfg).get_model_version_by_alias(name, "champion")
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise RegistryError(f"cannot read the champion alias of {name}: {exc}") from exc
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{name}/{mv.version}", dst_path=str(dest))
    return str(mv.version), Path(local)


def register(cfg: Config, candidate: Candidate, tags: dict[str, str] | None = None) -> str:
    """Register the candidate's model as a new version (or find the one made by a rerun)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    name = model_name(cfg, candidate.family)
    client = _client(cfg)
    try:
        existing = client.search_model_versions(f"name='{name}' and run_id='{candidate.run_id}'")
        if existing:
            return str(existing[0].version)
        version = str(mlflow.register_model(candidate.model_uri, name).version)
        all_tags = {
            "architecture": candidate.architecture,
            "dataset_version": str(candidate.dataset_version),
            "split_kind": candidate.split_kind,
            "test_set_sha256": candidate.test_set_sha256,
            **{f"metric.{k}": f"{v:.6g}" for k, v in candidate.metrics.items()},
            **(tags or {}),
        }
        for key, value in all_tags.items():
            client.set_model_version_tag(name, version, key, str(value))
        return version
    except MlflowException as exc:
        raise RegistryError(f"cannot register {candidate.model_uri} as {name}: {exc}") from exc


def promote(cfg: Config, candidate: Candidate, tags: dict[str, str] | None = None) -> Promotion:
    """Register, mark ``challenger``, gate, and if it passes move ``champion``."""
    name = model_name(cfg, candidate.family)
    version = register(cfg, candidate, tags)
    client = _client(cfg)
    with _alias_lock(cfg):
        champion = alias_version(cfg, name, "champion")
        if champion == version:  # a rerun of a run that already promoted this version
            return Promotion(name, version, True, ["already champion"], version,
                             alias_version(cfg, name, "previous_champion"))
        passed, reasons = gate(cfg, candidate)
        client.set_registered_model_alias(name, "challenger", version)
        client.set_model_version_tag(name, version, "gate_passed", str(passed).lower())
        client.set_model_version_tag(name, version, "gate_reasons", json.dumps(reasons))
        if not passed:
            return Promotion(name, version, False, reasons, champion or "", None)
        if champion:
            client.set_registered_model_alias(name, "previous_champion", champion)
        client.set_registered_model_alias(name, "champion", version)
        return Promotion(name, version, True, reasons, version, champion)


def undo_promotion(cfg: Config, promotion: Promotion) -> None:
    """Put ``champion`` back where it was before ``promotion`` (publish failed)."""
    if not promotion.promoted:
        return
    client = _client(cfg)
    with _alias_lock(cfg):
        client.set_model_version_tag(promotion.model_name, promotion.version, "rolled_back",
                                     "publish failed")
        if promotion.previous_champion:
            client.set_registered_model_alias(promotion.model_name, "champion",
                                              promotion.previous_champion)
        else:
            client.delete_registered_model_alias(promotion.model_name, "champion")


def rollback(cfg: Config, name: str) -> tuple[str, str]:
    """Swap ``champion`` and ``previous_champion``; returns (new champion, demoted version)."""
    client = _client(cfg)
    with _alias_lock(cfg):
        champion = alias_version(cfg, name, "champion")
        previous = alias_version(cfg, name, "previous_champion")
        if not champion or not previous:
            raise RegistryError(
                f"cannot roll back {name}: champion={champion}, previous_champion={previous}; "
                "a rollback needs both aliases"
            )
        client.set_registered_model_alias(name, "champion", previous)
        client.set_registered_model_alias(name, "previous_champion", champion)
        client.set_model_version_tag(name, champion, "rolled_back", "manual rollback")
        return previous, champion
