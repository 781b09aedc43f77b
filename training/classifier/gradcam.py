"""Grad-CAM heatmaps for the Keras classifiers (training artifacts and serving's ``/explain``).

The project's classifiers build their backbones flat (``training.classifier.architectures``),
and each logged model names its Grad-CAM layer in its metadata (``gradcam_layer``). Models that
wrap a Keras application as one nested layer also work: there the last convolution sits *inside* a
nested model, and its ``.output``
belongs to the inner graph and ``keras.Model(model.inputs, [conv.output, model.output])``
fails as "disconnected". Instead the outer graph is re-traced with ``keras.models.clone_model``
(sharing every layer, so no weights are copied) and a ``call_function`` that swaps the nested
backbone for a two-output view of itself, which yields one model from the image to
(feature map, prediction). Layer paths are written ``"backbone/top_conv"``.

Gradients are taken of the class *logit* when the last layer is a softmax/sigmoid ``Dense`` or
``Activation``: a confident softmax output saturates at 1.0 and its gradient vanishes.

TensorFlow/Keras are imported inside functions: this module imports without them.
"""

from __future__ import annotations

import io
import weakref
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "find_last_conv_layer",
    "gradcam_heatmap",
    "overlay_png",
    "save_gradcam_grid",
]

_SEP = "/"  # Keras 3 forbids "/" in layer names, so it can separate nesting levels
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# ---------------------------------------------------------------------------- layer search


def _is_model(layer: Any) -> bool:
    import keras

    return isinstance(layer, keras.Model)


def _output_rank(layer: Any) -> int:
    try:
        return len(layer.output.shape)
    except (AttributeError, ValueError):  # not called yet, or called several times
        return 0


def _last_4d_path(model: Any) -> list[str] | None:
    import keras

    for layer in reversed(model.layers):
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if _is_model(layer):  # look inside first: a nested model's .output is its own graph's
            inner = _last_4d_path(layer)
            if inner is not None:
                return [layer.name, *inner]
            continue
        if _output_rank(layer) == 4:
            return [layer.name]
    return None


def find_last_conv_layer(model: Any) -> str:
    """Path of the last layer with a 4-D (batch, h, w, c) output, searching nested models.

    Returns e.g. ``"top_activation"`` or ``"efficientnetb3/top_activation"``.
    """
    path = _last_4d_path(model)
    if path is None:
        raise ValueError(f"model {model.name!r} has no layer with a 4-D output for Grad-CAM")
    return _SEP.join(path)


def _resolve(model: Any, layer_name: str) -> list[str]:
    """A ``a/b/c`` path, or a bare layer name looked up at any depth (outermost first)."""
    if _SEP in layer_name:
        path = layer_name.split(_SEP)
        current = model
        for name in path:
            current = current.get_layer(name)  # ValueError names the missing layer
        return path

    def search(m: Any) -> list[str] | None:
        for layer in m.layers:
            if layer.name == layer_name:
                return [layer.name]
        for layer in m.layers:
            if _is_model(layer):
                inner = search(layer)
                if inner is not None:
                    return [layer.name, *inner]
        return None

    path = search(model)
    if path is None:
        raise ValueError(f"no layer named {layer_name!r} in model {model.name!r} or its sub-models")
    return path


# ---------------------------------------------------------------------------- grad model


def _retrace(model: Any, hook: Any) -> Any:
    """Rebuild ``model``'s graph on fresh inputs with shared layers, calling ``hook`` per layer."""
    import keras

    if isinstance(model, keras.Sequential):
        if not model.inputs:
            raise ValueError(f"Sequential model {model.name!r} has no defined input shape")
        inputs = keras.Input(batch_shape=model.inputs[0].shape, dtype=model.inputs[0].dtype)
        x = inputs
        for layer in model.layers:
            x = hook(layer, x)
        return keras.Model(inputs, x)
    return keras.models.clone_model(model, clone_function=lambda layer: layer, call_function=hook)


