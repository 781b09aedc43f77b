"""Hand-crafted features of a segmented cell, and the predictor of the baseline built on them.

The baseline every candidate must beat (issue 13): colour, texture and shape of the cell's
foreground (C-NMC cells sit on a black border), measured on the output of the one
preprocessing function, then a scikit-learn model (:mod:`training.classifier.baseline` fits
it). A simple model on such features carries subject-independent signal (nucleus size,
chromatin texture, colour) and is fast on a CPU: it is both the floor of the gate and a
classifier in its own right. Only numpy, Pillow and (to unpickle the fitted model) scikit-learn
here: serving imports this module.

Features (:data:`FEATURE_NAMES`): 16-bin histograms of R, G, B over the foreground, 8-bin hue
and saturation histograms, grey-level moments and percentiles, the nucleus-to-cell area ratio
(Otsu threshold inside the cell) and a dark-area fraction, area / roundness / extent /
elongation, a grey-level co-occurrence matrix (contrast, homogeneity, energy, correlation over
four offsets), gradient statistics and a rotation-invariant local-binary-pattern histogram.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from training.families import BASELINE_ARCHITECTURE, read_logged_model
from training.preprocess import PreprocessParams, preprocess_image

__all__ = [
    "BASELINE_ARCHITECTURE", "FEATURE_NAMES", "HandcraftedModel", "cell_features",
    "features_of_arrays", "load_handcrafted",
]

MODEL_FILE = "baseline.joblib"
_BACKGROUND = 12  # as training.preprocess: channels all at or below this are black border
_BINS, _HS_BINS, _GLCM_LEVELS = 16, 8, 8
_OFFSETS = ((0, 1), (1, 0), (1, 1), (1, -1))

FEATURE_NAMES: tuple[str, ...] = (
    *(f"hist_{c}_{i}" for c in "rgb" for i in range(_BINS)),
    *(f"hue_{i}" for i in range(_HS_BINS)), *(f"sat_{i}" for i in range(_HS_BINS)),
    "grey_mean", "grey_std", "grey_skew", "grey_kurtosis", "grey_p10", "grey_p50", "grey_p90",
    "nucleus_cell_ratio", "dark_fraction",
    "area_fraction", "roundness", "extent", "elongation",
    "glcm_contrast", "glcm_homogeneity", "glcm_energy", "glcm_correlation",
    "gradient_mean", "gradient_std",
    *(f"lbp_{i}" for i in range(9)),
    "foreground_found",
)


def _otsu(values: np.ndarray) -> float:
    """Otsu's threshold of 0-255 values (between-class variance over a 256-bin histogram)."""
    hist = np.bincount(values.astype(np.uint8), minlength=256).astype(np.float64)
    total, levels = hist.sum(), np.arange(256)
    w0 = np.cumsum(hist) / total
    m = np.cumsum(hist * levels)
    mu0 = np.divide(m, np.cumsum(hist), out=np.zeros(256), where=np.cumsum(hist) > 0)
    rest = total - np.cumsum(hist)
    mu1 = np.divide(m[-1] - m, rest, out=np.zeros(256), where=rest > 0)
    return float(np.argmax(w0 * (1 - w0) * (mu0 - mu1) ** 2))


def _hist(values: np.ndarray, bins: int, top: float) -> np.ndarray:
    h = np.histogram(values, bins=bins, range=(0, top))[0].astype(np.float64)
    return h / max(h.sum(), 1.0)


def _glcm(q: np.ndarray, mask: np.ndarray) -> list[float]:
    """Co-occurrence statistics of quantised grey levels, foreground pairs only, 4 offsets."""
    stats = np.zeros(4)
    i, j = np.meshgrid(np.arange(_GLCM_LEVELS), np.arange(_GLCM_LEVELS), indexing="ij")
    h, w = q.shape
    used = 0
    for dy, dx in _OFFSETS:
        ys, ye = max(0, -dy), h - max(0, dy)
        xs, xe = max(0, -dx), w - max(0, dx)
        a, b = q[ys:ye, xs:xe], q[ys + dy:ye + dy, xs + dx:xe + dx]
        both = mask[ys:ye, xs:xe] & mask[ys + dy:ye + dy, xs + dx:xe + dx]
        if both.sum() < 2:
            continue
        m = np.bincount(a[both] * _GLCM_LEVELS + b[both], minlength=_GLCM_LEVELS ** 2)
        m = m.reshape(_GLCM_LEVELS, _GLCM_LEVELS).astype(np.float64)
        m = m + m.T
        p = m / m.sum()
        mu_i, mu_j = (p * i).sum(), (p * j).sum()
        sd_i = np.sqrt((p * (i - mu_i) ** 2).sum())
        sd_j = np.sqrt((p * (j - mu_j) ** 2).sum())
        corr = ((p * (i - mu_i) * (j - mu_j)).sum() / (sd_i * sd_j)) if sd_i * sd_j > 0 else 1.0
        stats += [(p * (i - j) ** 2).sum(), (p / (1.0 + np.abs(i - j))).sum(), (p ** 2).sum(),
                  corr]
        used += 1
    return list(stats / used) if used else [0.0, 1.0, 1.0, 1.0]


