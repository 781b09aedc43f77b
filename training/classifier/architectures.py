"""The classifier architectures, as a table: name -> builder + the hyperparameters of its paper.

Adding an architecture is one :class:`ArchitectureSpec` row in :data:`ARCHITECTURES`. Every
model takes 0-255 float32 pixels (``training.preprocess.preprocess_image``) and normalises in
its own graph; backbones are built into the model's own graph (not nested), so Grad-CAM can
reach ``spec.gradcam_layer`` by name. Keras is imported inside the builders: the table, the
defaults and :func:`resolve_hparams` stay importable without TensorFlow (DAGs, docs, CLI help).

Weights (``classifier.weights``): ``"imagenet"`` calls Keras' real loader (online, or offline
once the ``*_notop.h5`` files sit in ``~/.keras/models``); a local ``.h5`` path is loaded by
layer name, a ``.keras``/``.weights.h5`` path by topology, both skipping mismatched layers
(the new head); ``None`` (the offline default) starts from random weights.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.config import Config
from training.errors import ConfigError, TrainingError
from training.families import BASELINE_ARCHITECTURE

if TYPE_CHECKING:
    import keras

__all__ = [
    "ARCHITECTURES", "HPARAM_KEYS", "KERAS_ARCHITECTURES", "LOSSES", "OPTIMIZERS",
    "ArchitectureSpec", "build_model", "count_params", "describe_architectures", "get_spec",
    "resolve_hparams",
]

# Hyperparameters an architecture sets and the config may override (``classifier.<key>``).
HPARAM_KEYS = (
    "image_size", "source_size", "epochs", "batch_size", "learning_rate", "learning_rate_after",
    "lr_drop_epoch", "optimizer", "loss", "dropout",
)
OPTIMIZERS = ("adam", "adamax", "adamw", "nadam", "rmsprop", "sgd")
LOSSES = ("categorical_crossentropy", "mse")

BATOOL_BYUN = (
    "Batool & Byun, 'Lightweight EfficientNetB3 Model Based on Depthwise Separable Convolutions "
    "for Enhancing Classification of Leukemia White Blood Cell Images', IEEE Access 11 (2023), "
    "doi:10.1109/ACCESS.2023.3266511"
)
_HARNESS = "baseline trained with the recipe of " + BATOOL_BYUN


@dataclass(frozen=True)
class ArchitectureSpec:
    """One architecture: how to build it, and the defaults its paper trains it with."""

    name: str
    builder: Callable[[dict[str, Any], int], keras.Model]  # (hparams, n_classes) -> model
    paper: str
    image_size: int
    source_size: int | None = 450  # C-NMC cells are 450x450: crop_and_resize from the full cell
    epochs: int = 20
    batch_size: int = 40
    learning_rate: float = 1e-3
    learning_rate_after: float = 1e-4
    lr_drop_epoch: int = 5  # epochs [0, lr_drop_epoch) use learning_rate, later ones the after
    optimizer: str = "adamax"
    loss: str = "categorical_crossentropy"
    dropout: float = 0.2
    min_image_size: int = 32  # the backbone's smallest accepted input
    gradcam_layer: str = ""  # last convolutional feature map, for Grad-CAM
    normalisation: str = ""  # what the graph does to the 0-255 input
    # "keras": built by `builder`, trained by the Keras loop; "handcrafted": the baseline of
    # training.classifier.handcrafted (features + scikit-learn; no builder, no Grad-CAM)
    kind: str = "keras"

    def defaults(self) -> dict[str, Any]:
        """The hyperparameters of the paper, as a plain dict."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name in HPARAM_KEYS}


# ------------------------------------------------------------------------------ builders
def _keras() -> Any:
    import keras

    return keras


def _imagenet(hp: dict[str, Any]) -> str | None:
    """What to hand the Keras constructor: only ``"imagenet"``; local files load afterwards."""
    return "imagenet" if hp.get("weights") == "imagenet" else None


def _input(hp: dict[str, Any]) -> Any:
    keras = _keras()
    size = int(hp["image_size"])
    return keras.Input(shape=(size, size, 3), dtype="float32", name="image")


def _normalise(x: Any, mode: str) -> Any:
    """0-255 pixels -> what the backbone's ImageNet weights expect."""
    keras = _keras()
    if mode == "caffe":  # VGG, ResNet: BGR minus ImageNet means
        from training.classifier.layers import CaffePreprocess

        return CaffePreprocess(name="caffe_preprocess")(x)
    if mode == "tf":  # Xception, Inception: [-1, 1]
        return keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="tf_preprocess")(x)
    return x  # "internal": Keras EfficientNet rescales inside its own stem


