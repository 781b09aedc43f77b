"""Deterministic synthetic microscopy data for demos and tests (numpy + Pillow only).

The project must run end to end without the real datasets, so it draws its own, in the real
on-disk layouts the importers read:

* **cell batches** like C-NMC 2019: ``fold_0/{all,hem}/UID_<subject>_<image>_<cell>_<label>``,
  one stained cell on a black background. The morphology follows the textbook description of
  lymphoblasts vs mature lymphocytes: a blast (``all``) is a large cell whose large nucleus
  fills most of it (high nucleus-to-cytoplasm ratio), with fine, smooth, light-purple chromatin,
  one to three pale nucleoli and a slightly irregular outline; a normal lymphocyte (``hem``) is
  smaller, with a small, dense, dark-purple, round nucleus and a clear ring of pale-blue
  cytoplasm. Nuisances (size, outline, rotation, blur, stain jitter, a stain tint per subject
  so that images of one subject look alike, as in the real data) never erase that signal.
* **smear fields** in YOLO layout: pink background, many unlabelled red cells as distractors,
  one to three labelled white cells (purple nucleus) with tight boxes, never cut by the border.
* **bad files** (truncated, empty, not an image, wrong mode, too small, decompression bomb) for
  the validation suite, each with the reason the platform must report.

Everything is a pure function of ``seed``: the same seed writes byte-identical files, and every
image has its own random stream, so changing one count does not reshuffle the other images.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

__all__ = [
    "BAD_FILE_REASONS",
    "make_bad_files",
    "make_cell_batch",
    "make_demo_batches",
    "make_smear_batch",
    "write_ready",
]

READY_MARKER = "_READY"
BAD_FILE_REASONS = (
    "truncated", "empty", "not_an_image", "wrong_mode", "too_small", "decompression_bomb",
)
_FORMATS = {"png": "PNG", "bmp": "BMP", "jpg": "JPEG", "jpeg": "JPEG", "tif": "TIFF",
            "tiff": "TIFF"}
_STREAM = {"cells": 1, "fields": 2, "bad": 3}  # keeps the random streams of each kind apart

# Stain colours (RGB, 0-255), May-Grünwald-Giemsa-like. The nucleus colours of the two classes
# are far apart in brightness on purpose: that is the class signal the tests measure.
_BLAST_CHROMATIN = np.array([158, 112, 196], np.float32)  # fine, light purple
_BLAST_NUCLEOLUS = np.array([196, 178, 226], np.float32)  # pale
_BLAST_CYTOPLASM = np.array([118, 150, 214], np.float32)  # scant, basophilic blue
_LYMPH_CHROMATIN = np.array([78, 34, 112], np.float32)  # dense, dark purple
_LYMPH_CYTOPLASM = np.array([168, 196, 236], np.float32)  # pale blue ring
_SMEAR_BACKGROUND = np.array([236, 214, 216], np.float32)
_RBC = np.array([214, 128, 134], np.float32)
_WBC_NUCLEUS = np.array([104, 56, 160], np.float32)
_WBC_CYTOPLASM = np.array([214, 196, 226], np.float32)


def _rng(seed: int, *key: int) -> np.random.Generator:
    """An independent random stream per (seed, kind, item): stable under changes elsewhere."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *key]))


def _format(fmt: str) -> tuple[str, str]:
    ext = fmt.lower().lstrip(".")
    if ext not in _FORMATS:
        raise ValueError(f"fmt={fmt!r} is not supported; use one of {sorted(_FORMATS)}")
    return ext, _FORMATS[ext]


