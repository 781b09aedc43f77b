"""The BentoML model store side of publishing: MLflow model dir -> BentoML model, idempotently.

Run it in a process whose ``BENTOML_HOME`` is already set (BentoML reads it once, at first use):
``training.publish.bento`` calls ``python -m serving.store ensure ...`` in a subprocess for exactly
that reason, and so that the caller (an Airflow task) never imports BentoML's server stack.

A BentoML model keeps the MLflow model dir as it is (``MLmodel``, ``artifacts/...``) and is
labelled ``registered_name``, ``registered_version`` and ``run_id``; the same registered version
of the same run is imported once.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

__all__ = ["ensure_model", "find_model", "import_model_dir"]


def find_model(name: str, registered_version: str, run_id: str) -> str | None:
    """The tag of a stored BentoML model made from this registered version, if any."""
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        models = bentoml.models.list(name)
    except NotFound:
        return None
    hits = [m for m in models
            if m.info.labels.get("registered_version") == str(registered_version)
            and m.info.labels.get("run_id") == run_id]
    if not hits:
        return None
    return str(max(hits, key=lambda m: m.info.creation_time).tag)


def import_model_dir(name: str, model_dir: str | Path, labels: dict[str, str]) -> str:
    """Copy a logged MLflow model dir into a new BentoML model; returns its tag."""
    import bentoml

    model_dir = Path(model_dir)
    mlmodel = model_dir / "MLmodel"
    if not mlmodel.is_file():
        raise FileNotFoundError(f"{model_dir} holds no MLmodel file: not an MLflow model dir")
    metadata: dict[str, Any] = (yaml.safe_load(mlmodel.read_text()) or {}).get("metadata") or {}
    with bentoml.models.create(name, labels=labels, metadata=_plain(metadata)) as model:
        shutil.copytree(model_dir, model.path, dirs_exist_ok=True)
    return str(model.tag)


def ensure_model(name: str, model_uri: str, labels: dict[str, str],
                 tracking_uri: str | None = None) -> dict[str, Any]:
    """Find or import the BentoML model of ``model_uri`` (downloaded only when missing)."""
    tag = find_model(name, labels["registered_version"], labels["run_id"])
    if tag is not None:
        return {"tag": tag, "imported": False}
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="leukoflow-publish-") as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp)
        return {"tag": import_model_dir(name, local, labels), "imported": True}


def _plain(value: Any) -> Any:
    """BentoML metadata takes scalars, lists and dicts only, and no None (dropped)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value if v is not None]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.store", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    ens = sub.add_parser("ensure", help="find or import a BentoML model; prints JSON")
    ens.add_argument("--name", required=True)
    ens.add_argument("--model-uri", required=True, help="e.g. models:/leukemia-classifier/3")
    ens.add_argument("--tracking-uri", default=None)
    ens.add_argument("--label", action="append", default=[], help="KEY=VALUE (repeatable)")
    args = parser.parse_args(argv)
    labels = dict(item.split("=", 1) for item in args.label)
    try:
        out = ensure_model(args.name, args.model_uri, labels, args.tracking_uri)
    except Exception as exc:  # the parent turns this into a PublishError with the message
        print(f"error: cannot import {args.model_uri} as {args.name}: "
              f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
