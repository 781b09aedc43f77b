"""Serving under load, and killing a model worker: the figures of docs/serving-benchmark.md
("Load test", "Killing a model worker"). A benchmark, not a test: it prints and writes JSON.

    PYTHONPATH=. python bench/serving_load.py --models-from /tmp/demo2/bentoml \\
        --home /tmp/wt10b/bench --clients 200 --seconds 60 --out /tmp/wt10b/load.json

Serves this checkout's ``serving.service:LeukoflowAPI`` with ``bentoml serve`` on 127.0.0.1 (the
models: the BentoML models copied from ``--models-from``, ``<name>:latest``), then

1. for /classify and for /detect: ``--clients`` asyncio clients send without pause for
   ``--seconds`` (each request has a ``--timeout`` client timeout; the loop stops by itself);
   counts by status, 5xx, timeouts, p50/p95/p99 latency, and the RSS of every server process
   before and after;
2. SIGKILL of the classifier's worker while 8 clients send /classify: time until /readyz says
   so, time until /classify answers 200 again, and what the clients received meanwhile.

``python bench/serving_load.py render docs/serving-benchmark.md [--marker NAME] "LABEL=run.json"
...`` writes the tables of one or more runs between the doc's load markers (or NAME's).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 1)


def _processes(server_pid: int) -> dict[str, float]:
    """RSS (MiB) of ``bentoml serve`` and each worker, named by its service."""
    out = {}
    root = psutil.Process(server_pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            cmd = proc.cmdline()
            name = (cmd[cmd.index("--service-name") + 1] if "--service-name" in cmd
                    else "bentoml serve (arbiter)")
            out[f"{name} [{proc.pid}]"] = round(proc.memory_info().rss / 2**20, 1)
        except (psutil.Error, IndexError):
            continue
    return out


async def _load(url: str, key: str, route: str, image: bytes, clients: int, seconds: float,
                timeout: float) -> dict[str, Any]:
    statuses: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    latencies: list[float] = []
    stop = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits,
                                 headers={"Authorization": f"Bearer {key}"}) as client:
        async def one_client() -> None:
            while time.monotonic() < stop:
                started = time.perf_counter()
                try:
                    resp = await client.post(route, files={"image": ("c.png", image, "image/png")})
                    statuses[str(resp.status_code)] += 1
                    if resp.status_code != 200:
                        try:
                            reasons[f"{resp.status_code} {resp.json().get('error', '')[:90]}"] += 1
                        except ValueError:
                            reasons[f"{resp.status_code} (not JSON)"] += 1
                    if resp.status_code == 200:
                        latencies.append(time.perf_counter() - started)
                    elif resp.status_code == 503:
                        await asyncio.sleep(float(resp.headers.get("retry-after", "1")))
                except httpx.TimeoutException:
                    statuses["timeout"] += 1
                except httpx.HTTPError as exc:
                    statuses[type(exc).__name__] += 1

        began = time.monotonic()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        wall = time.monotonic() - began
    fivexx = sum(n for s, n in statuses.items() if s.isdigit() and s.startswith("5"))
    # wall_s: until the last answer: requests sent before the stop are still awaited
    return {"route": route, "clients": clients, "seconds": seconds, "wall_s": round(wall, 1),
            "statuses": dict(statuses), "non_200_reasons": dict(reasons.most_common(6)),
            "5xx": fivexx, "timeouts": statuses.get("timeout", 0),
            "ok_per_s": round(len(latencies) / wall, 2),
            "p50_ms": _pct(latencies, 0.50), "p95_ms": _pct(latencies, 0.95),
            "p99_ms": _pct(latencies, 0.99),
            "mean_ms": round(statistics.fmean(latencies) * 1000, 1) if latencies else None}


async def _kill_worker(url: str, key: str, image: bytes, clients: int = 8) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        auth = {"Authorization": f"Bearer {key}"}
        pid = (await client.post("/whoami", headers=auth, json={})).json()["classifier"]["pid"]
        received: Counter[str] = Counter()
        reasons: Counter[str] = Counter()
        done = asyncio.Event()

        async def sender() -> None:
            while not done.is_set():
                try:
                    resp = await client.post("/classify", headers=auth,
                                             files={"image": ("c.png", image, "image/png")})
                    received[str(resp.status_code)] += 1
                    if resp.status_code != 200:
                        reasons[resp.json().get("error", "")[:140]] += 1
                except httpx.HTTPError as exc:
                    received[type(exc).__name__] += 1
                await asyncio.sleep(0.05)

        senders = [asyncio.create_task(sender()) for _ in range(clients)]
        await asyncio.sleep(2)
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        reported = serving_again = None
        readyz_reason = ""
        readyz_max_s = 0.0
        while time.monotonic() - killed < 180:
            t0 = time.monotonic()
            try:
                ready = await client.get("/readyz", timeout=5)
                readyz_max_s = max(readyz_max_s, time.monotonic() - t0)
                if ready.status_code == 503 and reported is None:
                    reported = time.monotonic() - killed
                    readyz_reason = ready.json().get("error", "")
                if ready.status_code == 200 and reported is not None:
                    resp = await client.post("/classify", headers=auth,
                                             files={"image": ("c.png", image, "image/png")})
                    if resp.status_code == 200:
                        serving_again = time.monotonic() - killed
                        break
            except httpx.HTTPError:
                readyz_max_s = max(readyz_max_s, time.monotonic() - t0)
            await asyncio.sleep(0.05)
        await asyncio.sleep(1)
        done.set()
        await asyncio.gather(*senders)
    return {"killed_pid": pid, "readyz_reports_s": _r(reported), "readyz_reason": readyz_reason,
            "serving_again_s": _r(serving_again), "slowest_readyz_s": _r(readyz_max_s),
            "clients": clients, "received": dict(received), "non_200_reasons": dict(reasons)}


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _server_pid(home: Path) -> int:
    """``bentoml serve`` (it runs in the home): the topmost process whose cwd is the home."""
    inside = {}
    for proc in psutil.process_iter():
        try:
            if Path(proc.cwd()) == home.resolve():
                inside[proc.pid] = proc
        except psutil.Error:
            continue
    return next(pid for pid, p in inside.items() if p.ppid() not in inside)


BEGIN, END = "<!-- BENCH:load:begin -->", "<!-- BENCH:load:end -->"


def _rss(before: dict[str, float], after: dict[str, float]) -> str:
    def name(k: str) -> str:
        return k.rsplit(" [", 1)[0]

    after_by = {name(k): v for k, v in after.items()}
    return "; ".join(f"{name(k)} {v:.0f} -> {after_by.get(name(k), float('nan')):.0f}"
                     for k, v in before.items())


def render(runs: list[tuple[str, dict[str, Any]]]) -> str:
    """Markdown of the ``--out`` JSON of one or more runs (label: what code it measured)."""
    lines = ["### Load test", "",
             "Each run: 200 asyncio clients on 127.0.0.1 send without pause for 60 s (then the "
             "requests already sent are awaited: *wall*), one route after the other; a client "
             "that gets a 503 waits its `Retry-After`. Client timeout 60 s per request. RSS in "
             "MiB of each process before -> after the route's run.", "",
             "| run | route | 200 | 5xx | timeouts | other | ok/s | p50 ms | p95 ms | p99 ms | "
             "wall s | load avg (1 min) before/after |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, r in runs:
        for x in r["load"]:
            st = x["statuses"]
            other = {k: v for k, v in st.items()
                     if k != "200" and k != "timeout" and not (k.isdigit() and k[0] == "5")}
            lines.append(
                f"| {label} | `{x['route']}` | {st.get('200', 0)} | {x['5xx']} | "
                f"{x['timeouts']} | {other or ''} | {x['ok_per_s']} | {x['p50_ms']} | "
                f"{x['p95_ms']} | {x['p99_ms']} | {x['wall_s']} | "
                f"{x['loadavg_before'][0]:.1f} / {x['loadavg_after'][0]:.1f} |")
    lines += ["", "What the non-200 answers said, and the memory (MiB):", ""]
    for label, r in runs:
        for x in r["load"]:
            reasons = x.get("non_200_reasons") or {}
            said = "; ".join(f"{n} x `{k}`" for k, n in reasons.items()) or (
                "(not recorded in this run)" if x["5xx"] else "none")
            lines.append(f"- {label} `{x['route']}`: {said}. RSS: "
                         f"{_rss(x['rss_before_mib'], x['rss_after_mib'])}.")
    lines += ["", "### Killing a model worker", "",
              "SIGKILL of the classifier's worker while 8 clients send `/classify` (50 ms "
              "apart); `/readyz` polled every 50 ms.", "",
              "| run | /readyz reports it after s | its reason | serving again after s | "
              "slowest /readyz s | what the clients received |", "|---|---|---|---|---|---|"]
    for label, r in runs:
        k = r["kill"]
        got = ", ".join(f"{n} x {s}" for s, n in k["received"].items())
        lines.append(f"| {label} | {k['readyz_reports_s']} | {k['readyz_reason']} | "
                     f"{k['serving_again_s']} | {k['slowest_readyz_s']} | {got} |")
    for label, r in runs:
        lines.append(f"\n{label}: {r['date']}, {r['machine']}, limits {r['limits']}; "
                     f"`{r['command']}`")
    return "\n".join(lines) + "\n"


def write_doc(doc: Path, text: str, marker: str = "load") -> None:
    """Replace the part between the ``marker`` markers of ``doc`` (append it when absent)."""
    old = doc.read_text() if doc.exists() else "# Serving benchmark\n"
    begin, end = (BEGIN, END) if marker == "load" else (
        f"<!-- BENCH:{marker}:begin -->", f"<!-- BENCH:{marker}:end -->")
    block = f"{begin}\n{text}{end}"
    if begin in old and end in old:
        new = old[:old.index(begin)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    doc.write_text(new)


def main() -> None:
    if sys.argv[1:2] == ["render"]:  # render DOC [--marker NAME] LABEL=JSON ...
        args, marker = sys.argv[3:], "load"
        if args[:1] == ["--marker"]:
            marker, args = args[1], args[2:]
        doc, pairs = Path(sys.argv[2]), [a.split("=", 1) for a in args]
        write_doc(doc, render([(label, json.loads(Path(p).read_text())) for label, p in pairs]),
                  marker)
        return
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-from", required=True, help="a BENTOML_HOME with the models")
    parser.add_argument("--home", default="/tmp/leukoflow-serving-load")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--timeout", type=float, default=60, help="client timeout per request")
    parser.add_argument("--routes", default="/classify,/detect")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from training.apikeys import create_key
    from training.config import load_config
    from training.publish.bento import serve, smoke_image

    home = Path(args.home)
    shutil.rmtree(home, ignore_errors=True)
    cfg = load_config(home=home, serving={"startup_timeout_s": 600})
    shutil.copytree(Path(args.models_from) / "models", cfg.bentoml_home / "models")
    key = create_key(cfg.api_keys_file, "load", ["classify", "detect", "explain"])
    image = smoke_image()
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                              "machine": f"{os.cpu_count()} CPUs, {os.uname().machine}",
                              "command": " ".join(sys.argv), "limits": {
                                  "max_inflight": cfg.serving.max_inflight,
                                  "client_timeout_s": args.timeout}}
    with serve(cfg) as url:
        server_pid = _server_pid(cfg.home)
        result["load"] = []
        for route in args.routes.split(","):
            before = _processes(server_pid)
            load_before = os.getloadavg()
            out = asyncio.run(_load(url, key, route, image, args.clients, args.seconds,
                                    args.timeout))
            out.update(rss_before_mib=before, rss_after_mib=_processes(server_pid),
                       loadavg_before=load_before, loadavg_after=os.getloadavg())
            print(json.dumps(out, indent=1), flush=True)
            result["load"].append(out)
        result["kill"] = asyncio.run(_kill_worker(url, key, image))
        print(json.dumps(result["kill"], indent=1), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
