"""Publish the champions: MLflow ``@champion`` -> BentoML models -> Bento -> loopback -> smoke test.

    import_champions   models:/<name>@champion -> BentoML models (labels: registered_name,
                       registered_version, run_id); skipped when that version is already there
    export_champions   each model exported to ONNX inside its BentoML model and checked against
                       the framework model on its test images (:mod:`training.publish.export`)
    build_bento        ``bentoml build`` with the champions' tags pinned as Bento arguments
    serve              ``bentoml serve <bento>`` on 127.0.0.1, wait for /readyz, always stop it
    smoke_test         authenticated /classify and /detect answer with the registered versions;
                       an unauthenticated request gets 401
    publish            all four; any failure is a PublishError with the reason (and the server
                       log's tail), the Bento that failed is deleted (``leukoflow:latest`` is
                       always the last one that passed), and the caller rolls the alias back

Nothing heavy runs in this process: BentoML (which reads ``BENTOML_HOME`` once), TensorFlow and
torch only run in subprocesses, with ``BENTOML_HOME = cfg.bentoml_home`` and the resolved config
written to a file that the server reads back (``LEUKOFLOW_CONFIG``).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from training.config import Config
from training.errors import PublishError, RegistryError
from training.families import FAMILIES, get_family
from training.lineage import BUILD_INFO, git_sha, git_sha_source
from training.records import Publication

__all__ = [
    "ChampionModel", "build_bento", "import_champions", "publish", "serve", "smoke_test",
]

log = logging.getLogger(__name__)

SERVICE = "serving.service:LeukoflowAPI"
BENTOFILE = "bentofile.yaml"  # package data of ``serving``
# What a Bento carries: the service and the library it imports, never the dev tooling.
BENTO_PACKAGES = ("serving", "training")
_NOT_IN_BENTO = shutil.ignore_patterns("__pycache__", "*.pyc", "dev")
SMOKE_KEY_PREFIX = "publish-smoke-"
_LOG_TAIL = 4000


@dataclass(frozen=True)
class ChampionModel:
    """A champion registered version and the BentoML model made from it."""

    family: str  # "classifier" | "detector"
    name: str
    version: str
    run_id: str
    bento_tag: str
    imported: bool  # False when an earlier publish had imported it already


# ------------------------------------------------------------------------ environment
def _resolved_config_file(cfg: Config) -> Path:
    """Write the resolved config where the server reads it: DAG overrides survive the hop."""
    path = cfg.home / "serving" / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".config.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        yaml.safe_dump(cfg.dump(), fh, sort_keys=False)
    os.replace(tmp, path)
    return path


def _child_env(cfg: Config, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment of a BentoML subprocess: our config file, our BentoML home, offline."""
    config_keys = {f"LEUKOFLOW_{name.upper()}" for name in Config.model_fields}
    env = {k: v for k, v in os.environ.items()
           if not (k in config_keys or any(k.startswith(c + "__") for c in config_keys))}
    env.update({
        "LEUKOFLOW_CONFIG": str(_resolved_config_file(cfg)),
        "BENTOML_HOME": str(cfg.bentoml_home),
        "BENTOML_DO_NOT_TRACK": "True",
        "YOLO_OFFLINE": "1",
        "YOLO_CONFIG_DIR": str(cfg.home / "ultralytics"),
        "MLFLOW_TRACKING_URI": cfg.tracking_uri,
        "PYTHONUNBUFFERED": "1",
    })
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env.update(extra or {})
    return env


def _bentoml() -> list[str]:
    exe = Path(sys.executable).with_name("bentoml")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "bentoml"]


def _run(cmd: list[str], cfg: Config, what: str, timeout: float,
         extra_env: Mapping[str, str] | None = None) -> str:
    try:
        proc = subprocess.run(cmd, cwd=cfg.home, env=_child_env(cfg, extra_env), text=True,
                              capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise PublishError(f"{what} timed out after {timeout:.0f}s: {' '.join(cmd)}") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or "")[-_LOG_TAIL:]
        raise PublishError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    return proc.stdout


