"""A corpus of malformed and awkward images, generated (never committed as files).

Each entry is ``name -> (bytes, reasons)``: what the input contract (:mod:`training.contract`)
must answer at the defaults of the config, ``()`` for an accepted image. The tests feed the
corpus to the batch validation and to the endpoint and check that both agree; anyone can write
it out to look at it: ``python -m training.dev.malformed OUT_DIR``.

Everything is small in bytes (the largest entry is about 10 KB), so it fits any upload limit:
the decompression bomb declares 400 Mpx in a few KB, the "huge" image is wide and flat.
"""

from __future__ import annotations

import io
import struct
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["corpus", "write_corpus"]

SIDE = 48  # above the default min_side (32), small in bytes


def _rng() -> np.random.Generator:
    return np.random.default_rng(9)


def _cell(mode: str = "RGB", size: tuple[int, int] = (SIDE, SIDE)) -> Image.Image:
    """A smooth colour picture (compresses well, survives JPEG)."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)),
                    ((xx + yy) * 127 // max(w + h - 2, 1))], axis=-1).astype(np.uint8)
    img = Image.fromarray(rgb, "RGB")
    return img if mode == "RGB" else img.convert(mode)


def _save(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb() -> bytes:
    """A 1-bit PNG whose header declares 20000 x 20000 pixels, with only 100 rows stored."""
    ihdr = struct.pack(">IIBBBBB", 20_000, 20_000, 1, 0, 0, 0, 0)
    rows = bytes((1 + 20_000 // 8) * 100)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)
            + _chunk(b"IDAT", zlib.compress(rows, 9)) + _chunk(b"IEND", b""))


def _exif_rotated() -> bytes:
    """A 64 x 48 JPEG whose EXIF says "rotate 90" (orientation 6): shown 48 x 64."""
    img = _cell(size=(64, 48))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(img, "JPEG", quality=95, exif=exif.tobytes())


def _grey16() -> bytes:
    grey = (np.asarray(_cell("L"), dtype=np.uint16) * 257).astype("<u2")
    return _save(Image.fromarray(grey), "PNG")


def _float() -> bytes:
    return _save(Image.fromarray(np.asarray(_cell("L"), dtype=np.float32)), "TIFF")


def _palette() -> bytes:
    return _save(_cell().quantize(16), "PNG")


def corpus() -> dict[str, tuple[bytes, tuple[str, ...]]]:
    """The corpus: ``name -> (bytes, reasons the contract must give at the defaults)``."""
    png = _save(_cell(), "PNG")
    jpeg = _save(_cell(), "JPEG", quality=90)
    makers: dict[str, Callable[[], tuple[bytes, tuple[str, ...]]]] = {
        # accepted, each with its documented conversion
        "good_rgb.png": lambda: (png, ()),
        "good.jpg": lambda: (jpeg, ()),
        "good.bmp": lambda: (_save(_cell(), "BMP"), ()),
        "good.tif": lambda: (_save(_cell(), "TIFF"), ()),
        "grey.png": lambda: (_save(_cell("L"), "PNG"), ()),
        "alpha_rgba.png": lambda: (_save(_cell("RGBA"), "PNG"), ()),
        "exif_rotated.jpg": lambda: (_exif_rotated(), ()),
        "jpeg_named.png": lambda: (jpeg, ()),  # the content decides, not the name
        # refused: not decodable
        "zero_bytes.png": lambda: (b"", ("not_decodable:empty",)),
        "truncated_half.png": lambda: (png[: len(png) // 2], ("not_decodable:truncated",)),
        "truncated_header.png": lambda: (png[:40], ("not_decodable:truncated",)),
        "truncated.jpg": lambda: (jpeg[:300], ("not_decodable:truncated",)),
        "bomb.png": lambda: (_bomb(), ("not_decodable:decompression_bomb",)),
        "text.png": lambda: (b"a lab note, sent by mistake\n", ("not_decodable:not_an_image",)),
        "pdf.png": lambda: (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n",
                            ("not_decodable:not_an_image",)),
        "html.png": lambda: (b"<!doctype html><title>404</title>", ("not_decodable:not_an_image",)),
        # refused: outside the contract
        "grey16.png": lambda: (_grey16(), ("wrong_mode",)),
        "float_mode_f.tif": lambda: (_float(), ("wrong_mode",)),
        "cmyk.jpg": lambda: (_save(_cell("CMYK"), "JPEG"), ("wrong_mode",)),
        "alpha_la.png": lambda: (_save(_cell("LA"), "PNG"), ("wrong_mode",)),
        "palette.png": lambda: (_palette(), ("wrong_mode",)),
        "bilevel.png": lambda: (_save(_cell("1"), "PNG"), ("wrong_mode",)),
        "anim.gif": lambda: (_save(_cell(), "GIF"), ("bad_format", "wrong_mode")),
        "image.webp": lambda: (_save(_cell(), "WEBP"), ("bad_format",)),
        "huge_wide.png": lambda: (_save(_cell(size=(5000, 40)), "PNG"), ("too_large",)),
        "tiny.png": lambda: (_save(_cell(size=(8, 8)), "PNG"), ("too_small",)),
        "one_pixel.png": lambda: (_save(_cell(size=(1, 1)), "PNG"), ("too_small",)),
        "tiny_cmyk.jpg": lambda: (_save(_cell("CMYK", size=(8, 8)), "JPEG"),
                                  ("wrong_mode", "too_small")),
    }
    return {name: make() for name, make in makers.items()}


def write_corpus(dest: Path) -> dict[str, tuple[str, ...]]:
    """Write the corpus under ``dest``; return ``name -> expected reasons``."""
    dest.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, (data, reasons) in corpus().items():
        (dest / name).write_bytes(data)
        out[name] = reasons
    return out


if __name__ == "__main__":
    for name, reasons in write_corpus(Path(sys.argv[1] if len(sys.argv) > 1 else "malformed")
                                      ).items():
        print(f"{name}\t{', '.join(reasons) or 'accepted'}")
