"""Serving throughput and latency: bare Keras, bare ONNX Runtime, and the served endpoint.

One run, the same model and the same images for every figure, at 300 px (the paper's
lightweight EfficientNet-B3 input) and at 64 px (the demo's):

    1. the classifier is built by the project's architecture table
       (``training.classifier.architectures.build_model``, random weights: speed does not
       depend on the weights), logged with the project's pyfunc and made champion
    2. the publish path exports it to ONNX and checks it (``training.publish.export``), builds
       the Bento and serves it on loopback (``training.publish.bento.serve``)
    3. bare figures, in a TensorFlow child process while the server idles: decode +
       preprocess + predict, Keras at batch 32 and batch 1, ONNX Runtime at batch 32 and 1
    4. served figures: real HTTP with an API key, 1, 4, 16 and 64 concurrent clients

    python bench/serving_benchmark.py --out docs/serving-benchmark.md

Results (markdown) replace the section between the BENCH markers of ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ARCH = "lightweight_efficientnet_b3"
CLASSES = ["all", "hem"]
CLIENTS = (1, 4, 16, 64)
N_IMAGES = 32
WARMUP_REQUESTS = 32
BEGIN, END = "<!-- BENCH:serving:begin -->", "<!-- BENCH:serving:end -->"


def _images(work: Path) -> list[Path]:
    """Cell-like 450 x 450 PNGs (the C-NMC source size), fixed seed."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(7)
    work.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(N_IMAGES):
        noise = rng.normal(0, 10, (450, 450, 3)) + np.array([230, 200, 210])
        img = Image.fromarray(np.clip(noise, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        r = int(rng.integers(80, 160))
        draw.ellipse((225 - r, 225 - r, 225 + r, 225 + r), fill=(150, 110, 190))
        r2 = int(r * rng.uniform(0.4, 0.8))
        draw.ellipse((225 - r2, 225 - r2, 225 + r2, 225 + r2), fill=(80, 40, 120))
        path = work / f"cell-{i:02d}.png"
        img.save(path)
        paths.append(path)
    return paths


# ----------------------------------------------------------------- TensorFlow child side
def _child_build(size: int, out: str) -> None:
    from training.classifier.architectures import build_model

    build_model(ARCH, len(CLASSES), {"image_size": size}).save(out)


def _child_bare(model_dir: str, images_dir: str) -> None:
    from training.classifier.predict import (
        OnnxClassifier,
        load_classifier,
        onnx_path,
        predict_array,
    )
    from training.preprocess import PreprocessParams, decode_image, preprocess_image

    keras_model, meta = load_classifier(Path(model_dir))
    onnx_model = OnnxClassifier(onnx_path(Path(model_dir)))
    params = PreprocessParams.from_dict(meta["preprocess"])
    blobs = [p.read_bytes() for p in sorted(Path(images_dir).glob("*.png"))]

    def prep(data: bytes) -> np.ndarray:
        return preprocess_image(decode_image(data), params)

    out: dict[str, Any] = {}
    for name, model in (("keras", keras_model), ("onnxruntime", onnx_model)):
        predict_array(model, np.stack([prep(b) for b in blobs[:2]]))  # warm up
        reps = 2  # 64 images at batch 32
        start = time.perf_counter()
        for _ in range(reps):
            for i in range(0, len(blobs), 32):
                predict_array(model, np.stack([prep(b) for b in blobs[i:i + 32]]))
        elapsed = time.perf_counter() - start
        out[f"{name}_batch32_img_s"] = reps * len(blobs) / elapsed
        lat = []
        for b in blobs[:16]:
            t = time.perf_counter()
            predict_array(model, prep(b)[None])
            lat.append(time.perf_counter() - t)
        out[f"{name}_batch1_ms"] = 1000 * float(np.median(lat))
        out[f"{name}_batch1_img_s"] = 1 / float(np.mean(lat))
    print(json.dumps(out))


# ------------------------------------------------------------------------ parent side
def _child(args: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run([sys.executable, __file__, *args], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=1800, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{args[0]} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""


def _register(cfg: Any, keras_path: Path, size: int) -> None:
    import mlflow
    from mlflow import MlflowClient

    from training.classifier.pyfunc import KerasClassifierModel
    from training.preprocess import PreprocessParams
    from training.tracking import configure_mlflow

    pre = PreprocessParams(size, source_size=450).to_dict()
    with mlflow.start_run(experiment_id=configure_mlflow(cfg), run_name=f"bench-{size}"):
        info = mlflow.pyfunc.log_model(
            name="model", python_model=KerasClassifierModel(classes=CLASSES, preprocess=pre),
            artifacts={"keras_model": str(keras_path)}, pip_requirements=["mlflow"],
            metadata={"family": "classifier", "architecture": ARCH, "classes": CLASSES,
                      "preprocess": pre, "positive_class": "all",
                      "gradcam_layer": "top_activation"})
    name = cfg.mlflow.classifier_name
    version = mlflow.register_model(info.model_uri, name).version
    MlflowClient(cfg.tracking_uri, cfg.tracking_uri).set_registered_model_alias(
        name, "champion", str(version))


async def _load(url: str, key: str, blobs: list[bytes], clients: int, n: int) -> dict[str, Any]:
    import httpx

    latencies: list[float] = []
    errors: dict[str, int] = {}
    counter = iter(range(n))

    async def worker(client: httpx.AsyncClient) -> None:
        for i in counter:
            files = {"image": (f"cell-{i}.png", blobs[i % len(blobs)], "image/png")}
            t = time.perf_counter()
            try:
                resp = await client.post("/classify", files=files)
                ok = resp.status_code == 200
                err = None if ok else str(resp.status_code)
            except httpx.HTTPError as exc:
                err = type(exc).__name__
            if err is None:
                latencies.append(time.perf_counter() - t)
            else:
                errors[err] = errors.get(err, 0) + 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits,
                                 headers={"Authorization": f"Bearer {key}"}) as client:
        start = time.perf_counter()
        await asyncio.gather(*[worker(client) for _ in range(clients)])
        elapsed = time.perf_counter() - start
    lat = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {"clients": clients, "requests": n, "ok": len(latencies), "errors": errors,
            "img_s": len(latencies) / elapsed, "p50_ms": float(np.percentile(lat, 50)),
            "p95_ms": float(np.percentile(lat, 95))}


def run_size(size: int, work: Path, images: list[Path], base_env: dict[str, str]) -> dict:
    from training.apikeys import create_key
    from training.config import load_config
    from training.publish.bento import _run, build_bento, import_champions_detail, serve
    from training.publish.export import export_champions

    home = work / f"home-{size}"
    cfg = load_config(home=home, serving={"startup_timeout_s": 900})
    env = {**base_env, "LEUKOFLOW_HOME": str(home)}
    keras_path = work / f"model-{size}" / "model.keras"  # the artifact name serving reads
    keras_path.parent.mkdir(parents=True, exist_ok=True)
    _child(["_build", str(size), str(keras_path)], env)
    _register(cfg, keras_path, size)
    models = import_champions_detail(cfg)
    export = export_champions(cfg, models, _run)[cfg.mlflow.classifier_name]
    model_dir = Path(export["file"]).parents[1]
    bare = json.loads(_child(["_bare", str(model_dir), str(images[0].parent)], env))
    tag = build_bento(cfg, models)
    key = create_key(cfg.api_keys_file, "bench", ["classify"])
    blobs = [p.read_bytes() for p in images]
    served = []
    with serve(cfg, target=tag) as url:
        # Warm up as a deployment that has served a while: BentoML's batch dispatcher trains
        # its latency model on its first ~11 calls, holding some of them back for a second
        # request (up to 7x a call's time); 32 requests at 4 clients get past that.
        asyncio.run(_load(url, key, blobs, 4, WARMUP_REQUESTS))
        for clients in CLIENTS:
            n = max(16, 2 * clients) if size >= 200 else max(48, 4 * clients)
            served.append(asyncio.run(_load(url, key, blobs, clients, n)))
            print(f"{size}px {served[-1]}", file=sys.stderr)
    return {"size": size, "bare": bare, "served": served, "export": export}


def _load_note(uptime: str) -> str:
    """Whether the figures were taken on a quiet machine: the 1-minute load before the run."""
    try:
        one_minute = float(uptime.split("load average:")[1].split(",")[0])
    except (IndexError, ValueError):
        return "- load before the run unknown"
    if one_minute > 0.5 * (os.cpu_count() or 1):  # an average: it may be a job just ended
        return (f"- 1-minute load {one_minute:.2f} on {os.cpu_count()} cores before the run: "
                "other work may have been running, and figures may be lower and noisier than "
                "on an idle machine")
    return (f"- nothing else ran on the machine (1-minute load {one_minute:.2f} on "
            f"{os.cpu_count()} cores before the run)")


def _machine() -> str:
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in
                   Path("/proc/cpuinfo").read_text().splitlines() if "model name" in line)
    except (OSError, StopIteration):
        cpu = platform.processor()
    return f"{platform.node()}: {os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def render(results: list[dict], started: str, load_before: str, load_after: str,
           command: str) -> str:
    lines = [BEGIN, "## Runtime and batching: throughput and latency", "",
             f"- machine: {_machine()}", f"- date: {started} (UTC)", f"- command: `{command}`",
             f"- load (`uptime`) before: `{load_before}`", f"- load after: `{load_after}`",
             _load_note(load_before),
             f"- model: `{ARCH}` built by the project's architecture table, random weights, "
             f"{len(CLASSES)} classes; {N_IMAGES} synthetic 450 x 450 PNG cell images "
             "(centre-cropped to 450, resized to the input), the same for every figure; "
             "bare figures include decode + preprocess; served figures are `/classify` over "
             "loopback HTTP with an API key (`bentoml serve` of the published Bento, 1 "
             "classifier worker, adaptive batching, ONNX Runtime), after "
             f"{WARMUP_REQUESTS} warm-up requests at 4 clients", ""]
    for r in results:
        b, s = r["bare"], {x["clients"]: x for x in r["served"]}
        lines += [f"### {r['size']} px", "",
                  f"ONNX export check: max |probability difference| "
                  f"{r['export']['max_abs_prob_diff']:.2e} on {r['export']['images']} images "
                  f"({r['export'].get('image_source')}), same label on "
                  f"{r['export']['same_labels']}", "",
                  "| runtime | images/s | single-image latency (median) |", "|---|---:|---:|",
                  f"| bare Keras, batch 32 | {b['keras_batch32_img_s']:.2f} | |",
                  f"| bare Keras, batch 1 | {b['keras_batch1_img_s']:.2f} | "
                  f"{b['keras_batch1_ms']:.0f} ms |",
                  f"| bare ONNX Runtime, batch 32 | {b['onnxruntime_batch32_img_s']:.2f} | |",
                  f"| bare ONNX Runtime, batch 1 | {b['onnxruntime_batch1_img_s']:.2f} | "
                  f"{b['onnxruntime_batch1_ms']:.0f} ms |", "",
                  "| served, clients | requests | answered 200 | errors | images/s | "
                  "p50 | p95 |", "|---:|---:|---:|---|---:|---:|---:|"]
        for c in CLIENTS:
            x = s[c]
            lines.append(f"| {c} | {x['requests']} | {x['ok']} | {x['errors'] or 0} | "
                         f"{x['img_s']:.2f} | {x['p50_ms']:.0f} ms | {x['p95_ms']:.0f} ms |")
        ratio = s[16]["img_s"] / b["keras_batch32_img_s"]
        errs = sum(sum(x["errors"].values()) for x in r["served"])
        lines += ["", "Goals:", "",
                  f"- served at 16 clients / bare Keras batch 32: **{ratio:.2f}x** "
                  f"(goal >= 2x{', at 300 px' if r['size'] >= 200 else ', stated at 300 px'})",
                  f"- one request over HTTP (1 client, p50) {s[1]['p50_ms']:.0f} ms vs bare "
                  f"Keras single image {b['keras_batch1_ms']:.0f} ms (goal: at most)",
                  f"- errors: **{errs}** of {sum(x['requests'] for x in r['served'])} requests "
                  "(goal 0)", ""]
    lines.append(END)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_build":
        _child_build(int(argv[1]), argv[2])
        return 0
    if argv and argv[0] == "_bare":
        _child_bare(argv[1], argv[2])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "serving-benchmark.md")
    parser.add_argument("--sizes", type=int, nargs="+", default=[300, 64])
    args = parser.parse_args(argv)
    for k in [k for k in os.environ if k.startswith("LEUKOFLOW_")]:
        del os.environ[k]
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M")
    load_before = _uptime()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2",
           "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory(prefix="leukoflow-bench-") as tmp:
        work = Path(tmp)
        images = _images(work / "images")
        results = [run_size(size, work, images, env) for size in args.sizes]
    text = render(results, started, load_before, _uptime(),
                  "python bench/serving_benchmark.py " + " ".join(argv))
    old = args.out.read_text() if args.out.exists() else "# Serving benchmark\n\n"
    if BEGIN in old and END in old:
        new = old[:old.index(BEGIN)] + text + old[old.index(END) + len(END) + 1:]
    else:
        new = old.rstrip("\n") + "\n\n" + text
    args.out.write_text(new)
    print(json.dumps(results, default=str)[:4000])
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