# ---------------------------------------------------------------------- import / build
def _champions(cfg: Config) -> list[tuple[str, str, str, str]]:
    """(family, name, version, run_id) of every family that has a champion.

    A deployment may serve one family (a cells-only site trains no detector); PublishError
    when no family has a champion, or when the registry cannot be read (never read as "none").
    """
    from mlflow import MlflowClient

    from training.promotion.aliases import alias_version

    try:
        client = MlflowClient(tracking_uri=cfg.tracking_uri, registry_uri=cfg.tracking_uri)
        out = []
        for family in FAMILIES.values():
            name = family.registered_name(cfg)
            version = alias_version(cfg, name, "champion")
            if version is None:
                log.info("%s has no champion: this Bento serves no %s", name, family.name)
                continue
            mv = client.get_model_version(name, version)
            out.append((family.name, name, version, str(mv.run_id or "")))
    except RegistryError as exc:
        raise PublishError(f"cannot read the champions: {exc}") from exc
    if not out:
        raise PublishError(f"no model has a 'champion' alias in {cfg.tracking_uri}: train and "
                           "promote a classifier or a detector first")
    return out


def import_champions_detail(cfg: Config) -> list[ChampionModel]:
    """Import both champions into the BentoML store (idempotent); returns what was served."""
    models = []
    for family, name, version, run_id in _champions(cfg):
        labels = {"registered_name": name, "registered_version": version, "run_id": run_id}
        cmd = [sys.executable, "-m", "serving.store", "ensure", "--name", name,
               "--model-uri", f"models:/{name}/{version}", "--tracking-uri", cfg.tracking_uri,
               *[arg for k, v in labels.items() for arg in ("--label", f"{k}={v}")]]
        out = _run(cmd, cfg, f"importing {name} v{version} into BentoML", timeout=900)
        try:
            result = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError) as exc:
            raise PublishError(f"importing {name} v{version} printed no result: {out!r}") from exc
        models.append(ChampionModel(family, name, version, run_id, result["tag"],
                                    bool(result["imported"])))
    return models


def import_champions(cfg: Config) -> dict[str, str]:
    """``{registered name: BentoML model tag}`` of both champions, importing what is missing."""
    return {m.name: m.bento_tag for m in import_champions_detail(cfg)}


def _model_tags(models: list[ChampionModel]) -> dict:
    """Family -> the BentoML model tag it serves, ``none`` for a family without a champion."""
    tags = {family: "none" for family in FAMILIES}
    tags.update({m.family: m.bento_tag for m in models})
    return tags


def _model_args(models: list[ChampionModel]) -> list[str]:
    return [arg for family, tag in _model_tags(models).items()
            for arg in ("--arg", f"{get_family(family).bento_arg}={tag}")]


@contextlib.contextmanager
def build_context() -> Iterator[Path]:
    """A folder to build the Bento from: the installed ``serving`` and ``training`` packages
    (dev tooling left out), the bentofile, and the code's git sha stamped in.

    Found with :mod:`importlib.resources`, so a wheel installed anywhere builds the same Bento
    as a checkout; the stamp (:mod:`training.lineage`) keeps the served code's lineage.
    """
    with tempfile.TemporaryDirectory(prefix="leukoflow-bento-") as tmp:
        ctx = Path(tmp)
        for package in BENTO_PACKAGES:
            with resources.as_file(resources.files(package)) as src:
                shutil.copytree(src, ctx / package, ignore=_NOT_IN_BENTO)
        shutil.copyfile(ctx / "serving" / BENTOFILE, ctx / BENTOFILE)
        (ctx / "training" / BUILD_INFO).write_text(
            json.dumps({"git_sha": git_sha(), "git_sha_source": git_sha_source()}) + "\n")
        yield ctx


def build_bento(cfg: Config, models: list[ChampionModel] | None = None) -> str:
    """``bentoml build`` of the packaged bentofile, champions pinned; returns the Bento tag."""
    models = import_champions_detail(cfg) if models is None else models
    labels = [arg for m in models
              for arg in ("--label", f"{m.family}={m.name}.v{m.version}")]
    with build_context() as ctx:
        cmd = [*_bentoml(), "build", "-f", str(ctx / BENTOFILE), "-o", "tag",
               *_model_args(models), *labels, str(ctx)]
        out = _run(cmd, cfg, "bentoml build", timeout=600)
    for line in reversed(out.splitlines()):
        if line.startswith("__tag__:"):
            return line.removeprefix("__tag__:").strip()
    raise PublishError(f"bentoml build printed no tag:\n{out[-_LOG_TAIL:]}")


# ------------------------------------------------------------------------------- serve
def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _tail(path: Path, n: int = _LOG_TAIL) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-n:].decode("utf-8", "replace")


