"""Colour jitter: it changes training batches, never the evaluation or serving path; sample
weights (class balancing by subject) travel through the same training pipeline.

The TensorFlow part runs in a subprocess (this file executed as a script): TF and torch
segfault in one process, and pytest may collect torch tests beside these.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from training.config import AugmentationConfig

REPO = Path(__file__).resolve().parents[2]
SIZE = 48
JITTER = {"enabled": True, "hue": 0.05, "saturation": 0.3, "brightness": 0.3, "contrast": 0.3}


def _probe(work: Path) -> dict:  # pragma: no cover - runs in the subprocess
    import keras

    from training.classifier.inputs import colour_jitter, load_uint8, make_dataset
    from training.dev.synth import _render_cell
    from training.preprocess import PreprocessParams

    keras.utils.set_random_seed(0)
    paths = []
    for i in range(8):
        img = _render_cell(np.random.default_rng(i), "all" if i % 2 else "hem", SIZE,
                           np.ones(3, np.float32))
        paths.append(str(work / f"c{i}.png"))
        img.save(paths[-1])
    y = np.arange(8) % 2
    params = PreprocessParams(SIZE)
    jitter = colour_jitter(JITTER, seed=3)

    def batches(**kw) -> np.ndarray:
        ds = make_dataset(paths, y, 2, params, batch_size=8, seed=1, cache=False, **kw)
        return np.concatenate([np.asarray(x) for x, _ in ds])

    plain_train = batches(training=True)
    jittered = batches(training=True, colour=jitter)
    evaluation = batches(training=False, colour=jitter)  # val/test: colour must be ignored
    raw = np.stack([load_uint8(p, params) for p in paths]).astype(np.float32)
    border = np.stack([~np.any(load_uint8(p, params) > 12, axis=-1) for p in paths])

    def match(images: np.ndarray) -> np.ndarray:
        """Which file each (reshuffled, jittered) image is."""
        return np.array([int(np.argmin(np.abs(raw - img).sum(axis=(1, 2, 3))))
                         for img in images])

    # two epochs of ONE training dataset: reshuffled, and drawn anew
    ds = make_dataset(paths, y, 2, params, batch_size=8, seed=1, cache=False, training=True,
                      colour=jitter)
    epochs = [np.concatenate([np.asarray(x) for x, _ in ds]) for _ in range(2)]
    by_file = [e[np.argsort(match(e))] for e in epochs]
    # same shuffled order with and without jitter (same seed): compare image by image
    return {
        "train_diff": float(np.abs(jittered - plain_train).mean()),
        "epoch_diff": float(np.abs(by_file[0] - by_file[1]).mean()),
        "eval_equal": bool(np.array_equal(evaluation, raw)),
        "border_max": float(np.abs(jittered[border[match(plain_train)]]).max()),
        "range": [float(jittered.min()), float(jittered.max())],
        "weights": _weights_probe(paths, y, params, jitter),
        "off": colour_jitter({"enabled": True}, 0) is None,
        "disabled": colour_jitter({**JITTER, "enabled": False}, 0) is None,
    }


def _weights_probe(paths, y, params, jitter) -> dict:  # pragma: no cover - subprocess
    """Per-image weights reach Keras as the third element, and a fit step accepts them."""
    import keras

    from training.classifier.inputs import augmentation_model, make_dataset

    w = np.linspace(0.5, 2.0, len(paths)).astype(np.float32)
    ds = make_dataset(paths, y, 2, params, batch_size=4, training=True, seed=2, cache=False,
                      colour=jitter, weights=w, augment=augmentation_model({"rotation": 10}, 2))
    seen = sorted(float(v) for *_, wb in ds for v in np.asarray(wb))
    inp = keras.Input((SIZE, SIZE, 3))
    out = keras.layers.Dense(2, activation="softmax")(
        keras.layers.GlobalAveragePooling2D()(inp))
    model = keras.Model(inp, out)
    model.compile("adam", "categorical_crossentropy")
    history = model.fit(ds, epochs=1, verbose=0)
    return {"arity": len(ds.element_spec), "seen": seen, "expected": sorted(map(float, w)),
            "loss_finite": bool(np.isfinite(history.history["loss"][0]))}


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("colour")
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3",
           "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, __file__, str(work)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((work / "report.json").read_text())


def test_colour_jitter_changes_training_batches(report: dict) -> None:
    assert report["train_diff"] > 1.0, report  # mean change in 0-255 units (measured ~2.5)
    assert report["epoch_diff"] > 1.0, report  # a new draw every epoch (measured 2.2-3.1)
    assert 0.0 <= report["range"][0] and report["range"][1] <= 255.0


def test_the_black_border_stays_black(report: dict) -> None:
    assert report["border_max"] == 0.0, report


def test_evaluation_batches_ignore_colour_jitter(report: dict) -> None:
    """val/test/serving pixels are the shared preprocessing's, jitter or not."""
    assert report["eval_equal"], report


def test_sample_weights_reach_training(report: dict) -> None:
    w = report["weights"]
    assert w["arity"] == 3 and w["loss_finite"]
    assert w["seen"] == pytest.approx(w["expected"])


def test_colour_jitter_is_off_by_default(report: dict) -> None:
    assert report["off"] and report["disabled"]
    cfg = AugmentationConfig()
    assert (cfg.hue, cfg.saturation, cfg.brightness, cfg.contrast) == (0, 0, 0, 0)


if __name__ == "__main__":  # pragma: no cover - the subprocess
    out = Path(sys.argv[1])
    (out / "report.json").write_text(json.dumps(_probe(out)))
