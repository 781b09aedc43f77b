"""The classifier architecture registry: every architecture builds, trains a step, predicts.

TensorFlow work runs once, in a subprocess (this file executed as a script), because TF and
torch segfault in one process and pytest may collect torch tests beside these. The probe
builds each architecture at a tiny input, trains one (eager) step on random data and reports
shapes, parameter counts and head structure as JSON; the tests assert on that report. The
registry's table, defaults and errors need no TF and are tested in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.classifier.architectures import (
    ARCHITECTURES,
    KERAS_ARCHITECTURES,
    get_spec,
    resolve_hparams,
)
from training.classifier.inputs import balanced_class_weights, lr_schedule
from training.config import load_config
from training.errors import ConfigError
from training.preprocess import PreprocessParams, preprocess_image

REPO = Path(__file__).resolve().parents[2]
TINY = 32  # the smallest input most backbones accept; Xception/InceptionV3 need 71/75
N_CLASSES = 3
RELOADED = ("vgg16", "efficientnet_b0", "xception")  # one per normalisation: caffe/internal/tf

# What the papers put after the backbone (Keras layer classes, in order).
HEADS = {
    "lightweight_efficientnet_b3": ["GlobalAveragePooling2D", "Flatten", "Dropout", "Dense"],
    "resnet50_custom_head": ["Flatten", "BatchNormalization", "Dense", "Dropout",
                             "BatchNormalization", "Dense", "Dropout", "Dense"],
    "xincept_all": ["Concatenate", "Dense", "Dense", "Dropout", "Dense"],
}
BASELINE_HEAD = ["GlobalAveragePooling2D", "Dropout", "Dense"]
FEATURES = {  # width of the features the classification head sees, per backbone
    "lightweight_efficientnet_b3": 1536, "vgg16": 512, "vgg19": 512, "xception": 2048,
    "resnet50": 2048, "efficientnet_b0": 1280, "efficientnet_b2": 1408,
    "resnet50_custom_head": 256, "xincept_all": 64,
}


def _probe(out: Path) -> None:  # pragma: no cover - runs in the subprocess
    import keras

    from training.classifier.architectures import build_model, count_params
    from training.classifier.layers import CaffePreprocess
    from training.classifier.predict import load_keras_model, predict_array

    rng = np.random.default_rng(0)
    report: dict = {}
    for name, spec in KERAS_ARCHITECTURES.items():
        keras.utils.set_random_seed(0)
        size = max(TINY, spec.min_image_size)
        model = build_model(name, N_CLASSES, {"image_size": size})
        model.run_eagerly = True  # one step: tracing a graph would cost 30 s per backbone
        x = rng.uniform(0, 255, (4, size, size, 3)).astype(np.float32)
        y = np.eye(N_CLASSES, dtype=np.float32)[[0, 1, 2, 0]]
        before = model.get_layer("predictions").get_weights()[0].copy()
        loss = model.train_on_batch(x, y)
        after = model.get_layer("predictions").get_weights()[0]
        probs = predict_array(model, x)
        total, trainable = count_params(model)
        tail = [type(layer).__name__ for layer in model.layers[-len(HEADS.get(name,
                                                                                BASELINE_HEAD)):]]
        report[name] = {
            "size": size, "total": total, "trainable": trainable,
            "loss": float(np.ravel(loss)[0]), "changed": bool(np.abs(after - before).max() > 0),
            "shape": list(probs.shape), "sum_err": float(np.abs(probs.sum(axis=1) - 1).max()),
            "head": tail, "features": int(model.get_layer("predictions").input.shape[-1]),
            "gradcam_rank": len(model.get_layer(spec.gradcam_layer).output.shape),
            "input_shape": list(model.input_shape[1:]),
        }
        if name in RELOADED:
            path = out.parent / f"{name}.keras"
            keras.Model(model.inputs, model.outputs).save(path)
            again = predict_array(load_keras_model(path), x)
            report[name]["reload_err"] = float(np.abs(again - probs).max())
            path.unlink()
        keras.backend.clear_session()
    x = rng.uniform(0, 255, (2, 8, 8, 3)).astype(np.float32)
    ref = keras.applications.vgg16.preprocess_input(x.copy())
    report["caffe_err"] = float(np.abs(np.asarray(CaffePreprocess()(x)) - ref).max())
    report["weights"] = _weights_probe(out.parent)
    report["batchnorm"] = _batchnorm_probe()
    out.write_text(json.dumps(report))


def _batchnorm_probe() -> dict:  # pragma: no cover - runs in the subprocess
    """A tiny BN net after 12 steps: the moving statistics lag, inference collapses to one
    class; re-estimating them (no weight changes) must restore it."""
    import keras

    from training.classifier.batchnorm import recalibrate_batchnorm

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    y = np.arange(64) % 2
    x = rng.uniform(0, 60, (64, 16, 16, 3)).astype(np.float32)
    x[y == 1] += 120  # class 1 is bright: trivially separable
    inp = keras.Input((16, 16, 3))
    h = keras.layers.ReLU()(keras.layers.BatchNormalization()(keras.layers.Conv2D(8, 3)(inp)))
    out = keras.layers.Dense(2, activation="softmax")(keras.layers.GlobalAveragePooling2D()(h))
    model = keras.Model(inp, out)
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=16, epochs=3, verbose=0)

    def accuracy() -> float:
        return float((np.asarray(model(x, training=False)).argmax(1) == y).mean())

    weights = [w.numpy().copy() for w in model.trainable_weights]
    momentum = model.layers[2].momentum
    before = accuracy()
    used = recalibrate_batchnorm(model, [x[i:i + 16] for i in range(0, 64, 16)])
    return {"before": before, "after": accuracy(), "used": used,
            "weights_kept": all(np.array_equal(a, b.numpy())
                                for a, b in zip(weights, model.trainable_weights, strict=True)),
            "momentum_restored": model.layers[2].momentum == momentum}


def _weights_probe(work: Path) -> dict:  # pragma: no cover - runs in the subprocess
    """Local weight files: a backbone-only legacy .h5 (like Keras' *_notop.h5) loads by layer
    name, a full .weights.h5 by topology, both under a new head; "imagenet" offline teaches."""
    from unittest import mock

    import h5py
    import keras
    from keras.src.legacy.saving import legacy_h5_format

    from training.classifier.architectures import build_model
    from training.errors import TrainingError

    def same(a, b, layer="block5_conv3") -> bool:
        return bool(np.array_equal(a.get_layer(layer).get_weights()[0],
                                   b.get_layer(layer).get_weights()[0]))

    hp = {"image_size": TINY}
    backbone = keras.applications.VGG16(include_top=False, weights=None,
                                        input_shape=(TINY, TINY, 3))
    with h5py.File(work / "vgg16_notop.h5", "w") as fh:
        legacy_h5_format.save_weights_to_hdf5_group(fh, backbone)
    trained = build_model("vgg16", 3, hp)
    trained.save_weights(work / "full.weights.h5")
    notop = build_model("vgg16", 2, {**hp, "weights": str(work / "vgg16_notop.h5")})
    full = build_model("vgg16", 2, {**hp, "weights": str(work / "full.weights.h5")})
    fresh = build_model("vgg16", 2, hp)
    with mock.patch("keras.src.utils.file_utils.get_file",
                    side_effect=Exception("URL fetch failure: Name or service not known")):
        try:
            build_model("vgg16", 2, {**hp, "weights": "imagenet"})
            offline = ""
        except TrainingError as exc:
            offline = str(exc)
    return {"notop_by_name": same(notop, backbone), "full_by_topology": same(full, trained),
            "fresh_differs": not same(fresh, trained), "offline_message": offline}


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("arch") / "report.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([sys.executable, __file__, str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


# ------------------------------------------------------------------ TF, through the probe
@pytest.mark.slow
@pytest.mark.parametrize("name", list(KERAS_ARCHITECTURES))
def test_every_architecture_builds_trains_and_predicts(probe: dict, name: str) -> None:
    r = probe[name]
    assert r["input_shape"] == [r["size"], r["size"], 3]
    assert r["shape"] == [4, N_CLASSES] and r["sum_err"] < 1e-5
    assert np.isfinite(r["loss"]) and r["changed"], "one training step must move the head"
    assert 0 < r["trainable"] <= r["total"]
    assert r["head"] == HEADS.get(name, BASELINE_HEAD)
    assert r["features"] == FEATURES[name]
    assert r["gradcam_rank"] == 4  # the named Grad-CAM layer is a feature map


@pytest.mark.slow
@pytest.mark.parametrize("name", RELOADED)
def test_saved_models_reload_with_their_normalisation(probe: dict, name: str) -> None:
    assert probe[name]["reload_err"] < 1e-5


@pytest.mark.slow
def test_caffe_layer_matches_keras_preprocess_input(probe: dict) -> None:
    assert probe["caffe_err"] < 1e-4


@pytest.mark.slow
def test_local_weight_files_load_under_a_new_head(probe: dict) -> None:
    w = probe["weights"]
    assert w["notop_by_name"] and w["full_by_topology"] and w["fresh_differs"]
    assert "~/.keras/models" in w["offline_message"] and "null" in w["offline_message"]


def test_a_missing_weight_file_is_a_config_error(tmp_path: Path) -> None:
    from training.classifier.architectures import build_model

    with pytest.raises(ConfigError, match="no such file"):  # checked before Keras is touched
        build_model("vgg16", 2, {"image_size": TINY, "weights": str(tmp_path / "nope.h5")})


@pytest.mark.slow
def test_batchnorm_recalibration_restores_inference_without_touching_weights(probe) -> None:
    bn = probe["batchnorm"]
    assert bn["before"] <= 0.6 and bn["after"] >= 0.95, bn
    assert bn["used"] == 4 and bn["weights_kept"] and bn["momentum_restored"]


@pytest.mark.slow
def test_parameter_counts_follow_the_backbones(probe: dict) -> None:
    # The fused model holds both backbones; the custom head adds two dense layers to ResNet50.
    assert probe["xincept_all"]["total"] > probe["xception"]["total"] + 2e7
    assert probe["resnet50_custom_head"]["total"] > probe["resnet50"]["total"]
    assert (probe["efficientnet_b0"]["total"] < probe["efficientnet_b2"]["total"]
            < probe["lightweight_efficientnet_b3"]["total"] < probe["vgg16"]["total"]
            < probe["vgg19"]["total"])


# ------------------------------------------------------------------ no TF needed
def test_unknown_name_suggests_the_nearest_and_lists_all() -> None:
    with pytest.raises(ConfigError) as err:
        get_spec("efficientnetb3")
    assert "did you mean 'lightweight_efficientnet_b3'" in str(err.value)
    assert all(name in str(err.value) for name in ARCHITECTURES)
    with pytest.raises(ConfigError, match="did you mean 'resnet50'"):
        get_spec("ResNet-50")


def test_paper_defaults_unless_the_config_says_otherwise() -> None:
    hp = resolve_hparams(load_config(), "lightweight_efficientnet_b3")
    assert (hp["image_size"], hp["source_size"], hp["batch_size"], hp["epochs"]) == (
        300, 450, 40, 20)
    assert (hp["optimizer"], hp["learning_rate"], hp["learning_rate_after"],
            hp["lr_drop_epoch"]) == ("adamax", 1e-3, 1e-4, 5)
    assert hp["loss"] == "categorical_crossentropy" and hp["weights"] is None
    cfg = load_config(classifier={"epochs": 3, "image_size": 64, "loss": "mse"})
    hp = resolve_hparams(cfg, "lightweight_efficientnet_b3")
    assert (hp["epochs"], hp["image_size"], hp["loss"], hp["batch_size"]) == (3, 64, "mse", 40)
    assert resolve_hparams(load_config(), "xception")["image_size"] == 299


def test_bad_hyperparameters_are_refused_with_the_allowed_values() -> None:
    with pytest.raises(ConfigError, match="did you mean 'adamax'"):
        resolve_hparams(load_config(classifier={"optimizer": "adamx"}), "vgg16")
    with pytest.raises(ConfigError, match="allowed: categorical_crossentropy, mse"):
        resolve_hparams(load_config(classifier={"loss": "hinge"}), "vgg16")
    with pytest.raises(ConfigError, match="at least 75"):
        resolve_hparams(load_config(classifier={"image_size": 64}), "xincept_all")


def test_every_spec_names_its_paper_and_a_gradcam_layer() -> None:
    for name, spec in ARCHITECTURES.items():
        assert spec.name == name and spec.paper and spec.normalisation
        assert spec.gradcam_layer or spec.kind != "keras"
    assert set(ARCHITECTURES) - set(KERAS_ARCHITECTURES) == {"handcrafted_baseline"}


def test_learning_rate_drops_at_the_configured_epoch() -> None:
    schedule = lr_schedule({"learning_rate": 1e-3, "learning_rate_after": 1e-4,
                            "lr_drop_epoch": 5})
    assert [schedule(e, 0.0) for e in range(7)] == [1e-3] * 5 + [1e-4] * 2


def test_balanced_class_weights_favour_the_rare_class() -> None:
    w = balanced_class_weights(np.array([0, 0, 0, 1]), 3)
    assert w == {0: pytest.approx(4 / 6), 1: pytest.approx(2.0)}  # class 2 absent: no weight
    assert sum(w[c] * n for c, n in ((0, 3), (1, 1))) == pytest.approx(4)


@pytest.mark.parametrize("params", [PreprocessParams(32), PreprocessParams(300, 450),
                                    PreprocessParams(40, None, "otsu")])
def test_preprocessing_is_integer_valued_so_the_uint8_cache_is_exact(params) -> None:
    rng = np.random.default_rng(1)
    for shape in ((57, 81, 3), (450, 450, 3), (224, 224, 3)):
        img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
        arr = preprocess_image(img, params)
        assert arr.dtype == np.float32 and np.array_equal(arr, np.rint(arr))
        assert 0 <= arr.min() and arr.max() <= 255


if __name__ == "__main__":  # the TF probe, run by the ``probe`` fixture in a subprocess
    _probe(Path(sys.argv[1]))