def _stop(proc: subprocess.Popen[bytes], grace: float = 20.0) -> None:
    """Stop ``bentoml serve`` and every worker it started, whatever state they are in.

    SIGTERM goes to the ``bentoml serve`` process only: it stops circus, which stops the
    workers in order. (Signalling the whole process group races circus' own shutdown and
    left the API worker hanging in about half of the tries.) Circus starts each worker in a
    session of its own, so the workers are listed first and whatever is left of the tree
    after ``grace`` seconds gets SIGKILL.
    """
    import psutil

    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    deadline = time.monotonic() + grace
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(tree, timeout=grace)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
    psutil.wait_procs(alive, timeout=10)
    if alive:
        log.warning("killed %d bentoml worker(s) that did not stop within %.0fs: %s",
                    len(alive), grace, [p.pid for p in alive])


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the parent dies (Linux ``PR_SET_PDEATHSIG``),
    so a publish step killed with SIGKILL leaves no smoke-test server behind."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


@contextlib.contextmanager
def serve(
    cfg: Config,
    port: int | None = None,
    target: str | None = None,
    extra_env: Mapping[str, str] | None = None,
    *,
    die_with_parent: bool = True,
) -> Iterator[str]:
    """Run ``bentoml serve`` on loopback until the block ends; yields the base URL.

    ``target``: a Bento tag (as built by :func:`build_bento`) or, by default, the service
    import path, served from the installed packages. Waits for ``/readyz`` up to
    ``cfg.serving.startup_timeout_s``; the server log goes to ``cfg.home/logs/`` and its tail
    into the PublishError when the server dies or never gets ready. Always stopped on exit;
    with ``die_with_parent`` also when this process is killed (only for a server started from
    a thread that lives as long as the process: the signal follows the starting thread).
    """
    import httpx

    host = "127.0.0.1"
    port = port or _free_port(host)
    log_dir = cfg.home / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    log_path = log_dir / f"bentoml-serve-{stamp}-{port}.log"
    cmd = [*_bentoml(), "serve", target or SERVICE, "--host", host, "--port", str(port),
           "--timeout-graceful-shutdown", "5"]
    base_url = f"http://{host}:{port}"
    with open(log_path, "ab") as log_fh:  # append: our own notes go to the same file
        log_fh.write(f"$ {' '.join(cmd)}\n".encode())
        log_fh.flush()
        proc = subprocess.Popen(cmd, cwd=cfg.home, env=_child_env(cfg, extra_env), stdout=log_fh,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_die_with_parent if die_with_parent else None)
    try:
        start = time.monotonic()
        deadline = start + cfg.serving.startup_timeout_s
        with httpx.Client(timeout=5.0) as client:
            while True:
                if proc.poll() is not None:
                    raise PublishError(f"bentoml serve exited with code {proc.returncode} "
                                       f"before it was ready; log {log_path}:\n{_tail(log_path)}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{base_url}/readyz").status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise PublishError(
                        f"bentoml serve was not ready after {cfg.serving.startup_timeout_s}s; "
                        f"log {log_path}:\n{_tail(log_path)}")
                time.sleep(0.5)
        with open(log_path, "ab") as fh:
            fh.write(f"# leukoflow: ready after {time.monotonic() - start:.1f}s\n".encode())
        yield base_url
    finally:
        _stop(proc)


