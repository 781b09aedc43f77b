"""The MLflow model registry: register candidates, move aliases, roll back.

The gate's verdict comes from :mod:`training.promotion.gate`; this module only acts on it.

Aliases: ``challenger`` = newest registered candidate; ``champion`` = what serving loads;
``previous_champion`` = the champion before it (rollback target). The life cycle and its state
diagram: ``docs/lifecycle.md``.

* Moves are serialized by a lock file under ``$LEUKOFLOW_HOME`` (one host) and by the one-slot
  Airflow pool ``leukoflow_registry`` that the promote and rollback tasks run in (several hosts).
* Every decision reads the aliases *at decision time*, under the lock: a candidate scored
  against another champion than the current one is refused, not promoted over it.
* Every move is recorded on the version as a tag ``move.<UTC time>.<alias>`` = ``from -> to by
  <actor>: <reason>``; a promotion carries the three aliases as they were before it, and undoing
  it restores exactly those.
* Registry errors are errors: a call is retried with backoff, then raises RegistryError. Only
  MLflow's "does not exist" answers read as "no such alias".
"""

from __future__ import annotations

import fcntl
import getpass
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from training.config import Config
from training.errors import RegistryError
from training.families import Family, get_family
from training.promotion.gate import gate
from training.records import Candidate, Promotion
from training.tracking import configure_mlflow

__all__ = [
    "ALIASES", "alias_version", "aliases", "download_champion", "model_name", "promote",
    "redo_promotion", "register", "rollback", "undo_promotion",
]

log = logging.getLogger(__name__)

ALIASES = ("champion", "challenger", "previous_champion")
# MLflow's answers for "no such model / alias / version": the only errors that mean absence.
_ABSENT = ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE")
RETRIES = 4  # attempts after the first, with backoff 0.5, 1, 2, 4 s
T = TypeVar("T")


def model_name(cfg: Config, family: str | Family) -> str:
    """The registered model name of a family (a name or a :class:`Family`)."""
    return (family if isinstance(family, Family) else get_family(family)).registered_name(cfg)


def _client(cfg: Config) -> Any:
    from mlflow import MlflowClient

    _call(f"connecting to MLflow at {cfg.tracking_uri}", lambda: configure_mlflow(cfg))
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


def _absent(exc: BaseException) -> bool:
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException) and exc.error_code in _ABSENT


