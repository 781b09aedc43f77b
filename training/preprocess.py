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

__all__ = [
    "STAIN_METHODS", "PreprocessParams", "as_images", "decode_image", "fit_stain_reference",
    "normalise_stain", "otsu_crop", "preprocess_image",
]

STAIN_METHODS = ("none", "reinhard", "macenko")
_BACKGROUND = 12  # a pixel whose channels are all at or below this is black border, not cell
_MIN_FOREGROUND = 64  # fewer foreground pixels than this: the image is left as it is


@dataclass(frozen=True)
class PreprocessParams:
    """What a model's input needs; stored with every logged model so serving reproduces it."""

    image_size: int
    source_size: int | None = None  # centre-crop this square first (C-NMC: 450)
    segmentation: str = "none"  # "none" | "otsu"
    stain: str = "none"  # "none" | "reinhard" | "macenko" (see :func:`normalise_stain`)
    # The reference fitted on training rows (:func:`fit_stain_reference`), stored with the
    # model so serving maps every image to the same target and never refits.
    stain_reference: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.stain not in STAIN_METHODS:
            raise ValueError(f"stain normalisation {self.stain!r} is not one of {STAIN_METHODS}")
        if self.stain != "none" and len(self.stain_reference) != _REFERENCE_LEN[self.stain]:
            raise ValueError(f"stain normalisation {self.stain!r} needs a fitted reference of "
                             f"{_REFERENCE_LEN[self.stain]} numbers, got "
                             f"{len(self.stain_reference)} (fit_stain_reference on train rows)")

    def to_dict(self) -> dict:
        return {"image_size": self.image_size, "source_size": self.source_size,
                "segmentation": self.segmentation, "stain": self.stain,
                "stain_reference": [float(v) for v in self.stain_reference]}

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessParams:
        return cls(int(d["image_size"]), d.get("source_size"), d.get("segmentation", "none"),
                   d.get("stain", "none"), tuple(float(v) for v in d.get("stain_reference", ())))


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