def _save(img: Image.Image, path: Path, pil_format: str) -> None:
    """Save with fixed encoder settings, so the bytes depend on the pixels only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if pil_format == "PNG":
        img.save(path, "PNG", compress_level=1)
    elif pil_format == "JPEG":
        img.save(path, "JPEG", quality=92, subsampling=0)
    else:
        img.save(path, pil_format)


# --------------------------------------------------------------------------------- shapes
def _outline(rng: np.random.Generator, irregularity: float, n: int = 256) -> np.ndarray:
    """Radius multiplier as a function of angle (table of ``n`` bins): a wobbly closed curve."""
    theta = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    radius = np.ones(n)
    for k in range(2, 7):
        radius += rng.uniform(0, irregularity) / k ** 0.5 * np.cos(k * theta + rng.uniform(0, 6.3))
    elong, axis = rng.uniform(0, 0.08), rng.uniform(0, np.pi)
    radius += elong * np.cos(2 * (theta - axis))  # slight ellipse, at a random rotation
    return (radius / radius.max()).astype(np.float32)  # peak = 1, so the radius is an upper bound


def _shape_alpha(
    yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, radius: float, table: np.ndarray
) -> np.ndarray:
    """Antialiased coverage (0-1) of a star-shaped blob centred at (cy, cx)."""
    dy, dx = yy - cy, xx - cx
    dist = np.sqrt(dy * dy + dx * dx)
    n = len(table)
    idx = ((np.arctan2(dy, dx) + np.pi) * (n / (2 * np.pi))).astype(np.int32) % n
    return np.clip(radius * table[idx] - dist + 0.5, 0.0, 1.0)


def _disc_alpha(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    return np.clip(r - np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) + 0.5, 0.0, 1.0)


def _noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Smooth noise (about unit variance) with ``cells`` features across the larger side."""
    h, w = shape
    gh, gw = max(2, round(cells * h / max(h, w))), max(2, round(cells * w / max(h, w)))
    grid = Image.fromarray(rng.standard_normal((gh, gw)).astype(np.float32))
    return np.asarray(grid.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)


def _blend(img: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> None:
    """In place: ``img = img * (1 - alpha) + alpha * colour`` (colour: RGB or per pixel)."""
    a = alpha[..., None]
    img *= 1.0 - a
    img += a * colour


# ---------------------------------------------------------------------------------- cells
def _subjects(seed: int, n: int) -> tuple[list[str], list[str]]:
    """Seed-dependent, distinct subject numbers; healthy donors get the C-NMC ``H`` prefix."""
    numbers = _rng(seed, _STREAM["cells"], 0).choice(np.arange(1, 10_000), 2 * n, replace=False)
    return [str(v) for v in numbers[:n]], [f"H{v}" for v in numbers[n:]]


def _render_cell(rng: np.random.Generator, label: str, size: int, tint: np.ndarray) -> Image.Image:
    """One C-NMC-like cell image: draw in a crop around the cell, paste on black."""
    s = size / 450.0
    blast = label == "all"
    if blast:
        r_cell = rng.uniform(88, 118) * s
        r_nuc = r_cell * rng.uniform(0.84, 0.93)
        nuc_shift = r_cell * rng.uniform(0.0, 0.05)
        cell_irr, nuc_irr = rng.uniform(0.08, 0.16), rng.uniform(0.06, 0.14)
    else:
        r_cell = rng.uniform(62, 82) * s
        r_nuc = r_cell * rng.uniform(0.56, 0.68)
        nuc_shift = r_cell * rng.uniform(0.05, 0.16)
        cell_irr, nuc_irr = rng.uniform(0.0, 0.05), rng.uniform(0.0, 0.03)

    half = int(np.ceil(r_cell)) + int(4 * s) + 3
    c = 2 * half
    yy, xx = np.mgrid[0:c, 0:c].astype(np.float32)
    img = np.zeros((c, c, 3), np.float32)

    cell_a = _shape_alpha(yy, xx, half, half, r_cell, _outline(rng, cell_irr))
    cyto_tex = 1.0 + 0.05 * _noise(rng, (c, c), 8)[..., None]
    _blend(img, cell_a, (_BLAST_CYTOPLASM if blast else _LYMPH_CYTOPLASM) * cyto_tex)

    ang = rng.uniform(0, 2 * np.pi)
    ny, nx = half + nuc_shift * np.sin(ang), half + nuc_shift * np.cos(ang)
    nuc_a = _shape_alpha(yy, xx, ny, nx, r_nuc, _outline(rng, nuc_irr)) * cell_a
    if blast:  # fine, smooth chromatin: small features, low amplitude
        tex = 0.06 * _noise(rng, (c, c), 22) + 0.04 * _noise(rng, (c, c), 6)
        _blend(img, nuc_a, _BLAST_CHROMATIN * (1.0 + tex[..., None]))
        for _ in range(rng.integers(1, 4)):  # 1-3 pale nucleoli, well inside the nucleus
            rho, phi = r_nuc * rng.uniform(0.0, 0.55), rng.uniform(0, 2 * np.pi)
            oy, ox, ro = ny + rho * np.sin(phi), nx + rho * np.cos(phi), rng.uniform(6, 11) * s
            win = _window(img.shape, oy, ox, ro)
            dot = _disc_alpha(yy[win], xx[win], oy, ox, ro) * nuc_a[win]
            _blend(img[win], 0.85 * dot, _BLAST_NUCLEOLUS)
    else:  # condensed chromatin: darker clumps
        clumps = np.maximum(_noise(rng, (c, c), 9), 0.0)
        _blend(img, nuc_a, _LYMPH_CHROMATIN * (1.0 - 0.18 * clumps[..., None]))

    jitter = rng.uniform(0.96, 1.04, 3).astype(np.float32) * rng.uniform(0.94, 1.06)
    img *= tint * jitter
    img += 2.0 * rng.standard_normal(img.shape, dtype=np.float32) * cell_a[..., None]
    crop = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    crop = crop.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.4) * s))

    canvas = Image.new("RGB", (size, size))
    offset = rng.uniform(-20, 20, 2) * s
    canvas.paste(crop, (int(size / 2 - half + offset[0]), int(size / 2 - half + offset[1])))
    return canvas