def _call(what: str, fn: Callable[[], T], *, absent_ok: bool = False) -> T | None:
    """Run one registry call; retry transient failures with backoff, then raise RegistryError.

    ``absent_ok``: MLflow's "does not exist" answer returns None instead (and is not retried).
    Anything else (a server that is down, a database error) is never read as absence.
    """
    delay = 0.5
    for attempt in range(RETRIES + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - MLflow, requests and SQLAlchemy errors alike
            if _absent(exc):  # an answer, not a glitch: never retried
                if absent_ok:
                    return None
                raise RegistryError(f"{what}: {exc}") from exc
            if attempt == RETRIES:
                raise RegistryError(f"{what} failed after {RETRIES + 1} attempts: "
                                    f"{type(exc).__name__}: {exc}") from exc
            log.warning("%s failed (%s: %s); retrying in %.1fs", what, type(exc).__name__,
                        str(exc)[:200], delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def alias_version(cfg: Config, name: str, alias: str) -> str | None:
    """The version an alias points at; None only when MLflow says the model or alias does not
    exist. Any other failure raises RegistryError (after retries)."""
    client = _client(cfg)
    mv = _call(f"reading alias {alias} of {name}",
               lambda: client.get_model_version_by_alias(name, alias), absent_ok=True)
    return None if mv is None else str(mv.version)


def aliases(cfg: Config, name: str) -> dict[str, str | None]:
    """The three aliases of ``name`` as they are now (None: unset)."""
    return {alias: alias_version(cfg, name, alias) for alias in ALIASES}


def _actor(tags: dict[str, str] | None = None) -> str:
    """Who moves an alias: the Airflow run, else the user at the command line."""
    run = (tags or {}).get("airflow_run_id")
    if run:
        return f"airflow:{run}"
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli:unknown"


def _set_alias(cfg: Config, name: str, alias: str, version: str | None, *, was: str | None,
               actor: str, reason: str) -> None:
    """Point ``alias`` at ``version`` (None: delete it) and record the move on the version."""
    if version == was:
        return
    client = _client(cfg)
    if version is None:
        _call(f"deleting alias {alias} of {name}",
              lambda: client.delete_registered_model_alias(name, alias), absent_ok=True)
    else:
        _call(f"setting alias {alias} of {name} to v{version}",
              lambda: client.set_registered_model_alias(name, alias, version))
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    note = f"{was or 'none'} -> {version or 'none'} by {actor}: {reason}"[:4900]
    for v in {version, was} - {None}:
        _call(f"recording the move on v{v}", lambda v=v: client.set_model_version_tag(
            name, v, f"move.{stamp}.{alias}", note))


def _restore(cfg: Config, name: str, target: dict[str, str | None], actor: str,
             reason: str) -> None:
    now = aliases(cfg, name)
    for alias in ALIASES:
        if alias in target:
            _set_alias(cfg, name, alias, target[alias], was=now[alias], actor=actor,
                       reason=reason)


def download_champion(cfg: Config, family: str | Family, dest: Path) -> tuple[str, Path] | None:
    """The champion's version and a local copy of its model dir; None when there is none yet."""
    import mlflow

    name = model_name(cfg, family)
    version = alias_version(cfg, name, "champion")
    if version is None:
        return None
    local = _call(f"downloading {name} v{version}", lambda: mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{name}/{version}", dst_path=str(dest)))
    return version, Path(str(local))


def register(cfg: Config, candidate: Candidate, tags: dict[str, str] | None = None) -> str:
    """Register the candidate's model as a new version (or find the one made by a rerun)."""
    import mlflow

    name = model_name(cfg, candidate.family)
    client = _client(cfg)
    existing = _call(f"looking up versions of {name}", lambda: client.search_model_versions(
        f"name='{name}' and run_id='{candidate.run_id}'"))
    if existing:
        return str(existing[0].version)
    version = str(_call(f"registering {candidate.model_uri} as {name}",
                        lambda: mlflow.register_model(candidate.model_uri, name)).version)
    all_tags = {
        "architecture": candidate.architecture,
        "dataset_version": str(candidate.dataset_version),
        "split_kind": candidate.split_kind,
        "test_set_sha256": candidate.test_set_sha256,
        **{f"metric.{k}": f"{v:.6g}" for k, v in candidate.metrics.items()},
        **(tags or {}),
    }
    for key, value in all_tags.items():
        _call(f"tagging {name} v{version}", lambda k=key, v=value: client.set_model_version_tag(
            name, version, k, str(v)))
    return version


def promote(cfg: Config, candidate: Candidate, tags: dict[str, str] | None = None) -> Promotion:
    """Register, mark ``challenger``, gate at decision time, and if it passes move ``champion``.

    Under the alias lock the current champion is read again: when it is not the version the
    candidate was scored against (a rollback or another run moved it meanwhile), the candidate
    is refused with that reason instead of replacing a champion it was never compared with.
    """
    name = model_name(cfg, candidate.family)
    version = register(cfg, candidate, tags)
    client = _client(cfg)
    actor = _actor(tags)
    with _alias_lock(cfg):
        before = aliases(cfg, name)
        champion = before["champion"]
        if champion == version:  # a rerun of a run that already promoted this version
            return Promotion(name, version, True, ["already champion"], version,
                             before["previous_champion"], before=_before_of(client, name,
                                                                            version, before))
        if champion != candidate.champion_version:
            scored = (f"v{candidate.champion_version}" if candidate.champion_version
                      else "no champion")
            passed, reasons = False, [
                f"the champion is v{champion} now, but this candidate was scored against "
                f"{scored}: not compared with the current champion, so not promoted (retrain "
                "to compare)"]
        else:
            passed, reasons = gate(cfg, candidate)
        _set_alias(cfg, name, "challenger", version, was=before["challenger"], actor=actor,
                   reason="newest candidate")
        _call("tagging the gate verdict", lambda: client.set_model_version_tag(
            name, version, "gate_passed", str(passed).lower()))
        _call("tagging the gate reasons", lambda: client.set_model_version_tag(
            name, version, "gate_reasons", json.dumps(reasons)))
        _call("recording the aliases before", lambda: client.set_model_version_tag(
            name, version, "aliases_before", json.dumps(before)))
        if not passed:
            return Promotion(name, version, False, reasons, champion or "", None, before=before)
        _set_alias(cfg, name, "previous_champion", champion or before["previous_champion"],
                   was=before["previous_champion"], actor=actor, reason="demoted by the gate")
        _set_alias(cfg, name, "champion", version, was=champion, actor=actor,
                   reason="gate passed")
        return Promotion(name, version, True, reasons, version, champion, before=before)


def _before_of(client: Any, name: str, version: str,
               fallback: dict[str, str | None]) -> dict[str, str | None]:
    """The aliases recorded before ``version`` was promoted (a rerun must undo the same way)."""
    mv = _call(f"reading {name} v{version}", lambda: client.get_model_version(name, version))
    try:
        return json.loads(mv.tags["aliases_before"])
    except (KeyError, ValueError):
        return fallback


def undo_promotion(cfg: Config, promotion: Promotion, reason: str = "publish failed") -> bool:
    """Put all three aliases back as they were before ``promotion`` (publishing it failed).

    Returns whether anything was restored: if an alias moved since (another run, a rollback),
    nothing is touched and the conflict is logged, so no later decision is undone.
    """
    if not promotion.promoted or promotion.before is None:
        return False
    name = promotion.model_name
    with _alias_lock(cfg):
        now = aliases(cfg, name)
        if now["champion"] != promotion.version:
            log.warning("not undoing %s v%s: champion is v%s now (moved since)", name,
                        promotion.version, now["champion"])
            return False
        _restore(cfg, name, promotion.before, "undo", reason)
        client = _client(cfg)
        _call("tagging the undo", lambda: client.set_model_version_tag(
            name, promotion.version, "rolled_back", reason[:4900]))
        return True


def redo_promotion(cfg: Config, promotion: Promotion) -> None:
    """Re-apply a promotion that an earlier publish attempt undid (a retried publish).

    Only from exactly the state the undo left (the aliases as they were before the promotion);
    anything else means another run or a person moved them, and raises RegistryError.
    """
    if not promotion.promoted:
        return
    name = promotion.model_name
    with _alias_lock(cfg):
        now = aliases(cfg, name)
        if now["champion"] == promotion.version:
            return
        if promotion.before is None or any(now[a] != promotion.before.get(a) for a in
                                           ("champion", "previous_champion")):
            raise RegistryError(
                f"cannot re-apply the promotion of {name} v{promotion.version}: the aliases are "
                f"{now}, not {promotion.before} as before it; another run or a person moved them")
        target = {"champion": promotion.version, "challenger": promotion.version,
                  "previous_champion": promotion.before.get("champion")
                  or promotion.before.get("previous_champion")}
        _restore(cfg, name, target, "publish retry", "re-applied after a failed publish")


def rollback(cfg: Config, name: str, to: str | None = None, *,
             actor: str | None = None) -> dict[str, Any]:
    """Make version ``to`` (default: the recorded ``previous_champion``) the champion.

    The old champion becomes ``previous_champion`` (so rolling forward is one more rollback).
    Idempotent: when ``to`` is already the champion, or when ``actor`` (say, the DAG run) already
    rolled this model back, nothing moves and ``changed`` is False, so a rerun never swaps back.
    """
    actor = actor or _actor()
    client = _client(cfg)
    with _alias_lock(cfg):
        now = aliases(cfg, name)
        done = _call("looking for this actor's rollback", lambda: client.search_model_versions(
            f"name='{name}' and tag.rollback_actor='{actor}'"))
        if done and now["champion"] == str(done[0].version) and to in (None, now["champion"]):
            return {"model": name, "champion": now["champion"], "demoted": None,
                    "changed": False, "reason": f"{actor} already rolled {name} back"}
        target = str(to) if to else now["previous_champion"]
        if not target:
            raise RegistryError(f"cannot roll back {name}: no target given and no "
                                f"previous_champion (aliases: {now})")
        if target == now["champion"]:
            return {"model": name, "champion": target, "demoted": None, "changed": False,
                    "reason": f"v{target} is already the champion"}
        _call(f"checking {name} v{target} exists", lambda: client.get_model_version(name, target))
        _restore(cfg, name, {"champion": target, "previous_champion": now["champion"]},
                 actor, f"rollback to v{target}")
        _call("tagging the rollback", lambda: client.set_model_version_tag(
            name, target, "rollback_actor", actor))
        if now["champion"]:
            _call("tagging the demoted version", lambda: client.set_model_version_tag(
                name, now["champion"], "rolled_back", f"rollback to v{target} by {actor}"))
        return {"model": name, "champion": target, "demoted": now["champion"],
                "changed": True, "reason": f"rollback to v{target}"}
