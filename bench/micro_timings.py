"""Timings that used to be asserted in tests: bootstrap metrics and the cached Grad-CAM model.

    python bench/micro_timings.py

Prints one JSON line: the seconds ``classification_metrics`` takes for 1,000 test rows and
1,000 bootstrap resamples (4 classes), and the seconds of a first and a second Grad-CAM
heatmap on one small Keras model (the second reuses the cached gradient model). A record of
this machine, never a pass/fail: tests check behaviour, ``bench/`` measures.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from training.dev.localenv import cpu_model  # noqa: E402
from training.evaluation.metrics import classification_metrics  # noqa: E402


def bootstrap_seconds(n: int = 1000, k: int = 4, resamples: int = 1000) -> float:
    rng = np.random.default_rng(7)
    y = rng.integers(0, k, n)
    p = rng.random((n, k))
    p[np.arange(n), y] += 0.8
    p /= p.sum(axis=1, keepdims=True)
    classes = [f"c{i}" for i in range(k)]
    classification_metrics(y, p, classes, n_bootstrap=10)  # warm imports
    start = time.perf_counter()
    classification_metrics(y, p, classes, n_bootstrap=resamples)
    return time.perf_counter() - start


def gradcam_seconds(size: int = 32) -> tuple[float, float]:
    import keras

    from training.classifier import gradcam

    inputs = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(8, 3, activation="relu", name="c1")(inputs)
    x = keras.layers.Conv2D(8, 3, activation="relu", name="c2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))
    image = np.random.default_rng(0).uniform(0, 255, (size, size, 3)).astype(np.float32)
    times = []
    for _ in range(2):
        start = time.perf_counter()
        gradcam.gradcam_heatmap(model, image, class_index=1)
        times.append(time.perf_counter() - start)
    return times[0], times[1]


def main() -> None:
    first, cached = gradcam_seconds()
    print(json.dumps({"cpu": cpu_model(), "cores": os.cpu_count(),
                      "bootstrap_1000x1000_s": round(bootstrap_seconds(), 3),
                      "gradcam_first_s": round(first, 3), "gradcam_cached_s": round(cached, 3)}))


if __name__ == "__main__":
    main()
