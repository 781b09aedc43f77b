"""The input contract: what an image must be to be curated, trained on or served.

One set of rules, read from the config, applied by the batch validation (the metadata extractor
and the GX suite, :mod:`training.data`) and by the HTTP endpoint (:mod:`serving.decode`), so a
file gets the same verdict on both sides: accepted with the same conversion to RGB, or refused
with the same reason codes.

The checks, in this order (the first two stop the check; the contract checks are all reported):

1. ``not_decodable:<error>`` - ``empty`` (0 bytes), ``not_an_image`` (no known format),
   ``truncated`` (a known format whose header or pixels are cut short or corrupt),
   ``unreadable`` (a broken header of a known format), ``decompression_bomb`` (the header
   declares more than ``max_pixels`` pixels: refused before any pixel is decoded);
2. the pixels are decoded (``truncated`` if that fails);
3. ``file_too_large`` (more than ``max_bytes``; the endpoint refuses it first, with 413, before
   reading it), ``bad_format`` (not one of ``formats``), ``wrong_mode`` (not one of ``modes``),
   ``too_small`` / ``too_large`` (a side outside ``min_side``..``max_side``).

The two sides differ in their budgets only: ``serving.max_pixels`` (per request, default 4096 x
4096, smaller than the validation's ``validation.max_pixels``) and ``serving.max_image_bytes``.
An image within ``max_side`` on both sides is within both pixel budgets at the defaults.

Conversion to RGB (:func:`to_rgb`; the model sees RGB, 0-255), documented per mode in
``CONVERSIONS``; ``validation.allowed_modes`` may name only modes listed there. EXIF orientation
is applied first (:func:`training.preprocess.decode_image`).

Only Pillow and numpy here: serving imports this module.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "CONTRACT_CODES", "CONVERSIONS", "DECODE_ERRORS", "ContractViolation", "InputContract",
    "Verdict", "check_image", "convert", "load_error", "open_image", "read_header", "to_rgb",
    "unknown_modes", "violations",
]

# mode -> how it becomes RGB 0-255 (to_rgb); a mode not listed here cannot be allowed
CONVERSIONS: dict[str, str] = {
    "RGB": "as is",
    "RGBA": "alpha channel dropped (the colour under it is kept, not blended)",
    "L": "grey value copied to R, G and B",
    "LA": "alpha dropped, grey value copied to R, G and B",
    "1": "black and white become 0 and 255 on R, G and B",
    "P": "palette looked up (transparency dropped)",
    "PA": "palette looked up, alpha dropped",
    "CMYK": "Pillow's CMYK to RGB formula (no colour profile): colours may shift",
    "YCbCr": "converted to RGB (ITU-R BT.601)",
    "I;16": "16-bit grey scaled to 8 bit (value / 257), copied to R, G and B",
    "I;16B": "16-bit grey scaled to 8 bit (value / 257), copied to R, G and B",
    "I;16L": "16-bit grey scaled to 8 bit (value / 257), copied to R, G and B",
    "I": "32-bit integer grey read as 16-bit data: value / 257, clipped to 0-255",
    "F": "32-bit float grey clipped to 0-255 (values taken as 8-bit levels)",
}
DECODE_ERRORS = ("empty", "not_an_image", "truncated", "unreadable", "decompression_bomb")
CONTRACT_CODES = ("file_too_large", "bad_format", "wrong_mode", "too_small", "too_large")
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"BM", "BMP"),
          (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"GIF8", "GIF"),
          (b"RIFF", "WEBP or another RIFF format"))


@dataclass(frozen=True)
class InputContract:
    """The rules an image must meet; build it with :meth:`for_validation` / :meth:`for_serving`."""

    formats: tuple[str, ...] = ("PNG", "JPEG", "BMP", "TIFF")
    modes: tuple[str, ...] = ("RGB", "RGBA", "L")
    min_side: int = 32
    max_side: int = 4096
    max_pixels: int = 40_000_000
    max_bytes: int = 50_000_000

    @classmethod
    def for_validation(cls, cfg: Any) -> InputContract:
        v = cfg.validation
        return cls(tuple(f.upper() for f in v.allowed_formats), tuple(v.allowed_modes),
                   v.min_side, v.max_side, v.max_pixels, v.max_bytes)

    @classmethod
    def for_serving(cls, cfg: Any) -> InputContract:
        """The same rules with the endpoint's per-request budgets (pixels, bytes)."""
        base = cls.for_validation(cfg)
        return cls(base.formats, base.modes, base.min_side, base.max_side,
                   cfg.serving.max_pixels, cfg.serving.max_image_bytes)

    def conversion(self, mode: str) -> str:
        return CONVERSIONS.get(mode, "no conversion known")


@dataclass(frozen=True)
class Verdict:
    """What the contract says about one file: ``reasons`` empty = accepted."""

    reasons: tuple[str, ...]
    message: str
    format: str = ""
    mode: str = ""
    width: int = 0
    height: int = 0
    conversion: str = ""
    details: dict[str, str] = field(default_factory=dict)  # reason -> what exactly is wrong

    @property
    def ok(self) -> bool:
        return not self.reasons


class ContractViolation(ValueError):
    """An image the contract refuses; ``reasons`` are its codes (see the module doc)."""

    def __init__(self, verdict: Verdict) -> None:
        super().__init__(verdict.message)
        self.verdict = verdict
        self.reasons = verdict.reasons


def _decode_error(code: str, message: str, **header: Any) -> Verdict:
    return Verdict((f"not_decodable:{code}",), f"not_decodable:{code}: {message}", **header)


