"""Stamps the git commit into wheels built from a checkout (see training/lineage.py).

Everything else is declared in pyproject.toml; this file only extends ``build_py`` so that a
wheel installed outside any checkout can still tell which commit it was built from.
"""

import json
import os
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


def _git_sha() -> str:
    if os.environ.get("LEUKOFLOW_GIT_SHA"):
        return os.environ["LEUKOFLOW_GIT_SHA"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


class StampedBuildPy(build_py):
    """``build_py`` that also writes ``training/_build_info.json`` into the build tree."""

    def run(self) -> None:
        super().run()
        sha = _git_sha()
        if sha and not self.editable_mode:
            target = Path(self.build_lib) / "training" / "_build_info.json"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps({"git_sha": sha, "git_sha_source": "build"}) + "\n")


setup(cmdclass={"build_py": StampedBuildPy})