def _backbone(app: str, x: Any, hp: dict[str, Any]) -> Any:
    """Build ``keras.applications.<app>`` on tensor ``x`` (layers join the outer graph)."""
    keras = _keras()
    size = int(hp["image_size"])
    try:
        model = getattr(keras.applications, app)(
            include_top=False, weights=_imagenet(hp), input_tensor=x, input_shape=(size, size, 3),
        )
    except Exception as exc:  # Keras' downloader raises a bare Exception when offline
        if _imagenet(hp):
            raise TrainingError(
                f"ImageNet weights for {app} could not be loaded ({exc}). Offline, put Keras' "
                f"'*_notop.h5' file in $KERAS_HOME/models (default ~/.keras/models), or set "
                f"classifier.weights to a local file or null"
            ) from exc
        raise
    return model.output


def _softmax(x: Any, n_classes: int) -> Any:
    return _keras().layers.Dense(n_classes, activation="softmax", name="predictions")(x)


def _gap_head(app: str, mode: str, flatten: bool = False) -> Callable[[dict[str, Any], int], Any]:
    """backbone -> GAP [-> Flatten] -> Dropout -> Dense softmax."""

    def build(hp: dict[str, Any], n_classes: int) -> Any:
        keras = _keras()
        inputs = _input(hp)
        x = _backbone(app, _normalise(inputs, mode), hp)
        x = keras.layers.GlobalAveragePooling2D(name="head_gap")(x)
        if flatten:
            x = keras.layers.Flatten(name="head_flatten")(x)
        x = keras.layers.Dropout(float(hp["dropout"]), name="head_dropout")(x)
        return keras.Model(inputs, _softmax(x, n_classes), name=hp["architecture"])

    return build


def _resnet50_custom_head(hp: dict[str, Any], n_classes: int) -> Any:
    """Narendra & Negi: ResNet50 -> Flatten -> BN -> Dense512 -> Dropout -> BN -> Dense256."""
    keras = _keras()
    layers = keras.layers
    rate = float(hp["dropout"])
    inputs = _input(hp)
    x = _backbone("ResNet50", _normalise(inputs, "caffe"), hp)
    x = layers.Flatten(name="head_flatten")(x)
    x = layers.BatchNormalization(name="head_bn1")(x)
    x = layers.Dense(512, activation="relu", name="head_dense512")(x)
    x = layers.Dropout(rate, name="head_dropout1")(x)
    x = layers.BatchNormalization(name="head_bn2")(x)
    x = layers.Dense(256, activation="relu", name="head_dense256")(x)
    x = layers.Dropout(rate, name="head_dropout2")(x)
    return keras.Model(inputs, _softmax(x, n_classes), name=hp["architecture"])


def _xincept_all(hp: dict[str, Any], n_classes: int) -> Any:
    """Khan: one input feeds InceptionV3 and Xception; pooled features concat -> 128 -> 64."""
    keras = _keras()
    layers = keras.layers
    inputs = _input(hp)
    x = _normalise(inputs, "tf")  # both backbones expect [-1, 1]
    inception = layers.GlobalAveragePooling2D(name="inception_gap")(_backbone("InceptionV3", x, hp))
    xception = layers.GlobalAveragePooling2D(name="xception_gap")(_backbone("Xception", x, hp))
    x = layers.Concatenate(name="fused_features")([inception, xception])
    x = layers.Dense(128, activation="relu", name="head_dense128")(x)
    x = layers.Dense(64, activation="relu", name="head_dense64")(x)
    x = layers.Dropout(float(hp["dropout"]), name="head_dropout")(x)
    return keras.Model(inputs, _softmax(x, n_classes), name=hp["architecture"])


def _baseline(name: str, app: str, mode: str, size: int, gradcam: str, paper: str,
              min_size: int = 32) -> ArchitectureSpec:
    return ArchitectureSpec(
        name=name, builder=_gap_head(app, mode), paper=f"{paper}; {_HARNESS}", image_size=size,
        min_image_size=min_size, gradcam_layer=gradcam,
        normalisation={"caffe": "BGR minus ImageNet means (CaffePreprocess)",
                       "tf": "Rescaling to [-1, 1]",
                       "internal": "EfficientNet's own Rescaling + Normalization"}[mode],
    )