def _geometry(img: Image.Image, params: PreprocessParams) -> np.ndarray:
    """Segmentation, centre crop and resize: uint8 ``(size, size, 3)``."""
    img = img.convert("RGB")
    if params.segmentation == "otsu":
        img = otsu_crop(img)
    w, h = img.size
    side = min(w, h, params.source_size or max(w, h))
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    img = img.resize((params.image_size, params.image_size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def preprocess_image(img: Image.Image, params: PreprocessParams) -> np.ndarray:
    """RGB PIL image -> ``(size, size, 3)`` float32 array in 0-255, ready for the model.

    Stain normalisation (``params.stain``) runs last, on the resized cell: the reference was
    fitted on images at this very size (:func:`fit_stain_reference`).
    """
    arr = _geometry(img, params)
    if params.stain != "none":
        arr = normalise_stain(arr, params.stain, params.stain_reference)
    return arr.astype(np.float32)


# ------------------------------------------------------------------ stain normalisation
# Reinhard: torchstain's numpy backend (pure numpy; its torch/tf backends are never imported)
# does the LAB algebra. Macenko is written here: torchstain orders the two stain vectors by
# their red component, which flips between two tints of one cell when the stains' red parts
# are close; here the vectors are ordered to match the reference. Both see only foreground
# pixels: C-NMC cells sit on a black border that would dominate the statistics.
_REFERENCE_LEN = {"none": 0, "reinhard": 6, "macenko": 8}
_IO, _BETA, _ALPHA = 240.0, 0.15, 1.0  # Macenko et al.: light intensity, OD floor, percentile


def _foreground(arr: np.ndarray) -> np.ndarray:
    """Mask of the pixels that are not black border (C-NMC cells are masked to black)."""
    return np.any(arr > _BACKGROUND, axis=-1)


def _reinhard() -> Any:
    from torchstain.numpy.normalizers import NumpyReinhardNormalizer

    return NumpyReinhardNormalizer()


def _macenko_fit(
    pixels: np.ndarray, ref_vectors: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stain vectors (3x2, unit columns), concentrations (2xn) and their 99th percentiles."""
    od = -np.log((pixels.reshape(-1, 3).astype(np.float64) + 1.0) / _IO)
    # Transparent pixels out. Macenko drops a pixel when ANY channel is below beta, which
    # drops pure eosin (its red optical density is small); the length of the OD vector is
    # what says "almost no stain".
    od_hat = od[np.linalg.norm(od, axis=1) >= _BETA]
    if len(od_hat) < _MIN_FOREGROUND:
        raise ValueError("too few stained pixels")
    _, eigvecs = np.linalg.eigh(np.cov(od_hat.T))
    plane = eigvecs[:, [2, 1]]  # the largest first: it points along the mean optical density
    if (od_hat @ plane[:, 0]).mean() < 0:  # eigh's sign is arbitrary; angles must not wrap at pi
        plane[:, 0] = -plane[:, 0]
    proj = od_hat @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, _ALPHA), np.percentile(phi, 100 - _ALPHA)
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    vectors = [v if v.sum() >= 0 else -v for v in (v1, v2)]  # optical densities are positive
    if ref_vectors is None:
        order = (0, 1) if vectors[0][0] > vectors[1][0] else (1, 0)  # haematoxylin first
    else:
        straight = float(vectors[0] @ ref_vectors[:, 0] + vectors[1] @ ref_vectors[:, 1])
        crossed = float(vectors[1] @ ref_vectors[:, 0] + vectors[0] @ ref_vectors[:, 1])
        order = (0, 1) if straight >= crossed else (1, 0)
    he = np.stack([vectors[order[0]], vectors[order[1]]], axis=1)
    he /= np.linalg.norm(he, axis=0, keepdims=True)
    conc = np.linalg.lstsq(he, od.T, rcond=None)[0]
    max_c = np.percentile(conc, 99, axis=1)
    if not np.all(np.isfinite(he)) or not np.all(max_c > 0):
        raise ValueError("the stains could not be separated")
    return he, conc, max_c


def fit_stain_reference(images: list[np.ndarray], method: str) -> tuple[float, ...]:
    """The target of ``method`` fitted on the foreground pixels of ``images`` (train rows).

    Reinhard: LAB mean and std per channel (6 numbers). Macenko: the two stain vectors in
    optical density (3x2) and the 99th percentile of each stain's concentration (8 numbers).
    """
    if method not in STAIN_METHODS or method == "none":
        raise ValueError(f"cannot fit stain reference {method!r}: use one of "
                         f"{STAIN_METHODS[1:]}")
    pixels = np.concatenate([np.asarray(a, dtype=np.uint8)[_foreground(np.asarray(a))]
                             for a in images]) if images else np.zeros((0, 3), np.uint8)
    if len(pixels) < _MIN_FOREGROUND:
        raise ValueError(f"too few foreground pixels ({len(pixels)}) to fit a {method} "
                         "stain reference")
    if method == "reinhard":
        norm = _reinhard()
        norm.fit(pixels.reshape(-1, 1, 3))
        ref = np.concatenate([norm.target_means, norm.target_stds])
    else:
        he, _, max_c = _macenko_fit(pixels)
        ref = np.concatenate([he.ravel(), max_c])
    if not np.all(np.isfinite(ref)):
        raise ValueError(f"the {method} stain reference is not finite: {ref}")
    return tuple(float(v) for v in ref)


def normalise_stain(arr: np.ndarray, method: str, reference: tuple[float, ...]) -> np.ndarray:
    """Map the cell's foreground colours to ``reference``; uint8 ``(h, w, 3)``.

    The black border stays black. An image with (almost) no foreground, or whose stains
    cannot be separated (Macenko on a uniform patch), is returned unchanged: serving answers
    it like any other image instead of failing.
    """
    arr = np.asarray(arr, dtype=np.uint8)
    if method == "none":
        return arr
    mask = _foreground(arr)
    if mask.sum() < _MIN_FOREGROUND:
        return arr
    ref = np.asarray(reference, dtype=np.float64)
    pixels = arr[mask]
    with np.errstate(all="ignore"):
        try:
            if method == "reinhard":
                norm = _reinhard()
                norm.target_means, norm.target_stds = ref[:3], ref[3:]
                out = np.asarray(norm.normalize(pixels.reshape(-1, 1, 3)), np.float64)
            else:
                ref_he, ref_max = ref[:6].reshape(3, 2), ref[6:]
                _, conc, max_c = _macenko_fit(pixels, ref_he)
                conc = conc * (ref_max / max_c)[:, None]
                out = _IO * np.exp(-(ref_he @ conc)).T - 1.0
        except (ValueError, IndexError, np.linalg.LinAlgError):
            return arr
    out = np.nan_to_num(out.reshape(-1, 3), nan=0.0)
    result = arr.copy()
    # a foreground pixel stays foreground: black would make it border to the next step
    result[mask] = np.clip(np.rint(out), _BACKGROUND + 1, 255).astype(np.uint8)
    return result


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
