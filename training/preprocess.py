"""The one preprocessing function, shared by training and serving.

Pixels stay in 0-255 float32: each model carries its own normalisation layer (min-max
``Rescaling(1/255)`` for most backbones; Keras EfficientNet rescales internally), so serving
cannot normalise twice or forget to. Only numpy and Pillow here: serving imports this module
without TensorFlow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from training.contract import ContractViolation, convert, open_image

__all__ = ["PreprocessParams", "as_images", "decode_image", "otsu_crop", "preprocess_image"]


@dataclass(frozen=True)
class PreprocessParams:
    """What a model's input needs; stored with every logged model so serving reproduces it."""

    image_size: int
    source_size: int | None = None  # centre-crop this square first (C-NMC: 450)
    segmentation: str = "none"  # "none" | "otsu"

    def to_dict(self) -> dict:
        return {"image_size": self.image_size, "source_size": self.source_size,
                "segmentation": self.segmentation}

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessParams:
        return cls(int(d["image_size"]), d.get("source_size"), d.get("segmentation", "none"))


def decode_image(data: bytes, max_pixels: int = 40_000_000) -> Image.Image:
    """Decode bytes to an RGB image, refusing decompression bombs; raises ValueError on bad data.

    Steps 1-2 of the input contract (:mod:`training.contract`: the header is checked before any
    pixel is decoded) and its documented conversion (EXIF orientation, then the mode's
    conversion to RGB), so training reads an image exactly as the endpoint does. The
    ``ValueError`` is a :class:`~training.contract.ContractViolation` naming the reason.
    """
    img, refused = open_image(data, max_pixels)
    if refused is not None or img is None:
        raise ContractViolation(refused)  # type: ignore[arg-type]
    return convert(img)


def otsu_crop(img: Image.Image) -> Image.Image:
    """Otsu-threshold the grey image and crop to the foreground's box (black-border crop)."""
    grey = np.asarray(img.convert("L"), dtype=np.uint8)
    hist = np.bincount(grey.ravel(), minlength=256).astype(np.float64)
    total = grey.size
    cum = np.cumsum(hist)
    cum_mean = np.cumsum(hist * np.arange(256))
    w0 = cum / total
    w1 = 1.0 - w0
    mu0 = np.divide(cum_mean, cum, out=np.zeros(256), where=cum > 0)
    mu1 = np.divide(cum_mean[-1] - cum_mean, total - cum, out=np.zeros(256), where=cum < total)
    threshold = int(np.argmax(w0 * w1 * (mu0 - mu1) ** 2))
    ys, xs = np.nonzero(grey > threshold)
    if len(xs) == 0:
        return img
    masked = np.asarray(img).copy()
    masked[grey <= threshold] = 0
    return Image.fromarray(masked).crop((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))


def preprocess_image(img: Image.Image, params: PreprocessParams) -> np.ndarray:
    """RGB PIL image -> ``(size, size, 3)`` float32 array in 0-255, ready for the model."""
    img = img.convert("RGB")
    if params.segmentation == "otsu":
        img = otsu_crop(img)
    w, h = img.size
    side = min(w, h, params.source_size or max(w, h))
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    img = img.resize((params.image_size, params.image_size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.float32)


def as_images(model_input: Any) -> list[Image.Image]:
    """The images an MLflow pyfunc was given, as a list of PIL images (both families accept
    the same input shapes, so any MLflow client can call either the same way).

    ``model_input``: one image or a list of them, an array ``(n, h, w, 3)``, or a DataFrame
    whose ``image`` column holds them; an image is a ``PIL.Image``, an RGB ``uint8`` array
    ``(h, w, 3)``, encoded bytes or a file path. Encoded bytes go through :func:`decode_image`
    (EXIF orientation, bomb check), as an upload to the endpoint does.
    """
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        if "image" not in model_input.columns:
            raise ValueError(
                f"a DataFrame input needs an 'image' column, got {list(model_input.columns)}"
            )
        items = list(model_input["image"])
    elif isinstance(model_input, np.ndarray) and model_input.ndim == 4:
        items = list(model_input)
    elif isinstance(model_input, list | tuple):
        items = list(model_input)
    else:
        items = [model_input]

    images = []
    for item in items:
        if isinstance(item, Image.Image):
            images.append(item)
        elif isinstance(item, np.ndarray):
            images.append(Image.fromarray(np.clip(item, 0, 255).astype(np.uint8)))
        elif isinstance(item, bytes | bytearray):
            images.append(decode_image(bytes(item)))
        elif isinstance(item, str):
            with open(item, "rb") as fh:
                images.append(decode_image(fh.read()))
        else:
            raise ValueError(f"cannot read an image from a {type(item).__name__}")
    return images