def make_cell_batch(
    dest: Path,
    *,
    n_subjects_per_class: int = 4,
    images_per_subject: int = 20,
    size: int = 450,
    seed: int = 0,
    fmt: str = "png",
) -> list[Path]:
    """Write a C-NMC-like batch ``dest/fold_0/{all,hem}/UID_<subject>_<image>_<cell>_<label>``.

    ``all`` subjects are plain numbers and ``hem`` subjects carry an ``H`` prefix, as in the real
    data; the numbers depend on the seed, so batches of different seeds share few subjects.
    Returns the files written, in writing order.
    """
    ext, pil_format = _format(fmt)
    if size < 32:
        raise ValueError(f"size={size} is too small for a cell image; use 32 or more")
    dest = Path(dest)
    written: list[Path] = []
    for label, subjects in zip(("all", "hem"), _subjects(seed, n_subjects_per_class), strict=True):
        for subject in subjects:
            key = int(subject.lstrip("H"))
            srng = _rng(seed, _STREAM["cells"], 1, key)
            tint = (srng.uniform(0.92, 1.08, 3) * srng.uniform(0.9, 1.08)).astype(np.float32)
            pool = np.arange(1, max(400, 2 * images_per_subject))  # C-NMC-like image numbers
            image_ids = np.sort(srng.choice(pool, images_per_subject, replace=False))
            for image_id in image_ids:
                rng = _rng(seed, _STREAM["cells"], 2, key, int(image_id))
                cell_id = int(rng.integers(1, 4))
                path = dest / "fold_0" / label / f"UID_{subject}_{image_id}_{cell_id}_{label}.{ext}"
                _save(_render_cell(rng, label, size, tint), path, pil_format)
                written.append(path)
    return written


# --------------------------------------------------------------------------------- fields
def _window(shape: tuple[int, ...], cy: float, cx: float, r: float) -> tuple[slice, slice]:
    """The part of an image a blob of radius ``r`` at (cy, cx) can touch: draw only there."""
    y0, x0 = max(0, int(cy - r - 2)), max(0, int(cx - r - 2))
    return slice(y0, max(y0, min(shape[0], int(cy + r + 3)))), slice(
        x0, max(x0, min(shape[1], int(cx + r + 3))))


def _paint(
    img: np.ndarray, cy: float, cx: float, r: float,
    paint: Callable[[np.ndarray, np.ndarray, np.ndarray], None],
) -> None:
    """Run ``paint(view, yy, xx)`` on the window around (cy, cx) only: fields stay fast."""
    win = _window(img.shape, cy, cx, r)
    yy, xx = np.mgrid[win].astype(np.float32)
    if yy.size:
        paint(img[win], yy, xx)


def _rbc(rng: np.random.Generator, img: np.ndarray, cy: float, cx: float, r: float) -> None:
    """A red cell: pale-red disc, darker rim, central pallor."""
    colour = _RBC * rng.uniform(0.95, 1.05, 3).astype(np.float32)

    def paint(view: np.ndarray, yy: np.ndarray, xx: np.ndarray) -> None:
        disc = _shape_alpha(yy, xx, cy, cx, r, _outline(rng, 0.05, 64))
        d2 = ((yy - cy) ** 2 + (xx - cx) ** 2) / (r * r)
        _blend(view, disc * (0.8 - 0.45 * np.exp(-d2 / 0.18)), colour)

    _paint(img, cy, cx, r, paint)