def _lbp(grey: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Histogram of how many of the 8 neighbours are at least the centre (rotation-invariant)."""
    g = np.pad(grey, 1, mode="edge")
    centre = g[1:-1, 1:-1]
    count = np.zeros(grey.shape, dtype=np.int64)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                count += g[1 + dy:g.shape[0] - 1 + dy, 1 + dx:g.shape[1] - 1 + dx] >= centre
    return np.bincount(count[mask], minlength=9)[:9] / max(int(mask.sum()), 1)


def _erode(mask: np.ndarray) -> np.ndarray:
    """4-neighbour binary erosion (the image edge counts as outside)."""
    out = np.zeros_like(mask)
    out[1:-1, 1:-1] = (mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2]
                       & mask[1:-1, 2:])
    return out


def cell_features(arr: np.ndarray) -> np.ndarray:
    """The :data:`FEATURE_NAMES` vector of one preprocessed cell (``(h, w, 3)``, 0-255)."""
    rgb = np.clip(np.asarray(arr, dtype=np.float64), 0, 255)
    mask = np.any(rgb > _BACKGROUND, axis=-1)
    out = np.zeros(len(FEATURE_NAMES))
    if mask.sum() < 16:  # no cell found: every feature 0, and the flag says so
        return out
    fg = rgb[mask]
    grey_img = rgb @ np.array([0.299, 0.587, 0.114])
    # grey levels and the nucleus inside the cell, without its rim (blended with the black
    # border by blur and resizing, it would pass for the darkest "nucleus")
    inner = _erode(_erode(mask))
    grey = grey_img[inner] if inner.sum() >= 16 else grey_img[mask]
    hsv = np.asarray(Image.fromarray(rgb.astype(np.uint8)).convert("HSV"), dtype=np.float64)
    mean, std = grey.mean(), grey.std()
    z = (grey - mean) / std if std > 0 else np.zeros_like(grey)
    threshold = _otsu(grey)
    area = float(mask.sum())
    perimeter = float((mask & ~_erode(mask)).sum())
    ys, xs = np.nonzero(mask)
    box = float((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    eig = np.linalg.eigvalsh(np.cov(np.stack([ys, xs]).astype(np.float64))) if area > 2 \
        else np.ones(2)
    gy, gx = np.gradient(grey_img)
    grad = np.hypot(gy, gx)[mask]
    q = np.clip((grey_img / 256.0 * _GLCM_LEVELS).astype(np.int64), 0, _GLCM_LEVELS - 1)
    parts = [
        *(_hist(fg[:, c], _BINS, 256) for c in range(3)),
        _hist(hsv[..., 0][mask], _HS_BINS, 256), _hist(hsv[..., 1][mask], _HS_BINS, 256),
        [mean / 255, std / 255, float((z ** 3).mean()), float((z ** 4).mean() - 3.0),
         *(np.percentile(grey, [10, 50, 90]) / 255)],
        [float((grey <= threshold).mean()), float((grey < 0.5 * mean).mean())],
        [area / mask.size, float(4 * np.pi * area / max(perimeter, 1.0) ** 2), area / box,
         float(np.sqrt(max(eig.min(), 0.0) / eig.max())) if eig.max() > 0 else 1.0],
        _glcm(q, mask),
        [grad.mean() / 255, grad.std() / 255],
        _lbp(grey_img, mask),
        [1.0],
    ]
    out[:] = np.concatenate([np.ravel(np.asarray(p, dtype=np.float64)) for p in parts])
    return out


def features_of_arrays(x: np.ndarray) -> np.ndarray:
    """``(n, d)`` features of preprocessed cells ``(n, h, w, 3)`` (or one ``(h, w, 3)``)."""
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected preprocessed RGB cells (n, h, w, 3), got shape {x.shape}")
    return np.stack([cell_features(a) for a in x]) if len(x) else np.zeros(
        (0, len(FEATURE_NAMES)))


class HandcraftedModel:
    """A fitted scikit-learn model on :func:`cell_features`: what serving and evaluation call.

    ``predict_array`` takes preprocessed pixels as the Keras models do, so
    :mod:`training.classifier.predict` dispatches to it without knowing more.
    """

    kind = "handcrafted"

    def __init__(self, estimator: Any, n_classes: int, classes_seen: list[int] | None = None):
        self.estimator = estimator
        self.n_classes = int(n_classes)
        self.classes_seen = list(range(self.n_classes)) if classes_seen is None \
            else [int(c) for c in classes_seen]

    def predict_features(self, feats: np.ndarray) -> np.ndarray:
        """Class probabilities ``(n, k)`` of :func:`cell_features` rows."""
        out = np.zeros((len(feats), self.n_classes), dtype=np.float32)
        if len(feats):
            out[:, self.classes_seen] = self.estimator.predict_proba(feats)
        return out

    def predict_array(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities ``(n, k)`` of preprocessed cells."""
        return self.predict_features(features_of_arrays(x))

    def predict_images(self, images: list[Image.Image], params: PreprocessParams) -> np.ndarray:
        if not images:
            return np.zeros((0, self.n_classes), dtype=np.float32)
        return self.predict_array(np.stack([preprocess_image(im, params) for im in images]))

    def save(self, path: Path) -> Path:
        import joblib

        joblib.dump({"estimator": self.estimator, "n_classes": self.n_classes,
                     "classes_seen": self.classes_seen, "features": list(FEATURE_NAMES)}, path)
        return path

    @classmethod
    def load(cls, path: Path) -> HandcraftedModel:
        import joblib

        d = joblib.load(path)
        if list(d.get("features", [])) != list(FEATURE_NAMES):
            raise ValueError(f"{path} was fitted on other hand-crafted features than this "
                             "code computes; retrain the baseline")
        return cls(d["estimator"], d["n_classes"], d["classes_seen"])


def load_handcrafted(model_dir: Path) -> tuple[HandcraftedModel, dict]:
    """A logged hand-crafted classifier (``artifacts/baseline.joblib``) and its metadata."""
    path, meta = read_logged_model(model_dir, "classifier", MODEL_FILE)
    return HandcraftedModel.load(path), meta