def _tapped(model: Any, path: list[str], input_of: Any = None) -> Any:
    """A model from ``model``'s inputs to (output of the layer at ``path``, model output).

    With ``input_of`` (a top-level layer), the second output is that layer's input instead.
    """
    import keras

    target = model.get_layer(path[0])
    inner = _tapped(target, path[1:]) if len(path) > 1 else None
    captured: dict[str, Any] = {}

    def hook(layer: Any, *args: Any, **kwargs: Any) -> Any:
        if layer is input_of:
            captured["input_of"] = args[0]
        if layer is target:
            if inner is None:
                captured["feature"] = out = layer(*args, **kwargs)
            else:
                captured["feature"], out = inner(*args, **kwargs)
            return out
        return layer(*args, **kwargs)

    traced = _retrace(model, hook)
    if "feature" not in captured:
        raise ValueError(f"layer {path[0]!r} is not on the path from input to output")
    second = captured["input_of"] if input_of is not None else traced.outputs[0]
    return keras.Model(traced.inputs, [captured["feature"], second])


def _logit_head(model: Any) -> tuple[Any, Any] | None:
    """(final layer, how to get logits from its input) when the output is a squashed logit."""
    import keras

    last = model.layers[-1]
    act = getattr(getattr(last, "activation", None), "__name__", "")
    if act not in ("softmax", "sigmoid") or len(model.outputs) != 1:
        return None
    if isinstance(last, keras.layers.Activation):
        return last, lambda x: x
    if isinstance(last, keras.layers.Dense):
        def logits(x: Any) -> Any:
            z = keras.ops.matmul(x, last.kernel)
            return z + last.bias if last.use_bias else z
        return last, logits
    return None


def _grad_model(model: Any, layer_name: str | None) -> tuple[Any, Any]:
    """Model image -> [feature map, final-layer input or prediction], cached per model."""
    key = layer_name or ""
    try:
        cached = _CACHE.setdefault(model, {})
    except TypeError:
        cached = {}
    if key in cached:
        return cached[key]
    path = _resolve(model, layer_name) if layer_name else _last_4d_path(model)
    if path is None:
        raise ValueError(f"model {model.name!r} has no layer with a 4-D output for Grad-CAM")
    head = _logit_head(model)
    last, to_score = head if head is not None else (None, None)
    grad_model = _tapped(model, path, input_of=last)
    cached[key] = (grad_model, to_score)
    return cached[key]


# ---------------------------------------------------------------------------- heatmaps


def gradcam_heatmap(
    model: Any,
    image_batch: np.ndarray,
    class_index: int | None = None,
    layer_name: str | None = None,
) -> np.ndarray:
    """Grad-CAM of ``class_index`` (default: the predicted class) at the input's resolution.

    ``image_batch``: (h, w, 3) or (n, h, w, 3), preprocessed as the model expects (0-255).
    Returns (h, w) in [0, 1] for one image, (n, h, w) for several; all zeros when no
    location has a positive influence on the class.
    """
    import tensorflow as tf

    x = np.asarray(image_batch, dtype=np.float32)
    single = x.ndim == 3
    if single:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"expected (h, w, c) or (n, h, w, c) images, got shape {x.shape}")
    grad_model, to_score = _grad_model(model, layer_name)
    x_t = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        feature, out = grad_model(x_t, training=False)
        scores = to_score(out) if to_score is not None else out
        if scores.shape[-1] == 1:  # one sigmoid unit: class 1 = +logit, class 0 = -logit
            scores = tf.concat([-scores, scores], axis=-1)
        idx = (tf.argmax(scores, axis=-1, output_type=tf.int32) if class_index is None
               else tf.fill([tf.shape(scores)[0]], int(class_index)))
        score = tf.gather(scores, idx, axis=1, batch_dims=1)
    grads = tape.gradient(score, feature)
    if grads is None:
        raise ValueError("the prediction does not depend on the chosen layer's output")
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)  # (n, 1, 1, c)
    cam = tf.nn.relu(tf.reduce_sum(weights * feature, axis=-1))[..., None]
    cam = tf.image.resize(cam, x.shape[1:3], method="bilinear")[..., 0].numpy()
    peak = cam.reshape(len(cam), -1).max(axis=1)[:, None, None]
    cam = np.divide(cam, peak, out=np.zeros_like(cam), where=peak > 0)
    cam = np.clip(cam, 0.0, 1.0).astype(np.float32)
    return cam[0] if single else cam


