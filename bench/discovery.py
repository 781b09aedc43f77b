"""Batch discovery with many landed batches: a full listing (the old way) vs ledger + folders.

    python bench/discovery.py [--batches 10000] [--new 10] [--files 2] [--deadline 900]

Starts moto's S3-protocol HTTP server (``ThreadedMotoServer``) on 127.0.0.1, lands
``--batches`` complete batches (``--files`` objects each plus ``_READY``) and writes a ledger
verdict for all but ``--new`` of them, then times, in one run on the same bucket:

* **old**: the former ``discover_batches``: the base ``Storage.list_dirs`` (a listing of every
  key under landing/), then per batch a HEAD for its marker and a HEAD for its ledger entry;
* **new**: :func:`training.data.batches.discover_batches`: ``list_dirs`` with
  ``Delimiter="/"`` (one entry per batch), one listing of the ledger, a marker HEAD only for
  the batches not processed yet.

Both must find the same ``--new`` batches. Prints one JSON line (machine, date, counts, seconds,
HTTP requests). Loopback only; stops by itself: ``--deadline`` seconds in all (SIGALRM).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.config import Config, load_config  # noqa: E402
from training.data.batches import (  # noqa: E402
    _BATCH_ID,
    discover_batches,
    find_marker,
    landing_storage,
    ledger_key,
)
from training.data.dataset import curated_storage  # noqa: E402
from training.dev.localenv import cpu_model  # noqa: E402
from training.records import Batch  # noqa: E402
from training.storage import Storage  # noqa: E402


def old_discover(cfg: Config) -> list[Batch]:
    """``discover_batches`` as it was before the ledger listing (kept here to compare)."""
    store = landing_storage(cfg)
    curated = curated_storage(cfg)
    found = []
    for batch_id in Storage.list_dirs(store, ""):  # the base class: a walk of every key
        if not _BATCH_ID.match(batch_id):
            continue
        marker = find_marker(cfg, batch_id, store)
        if marker is None:
            continue
        if curated.exists(ledger_key(batch_id)):
            continue
        found.append(Batch(batch_id=batch_id, landing_uri=store.uri, marker=marker))
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Counter:
    """Counts the HTTP requests botocore sends (all clients of this process)."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, **_: object) -> None:
        self.n += 1


def _count_requests(counter: _Counter) -> None:
    import boto3

    boto3.DEFAULT_SESSION = None
    boto3.setup_default_session()
    boto3.DEFAULT_SESSION.events.register("before-send.s3", counter)


def _timed(fn, cfg: Config, counter: _Counter) -> tuple[float, int, list[str]]:
    before = counter.n
    start = time.perf_counter()
    found = [b.batch_id for b in fn(cfg)]
    return time.perf_counter() - start, counter.n - before, found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=10_000)
    ap.add_argument("--new", type=int, default=10, help="batches without a ledger verdict")
    ap.add_argument("--files", type=int, default=2, help="objects per batch besides _READY")
    ap.add_argument("--threads", type=int, default=8, help="parallel uploads while landing")
    ap.add_argument("--deadline", type=int, default=900, help="seconds before giving up")
    args = ap.parse_args()
    signal.signal(signal.SIGALRM, lambda *_: sys.exit(f"deadline of {args.deadline}s reached"))
    signal.alarm(args.deadline)

    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
            Bucket="bench")
        with tempfile.TemporaryDirectory() as home:
            cfg = load_config(home=Path(home), storage={
                "landing_uri": "s3://bench/landing", "curated_uri": "s3://bench/curated",
                "quarantine_uri": "s3://bench/quarantine", "s3_endpoint_url": endpoint})
            ids = [f"batch-{i:05d}" for i in range(args.batches)]
            t0 = time.perf_counter()
            landing, curated = landing_storage(cfg), curated_storage(cfg)

            def land(batch_id: str) -> None:
                for f in range(args.files):
                    landing.write_bytes(f"{batch_id}/fold_0/all/UID_1_{f}_1_all.png", b"png")
                landing.write_bytes(f"{batch_id}/_READY", b"")
                if batch_id not in new_ids:
                    curated.write_bytes(ledger_key(batch_id), b'{"status": "accepted"}')

            new_ids = set(ids[-args.new:]) if args.new else set()
            with ThreadPoolExecutor(args.threads) as pool:
                list(pool.map(land, ids))
            setup_s = time.perf_counter() - t0

            counter = _Counter()
            _count_requests(counter)
            # the stores open fresh clients (from the default session) that carry the counter
            old_s, old_req, old_found = _timed(old_discover, cfg, counter)
            new_s, new_req, new_found = _timed(discover_batches, cfg, counter)
            if old_found != new_found or set(new_found) != new_ids:
                raise SystemExit(f"the two ways disagree: {len(old_found)} vs {len(new_found)}")
    finally:
        server.stop()
    record = {
        "bench": "discovery", "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                    "python": platform.python_version(),
                    "load_avg_1m": round(os.getloadavg()[0], 2)},
        "server": "moto ThreadedMotoServer on 127.0.0.1",
        "batches": args.batches, "unprocessed": args.new, "objects": args.batches * (args.files + 1)
        + (args.batches - args.new), "setup_s": round(setup_s, 1),
        "old": {"seconds": round(old_s, 2), "requests": old_req},
        "new": {"seconds": round(new_s, 2), "requests": new_req},
        "speedup": round(old_s / new_s, 1) if new_s else None,
    }
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
