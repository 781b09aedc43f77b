"""The command-line entry both model families share when the DAG trains them in a child process.

``python -m training.classifier.train`` and ``python -m training.detector.train`` parse the same
flags, load the config the same way (file + ``LEUKOFLOW_*`` env), and write the Candidate JSON the
same way; only the training function differs. Errors of ours exit 2 with one line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from training.config import Config, load_config
from training.errors import ConfigError, LeukoflowError
from training.records import Candidate

__all__ = ["child_process_setup", "run_candidate_entry"]

TrainFn = Callable[[Config, argparse.Namespace, dict[str, Any] | None], Candidate]


def child_process_setup() -> None:
    """What every training child process does first: quiet TF start-up, log to stderr.

    (MLflow telemetry is switched off by importing the ``training`` package itself.)
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run_candidate_entry(argv: list[str] | None, *, prog: str, doc: str | None, train: TrainFn,
                        architecture: bool = False) -> int:
    """Parse flags, train, write ``--out``; returns the process exit code."""
    parser = argparse.ArgumentParser(prog=prog, description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if architecture:
        parser.add_argument("--architecture", default=None,
                            help="architecture name (default: the config's first)")
    parser.add_argument("--dataset-version", type=int, default=None,
                        help="curated manifest version (default: the newest)")
    parser.add_argument("--parent-run-id", default=None, help="MLflow run to nest under")
    parser.add_argument("--tags-json", default=None, help="JSON object of MLflow run tags")
    parser.add_argument("--out", type=Path, required=True, help="where to write the Candidate")
    args = parser.parse_args(argv)
    child_process_setup()
    try:
        tags = json.loads(args.tags_json) if args.tags_json else None
        if tags is not None and not isinstance(tags, dict):
            raise ConfigError(f"--tags-json must be a JSON object, got {args.tags_json!r}")
        candidate = train(load_config(), args, tags)
    except json.JSONDecodeError as exc:
        print(f"error: --tags-json is not valid JSON: {exc}", file=sys.stderr)
        return 2
    except LeukoflowError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(candidate.to_dict(), indent=2, sort_keys=True) + "\n")
    print(json.dumps(candidate.to_dict(), sort_keys=True))
    return 0
