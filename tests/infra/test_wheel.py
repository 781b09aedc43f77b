"""The package runs outside its checkout: a wheel, installed without ``-e`` into a fresh venv.

A wheel is built from this checkout (``pip wheel .``, as the Airflow image's ``pip install .``
does) and installed into a new virtual environment in a temporary folder; every command then
runs from a working directory outside the checkout, with no ``PYTHONPATH``. The third-party
dependencies (8 GB) are not installed a second time: the new venv sees the project venv's
``site-packages`` through a ``.pth`` line, which adds the folder to ``sys.path`` but processes
none of the ``.pth`` files in it, so the checkout's editable install is invisible there and
``training`` / ``serving`` come from the wheel alone (asserted below).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED_CELLS = REPO.parent / "shared" / "data" / "cnmc_fold1"

pytestmark = pytest.mark.slow


def _run(cmd: list[str], *, cwd: Path, env: dict[str, str], timeout: int = 600) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (f"{' '.join(cmd)} exited {proc.returncode}:\n"
                                  f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Build the wheel, make the venv, install the wheel: paths and the environment to use."""
    tmp = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "LEUKOFLOW_GIT_SHA", "VIRTUAL_ENV")}
    _run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
          "-q", "-w", str(tmp / "dist")], cwd=tmp, env=env)
    wheel = next((tmp / "dist").glob("leukoflow-*.whl"))
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp, env=env)
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                      "['purelib'])"], cwd=tmp, env=env).strip())
    (site / "leukoflow_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
         cwd=tmp, env=env)
    work = tmp / "elsewhere"
    work.mkdir()
    env = {**env, "LEUKOFLOW_HOME": str(tmp / "home"), "PATH": f"{venv / 'bin'}:{env['PATH']}"}
    return {"tmp": tmp, "wheel": wheel, "venv": venv, "python": python, "site": site,
            "work": work, "env": env}


def test_the_wheel_carries_its_data_files_and_no_dev_or_research_code(installed: dict) -> None:
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    assert "serving/bentofile.yaml" in names
    assert "training/_build_info.json" in names
    for web in ("serving/webapp/templates/classify.html", "serving/webapp/static/app.css",
                "serving/webapp/static/vendor/bootstrap/bootstrap.min.css",
                "serving/webapp/static/vendor/fontawesome/webfonts/fa-solid-900.woff2"):
        assert web in names, web  # the web app's pages and offline assets travel with it
    assert not [n for n in names if n.startswith(("research/", "tests/", "bench/", "dags/"))]


def test_packages_come_from_the_wheel_not_the_checkout(installed: dict) -> None:
    out = _run([str(installed["python"]), "-c",
                "import training, serving; print(training.__file__); print(serving.__file__)"],
               cwd=installed["work"], env=installed["env"])
    for line in out.split():
        assert Path(line).is_relative_to(installed["site"]), out


def test_git_sha_is_stamped_at_build_time(installed: dict) -> None:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout.strip()
    out = _run([str(installed["python"]), "-c",
                "from training.lineage import lineage_tags; import json; "
                "print(json.dumps(lineage_tags()))"], cwd=installed["work"], env=installed["env"])
    assert json.loads(out) == {"git_sha": head, "git_sha_source": "build"}
    env = {**installed["env"], "LEUKOFLOW_GIT_SHA": "0123abc"}
    out = _run([str(installed["python"]), "-c",
                "from training.lineage import lineage_tags; import json; "
                "print(json.dumps(lineage_tags()))"], cwd=installed["work"], env=env)
    assert json.loads(out) == {"git_sha": "0123abc", "git_sha_source": "env"}


def test_cli_help_and_validate_a_real_folder(installed: dict, tmp_path: Path) -> None:
    leukoflow = str(installed["venv"] / "bin" / "leukoflow")
    assert "validate" in _run([leukoflow, "--help"], cwd=installed["work"],
                              env=installed["env"])
    folder = tmp_path / "cells"
    if SHARED_CELLS.is_dir():  # a small real folder: 6 C-NMC cells of each class
        for cls in ("all", "hem"):
            (folder / cls).mkdir(parents=True)
            for src in sorted((SHARED_CELLS / cls).iterdir())[:6]:
                shutil.copy(src, folder / cls / src.name)
    else:
        _run([str(installed["python"]), "-c", textwrap.dedent(f"""
            from pathlib import Path
            from training.dev.synth import make_cell_batch
            make_cell_batch(Path({str(folder)!r}), n_subjects_per_class=2,
                            images_per_subject=3, seed=1)
        """)], cwd=installed["work"], env=installed["env"])
    report = tmp_path / "report"
    out = _run([leukoflow, "validate", str(folder), "--report", str(report)],
               cwd=installed["work"], env=installed["env"])
    result = json.loads(out[:out.rindex("}") + 1])
    assert result["images"] == 12 and result["accepted"] + result["quarantined"] == 12, result
    assert (report / "summary.json").is_file()


def test_the_bento_builds_from_the_installed_resources(installed: dict) -> None:
    """Stand-in BentoML models (the build only checks that the tags exist), real build."""
    script = textwrap.dedent("""
        import json
        from pathlib import Path
        import bentoml
        from training.config import load_config
        from training.families import FAMILIES
        from training.publish.bento import ChampionModel, build_bento

        cfg = load_config()
        models = []
        for family in FAMILIES.values():
            name = family.registered_name(cfg)
            with bentoml.models.create(name, labels={"registered_version": "1"}) as m:
                Path(m.path, "MLmodel").write_text("metadata: {}\\n")
            models.append(ChampionModel(family.name, name, "1", "run", str(m.tag), True))
        tag = build_bento(cfg, models)
        src = Path(bentoml.get(tag).path) / "src"
        print(json.dumps({"tag": tag, "files": sorted(
            str(p.relative_to(src)) for p in src.rglob("*") if p.is_file())}))
    """)
    env = {**installed["env"], "BENTOML_HOME": str(installed["tmp"] / "home" / "bentoml"),
           "BENTOML_DO_NOT_TRACK": "true"}
    out = _run([str(installed["python"]), "-c", script], cwd=installed["work"], env=env)
    built = json.loads(out.strip().splitlines()[-1])
    files = set(built["files"])
    assert built["tag"].startswith("leukoflow:")
    assert {"serving/service.py", "serving/bentofile.yaml", "training/classifier/predict.py",
            "training/_build_info.json"} <= files, sorted(files)
    assert not [f for f in files if f.startswith("training/dev/")], sorted(files)
