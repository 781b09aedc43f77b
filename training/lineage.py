"""Which code made a run: the git commit, and where that fact came from.

A lineage tag must survive the package leaving its checkout (a wheel in a container, a Bento).
The commit is taken, in order, from:

1. ``LEUKOFLOW_GIT_SHA`` in the environment (CI and image builds set it; it wins so that a
   deployment can state what it runs),
2. the git checkout the package was imported from, when there is one,
3. ``training/_build_info.json``, stamped by ``setup.py`` when a wheel is built from a checkout,

and :func:`git_sha_source` says which one answered ("env", "checkout", "build" or "unknown").
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
from importlib import resources
from pathlib import Path

__all__ = ["BUILD_INFO", "git_sha", "git_sha_source", "lineage_tags"]

BUILD_INFO = "_build_info.json"
ENV = "LEUKOFLOW_GIT_SHA"


def _from_checkout() -> str | None:
    """HEAD of the git work tree holding this package's source, if it is in one."""
    here = Path(__file__).resolve().parent
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=here, text=True,
                             capture_output=True, timeout=10, check=True).stdout.strip()
        # a wheel installed into a venv inside some checkout is not that checkout's code
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", __file__], cwd=top,
                                 capture_output=True, timeout=10).returncode == 0
        if not tracked:
            return None
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=top, text=True,
                              capture_output=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _from_build() -> str | None:
    try:
        info = json.loads(resources.files("training").joinpath(BUILD_INFO).read_text())
    except (OSError, ValueError):
        return None
    return str(info.get("git_sha") or "") or None


@functools.cache
def _resolve() -> tuple[str, str]:
    if os.environ.get(ENV):
        return os.environ[ENV], "env"
    for source, find in (("checkout", _from_checkout), ("build", _from_build)):
        sha = find()
        if sha:
            return sha, source
    return "unknown", "unknown"


def git_sha() -> str:
    """The commit of the running code, or "unknown" (see the module docstring for the order)."""
    return _resolve()[0]


def git_sha_source() -> str:
    """Where :func:`git_sha` came from: "env", "checkout", "build" or "unknown"."""
    return _resolve()[1]


def lineage_tags() -> dict[str, str]:
    """The code-lineage tags of a run or model version: ``git_sha`` and ``git_sha_source``."""
    sha, source = _resolve()
    return {"git_sha": sha, "git_sha_source": source}