def read_header(data: bytes, max_pixels: int) -> tuple[Image.Image | None, Verdict | None]:
    """Step 1: the opened image (header parsed, no pixel decoded), or the refusal.

    A declared size above ``max_pixels`` is refused without decoding a pixel. Pillow's
    process-wide ``MAX_IMAGE_PIXELS`` is left alone.
    """
    if not data:
        return None, _decode_error("empty", "the file is empty (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            return None, _decode_error("decompression_bomb",
                                       f"image refused as a decompression bomb: {exc}")
        except UnidentifiedImageError:
            kind = next((name for magic, name in _MAGIC if data.startswith(magic)), None)
            if kind:
                return None, _decode_error("truncated", f"the file starts like a {kind} but "
                                           "cannot be read: it is truncated or corrupt")
            return None, _decode_error("not_an_image", "not an image: the bytes match no known "
                                       f"image format (first bytes: {data[:8]!r})")
        except Exception as exc:  # noqa: BLE001 - a broken header of a known format
            kind = next((name for magic, name in _MAGIC if data.startswith(magic)), None)
            if kind:  # e.g. a JPEG cut inside its header: "Truncated File Read"
                return None, _decode_error("truncated", f"not a decodable image: the file "
                                           f"starts like a {kind} but its header is cut short "
                                           f"or corrupt ({type(exc).__name__}: {exc})")
            return None, _decode_error("unreadable", f"the image header cannot be read: "
                                       f"{type(exc).__name__}: {exc}")
        header = {"format": str(img.format or ""), "mode": img.mode, "width": img.width,
                  "height": img.height}
        if img.width * img.height > max_pixels:
            return None, _decode_error(
                "decompression_bomb", f"image is {img.width}x{img.height} = "
                f"{img.width * img.height} pixels, more than the limit of {max_pixels} "
                "(a decompression bomb?)", **header)
    return img, None


def load_error(img: Image.Image, exc: Exception) -> Verdict:
    """Step 2's refusal: the header was fine, the pixels are not."""
    return _decode_error("truncated", "not a decodable image (truncated or corrupt pixel "
                         f"data): {type(exc).__name__}: {exc}", format=str(img.format or ""),
                         mode=img.mode, width=img.width, height=img.height)


def open_image(data: bytes, max_pixels: int) -> tuple[Image.Image | None, Verdict | None]:
    """Steps 1-2: the loaded (not yet converted) image, or the ``not_decodable`` verdict."""
    img, refused = read_header(data, max_pixels)
    if refused is not None or img is None:
        return None, refused
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img.load()
        except Exception as exc:  # noqa: BLE001 - any decoder failure after a valid header
            return None, load_error(img, exc)
    return img, None


def violations(contract: InputContract, *, n_bytes: int, fmt: str, mode: str, width: int,
               height: int, decodable: bool = True) -> dict[str, str]:
    """Step 3: every contract code the file breaks -> what exactly is wrong.

    ``file_too_large`` is judged for every file; the rest only for decodable ones.
    """
    out: dict[str, str] = {}
    if n_bytes > contract.max_bytes:
        out["file_too_large"] = (f"image is {n_bytes} bytes, more than the limit of "
                                 f"{contract.max_bytes} bytes")
    if not decodable:
        return out
    if fmt.upper() not in contract.formats:
        out["bad_format"] = (f"image format {fmt or 'unknown'} is not accepted; send one of "
                             f"{', '.join(contract.formats)}")
    if mode not in contract.modes:
        out["wrong_mode"] = (f"image mode {mode} is not accepted; send one of "
                             f"{', '.join(contract.modes)}")
    if min(width, height) < contract.min_side:
        out["too_small"] = (f"image is {width}x{height}; each side must be at least "
                            f"{contract.min_side} px")
    if max(width, height) > contract.max_side:
        out["too_large"] = (f"image is {width}x{height}; each side must be at most "
                            f"{contract.max_side} px")
    return out


def check_image(data: bytes, contract: InputContract) -> tuple[Verdict, Image.Image | None]:
    """The contract's verdict on encoded bytes, and the loaded image when it is accepted."""
    img, refused = open_image(data, contract.max_pixels)
    if refused is not None:
        broken = violations(contract, n_bytes=len(data), fmt="", mode="", width=0, height=0,
                            decodable=False)
        if broken:  # a file too large is that first: the endpoint never reads it
            return Verdict(tuple(broken), "; ".join(f"{k}: {v}" for k, v in broken.items()),
                           refused.format, refused.mode, refused.width, refused.height), None
        return refused, None
    assert img is not None
    fmt, mode, (w, h) = str(img.format or ""), img.mode, img.size
    broken = violations(contract, n_bytes=len(data), fmt=fmt, mode=mode, width=w, height=h)
    if broken:
        message = "; ".join(f"{code}: {why}" for code, why in broken.items())
        return Verdict(tuple(broken), message, fmt, mode, w, h, details=broken), None
    return Verdict((), "accepted", fmt, mode, w, h, contract.conversion(mode)), img


def convert(img: Image.Image) -> Image.Image:
    """A decoded image as the models see it: EXIF orientation applied, then :func:`to_rgb`."""
    from PIL import ImageOps

    return to_rgb(ImageOps.exif_transpose(img))


def to_rgb(img: Image.Image) -> Image.Image:
    """The documented conversion of ``img`` (any mode in ``CONVERSIONS``) to RGB 0-255."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode == "I":
        grey = np.asarray(img, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(grey, 0, 255).round().astype(np.uint8)).convert("RGB")
    if img.mode == "F":
        grey = np.asarray(img, dtype=np.float64)
        return Image.fromarray(np.clip(np.nan_to_num(grey), 0, 255).round().astype(
            np.uint8)).convert("RGB")
    return img.convert("RGB")


def unknown_modes(modes: Iterable[str]) -> list[str]:
    """Modes that have no documented conversion (the config refuses them)."""
    return [m for m in modes if m not in CONVERSIONS]
