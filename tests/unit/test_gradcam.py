"""Grad-CAM and deep-feature extraction on tiny Keras models.

TensorFlow work runs once, in a subprocess (this file executed as a script), because TF and
torch segfault in one process and pytest may collect torch tests beside these. The probe
trains tiny CNNs to tell "bright blob" from "no blob" images, then reports heatmaps and
checks as JSON; the tests assert on that report. Nothing here imports TF in the pytest process.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
SIZE = 32


def _blob_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dark noisy 32x32 images; label 1 ones carry a bright disc. Returns images, labels, masks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    images = rng.uniform(0, 60, size=(n, SIZE, SIZE, 3)).astype(np.float32)
    labels = np.arange(n) % 2
    masks = np.zeros((n, SIZE, SIZE), dtype=bool)
    for i in np.flatnonzero(labels):
        cy, cx = rng.integers(7, SIZE - 7, size=2)
        masks[i] = (yy - cy) ** 2 + (xx - cx) ** 2 <= 5**2
        images[i][masks[i]] = [230, 200, 210]
    return images, labels, masks


def _probe(out_dir: Path) -> dict:  # pragma: no cover - runs in the subprocess
    import keras

    from training.classifier import gradcam
    from training.classifier.classical import extract_features

    keras.utils.set_random_seed(0)
    x, y, masks = _blob_data(192, seed=1)
    report: dict = {}

    def conv_stack(inp, prefix):
        h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name=f"{prefix}c1")(inp)
        h = keras.layers.MaxPooling2D(name=f"{prefix}pool")(h)
        return keras.layers.Conv2D(16, 3, padding="same", activation="relu", name=f"{prefix}c2")(h)

    def head(h, name):
        h = keras.layers.GlobalAveragePooling2D(name=f"{name}_gap")(h)
        h = keras.layers.Dropout(0.1, name=f"{name}_drop")(h)
        return keras.layers.Dense(2, activation="softmax", name=f"{name}_out")(h)

    inp = keras.Input((SIZE, SIZE, 3))
    flat = keras.Model(inp, head(conv_stack(keras.layers.Rescaling(1 / 255)(inp), "f_"), "flat"))

    b_in = keras.Input((SIZE, SIZE, 3))
    backbone = keras.Model(b_in, conv_stack(b_in, "b_"), name="backbone")
    inp = keras.Input((SIZE, SIZE, 3))
    nested = keras.Model(inp, head(backbone(keras.layers.Rescaling(1 / 255)(inp)), "nested"))

    # nested twice, pooling inside the backbone (its output is 2-D), Sequential outer model
    p_in = keras.Input((SIZE, SIZE, 3))
    pooled_inner = keras.Model(p_in, conv_stack(p_in, "p_"), name="inner")
    p2_in = keras.Input((SIZE, SIZE, 3))
    pooled = keras.Model(
        p2_in, keras.layers.GlobalAveragePooling2D()(pooled_inner(p2_in)), name="pooled"
    )
    deep = keras.Sequential([
        keras.Input((SIZE, SIZE, 3)), keras.layers.Rescaling(1 / 255), pooled,
        keras.layers.Dense(2, activation="softmax"),
    ], name="deep")

    for name, model in {"flat": flat, "nested": nested, "deep": deep}.items():
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"])
        hist = model.fit(x, y, epochs=12, batch_size=32, verbose=0)
        report[f"{name}_train_acc"] = float(hist.history["accuracy"][-1])
        report[f"{name}_last_conv"] = gradcam.find_last_conv_layer(model)

    xt, yt, mt = _blob_data(16, seed=7)
    blob = int(np.flatnonzero(yt)[0])
    for name, model in {"flat": flat, "nested": nested, "deep": deep}.items():
        heat = gradcam.gradcam_heatmap(model, xt[blob], class_index=1)
        gradcam.gradcam_heatmap(model, xt[blob], class_index=1)
        # the second call reuses the gradient model built by the first (timings: bench/)
        report[f"{name}_grad_model_reused"] = (
            gradcam._grad_model(model, None)[0] is gradcam._grad_model(model, None)[0])
        report[f"{name}_shape"] = list(heat.shape)
        report[f"{name}_min"], report[f"{name}_max"] = float(heat.min()), float(heat.max())
        report[f"{name}_std"] = float(heat.std())
        report[f"{name}_in_blob"] = float(heat[mt[blob]].mean())
        report[f"{name}_off_blob"] = float(heat[~mt[blob]].mean())

    # the nested re-trace must give exactly the heatmap of the same layers wired flat
    inp = keras.Input((SIZE, SIZE, 3))
    h = keras.layers.Rescaling(1 / 255)(inp)
    for layer in backbone.layers[1:]:
        h = layer(h)
    for layer in nested.layers[-3:]:
        h = layer(h)
    rewired = keras.Model(inp, h)
    a = gradcam.gradcam_heatmap(nested, xt[:4], class_index=1)
    b = gradcam.gradcam_heatmap(rewired, xt[:4], class_index=1)
    report["batch_shape"] = list(a.shape)
    report["nested_vs_rewired_maxdiff"] = float(np.abs(a - b).max())
    report["by_bare_name_maxdiff"] = float(np.abs(
        gradcam.gradcam_heatmap(nested, xt[:4], 1, layer_name="b_c2") - a).max())
    report["explicit_path_maxdiff"] = float(np.abs(
        gradcam.gradcam_heatmap(nested, xt[:4], 1, layer_name="backbone/b_c2") - a).max())
    nested.save(out_dir / "nested.keras")  # serving loads the saved file, not this object
    loaded = keras.saving.load_model(out_dir / "nested.keras")
    report["loaded_last_conv"] = gradcam.find_last_conv_layer(loaded)
    report["loaded_maxdiff"] = float(np.abs(
        gradcam.gradcam_heatmap(loaded, xt[:4], class_index=1) - a).max())
    try:
        gradcam.find_last_conv_layer(keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]))
        report["no_conv_error"] = None
    except ValueError as exc:
        report["no_conv_error"] = str(exc)

    # a real Keras application nested as the backbone, as the project's classifiers do
    eff = keras.applications.EfficientNetB0(weights=None, include_top=False,
                                            input_shape=(64, 64, 3))
    inp = keras.Input((64, 64, 3))
    app = keras.Model(inp, keras.layers.Dense(2, activation="softmax")(
        keras.layers.GlobalAveragePooling2D()(eff(inp))))
    report["app_last_conv"] = gradcam.find_last_conv_layer(app)
    big = np.asarray(Image.fromarray(xt[blob].astype(np.uint8)).resize((64, 64)), np.float32)
    heat = gradcam.gradcam_heatmap(app, big)
    report["app_shape"], report["app_max"] = list(heat.shape), float(heat.max())
    report["app_min"] = float(heat.min())

    feats = extract_features(backbone, [xt[:5], (xt[5:9], yt[5:9])])
    report["features_shape"] = list(feats.shape)
    report["features_match"] = bool(np.allclose(
        feats[:5], keras.ops.convert_to_numpy(backbone(xt[:5])).mean(axis=(1, 2)), atol=1e-5))

    grid = gradcam.save_gradcam_grid(nested, xt[:6], yt[:6], ["none", "blob"],
                                     out_dir / "gradcam.png")
    report["grid"] = str(grid)
    png = gradcam.overlay_png(xt[blob], gradcam.gradcam_heatmap(nested, xt[blob]))
    (out_dir / "overlay.png").write_bytes(png)
    return report


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("gradcam")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, __file__, str(out)], cwd=REPO, env=env, capture_output=True,
        text=True, timeout=600,
    )
    assert proc.returncode == 0, f"probe failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    report["out_dir"] = str(out)
    return report


@pytest.mark.slow
def test_tiny_models_learned_the_blob(probe: dict) -> None:
    for name in ("flat", "nested", "deep"):
        assert probe[f"{name}_train_acc"] >= 0.9, name


@pytest.mark.slow
def test_last_conv_layer_found_at_any_depth(probe: dict) -> None:
    assert probe["flat_last_conv"] == "f_c2"
    assert probe["nested_last_conv"] == "backbone/b_c2"
    assert probe["deep_last_conv"] == "pooled/inner/p_c2"
    assert probe["app_last_conv"] == "efficientnetb0/top_activation"
    assert "no layer with a 4-D output" in probe["no_conv_error"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["flat", "nested", "deep"])
def test_heatmap_shape_range_and_focus(probe: dict, name: str) -> None:
    assert probe[f"{name}_shape"] == [SIZE, SIZE]
    assert probe[f"{name}_min"] >= 0.0
    assert probe[f"{name}_max"] == pytest.approx(1.0)
    assert probe[f"{name}_std"] > 0.05  # not constant
    # the blob is what tells the classes apart, so it is where the heat is
    assert probe[f"{name}_in_blob"] > 2 * probe[f"{name}_off_blob"], name


@pytest.mark.slow
def test_nested_backbone_equals_the_same_layers_wired_flat(probe: dict) -> None:
    assert probe["batch_shape"] == [4, SIZE, SIZE]
    assert probe["nested_vs_rewired_maxdiff"] < 1e-5
    assert probe["by_bare_name_maxdiff"] < 1e-6
    assert probe["explicit_path_maxdiff"] < 1e-6


@pytest.mark.slow
def test_saved_and_reloaded_model_gives_the_same_heatmap(probe: dict) -> None:
    assert probe["loaded_last_conv"] == "backbone/b_c2"
    assert probe["loaded_maxdiff"] < 1e-5


@pytest.mark.slow
def test_keras_application_backbone(probe: dict) -> None:
    assert probe["app_shape"] == [64, 64]
    assert 0.0 <= probe["app_min"] <= probe["app_max"] <= 1.0


@pytest.mark.slow
def test_grad_model_is_cached(probe: dict) -> None:
    for name in ("flat", "nested", "deep"):
        assert probe[f"{name}_grad_model_reused"] is True, name


@pytest.mark.slow
def test_extract_features_pools_feature_maps(probe: dict) -> None:
    assert probe["features_shape"] == [9, 16]
    assert probe["features_match"]


@pytest.mark.slow
def test_artifacts_are_pngs(probe: dict) -> None:
    for name in ("gradcam.png", "overlay.png"):
        with Image.open(Path(probe["out_dir"]) / name) as img:
            img.verify()
    with Image.open(Path(probe["out_dir"]) / "overlay.png") as img:
        assert img.size == (SIZE, SIZE) and img.mode == "RGB"


# ---------------------------------------------------------------- no TensorFlow needed below


def test_overlay_png_without_tensorflow() -> None:
    from training.classifier.gradcam import overlay_png

    image = np.zeros((20, 30, 3), dtype=np.uint8)
    heat = np.zeros((5, 5), dtype=np.float32)
    heat[2, 2] = 1.0  # resized to the image; centre goes red in the jet colormap
    png = overlay_png(image, heat, alpha=0.5)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(png)) as img:
        arr = np.asarray(img)
    assert arr.shape == (20, 30, 3)
    assert arr[10, 15, 0] > arr[10, 15, 2]  # hot centre: more red than blue
    assert arr[0, 0, 2] > arr[0, 0, 0]  # cold corner: blue
    with pytest.raises(ValueError, match="alpha"):
        overlay_png(image, heat, alpha=2.0)


@pytest.mark.parametrize("module", ["training.classifier.gradcam", "training.evaluation.metrics",
                                    "training.classifier.classical"])
def test_imports_without_tensorflow_or_torch(module: str) -> None:
    code = (f"import sys, {module}; "
            "bad = [m for m in ('tensorflow', 'torch', 'keras') if m in sys.modules]; "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    result = _probe(Path(sys.argv[1]))
    print(json.dumps(result))
