"""``leukoflow``: the command line front of the library (every stage runs without Airflow too).

Global options come before the subcommand: ``leukoflow --config configs/demo.yaml synth``.
Heavy libraries are imported inside commands, so ``leukoflow --help`` is instant.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

from training.config import Config, load_config
from training.errors import LeukoflowError
from training.families import FAMILIES, get_family

__all__ = ["main"]


def _cfg(ctx: click.Context) -> Config:
    return ctx.obj["cfg"]


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


class _Group(click.Group):
    """Turns every LeukoflowError into one clear line and exit code 2, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LeukoflowError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              envvar="LEUKOFLOW_CONFIG", help="YAML config (default: $LEUKOFLOW_CONFIG).")
@click.option("--home", type=click.Path(file_okay=False), help="Override LEUKOFLOW_HOME.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.pass_context
def main(ctx: click.Context, config_path: str | None, home: str | None, verbose: bool) -> None:
    """leukoflow: validate WBC image batches, retrain, register and serve models."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.DEBUG if verbose else logging.WARNING)
    overrides = {"home": home} if home else {}
    ctx.obj = {"cfg": load_config(config_path, **overrides)}


@main.group()
def config() -> None:
    """Inspect the resolved configuration."""


@config.command("show")
@click.pass_context
def config_show(ctx: click.Context) -> None:
    """Print the configuration after file, env and overrides are merged."""
    import yaml

    click.echo(yaml.safe_dump(_cfg(ctx).dump(), sort_keys=False))


@main.command()
@click.option("--seed", type=int, default=None, help="Default: the next unused seed.")
@click.option("--subjects", type=int, default=4, show_default=True, help="Subjects per class.")
@click.option("--images", type=int, default=20, show_default=True, help="Images per subject.")
@click.option("--fields", type=int, default=24, show_default=True, help="Smear fields.")
@click.pass_context
def synth(ctx: click.Context, seed: int | None, subjects: int, images: int, fields: int) -> None:
    """Generate a synthetic cell batch and a smear-field batch into the landing zone."""
    from training.dev.synthetic_landing import land_synthetic_batches

    ids = land_synthetic_batches(_cfg(ctx), seed=seed, n_subjects_per_class=subjects,
                                 images_per_subject=images, n_fields=fields)
    for batch_id in ids:
        click.echo(f"landed {batch_id} in {_cfg(ctx).uri('landing')}/{batch_id}")


@main.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--batch-id", required=True, help="Name of the batch in the landing zone.")
@click.pass_context
def upload(ctx: click.Context, path: Path, batch_id: str) -> None:
    """Upload a local folder as a batch: every file first, the _READY marker last."""
    from training.data.landing import upload_batch

    upload_batch(_cfg(ctx), path, batch_id)
    click.echo(f"landed {batch_id} in {_cfg(ctx).uri('landing')}/{batch_id}")


@main.command()
@click.pass_context
def ingest(ctx: click.Context) -> None:
    """Validate every new complete batch in the landing zone (what ingest_validate does)."""
    from training.stages import discover, validate

    cfg = _cfg(ctx)
    for batch_id in discover(cfg):
        result = validate(cfg, batch_id)
        click.echo(f"{batch_id}: {result['status']} ({result['accepted']} accepted, "
                   f"{result['quarantined']} quarantined) report: {result['report_dir']}")


@main.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--report", "report_dir", type=click.Path(file_okay=False, path_type=Path),
              required=True, help="Folder for summary.json, quarantine.html, Data Docs link.")
@click.pass_context
def validate(ctx: click.Context, path: Path, report_dir: Path) -> None:
    """Run the batch validation suite on a local folder without curating anything."""
    from training.data.curation import validate_path

    result = validate_path(_cfg(ctx), path, report_dir)
    _echo_json(result.to_dict())
    click.echo(f"report: {result.report_dir}")
    if result.data_docs:
        click.echo(f"Data Docs: {result.data_docs}")


@main.command()
@click.argument("family", type=click.Choice(sorted(FAMILIES)))
@click.option("--architecture", default=None, help="Classifier architecture (see models list).")
@click.option("--dataset-version", type=int, default=None, help="Default: newest.")
@click.pass_context
def train(ctx: click.Context, family: str, architecture: str | None,
          dataset_version: int | None) -> None:
    """Train and evaluate one candidate in its own process; prints the candidate record."""
    from training.stages import curated_dataset, train

    cfg = _cfg(ctx)
    version = dataset_version or curated_dataset(cfg)["version"]
    architecture = architecture or get_family(family).default_architecture(cfg)
    _echo_json(train(cfg, family, architecture=architecture, dataset_version=version))


@main.command()
@click.argument("model")
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--bootstrap", "n_bootstrap", type=int, default=1000, show_default=True,
              help="Bootstrap resamples for the 95 % CIs (0: none).")
@click.pass_context
def evaluate(ctx: click.Context, model: str, path: Path, n_bootstrap: int) -> None:
    """Score MODEL on the labelled folder PATH (any supported layout) without curating it.

    MODEL: leukemia-classifier@champion, leukemia-detector/3, runs:/<run id>/model. A
    classifier takes a cell folder, a detector a YOLO or Pascal VOC field folder.
    Logs an MLflow evaluation run (split kind 'external') linked to the model; prints its report.
    """
    from training.external import evaluate_folder, headline

    report = evaluate_folder(_cfg(ctx), model, path, n_bootstrap=n_bootstrap)
    extra = {k: report[k] for k in ("boxes_dropped", "classes_not_in_model") if k in report}
    _echo_json({"run_id": report["run_id"], "model": report["model"]["uri"],
                "family": report["family"], "split_kind": report["split_kind"],
                "layout": report["layout"], "skipped": report["skipped"],
                "n_seen_in_training": report["n_seen_in_training"], **extra,
                "metrics": headline(get_family(report["family"]), report["metrics"])})


@main.command("cv")
@click.option("--architecture", default=None, help="Classifier architecture (see models list).")
@click.option("--dataset-version", type=int, default=None, help="Default: newest.")
@click.option("--folds", type=int, default=None, help="Subject folds (default: cv.folds).")
@click.option("--feature-classifiers", default="",
              help="Comma-separated classical classifiers fitted on each fold's backbone "
                   "features (the deep-feature sweep under the same folds).")
@click.pass_context
def cv(ctx: click.Context, architecture: str | None, dataset_version: int | None,
       folds: int | None, feature_classifiers: str) -> None:
    """Leave-subjects-out CV of a classifier architecture: retrained per fold in its own
    process, scored on subjects it never saw (pooled, with subject-level 95 % CIs)."""
    from training.stages import curated_dataset, subject_cv

    cfg = _cfg(ctx)
    version = dataset_version or curated_dataset(cfg)["version"]
    architecture = architecture or get_family("classifier").default_architecture(cfg)
    summary = subject_cv(cfg, architecture, dataset_version=version, folds=folds,
                         feature_classifiers=[n for n in feature_classifiers.split(",") if n])
    m = summary["metrics"]
    for note in summary["notes"]:
        click.secho(f"note: {note}", fg="yellow", err=True)
    click.echo(f"{architecture}, {summary['scheme']} over {int(m['cv/n_subjects'])} subjects: "
               f"balanced accuracy {m['cv/balanced_accuracy']:.3f} [95% CI over subjects "
               f"{m.get('cv/balanced_accuracy_ci_low', float('nan')):.3f}, "
               f"{m.get('cv/balanced_accuracy_ci_high', float('nan')):.3f}] "
               f"(MLflow run {summary['run_id']})", err=True)
    _echo_json(summary)


@main.group()
def models() -> None:
    """The classifier architecture registry."""


@models.command("list")
@click.option("--image-size", type=int, default=None, help="Default: each architecture's own.")
@click.option("--classes", type=int, default=2, show_default=True)
def models_list(image_size: int | None, classes: int) -> None:
    """Every architecture with its paper, input size and parameter counts."""
    from training.classifier.architectures import describe_architectures

    for row in describe_architectures(image_size=image_size, n_classes=classes):
        click.echo("  ".join(f"{k}={v}" for k, v in row.items()))


@main.group()
def registry() -> None:
    """The MLflow model registry."""


@registry.command("show")
@click.pass_context
def registry_show(ctx: click.Context) -> None:
    """Aliases and gate decisions of both registered models."""
    from training.promotion.aliases import ALIASES, alias_version

    cfg = _cfg(ctx)
    for name in (cfg.mlflow.classifier_name, cfg.mlflow.detector_name):
        aliases = {a: alias_version(cfg, name, a) for a in ALIASES}
        click.echo(f"{name}: " + ", ".join(f"{a}=v{v}" for a, v in aliases.items() if v))


@main.command()
@click.argument("model")
@click.option("--to", "to", default=None, help="Version to make champion (default: the "
              "recorded previous champion).")
@click.option("--no-publish", is_flag=True, help="Only move the aliases.")
@click.pass_context
def rollback(ctx: click.Context, model: str, to: str | None, no_publish: bool) -> None:
    """champion <- version TO (default previous_champion) for MODEL, then republish."""
    from training.stages import publish
    from training.stages import rollback as do_rollback

    cfg = _cfg(ctx)
    result = do_rollback(cfg, model, to)
    if result["changed"]:
        click.echo(f"{model}: champion is now v{result['champion']} "
                   f"(v{result['demoted']} demoted)")
    else:
        click.echo(f"{model}: nothing moved ({result['reason']})")
    if not no_publish:
        _echo_json(publish(cfg, [], always=True))


@main.command()
@click.pass_context
def publish(ctx: click.Context) -> None:
    """Build the Bento from the champions, start it on loopback and smoke-test it."""
    from training.stages import publish as do_publish

    _echo_json(do_publish(_cfg(ctx), [], always=True))


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@main.command()
@click.option("--port", type=int, default=None, help="Default: serving.port of the config.")
@click.option("--source", is_flag=True, help="Serve the installed service code once, not the "
              "published Bento (no swaps).")
@click.pass_context
def serve(ctx: click.Context, port: int | None, source: bool) -> None:
    """Serve the published champions on one stable port, swapping (blue/green) to each newly
    published Bento, until SIGTERM or Ctrl-C; every process it started stops with it."""
    import signal
    import time

    from training.publish.bento import serve as run_server

    cfg = _cfg(ctx)
    if not source:
        from training.publish.deploy import run_supervisor

        click.echo(f"serving the published Bento at http://{cfg.serving.host}:"
                   f"{port or cfg.serving.port} (docs /docs); new publications swap in; "
                   "Ctrl-C stops")
        run_supervisor(cfg, port=port)
        return
    # `make down` sends SIGTERM: stop the Bento's circus tree as Ctrl-C does (circus puts its
    # workers in sessions of their own, out of reach of a signal to this process's group)
    signal.signal(signal.SIGTERM, _interrupt)
    with run_server(cfg, port=port or cfg.serving.port, target=None) as url:
        click.echo(f"serving serving.service:LeukoflowAPI at {url} "
                   f"(docs {url}/docs); Ctrl-C stops")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


@main.group()
def keys() -> None:
    """API keys for the HTTP service (stored hashed)."""


@keys.command("create")
@click.argument("name")
@click.option("--scope", "scopes", multiple=True, default=["classify", "detect", "explain"],
              show_default=True)
@click.pass_context
def keys_create(ctx: click.Context, name: str, scopes: tuple[str, ...]) -> None:
    """Create a key; the plaintext is shown once."""
    from training.apikeys import create_key

    token = create_key(_cfg(ctx).api_keys_file, name, list(scopes))
    click.echo(token)


@keys.command("revoke")
@click.argument("name")
@click.pass_context
def keys_revoke(ctx: click.Context, name: str) -> None:
    """Remove a key by name."""
    from training.apikeys import revoke_key

    revoke_key(_cfg(ctx).api_keys_file, name)
    click.echo(f"revoked {name}")


@main.command()
@click.pass_context
def demo(ctx: click.Context) -> None:
    """The whole chain on synthetic data through Airflow, then real HTTP requests."""
    from training.dev.demo import run_demo

    run_demo(_cfg(ctx))


@main.command()
@click.pass_context
def up(ctx: click.Context) -> None:
    """Start Airflow (standalone), the MLflow UI and the service on loopback."""
    from training.dev.localstack import start_all

    start_all(_cfg(ctx))


@main.command()
@click.pass_context
def down(ctx: click.Context) -> None:
    """Stop what ``leukoflow up`` started."""
    from training.dev.localstack import stop_all

    stop_all(_cfg(ctx))


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def airflow(ctx: click.Context, args: tuple[str, ...]) -> None:
    """Run the ``airflow`` CLI with the embedded environment (SQLite under home)."""
    import os

    from training.dev.localenv import airflow_env

    env = {**os.environ, **airflow_env(_cfg(ctx))}
    (_cfg(ctx).home / "airflow").mkdir(parents=True, exist_ok=True)
    binary = str(Path(sys.executable).with_name("airflow"))
    os.execvpe(binary, [binary, *args], env)


if __name__ == "__main__":
    main()