_SPECS = [
    ArchitectureSpec(
        name="lightweight_efficientnet_b3", builder=_gap_head("EfficientNetB3", "internal", True),
        paper=BATOOL_BYUN, image_size=300, gradcam_layer="top_activation",
        dropout=0.2,  # the rate is not in our notes on the paper: a stated choice, configurable
        normalisation="EfficientNet's own Rescaling(1/255) (min-max) + Normalization",
    ),
    _baseline("vgg16", "VGG16", "caffe", 224, "block5_conv3",
              "Simonyan & Zisserman, VGG, ICLR 2015"),
    _baseline("vgg19", "VGG19", "caffe", 224, "block5_conv4",
              "Simonyan & Zisserman, VGG, ICLR 2015"),
    _baseline("xception", "Xception", "tf", 299, "block14_sepconv2_act",
              "Chollet, Xception, CVPR 2017", min_size=71),
    _baseline("resnet50", "ResNet50", "caffe", 224, "conv5_block3_out",
              "He et al., ResNet, CVPR 2016"),
    _baseline("efficientnet_b0", "EfficientNetB0", "internal", 224, "top_activation",
              "Tan & Le, EfficientNet, ICML 2019"),
    _baseline("efficientnet_b2", "EfficientNetB2", "internal", 260, "top_activation",
              "Tan & Le, EfficientNet, ICML 2019"),
    ArchitectureSpec(
        name="resnet50_custom_head", builder=_resnet50_custom_head,
        paper="Narendra & Negi: ResNet50 deep features with a custom dense head "
              "(Flatten-BN-Dense512-Dropout-BN-Dense256-Dropout-Dense)",
        image_size=224, dropout=0.5, gradcam_layer="conv5_block3_out",
        normalisation="BGR minus ImageNet means (CaffePreprocess)",
    ),
    ArchitectureSpec(
        name="xincept_all", builder=_xincept_all,
        paper="Khan (thesis): XIncept-ALL, InceptionV3 + Xception fused features "
              "-> Dense128 -> Dense64 -> output",
        image_size=299, dropout=0.0, min_image_size=75, gradcam_layer="mixed10",
        normalisation="Rescaling to [-1, 1] (shared by both backbones)",
    ),
]



def _no_builder(hp: dict[str, Any], n_classes: int) -> Any:
    raise TrainingError(f"{hp.get('architecture')} is not a Keras model: it has no graph to "
                        "build (training.classifier.baseline fits it)")


_SPECS.append(ArchitectureSpec(
    name=BASELINE_ARCHITECTURE, builder=_no_builder, kind="handcrafted",
    paper="hand-crafted baseline (issue 13): foreground colour histograms, nucleus-to-cell "
          "area ratio, dark-area fraction, shape, GLCM and LBP texture -> "
          "classifier.baseline_model (logistic regression); CPU only, no GPU needed",
    image_size=96, min_image_size=16, epochs=1,
    normalisation="features standardised inside the scikit-learn pipeline",
))
ARCHITECTURES: dict[str, ArchitectureSpec] = {s.name: s for s in _SPECS}
KERAS_ARCHITECTURES: dict[str, ArchitectureSpec] = {
    n: s for n, s in ARCHITECTURES.items() if s.kind == "keras"}