def _colourise(image: np.ndarray, heatmap: np.ndarray, alpha: float) -> np.ndarray:
    from matplotlib import colormaps

    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    img = np.clip(img[..., :3], 0, 255)
    h, w = img.shape[:2]
    heat = np.clip(np.asarray(heatmap, dtype=np.float32), 0.0, 1.0)
    if heat.shape != (h, w):
        heat = np.asarray(Image.fromarray(heat).resize((w, h), Image.BILINEAR))
    colour = colormaps["jet"](np.clip(heat, 0.0, 1.0))[..., :3] * 255.0
    return np.clip((1 - alpha) * img + alpha * colour, 0, 255).astype(np.uint8)


def overlay_png(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> bytes:
    """Blend a jet-coloured heatmap over a 0-255 RGB image; returns PNG bytes."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be within [0, 1], got {alpha}")
    buf = io.BytesIO()
    Image.fromarray(_colourise(image, heatmap, alpha)).save(buf, format="PNG")
    return buf.getvalue()


def _as_array(item: Any, params: Any) -> np.ndarray:
    """An already preprocessed array, or a PIL image / path preprocessed with ``params``."""
    if isinstance(item, np.ndarray):
        return item.astype(np.float32)
    from training.preprocess import PreprocessParams, preprocess_image

    if params is None:
        raise ValueError("images given as files or PIL images need preprocessing params")
    if isinstance(params, dict):
        params = PreprocessParams.from_dict(params)
    img = item if isinstance(item, Image.Image) else Image.open(item)
    return preprocess_image(img.convert("RGB"), params)


def save_gradcam_grid(
    model: Any,
    images: Any,
    labels: Any,
    classes: list[str],
    out_path: Path,
    params: Any = None,
    *,
    max_images: int = 8,
    layer_name: str | None = None,
) -> Path:
    """A figure of test images (top) and their Grad-CAM overlays (bottom) for the artifacts.

    ``images``: (n, h, w, 3) preprocessed arrays, or PIL images / paths that ``params``
    (:class:`~training.preprocess.PreprocessParams` or its dict) preprocesses. ``labels``:
    true class indices. The first ``max_images`` are shown with true and predicted class.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    items = [_as_array(im, params) for im in list(images)[:max_images]]
    if not items:
        raise ValueError("save_gradcam_grid got no images")
    batch = np.stack(items)
    probs = np.asarray(model(batch, training=False))
    heat = gradcam_heatmap(model, batch, layer_name=layer_name)
    labels = list(labels)[: len(items)]
    n = len(items)
    fig = Figure(figsize=(2.4 * n, 5.2), layout="constrained")
    axes = fig.subplots(2, n, squeeze=False)
    for i in range(n):
        pred = int(probs[i].argmax())
        true = classes[int(labels[i])] if i < len(labels) else "?"
        axes[0, i].imshow(np.clip(batch[i], 0, 255).astype(np.uint8))
        axes[0, i].set_title(f"true: {true}", fontsize=9)
        axes[1, i].imshow(_colourise(batch[i], heat[i], 0.4))
        axes[1, i].set_title(f"pred: {classes[pred]} ({probs[i, pred]:.2f})", fontsize=9)
        for ax in axes[:, i]:
            ax.set_axis_off()
    fig.suptitle("Grad-CAM of the predicted class (red = most influential)")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out_path, dpi=110)
    return out_path