# --------------------------------------------------------------------------- smoke test
def smoke_image() -> bytes:
    """A small synthetic smear-like PNG (pink field, one purple-nucleus cell)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (160, 160), (236, 190, 200))
    draw = ImageDraw.Draw(img)
    draw.ellipse((50, 45, 115, 110), fill=(200, 170, 220))
    draw.ellipse((62, 58, 102, 98), fill=(90, 40, 130))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def smoke_test(
    base_url: str,
    api_key: str,
    image_bytes: bytes,
    expected_versions: Mapping[str, str] | None = None,
    transport: Any = None,
    families: list[str] | None = None,
) -> dict[str, Any]:
    """Authenticated requests to the routes of ``families`` (default: all) succeed, naming the
    expected registered versions if given, and an unauthenticated one gets 401; raises
    PublishError saying what failed.

    ``transport``: an ``httpx`` transport to use instead of the network (tests).
    """
    import httpx

    report: dict[str, Any] = {}
    files = {"image": ("smoke.png", image_bytes, "image/png")}
    auth = {"Authorization": f"Bearer {api_key}"}
    with httpx.Client(base_url=base_url, timeout=120.0, transport=transport) as client:
        def post(route: str, headers: dict[str, str]) -> tuple[httpx.Response, float]:
            start = time.perf_counter()
            try:
                resp = client.post(route, files=files, headers=headers)
            except httpx.HTTPError as exc:
                raise PublishError(f"smoke test: POST {route} failed: {exc}") from exc
            return resp, (time.perf_counter() - start) * 1000

        served = [get_family(f) for f in (families or list(FAMILIES))]
        first = served[0].route
        resp, _ = post(first, {})
        if resp.status_code != 401:
            raise PublishError(f"smoke test: {first} without a key answered "
                               f"{resp.status_code}, expected 401: {resp.text[:300]}")
        report["unauthenticated_status"] = resp.status_code

        for route, needs in ((f.route, f.answer_fields) for f in served):
            resp, ms = post(route, auth)
            if resp.status_code != 200:
                raise PublishError(f"smoke test: {route} answered {resp.status_code}: "
                                   f"{resp.text[:500]}")
            try:
                report[route.strip("/")] = _check_answer(route, resp.json(), needs, ms,
                                                         expected_versions)
            except (ValueError, TypeError, AttributeError, KeyError) as exc:
                raise PublishError(f"smoke test: {route} answered something malformed "
                                   f"({exc!r}): {resp.text[:500]}") from exc
    return report


def _check_answer(route: str, body: dict[str, Any], needs: tuple[str, ...], ms: float,
                  expected_versions: Mapping[str, str] | None) -> dict[str, Any]:
    missing = [k for k in (*needs, "model") if k not in body]
    if missing:
        raise PublishError(f"smoke test: {route} answer lacks {missing}: {body}")
    model = body["model"]
    want = (expected_versions or {}).get(model.get("name"))
    if expected_versions is not None and str(model.get("version")) != str(want):
        raise PublishError(f"smoke test: {route} served {model}, expected "
                           f"{model.get('name')} v{want} (of {dict(expected_versions)})")
    entry = {"status": 200, "latency_ms": round(ms, 1), "model": model}
    if "probabilities" in needs:
        entry["label"] = body["label"]
        total = sum(float(p) for p in body["probabilities"].values())
        if abs(total - 1.0) > 1e-3:
            raise PublishError(f"smoke test: probabilities sum to {total}: {body}")
    if "boxes" in needs:
        entry["boxes"] = len(body["boxes"])
    return entry


def _delete_bento(cfg: Config, tag: str) -> None:
    """Remove a Bento that failed its smoke test; a failure to remove it is only logged."""
    try:
        _run([*_bentoml(), "delete", tag, "-y"], cfg, f"bentoml delete {tag}", timeout=120)
    except PublishError as exc:
        log.warning("could not delete the failed Bento %s: %s", tag, exc)


# ----------------------------------------------------------------------------- publish
@contextlib.contextmanager
def _smoke_key(cfg: Config) -> Iterator[str]:
    """A key that lives only as long as the smoke test (the plaintext is never stored)."""
    from training.apikeys import create_key, revoke_key

    name = SMOKE_KEY_PREFIX + uuid.uuid4().hex[:12]
    key = create_key(cfg.api_keys_file, name, ["classify", "detect"])
    try:
        yield key
    finally:
        revoke_key(cfg.api_keys_file, name)


def publish(cfg: Config, *, serve_built: bool = True) -> Publication:
    """Import the champions, build the Bento, serve it on a free loopback port, smoke-test it.

    ``serve_built=False`` serves the installed service code instead of the built Bento
    (same code, same models; for debugging a build problem).
    """
    try:
        return _publish(cfg, serve_built)
    except PublishError:
        raise
    except Exception as exc:  # a key file, disk or bug: still a failed publish, with its reason
        raise PublishError(f"publishing failed: {type(exc).__name__}: {exc}") from exc


def _publish(cfg: Config, serve_built: bool) -> Publication:
    from training.publish.export import export_champions

    models = import_champions_detail(cfg)
    exports = export_champions(cfg, models, _run)  # infra-validation: a mismatch stops here
    tag = build_bento(cfg, models)
    versions = {m.name: m.version for m in models}
    started = time.monotonic()
    try:
        with _smoke_key(cfg) as key:
            target = tag if serve_built else None
            extra = None if serve_built else {
                get_family(family).bento_tag_env: tag
                for family, tag in _model_tags(models).items()}
            with serve(cfg, target=target, extra_env=extra) as url:
                ready_s = time.monotonic() - started
                smoke = smoke_test(url, key, smoke_image(), expected_versions=versions,
                                   families=[m.family for m in models])
    except BaseException:
        _delete_bento(cfg, tag)  # so that "leukoflow:latest" stays the last Bento that passed
        raise
    smoke["startup_s"] = round(ready_s, 1)
    smoke["bento_models"] = {m.name: m.bento_tag for m in models}
    smoke["imported"] = [m.name for m in models if m.imported]
    smoke["onnx"] = exports
    return Publication(bento_tag=tag, models=versions, url=url, smoke=smoke)
