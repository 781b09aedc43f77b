"""The classifier's input pipeline: files -> the shared preprocessing -> tf.data batches.

Each image goes through ``training.preprocess.preprocess_image``, the very function serving
calls, so train and serve see identical pixels. Its output is integer-valued (a resized 8-bit
image as float32), so the pipeline caches uint8 — exact, and a quarter of the memory — and
turns it back into 0-255 float32 after the cache. Augmentation (Batool & Byun's rotation 20,
zoom 0.2, shifts 0.2, flips, as Keras preprocessing layers) runs on training batches only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from training.preprocess import (
    PreprocessParams,
    decode_image,
    fit_stain_reference,
    preprocess_image,
)

__all__ = [
    "augmentation_model", "balanced_class_weights", "colour_jitter", "fit_preprocess",
    "load_uint8", "lr_schedule", "make_dataset", "subject_balanced_weights",
]

_MEMORY_CACHE_BYTES = 4 * 2**30  # above this the decoded images are cached to a file


def load_uint8(path: str, params: PreprocessParams) -> np.ndarray:
    """Read one file and preprocess it exactly as serving does; uint8 ``(size, size, 3)``."""
    with open(path, "rb") as fh:
        arr = preprocess_image(decode_image(fh.read()), params)
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def fit_preprocess(hp: dict[str, Any], train_paths: Sequence[str]) -> PreprocessParams:
    """The model's preprocessing, with its stain reference fitted on train cells only.

    ``hp["stain_fit_images"]`` cells, evenly spaced over the train rows (deterministic), are
    preprocessed without normalisation and the reference of ``hp["stain_normalisation"]`` is
    fitted on their foreground; it travels with the model, so serving never refits.
    """
    base = PreprocessParams(int(hp["image_size"]), hp["source_size"], hp["segmentation"])
    method = hp.get("stain_normalisation") or "none"
    if method == "none":
        return base
    n = min(len(train_paths), int(hp.get("stain_fit_images") or 256))
    picks = np.linspace(0, len(train_paths) - 1, n).round().astype(int) if n else []
    images = [load_uint8(train_paths[i], base) for i in sorted(set(picks))]
    return PreprocessParams(base.image_size, base.source_size, base.segmentation, method,
                            fit_stain_reference(images, method))


def balanced_class_weights(y: np.ndarray, n_classes: int) -> dict[int, float]:
    """``n / (k * count_c)`` per present class (sklearn's 'balanced'), so rare classes count."""
    counts = np.bincount(y, minlength=n_classes)
    present = counts > 0
    k = int(present.sum())
    return {c: float(len(y) / (k * counts[c])) for c in range(n_classes) if present[c]}


def subject_balanced_weights(y: np.ndarray, subjects: Sequence[Any], n_classes: int,
                             balance_classes: bool = True) -> np.ndarray:
    """Per-image weights so each subject of a class counts equally (mean weight 1).

    A subject with 600 cells otherwise teaches the model its own colour cast 600 times and a
    subject with 20 cells barely at all. Within a class every subject gets the same total
    weight, shared by its cells; with ``balance_classes`` every class gets the same total
    (:func:`balanced_class_weights`' rule), else its share of the images. A missing subject
    id (NaN/None/"") counts the image as a subject of its own.
    """
    y = np.asarray(y, dtype=np.int64)
    keys = [f"\0image{i}" if s is None or (isinstance(s, float) and np.isnan(s)) or s == ""
            else str(s) for i, s in enumerate(subjects)]
    if len(keys) != len(y):
        raise ValueError(f"{len(y)} labels but {len(keys)} subject ids")
    n = len(y)
    counts = np.bincount(y, minlength=n_classes)
    k = int((counts > 0).sum())
    per_pair: dict[tuple[int, str], int] = {}
    for c, s in zip(y, keys, strict=True):
        per_pair[(int(c), s)] = per_pair.get((int(c), s), 0) + 1
    subjects_of = np.bincount([c for c, _ in per_pair], minlength=n_classes)
    weights = np.empty(n, dtype=np.float64)
    for i, (c, s) in enumerate(zip(y, keys, strict=True)):
        class_total = n / k if balance_classes else counts[c]
        weights[i] = class_total / subjects_of[c] / per_pair[(int(c), s)]
    return weights


def lr_schedule(hp: dict[str, Any]) -> Callable[[int, float], float]:
    """``learning_rate`` for epochs before ``lr_drop_epoch``, ``learning_rate_after`` from it."""
    before, after = float(hp["learning_rate"]), float(hp["learning_rate_after"])
    drop = int(hp["lr_drop_epoch"])

    def schedule(epoch: int, lr: float | None = None) -> float:
        return before if epoch < drop else after

    return schedule


def augmentation_model(aug: dict[str, Any], seed: int) -> Any | None:
    """Keras preprocessing layers equivalent to the paper's ImageDataGenerator ranges.

    ``fill_mode="nearest"`` is ImageDataGenerator's default, which the papers used.
    Returns None when augmentation is disabled or every range is zero.
    """
    import keras

    if not aug.get("enabled", True):
        return None
    layers: list[Any] = []
    if aug.get("rotation"):
        layers.append(keras.layers.RandomRotation(
            float(aug["rotation"]) / 360.0, fill_mode="nearest", seed=seed))
    if aug.get("zoom"):
        z = float(aug["zoom"])
        layers.append(keras.layers.RandomZoom((-z, z), fill_mode="nearest", seed=seed + 1))
    if aug.get("width_shift") or aug.get("height_shift"):
        layers.append(keras.layers.RandomTranslation(
            float(aug.get("height_shift") or 0.0), float(aug.get("width_shift") or 0.0),
            fill_mode="nearest", seed=seed + 2))
    flip = {(True, True): "horizontal_and_vertical", (True, False): "horizontal",
            (False, True): "vertical"}.get(
        (bool(aug.get("horizontal_flip")), bool(aug.get("vertical_flip"))))
    if flip:
        layers.append(keras.layers.RandomFlip(flip, seed=seed + 3))
    return keras.Sequential(layers, name="augmentation") if layers else None


def colour_jitter(aug: dict[str, Any], seed: int) -> Callable[[Any], Any] | None:
    """Per-image hue, saturation, brightness and contrast jitter (training batches only).

    ``hue``: the largest shift as a fraction of the colour circle (<= 0.5); ``saturation``,
    ``brightness``, ``contrast``: a factor drawn from ``[1 - v, 1 + v]``. Brightness scales
    and contrast stretches around the cell's own mean, both on the cell's pixels only: a
    black border that turned grey would be a cue no real image has. Returns None when every
    range is zero (the default: the papers' recipe is geometric only; whether colour jitter
    helps on unseen subjects is what leave-subjects-out CV measures).
    """
    if not aug.get("enabled", True):
        return None
    hue, sat = float(aug.get("hue") or 0.0), float(aug.get("saturation") or 0.0)
    bright, contrast = float(aug.get("brightness") or 0.0), float(aug.get("contrast") or 0.0)
    if not (hue or sat or bright or contrast):
        return None
    import tensorflow as tf

    def factor(v: float, op_seed: int) -> Any:
        return tf.random.uniform([], 1.0 - v, 1.0 + v, seed=seed + op_seed)

    def jitter(img: Any) -> Any:
        x = tf.cast(img, tf.float32) / 255.0
        cell = tf.cast(tf.reduce_max(x, axis=-1, keepdims=True) > 12.0 / 255.0, tf.float32)
        if hue:
            x = tf.image.adjust_hue(x, tf.random.uniform([], -hue, hue, seed=seed + 11))
        if sat:
            x = tf.image.adjust_saturation(x, factor(sat, 12))
        if bright:
            x = x * factor(bright, 13)
        if contrast:
            area = tf.maximum(tf.reduce_sum(cell), 1.0)
            mean = tf.reduce_sum(x * cell, axis=[0, 1], keepdims=True) / area
            x = (x - mean) * factor(contrast, 14) + mean
        x = tf.clip_by_value(x, 0.0, 1.0) * cell  # the border stays black
        return x * 255.0

    return jitter


def make_dataset(
    paths: Sequence[str],
    labels: np.ndarray | None,
    n_classes: int,
    params: PreprocessParams,
    *,
    batch_size: int,
    training: bool = False,
    seed: int = 0,
    augment: Any | None = None,
    colour: Callable[[Any], Any] | None = None,
    weights: np.ndarray | None = None,
    cache: bool = True,
    cache_file: str | None = None,
) -> Any:
    """A ``tf.data.Dataset`` of ``(images float32 0-255, one-hot labels)`` batches.

    Decoding runs in parallel (AUTOTUNE), the decoded images are cached (``cache``; in memory,
    or in ``cache_file`` when they would not fit), training data is reshuffled every epoch with
    a seeded order and augmented (``colour``: :func:`colour_jitter`, per image;
    ``augment``: the geometric layers, per batch); order is kept otherwise, so predictions
    line up with ``paths``. With ``labels=None`` the elements are images only; with
    ``weights`` (per image, e.g. :func:`subject_balanced_weights`) they are
    ``(images, labels, weights)``, which Keras reads as sample weights.
    """
    import tensorflow as tf

    size = params.image_size
    autotune = tf.data.AUTOTUNE

    def load(path: Any) -> np.ndarray:
        return load_uint8(path.decode() if isinstance(path, bytes) else str(path), params)

    def decode(path: Any) -> Any:
        img = tf.numpy_function(load, [path], tf.uint8, stateful=False)
        img.set_shape((size, size, 3))
        return img

    ds = tf.data.Dataset.from_tensor_slices(list(paths))
    ds = ds.map(decode, num_parallel_calls=autotune)
    if labels is not None:
        onehot = np.eye(n_classes, dtype=np.float32)[np.asarray(labels, dtype=np.int64)]
        parts = [ds, tf.data.Dataset.from_tensor_slices(onehot)]
        if weights is not None:
            parts.append(tf.data.Dataset.from_tensor_slices(
                np.asarray(weights, dtype=np.float32)))
        ds = tf.data.Dataset.zip(tuple(parts))
    if cache:
        fits_memory = len(paths) * size * size * 3 <= _MEMORY_CACHE_BYTES
        ds = ds.cache() if fits_memory or not cache_file else ds.cache(cache_file)
    if training:
        buffer = min(len(paths), max(1024, 8 * batch_size))
        ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
        if colour is not None and labels is not None:
            ds = ds.map(lambda x, *rest: (colour(x), *rest), num_parallel_calls=autotune)
    ds = ds.batch(batch_size)

    def to_float(*item: Any) -> Any:
        x = tf.cast(item[0], tf.float32)
        return (x, *item[1:]) if len(item) > 1 else x

    ds = ds.map(to_float, num_parallel_calls=autotune)
    if training and augment is not None and labels is not None:
        ds = ds.map(lambda x, *rest: (augment(x, training=True), *rest),
                    num_parallel_calls=autotune)
    return ds.prefetch(autotune)