def _wbc(
    rng: np.random.Generator, img: np.ndarray, cy: float, cx: float, r: float
) -> tuple[int, int, int, int]:
    """A white cell: lilac cytoplasm, purple nucleus of 1-4 lobes; returns its tight box."""
    lobes = int(rng.integers(1, 5))
    outline = _outline(rng, 0.06, 128)
    box: list[int] = []

    def paint(view: np.ndarray, yy: np.ndarray, xx: np.ndarray) -> None:
        cell = _shape_alpha(yy, xx, cy, cx, r, outline)
        _blend(view, 0.92 * cell, _WBC_CYTOPLASM)
        nucleus = np.zeros_like(cell)
        r_lobe = r * (0.72 if lobes == 1 else rng.uniform(0.32, 0.42))
        spread = 0.0 if lobes == 1 else r * 0.36
        start = rng.uniform(0, 2 * np.pi)
        for i in range(lobes):
            a = start + i * 2 * np.pi / lobes
            lobe = _shape_alpha(yy, xx, cy + spread * np.sin(a), cx + spread * np.cos(a),
                                r_lobe, _outline(rng, 0.1, 64))
            nucleus = np.maximum(nucleus, lobe)
        tex = 1.0 + 0.08 * _noise(rng, cell.shape, 10)[..., None]
        _blend(view, nucleus * cell, _WBC_NUCLEUS * tex)
        ys, xs = np.nonzero(cell >= 0.5)
        y0, x0 = int(yy[0, 0]), int(xx[0, 0])
        box.extend([x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1])

    _paint(img, cy, cx, r, paint)
    return box[0], box[1], box[2], box[3]


def _render_field(
    rng: np.random.Generator, width: int, height: int
) -> tuple[Image.Image, list[tuple[int, int, int, int]]]:
    s = min(width, height) / 480.0
    tint = rng.uniform(0.96, 1.03, 3).astype(np.float32)
    light = 1.0 + 0.025 * _noise(rng, (height, width), 3)[..., None]
    img = np.empty((height, width, 3), np.float32)
    img[:] = _SMEAR_BACKGROUND * tint
    img *= light

    n_wbc = int(rng.integers(1, 4))
    wbcs: list[tuple[float, float, float]] = []
    for _ in range(100):  # rejection sampling: inside the frame, apart from each other
        r = rng.uniform(36, 52) * s
        margin = r + 4
        if width <= 2 * margin or height <= 2 * margin:
            raise ValueError(f"a {width}x{height} field is too small for a white cell")
        cy, cx = rng.uniform(margin, height - margin), rng.uniform(margin, width - margin)
        if all((cy - y) ** 2 + (cx - x) ** 2 > (r + q + 6) ** 2 for y, x, q in wbcs):
            wbcs.append((cy, cx, r))
        if len(wbcs) == n_wbc:  # a crowded small field may end with fewer: never loop for ever
            break

    n_rbc = int(rng.uniform(0.6, 1.0) * 70 * width * height / (640 * 480))
    for _ in range(n_rbc):
        r = rng.uniform(19, 27) * s
        _rbc(rng, img, rng.uniform(-r, height + r), rng.uniform(-r, width + r), r)
    boxes = [_wbc(rng, img, cy, cx, r) for cy, cx, r in wbcs]

    img += 2.5 * rng.standard_normal(img.shape, dtype=np.float32)
    field = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    return field.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.1) * s)), boxes


