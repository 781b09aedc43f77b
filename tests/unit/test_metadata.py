"""Per-image metadata: every column and every error, on tiny files made here."""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFile, ImageFilter

from training.data import metadata
from training.data.importers import ImageRecord, import_batch
from training.data.metadata import ERRORS, METADATA_COLUMNS, extract_metadata
from training.dev.synth import make_bad_files

CONTRACT = [
    "batch_id", "path", "kind", "label", "subject_id", "yolo_labels", "box_counts", "decodable",
    "error", "format", "width", "height", "mode", "channels", "bytes", "sha256", "phash", "blur",
    "exposure", "contrast", "background_fraction",
]


def _save(root: Path, rel: str, img: Image.Image, fmt: str, **kw) -> ImageRecord:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt, **kw)
    return ImageRecord(path=rel, kind="cell", label="all", subject_id="7")


def _one(root: Path, rec: ImageRecord, **kw) -> pd.Series:
    df = extract_metadata(root, [rec], "b1", **kw)
    assert len(df) == 1
    return df.iloc[0]


def _rgb(w: int = 64, h: int = 48, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def test_columns_are_the_contract() -> None:
    assert METADATA_COLUMNS == CONTRACT
    empty = extract_metadata(Path("."), [], "b0")
    assert list(empty.columns) == CONTRACT and len(empty) == 0


@pytest.mark.parametrize(("fmt", "ext", "mode"), [
    ("PNG", "png", "RGB"), ("JPEG", "jpg", "RGB"), ("BMP", "bmp", "RGB"), ("PNG", "png", "L"),
    ("PNG", "png", "RGBA"),
])
def test_good_images(tmp_path: Path, fmt: str, ext: str, mode: str) -> None:
    rec = _save(tmp_path, f"all/x.{ext}", _rgb().convert(mode), fmt)
    row = _one(tmp_path, rec)
    data = (tmp_path / rec.path).read_bytes()
    assert (row.batch_id, row.path, row.kind, row.label, row.subject_id) == (
        "b1", "all/x." + ext, "cell", "all", "7")
    assert row.decodable and row.error == ""
    assert (row.format, row.width, row.height, row["mode"]) == (fmt, 64, 48, mode)
    assert row.channels == len(mode)
    assert row.bytes == len(data)
    assert row.sha256 == hashlib.sha256(data).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{16}", row.phash)
    assert row.yolo_labels == "" and json.loads(row.box_counts) == {}
    for col in ("blur", "exposure", "contrast", "background_fraction"):
        assert math.isfinite(row[col])


def test_dtypes(tmp_path: Path) -> None:
    rec = _save(tmp_path, "a.png", _rgb(), "PNG")
    df = extract_metadata(tmp_path, [rec, ImageRecord("gone.png", "cell", error="missing_file")],
                          "b1")
    assert df["decodable"].dtype == bool
    for col in ("width", "height", "channels", "bytes"):
        assert df[col].dtype == np.int64
    for col in ("blur", "exposure", "contrast", "background_fraction"):
        assert df[col].dtype == np.float64


def test_statistics_of_known_images(tmp_path: Path) -> None:
    flat = _save(tmp_path, "flat.png", Image.new("L", (40, 30), 100), "PNG")
    half = np.zeros((30, 40), np.uint8)
    half[:, 20:] = 255
    halves = _save(tmp_path, "half.png", Image.fromarray(half), "PNG")
    checker = ((np.indices((30, 40)).sum(axis=0) % 2) * 255).astype(np.uint8)
    board = _save(tmp_path, "board.png", Image.fromarray(checker), "PNG")
    df = extract_metadata(tmp_path, [flat, halves, board], "b1").set_index("path")

    assert df.loc["flat.png", ["exposure", "contrast", "blur", "background_fraction"]].tolist() \
        == [100.0, 0.0, 0.0, 0.0]
    assert df.loc["half.png", "exposure"] == pytest.approx(127.5)
    assert df.loc["half.png", "contrast"] == pytest.approx(127.5)
    assert df.loc["half.png", "background_fraction"] == pytest.approx(0.5)
    # interior checkerboard pixels: Laplacian = +-4*255, mean 0, so variance (4*255)^2
    assert df.loc["board.png", "blur"] == pytest.approx(1020.0**2)
    assert df.loc["board.png", "background_fraction"] == pytest.approx(0.5)


def test_blurred_image_scores_lower(tmp_path: Path) -> None:
    sharp = _rgb(96, 96, seed=1)
    recs = [_save(tmp_path, "sharp.png", sharp, "PNG"),
            _save(tmp_path, "soft.png", sharp.filter(ImageFilter.GaussianBlur(2)), "PNG")]
    df = extract_metadata(tmp_path, recs, "b1").set_index("path")
    assert df.loc["soft.png", "blur"] < df.loc["sharp.png", "blur"] / 10


def test_near_duplicates_share_a_perceptual_hash_and_not_a_sha(tmp_path: Path) -> None:
    base = _rgb(128, 128, seed=2).filter(ImageFilter.GaussianBlur(3))
    recs = [_save(tmp_path, "a.png", base, "PNG"), _save(tmp_path, "b.jpg", base, "JPEG",
                                                         quality=90),
            _save(tmp_path, "c.png", _rgb(128, 128, seed=3).filter(ImageFilter.GaussianBlur(3)),
                  "PNG")]
    df = extract_metadata(tmp_path, recs, "b1").set_index("path")
    assert df.loc["a.png", "sha256"] != df.loc["b.jpg", "sha256"]

    def dist(a: str, b: str) -> int:
        return bin(int(df.loc[a, "phash"], 16) ^ int(df.loc[b, "phash"], 16)).count("1")

    assert dist("a.png", "b.jpg") <= 4 < dist("a.png", "c.png")


def test_big_jpeg_reports_full_size_but_is_analysed_small(tmp_path: Path) -> None:
    rec = _save(tmp_path, "big.jpg", _rgb(2000, 1000).resize((2000, 1000)), "JPEG")
    row = _one(tmp_path, rec)
    assert (row.width, row.height, row["mode"], row.channels) == (2000, 1000, "RGB", 3)
    assert row.decodable and row.format == "JPEG"


def test_wrong_modes_are_recorded_not_errors(tmp_path: Path) -> None:
    cmyk = _save(tmp_path, "cmyk.jpg", _rgb().convert("CMYK"), "JPEG")
    grey16 = np.full((20, 30), 100 * 257, np.uint16)
    deep = _save(tmp_path, "deep.png", Image.fromarray(grey16), "PNG")
    df = extract_metadata(tmp_path, [cmyk, deep], "b1").set_index("path")
    assert df.loc["cmyk.jpg", "mode"] == "CMYK" and df.loc["cmyk.jpg", "channels"] == 4
    assert df.loc["deep.png", "mode"].startswith("I")
    assert df["decodable"].all() and (df["error"] == "").all()
    assert df.loc["deep.png", "exposure"] == pytest.approx(100.0)  # scaled, not clipped at 255


def test_synthetic_bad_files(tmp_path: Path) -> None:
    reasons = make_bad_files(tmp_path / "all")
    _, records = import_batch(tmp_path, "bad")
    df = extract_metadata(tmp_path, records, "bad").set_index("path")
    expected = {"truncated": "truncated", "empty": "empty", "not_an_image": "not_an_image",
                "decompression_bomb": "decompression_bomb", "wrong_mode": "", "too_small": ""}
    for name, reason in reasons.items():
        row = df.loc[f"all/{name}"]
        assert row.error == expected[reason], name
        assert bool(row.decodable) == (expected[reason] == ""), name
        if row.error:
            assert row.format == "" and row.phash == "" and math.isnan(row.blur)
    assert df.loc[f"all/{_name(reasons, 'empty')}", "bytes"] == 0
    assert df.loc[f"all/{_name(reasons, 'too_small')}", ["width", "height"]].tolist() == [8, 8]


def _name(reasons: dict[str, str], reason: str) -> str:
    return next(k for k, v in reasons.items() if v == reason)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP"])
def test_truncated_files(tmp_path: Path, fmt: str) -> None:
    buf = io.BytesIO()
    _rgb(200, 150).save(buf, fmt)
    data = buf.getvalue()
    (tmp_path / "t.img").write_bytes(data[: len(data) * 2 // 3])
    row = _one(tmp_path, ImageRecord("t.img", "cell"))
    assert row.error == "truncated" and not row.decodable
    assert (row.width, row.height) == (200, 150)  # the header was fine
    assert row.sha256 == hashlib.sha256(data[: len(data) * 2 // 3]).hexdigest()
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_garbage_and_empty(tmp_path: Path) -> None:
    (tmp_path / "text.png").write_text("not an image at all\n")
    (tmp_path / "zero.jpg").write_bytes(b"")
    df = extract_metadata(tmp_path, [ImageRecord("text.png", "cell"),
                                     ImageRecord("zero.jpg", "cell")], "b1")
    assert df["error"].tolist() == ["not_an_image", "empty"]
    assert (df["width"] == 0).all() and (df["format"] == "").all() and (df["mode"] == "").all()


def test_decompression_bomb_is_caught_from_the_header(tmp_path: Path, monkeypatch) -> None:
    rec = _save(tmp_path, "wide.png", Image.new("L", (300, 200)), "PNG")

    def refuse(self):  # noqa: ANN001 - loading a bomb would be the bug
        raise AssertionError("load() called on a decompression bomb")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    row = _one(tmp_path, rec, max_pixels=300 * 200 - 1)
    assert row.error == "decompression_bomb" and not row.decodable
    assert (row.width, row.height) == (300, 200)  # the evidence is kept
    monkeypatch.undo()
    assert _one(tmp_path, rec, max_pixels=300 * 200).error == ""


def test_missing_unreadable_and_label_errors(tmp_path: Path) -> None:
    _save(tmp_path, "ok.png", _rgb(), "PNG")
    _save(tmp_path, "vanished.png", _rgb(), "PNG")
    (tmp_path / "dir.png").mkdir()  # a folder with an image's name cannot be read
    (tmp_path / "text.png").write_text("junk")
    records = [
        ImageRecord("never.png", "cell", error="missing_file"),
        ImageRecord("vanished.png", "cell"),
        ImageRecord("dir.png", "cell"),
        ImageRecord("ok.png", "field", yolo_labels="", box_counts={"WBC": 2},
                    error="bad_label_file"),
        ImageRecord("text.png", "field", error="bad_label_file"),
    ]
    (tmp_path / "vanished.png").unlink()  # deleted between import and metadata
    df = extract_metadata(tmp_path, records, "b1")
    assert df["error"].tolist() == [
        "missing_file", "missing_file", "unreadable", "bad_label_file", "not_an_image",
    ]
    assert df["decodable"].tolist() == [False, False, False, True, False]
    assert json.loads(df.loc[3, "box_counts"]) == {"WBC": 2}
    assert set(df["error"]) <= set(ERRORS) | {""}


def test_field_columns_pass_through(tmp_path: Path) -> None:
    rec = _save(tmp_path, "images/f.jpg", _rgb(), "JPEG")
    rec = ImageRecord(rec.path, "field", yolo_labels="0 0.5 0.5 0.1 0.1\n1 0.2 0.2 0.1 0.1",
                      box_counts={"WBC": 1, "RBC": 1})
    row = _one(tmp_path, rec)
    assert row.kind == "field" and row.label == "" and row.subject_id == ""
    assert row.yolo_labels == rec.yolo_labels
    assert row.box_counts == '{"RBC": 1, "WBC": 1}'


def test_process_pool_matches_in_process(tmp_path: Path) -> None:
    n = metadata.SMALL_BATCH + 6
    records = [_save(tmp_path, f"c/{i:03d}.png", _rgb(24, 24, seed=i), "PNG") for i in range(n)]
    (tmp_path / "c" / "003.png").write_bytes(b"")
    serial = extract_metadata(tmp_path, records, "b1", workers=1)
    pooled = extract_metadata(tmp_path, records, "b1", workers=2)
    pd.testing.assert_frame_equal(serial, pooled)
    assert serial["path"].tolist() == [r.path for r in records]  # order kept
    assert serial.loc[3, "error"] == "empty"
