"""Throughput of the front half of validation (import + per-image metadata) vs a bare decode.

    python bench/validation_throughput.py [--data ../shared/data/cnmc_fold1] [--workers N]

Times, in one run on the same files: (a) ``Image.open(p).load()`` of every image in one
process, the least any validator must do; (b) ``import_batch`` + ``extract_metadata`` (sha256,
perceptual hash, statistics, safety checks) with ``--workers`` processes. Prints images/s for
both, the ratio of wall times (goal: at most 2) and of CPU times (this process plus the pool's
workers: what the work costs, whatever else the machine runs), then one JSON line.
The phases alternate ``--repeat`` times and the fastest run of each is kept, so both see the
same load from other processes; the OS file cache is warmed by an untimed read first, so both
read from memory. The 1-minute load average before and after is reported: on a shared machine
read the ratio with it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.data.importers import import_batch  # noqa: E402
from training.data.metadata import extract_metadata, resolve_workers  # noqa: E402
from training.dev.localenv import cpu_model  # noqa: E402


def _bare_decode(paths: list[Path]) -> None:
    for p in paths:
        with Image.open(p) as im:
            im.load()


def _cpu_s() -> float:
    """CPU seconds of this process plus its finished children (the pool's workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds): CPU time does not depend on what else the machine runs."""
    c0, t0 = _cpu_s(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, _cpu_s() - c0


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cnmc_fold1")
    parser.add_argument("--workers", type=int, default=None, help="default: usable cores")
    parser.add_argument("--repeat", type=int, default=3, help="runs per phase; fastest kept")
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        parser.error(f"{args.data} does not exist (see ../shared/data/README.md)")

    layout, records = import_batch(args.data, "bench")
    paths = [args.data / r.path for r in records]
    for p in paths:  # warm the page cache, untimed
        p.read_bytes()
    workers = resolve_workers(args.workers)

    def pipeline() -> None:
        _, recs = import_batch(args.data, "bench")
        extract_metadata(args.data, recs, "bench", workers=workers)

    load_before = os.getloadavg()[0]
    bare, meta = [], []
    for _ in range(args.repeat):
        bare.append(_timed(lambda: _bare_decode(paths)))
        meta.append(_timed(pipeline))
    bare_runs, meta_runs = [w for w, _ in bare], [w for w, _ in meta]
    bare_s, meta_s = min(bare_runs), min(meta_runs)
    bare_cpu, meta_cpu = min(c for _, c in bare), min(c for _, c in meta)
    n = len(paths)
    result = {
        "data": str(args.data), "layout": layout, "images": n, "workers": workers,
        "cpus": os.cpu_count(), "cpu_model": cpu_model(), "repeat": args.repeat,
        "bare_decode_s": round(bare_s, 3), "bare_decode_images_per_s": round(n / bare_s, 1),
        "metadata_s": round(meta_s, 3), "metadata_images_per_s": round(n / meta_s, 1),
        "ratio_metadata_to_bare": round(meta_s / bare_s, 3),
        "goal_ratio_at_most": 2.0,
        "bare_decode_cpu_s": round(bare_cpu, 3), "metadata_cpu_s": round(meta_cpu, 3),
        "cpu_ratio_metadata_to_bare": round(meta_cpu / bare_cpu, 3),
        "bare_runs_s": [round(t, 3) for t in bare_runs],
        "metadata_runs_s": [round(t, 3) for t in meta_runs],
        "loadavg_1min_before": round(load_before, 2),
        "loadavg_1min_after": round(os.getloadavg()[0], 2),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(f"{n} images ({layout}) from {args.data}")
    print(f"bare decode, 1 process:          {n / bare_s:8.1f} images/s ({bare_s:.2f} s)")
    print(f"import + metadata, {workers} worker(s): {n / meta_s:8.1f} images/s ({meta_s:.2f} s)")
    print(f"ratio metadata/bare: {meta_s / bare_s:.2f} (goal <= 2); "
          f"CPU-time ratio {meta_cpu / bare_cpu:.2f} (independent of other load)")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