def make_smear_batch(
    dest: Path,
    *,
    n_images: int = 24,
    size: tuple[int, int] = (640, 480),
    seed: int = 0,
    fmt: str = "jpg",
) -> list[Path]:
    """Write blood-smear fields in YOLO layout: ``images/``, ``labels/``, ``data.yaml``.

    ``size`` is (width, height). Only white cells are labelled (class 0 ``WBC``); red cells are
    distractors. Returns the image files written.
    """
    ext, pil_format = _format(fmt)
    dest = Path(dest)
    width, height = size
    (dest / "labels").mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for i in range(n_images):
        name = f"smear_{seed}_{i:04d}"
        field, boxes = _render_field(_rng(seed, _STREAM["fields"], i), width, height)
        path = dest / "images" / f"{name}.{ext}"
        _save(field, path, pil_format)
        lines = [
            f"0 {(x0 + x1) / 2 / width:.6f} {(y0 + y1) / 2 / height:.6f} "
            f"{(x1 - x0) / width:.6f} {(y1 - y0) / height:.6f}"
            for x0, y0, x1, y1 in boxes
        ]
        (dest / "labels" / f"{name}.txt").write_text("\n".join(lines) + "\n")
        written.append(path)
    # No ``path:`` key: Ultralytics then resolves train/val against this file's folder.
    (dest / "data.yaml").write_text(
        "# synthetic blood-smear fields (training.dev.synth)\n"
        "train: images\nval: images\nnc: 1\nnames:\n  0: WBC\n"
    )
    return written


# ---------------------------------------------------------------------------------- batch
def write_ready(dest: Path) -> Path:
    """Mark a batch complete; call it last, since the platform reads a batch only after this."""
    marker = Path(dest) / READY_MARKER
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_bytes(b"")
    return marker


def make_demo_batches(
    landing: Path,
    *,
    seed: int = 0,
    n_subjects_per_class: int = 4,
    images_per_subject: int = 20,
    n_fields: int = 24,
) -> list[str]:
    """Write ``synth-cells-<seed>`` and ``synth-fields-<seed>`` under ``landing``; return their ids.

    A batch that already carries its ready marker is left alone: it may be being read, and the
    same seed would write the same bytes anyway.
    """
    landing = Path(landing)
    cells, fields = f"synth-cells-{seed}", f"synth-fields-{seed}"
    if not (landing / cells / READY_MARKER).exists():
        make_cell_batch(landing / cells, n_subjects_per_class=n_subjects_per_class,
                        images_per_subject=images_per_subject, seed=seed)
        write_ready(landing / cells)
    if not (landing / fields / READY_MARKER).exists():
        make_smear_batch(landing / fields, n_images=n_fields, seed=seed)
        write_ready(landing / fields)
    return [cells, fields]


# ------------------------------------------------------------------------------ bad files
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb_png(width: int = 20_000, height: int = 20_000, rows: int = 2_000) -> bytes:
    """A 1-bit PNG whose header declares ``width x height`` pixels (400 Mpx by default).

    A complete stream of that size cannot be under ~48 KB (deflate tops out near 1:1032), so
    only the first ``rows`` rows are stored: the file stays a few KB. A safe reader refuses it
    from the header alone, before decoding anything, which is what the validator must do.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    raw = bytes((1 + (width + 7) // 8) * rows)  # filter byte 0 + zero pixels per row
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(raw, 9)) + _png_chunk(b"IEND", b""))


def make_bad_files(dest_dir: Path, *, seed: int = 0) -> dict[str, str]:
    """Write one broken file of each kind into ``dest_dir``; return ``{filename: reason}``.

    Names follow the C-NMC pattern with the folder's name as label and a subject of their own,
    so the only thing wrong with each file is the fault it was made for.
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    label = dest_dir.name
    rng = _rng(seed, _STREAM["bad"])
    number = int(rng.integers(10_000, 20_000))  # outside the range of good subjects
    subject = f"H{number}" if label == "hem" else str(number)
    names = {reason: f"UID_{subject}_{900 + i}_1_{label}.png"
             for i, reason in enumerate(BAD_FILE_REASONS)}

    cell = _render_cell(rng, "hem" if label == "hem" else "all", 450, np.ones(3, np.float32))
    good = dest_dir / names["truncated"]
    _save(cell, good, "PNG")
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])  # header intact, pixel stream cut in half

    (dest_dir / names["empty"]).write_bytes(b"")
    (dest_dir / names["not_an_image"]).write_text(
        "This is a text file with an image's name, e.g. an upload of the wrong attachment.\n"
    )
    grey16 = (np.asarray(cell.convert("L"), dtype=np.uint16) * 257).astype("<u2")
    Image.fromarray(grey16).save(dest_dir / names["wrong_mode"], "PNG")
    _save(cell.resize((8, 8), Image.Resampling.BILINEAR), dest_dir / names["too_small"], "PNG")
    (dest_dir / names["decompression_bomb"]).write_bytes(_bomb_png())
    return {names[reason]: reason for reason in BAD_FILE_REASONS}
