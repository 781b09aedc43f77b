"""Real-data classifier experiment: validate -> train -> baseline -> deep-feature sweep -> table.

    python bench/classifier_realdata.py --dataset cnmc_fold1|all_4class \
        --split-level subject|image --architectures lightweight_efficientnet_b3 \
        --image-size 64 --epochs 3 --home /tmp/lf-exp-cnmc-subject

The dataset folder (``../shared/data/<dataset>`` beside the checkout, or ``--data-root``) is
landed by symlink into ``--home``, a throw-away ``LEUKOFLOW_HOME``; use a fresh home per
(dataset, split level). Training and feature extraction run in child processes. Prints the
markdown report (also written to ``<home>/experiment/experiment.md`` with the comparison
CSV/PNG and ``experiment.json``); results are written up in ``docs/classifier-results.md``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from research.experiments import (  # noqa: E402
    DATASETS,
    DEFAULT_CV_NAMES,
    DEFAULT_DATA_ROOT,
    report_markdown,
    run_experiment,
)
from training.classifier.architectures import ARCHITECTURES  # noqa: E402
from training.classifier.classical import CLASSIFIERS  # noqa: E402
from training.errors import LeukoflowError  # noqa: E402


def _names(text: str | None) -> list[str] | None:
    if text is None or text == "all":
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = sorted(set(names) - set(CLASSIFIERS))
    if unknown:
        raise SystemExit(f"unknown classifier(s) {unknown}; choose from {sorted(CLASSIFIERS)}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(DATASETS), required=True)
    parser.add_argument("--split-level", choices=("subject", "image"), default="subject")
    parser.add_argument("--architectures", nargs="+", default=["lightweight_efficientnet_b3"],
                        choices=sorted(ARCHITECTURES), metavar="NAME")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default: the architecture's (Batool & Byun: 40)")
    parser.add_argument("--home", type=Path, required=True, help="throw-away LEUKOFLOW_HOME")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    parser.add_argument("--sweep", default="all",
                        help="comma-separated classical classifiers, or 'all' (default)")
    parser.add_argument("--cv-k", type=int, default=10, help="grouped CV folds (0: no CV)")
    parser.add_argument("--cv-names", default=",".join(DEFAULT_CV_NAMES),
                        help="classifiers for the grouped CV")
    parser.add_argument("--out", type=Path, default=None, help="default: <home>/experiment")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    spec = DATASETS[args.dataset]
    source = args.data_root / spec.folder
    if not source.is_dir():
        print(f"error: dataset folder {source} not found (../shared/data beside the checkout, "
              "or --data-root)", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        result = run_experiment(
            spec, home=args.home, split_level=args.split_level, architectures=args.architectures,
            image_size=args.image_size, epochs=args.epochs, batch_size=args.batch_size,
            source=source, sweep_names=_names(args.sweep), cv_k=args.cv_k,
            cv_names=_names(args.cv_names), out_dir=args.out)
    except LeukoflowError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print(report_markdown(result))
    print(f"wall time: {time.perf_counter() - start:.1f} s; files: {', '.join(result['files'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
