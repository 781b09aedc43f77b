"""The synthetic data generator: deterministic, in the real layouts, with a real class signal."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.dev import synth

CNMC_NAME = re.compile(r"^UID_(?P<subject>H?\d+)_(?P<image>\d+)_(?P<cell>\d+)_(?P<label>all|hem)$")
SMALL = {"n_subjects_per_class": 2, "images_per_subject": 4, "size": 160}


def _digest(files: list[Path], root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _dark_purple_fraction(path: Path) -> float:
    """Share of the cell's pixels that are dark purple (condensed chromatin), from the pixels."""
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    cell = rgb.max(axis=2) > 40
    dark_purple = cell & (rgb.mean(axis=2) < 105) & (b > g + 30) & (r > g)
    return float(dark_purple.sum() / max(cell.sum(), 1))


@pytest.fixture(scope="module")
def cells(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("cells")
    return root, synth.make_cell_batch(root, seed=3, **SMALL)


@pytest.fixture(scope="module")
def fields(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("fields")
    return root, synth.make_smear_batch(root, n_images=6, size=(320, 240), seed=3)


def test_cell_batch_is_byte_identical_for_the_same_seed(cells, tmp_path: Path) -> None:
    root, files = cells
    again = synth.make_cell_batch(tmp_path, seed=3, **SMALL)
    assert _digest(again, tmp_path) == _digest(files, root)
    other = synth.make_cell_batch(tmp_path / "other", seed=4, **SMALL)
    assert set(_digest(other, tmp_path / "other").values()).isdisjoint(
        _digest(files, root).values())


def test_smear_batch_is_byte_identical_for_the_same_seed(fields, tmp_path: Path) -> None:
    root, files = fields
    synth.make_smear_batch(tmp_path, n_images=6, size=(320, 240), seed=3)
    every = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert every == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert _digest([root / p for p in every], root) == _digest(
        [tmp_path / p for p in every], tmp_path)


def test_cell_layout_names_and_subjects(cells) -> None:
    root, files = cells
    assert len(files) == 2 * 2 * 4 and all(p.is_file() for p in files)
    subjects: dict[str, set[str]] = {"all": set(), "hem": set()}
    for path in files:
        assert path.parent.parent == root / "fold_0" and path.suffix == ".png"
        match = CNMC_NAME.match(path.stem)
        assert match, path.name
        assert match["label"] == path.parent.name
        assert match["subject"].startswith("H") == (match["label"] == "hem")
        subjects[match["label"]].add(match["subject"])
        with Image.open(path) as img:
            assert (img.size, img.mode) == ((160, 160), "RGB")
    assert len(subjects["all"]) == len(subjects["hem"]) == 2
    assert not subjects["all"] & subjects["hem"]
    numbers = {s.lstrip("H") for s in subjects["all"] | subjects["hem"]}
    assert len(numbers) == 4  # distinct even without the prefix


def test_subjects_depend_on_the_seed(tmp_path: Path) -> None:
    def subjects(seed: int) -> set[str]:
        files = synth.make_cell_batch(tmp_path / str(seed), n_subjects_per_class=4,
                                      images_per_subject=1, size=64, seed=seed)
        return {CNMC_NAME.match(p.stem)["subject"] for p in files}

    a, b = subjects(0), subjects(1)
    assert len(a) == len(b) == 8
    assert len(a & b) <= 1


def test_cell_is_centred_on_black(cells) -> None:
    for path in cells[1]:
        rgb = np.asarray(Image.open(path))
        assert rgb[:8].max() == rgb[-8:].max() == rgb[:, :8].max() == rgb[:, -8:].max() == 0
        ys, xs = np.nonzero(rgb.max(axis=2) > 40)
        assert abs(ys.mean() - 80) < 16 and abs(xs.mean() - 80) < 16


def test_classes_differ_in_morphology(cells) -> None:
    """Dark condensed nuclei and small cells are 'hem'; large pale nuclei are 'all'."""
    files = cells[1]
    dark = {lab: [_dark_purple_fraction(p) for p in files if p.parent.name == lab]
            for lab in ("all", "hem")}
    assert np.mean(dark["hem"]) > 0.2 > 0.05 > np.mean(dark["all"])
    assert min(dark["hem"]) > max(dark["all"])  # separable image by image, not just on average

    def area(p: Path) -> float:
        return float((np.asarray(Image.open(p)).max(axis=2) > 40).mean())

    assert np.mean([area(p) for p in files if p.parent.name == "all"]) > 1.4 * np.mean(
        [area(p) for p in files if p.parent.name == "hem"])


def test_cell_formats(tmp_path: Path) -> None:
    files = synth.make_cell_batch(tmp_path, n_subjects_per_class=1, images_per_subject=1,
                                  size=64, fmt="bmp")
    assert {p.suffix for p in files} == {".bmp"}
    assert Image.open(files[0]).format == "BMP"
    with pytest.raises(ValueError, match="fmt='gif'"):
        synth.make_cell_batch(tmp_path, fmt="gif")


def test_smear_layout_and_boxes(fields) -> None:
    root, files = fields
    assert "names:\n  0: WBC" in (root / "data.yaml").read_text()
    assert "nc: 1" in (root / "data.yaml").read_text()
    for path in files:
        assert path.parent == root / "images" and path.suffix == ".jpg"
        rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
        assert rgb.shape == (240, 320, 3)
        lines = (root / "labels" / f"{path.stem}.txt").read_text().split("\n")
        boxes = [line.split() for line in lines if line]
        assert 1 <= len(boxes) <= 3
        for cls, *numbers in boxes:
            cx, cy, w, h = map(float, numbers)
            assert cls == "0"
            assert 0 < cx - w / 2 and cx + w / 2 < 1 and 0 < cy - h / 2 and cy + h / 2 < 1
            x0, x1 = round((cx - w / 2) * 320), round((cx + w / 2) * 320)
            y0, y1 = round((cy - h / 2) * 240), round((cy + h / 2) * 240)
            inside = rgb[y0:y1, x0:x1]
            purple = (inside[..., 2] > inside[..., 0] + 20) & (inside.mean(axis=2) < 150)
            assert purple.mean() > 0.1  # a purple nucleus (blue above red) in the box
            # tight: the cell (lilac, blue >= red; background and red cells are redder) touches
            # each edge of the box from inside, and hardly shows just outside it
            lilac = rgb[..., 2] > rgb[..., 0] - 4
            strips_in = [lilac[y0:y1, x0:x0 + 3], lilac[y0:y1, x1 - 3:x1],
                         lilac[y0:y0 + 3, x0:x1], lilac[y1 - 3:y1, x0:x1]]
            strips_out = [lilac[y0:y1, max(0, x0 - 6):x0 - 3], lilac[y0:y1, x1 + 3:x1 + 6],
                          lilac[max(0, y0 - 6):y0 - 3, x0:x1], lilac[y1 + 3:y1 + 6, x0:x1]]
            assert min(s.sum() for s in strips_in) >= 8, path.name
            assert max(s.sum() for s in strips_out) <= 20, path.name
        assert len(boxes) == len({tuple(b) for b in boxes})


def test_demo_batches_are_complete_and_idempotent(tmp_path: Path) -> None:
    ids = synth.make_demo_batches(tmp_path, seed=5, n_subjects_per_class=1,
                                  images_per_subject=2, n_fields=2)
    assert ids == ["synth-cells-5", "synth-fields-5"]
    for batch in ids:
        marker = tmp_path / batch / "_READY"
        assert marker.is_file() and marker.stat().st_size == 0
        newest = max(p.stat().st_mtime_ns for p in (tmp_path / batch).rglob("*") if p.is_file())
        assert marker.stat().st_mtime_ns == newest  # written last
    assert len(list((tmp_path / ids[0]).rglob("*.png"))) == 4
    assert len(list((tmp_path / ids[1] / "labels").glob("*.txt"))) == 2
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    assert synth.make_demo_batches(tmp_path, seed=5, n_subjects_per_class=1,
                                   images_per_subject=2, n_fields=2) == ids
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


def test_bad_files_are_bad_for_their_stated_reason(tmp_path: Path) -> None:
    folder = tmp_path / "all"
    bad = synth.make_bad_files(folder, seed=1)
    assert sorted(bad.values()) == sorted(synth.BAD_FILE_REASONS)
    assert bad == synth.make_bad_files(tmp_path / "again" / "all", seed=1)
    by_reason = {reason: folder / name for name, reason in bad.items()}
    for path in by_reason.values():
        assert CNMC_NAME.match(path.stem) and path.stem.endswith("_all")

    with Image.open(by_reason["truncated"]) as img:  # the header reads, the pixels do not
        assert img.size == (450, 450)
        with pytest.raises(OSError, match="truncated"):
            img.load()
    assert by_reason["empty"].stat().st_size == 0
    for reason in ("empty", "not_an_image"):
        with pytest.raises(Image.UnidentifiedImageError):
            Image.open(by_reason[reason])
    with Image.open(by_reason["wrong_mode"]) as img:
        img.load()
        assert img.mode == "I;16" and img.size == (450, 450)
    with Image.open(by_reason["too_small"]) as img:
        img.load()
        assert img.size == (8, 8) and img.mode == "RGB"

    bomb = by_reason["decompression_bomb"]
    assert bomb.stat().st_size < 8_000
    with pytest.raises(Image.DecompressionBombError):  # Pillow's own default limit refuses it
        Image.open(bomb)
    limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = None
        with Image.open(bomb) as img:
            assert img.size == (20_000, 20_000) and img.format == "PNG"
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def test_bad_files_in_hem_folder_use_healthy_subject(tmp_path: Path) -> None:
    names = synth.make_bad_files(tmp_path / "hem")
    assert all(CNMC_NAME.match(Path(n).stem)["subject"].startswith("H") for n in names)


def test_write_ready(tmp_path: Path) -> None:
    marker = synth.write_ready(tmp_path / "batch")
    assert marker == tmp_path / "batch" / "_READY" and marker.read_bytes() == b""