# ------------------------------------------------------------------------------ public API
def get_spec(name: str) -> ArchitectureSpec:
    """The spec of ``name``; an unknown name gets the nearest valid one and the full list."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        def key(text: str) -> str:  # compare without case, separators or the paper's adjective
            return text.lower().replace("_", "").replace("-", "").removeprefix("lightweight")

        keys = {key(n): n for n in ARCHITECTURES}
        near = difflib.get_close_matches(key(name), keys, n=1, cutoff=0.3)
        hint = f"did you mean '{keys[near[0]]}'? " if near else ""
        raise ConfigError(
            f"unknown classifier architecture '{name}': {hint}"
            f"valid names: {', '.join(ARCHITECTURES)}"
        ) from None


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> str:
    value = value.lower()
    if value not in allowed:
        near = difflib.get_close_matches(value, allowed, n=1)
        hint = f"did you mean '{near[0]}'? " if near else ""
        raise ConfigError(f"'classifier.{key}' = {value!r} is not supported: {hint}"
                          f"allowed: {', '.join(allowed)}")
    return value


def resolve_hparams(cfg: Config, name: str) -> dict[str, Any]:
    """Architecture defaults overlaid by every non-null ``cfg.classifier.<key>`` (config wins).

    The result is what trains the model and what is logged to MLflow, so a run can always be
    reproduced from its parameters.
    """
    spec = get_spec(name)
    c = cfg.classifier
    hp: dict[str, Any] = {"architecture": name, **spec.defaults()}
    hp.update({k: getattr(c, k) for k in HPARAM_KEYS if getattr(c, k) is not None})
    hp["optimizer"] = _choice("optimizer", hp["optimizer"], OPTIMIZERS)
    hp["loss"] = _choice("loss", hp["loss"], LOSSES)
    if hp["image_size"] < spec.min_image_size:
        raise ConfigError(
            f"'classifier.image_size' = {hp['image_size']} is too small for {name}: "
            f"its backbone needs at least {spec.min_image_size}"
        )
    if c.weights and c.weights != "imagenet":
        _weights_file(c.weights)  # a missing file fails now, not after the data is read
    hp.update(weights=c.weights, class_weights=c.class_weights, kind=spec.kind,
              balance_subjects=c.balance_subjects, segmentation=c.segmentation,
              stain_normalisation=c.stain_normalisation, stain_fit_images=c.stain_fit_images,
              seed=c.seed, augmentation=c.augmentation.model_dump())
    return hp


def _optimizer(hp: dict[str, Any]) -> Any:
    keras = _keras()
    classes = {"adam": keras.optimizers.Adam, "adamax": keras.optimizers.Adamax,
               "adamw": keras.optimizers.AdamW, "nadam": keras.optimizers.Nadam,
               "rmsprop": keras.optimizers.RMSprop, "sgd": keras.optimizers.SGD}
    name = _choice("optimizer", str(hp["optimizer"]), OPTIMIZERS)
    return classes[name](learning_rate=float(hp["learning_rate"]))


def _weights_file(path_text: str) -> Path:
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"'classifier.weights' = {path_text!r}: no such file (use 'imagenet', a local "
            f".h5/.keras/.weights.h5 file, or null)"
        )
    return path


def _load_local_weights(model: Any, path: Path) -> None:
    try:
        if path.suffix in (".h5", ".hdf5") and not path.name.endswith(".weights.h5"):
            model.load_weights(str(path), skip_mismatch=True, by_name=True)
        else:
            model.load_weights(str(path), skip_mismatch=True)
    except Exception as exc:  # h5py/keras raise many kinds; say which file and why
        raise TrainingError(f"could not load weights from {path}: {exc}") from exc


def build_model(name: str, n_classes: int, hp: dict[str, Any]) -> keras.Model:
    """Build architecture ``name`` with ``n_classes`` outputs, load weights, and compile it.

    ``hp`` is :func:`resolve_hparams`'s output (or any dict with the same keys; missing keys
    take the architecture's defaults).
    """
    spec = get_spec(name)
    if n_classes < 2:
        raise TrainingError(f"a classifier needs at least 2 classes, got {n_classes}")
    hp = {"architecture": name, **spec.defaults(), "weights": None, **hp}
    # Every check that can fail runs before TensorFlow is imported.
    weights = hp.get("weights")
    local = _weights_file(str(weights)) if weights and weights != "imagenet" else None
    loss = _choice("loss", str(hp["loss"]), LOSSES)
    _choice("optimizer", str(hp["optimizer"]), OPTIMIZERS)
    keras = _keras()
    model = spec.builder(hp, n_classes)
    if local is not None:
        _load_local_weights(model, local)
    model.compile(
        optimizer=_optimizer(hp),
        loss=keras.losses.MeanSquaredError() if loss == "mse"
        else keras.losses.CategoricalCrossentropy(),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
        jit_compile=False,  # XLA compiles these backbones for minutes on CPU, to save seconds
    )
    return model


def count_params(model: keras.Model) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    import numpy as np

    trainable = int(sum(int(np.prod(w.shape)) for w in model.trainable_weights))
    return int(model.count_params()), trainable


def describe_architectures(image_size: int | None = None, n_classes: int = 2) -> list[dict]:
    """One row per architecture: paper, input size and parameter counts (builds each model)."""
    import keras

    rows = []
    for name, spec in ARCHITECTURES.items():
        size = max(image_size or spec.image_size, spec.min_image_size)
        if spec.kind != "keras":  # its size is that of a fitted linear model, known after fit
            rows.append({"name": name, "image_size": size, "total_params": None,
                         "trainable_params": None, "optimizer": "-", "epochs": "-",
                         "batch_size": "-", "paper": spec.paper})
            continue
        total, trainable = count_params(build_model(name, n_classes, {"image_size": size}))
        keras.backend.clear_session()
        rows.append({"name": name, "image_size": size, "total_params": total,
                     "trainable_params": trainable, "optimizer": spec.optimizer,
                     "epochs": spec.epochs, "batch_size": spec.batch_size, "paper": spec.paper})
    return rows
