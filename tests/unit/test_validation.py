"""The GX suite on hand-made metadata frames: each fault gets its reason, soft bounds only warn."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from training.config import load_config
from training.data.validation import (
    METADATA_COLUMNS,
    SUITE_NAME,
    hamming_matches,
    prepare_frame,
    run_suite,
    same_picture,
)
from training.dev.synth import make_cell_batch


def _row(path: str, **kw: object) -> dict[str, object]:
    row: dict[str, object] = {
        "batch_id": "b", "path": path, "kind": "cell", "label": "all", "subject_id": "7",
        "yolo_labels": "", "box_counts": "{}", "decodable": True, "error": "", "format": "PNG",
        "width": 100, "height": 100, "mode": "RGB", "channels": 3, "bytes": 5000,
        "sha256": f"sha-{path}", "phash": "ffff000000000000", "blur": 50.0, "exposure": 100.0,
        "contrast": 20.0, "background_fraction": 0.5,
    }
    row.update(kw)
    return row


def _broken(path: str, error: str) -> dict[str, object]:
    return _row(path, decodable=False, error=error, format="", width=0, height=0, mode="",
                channels=0, phash="", blur=float("nan"), exposure=float("nan"))


GOOD = [_row(f"good{i}.png", label="all" if i % 2 else "hem") for i in range(12)]
FAULTS = {
    "bomb.png": (_broken("bomb.png", "decompression_bomb"),
                 ["not_decodable:decompression_bomb"]),
    "trunc.png": (_broken("trunc.png", "truncated"), ["not_decodable:truncated"]),
    "empty.png": (_broken("empty.png", "empty"), ["not_decodable:empty"]),
    "text.png": (_broken("text.png", "not_an_image"), ["not_decodable:not_an_image"]),
    "cmyk.jpg": (_row("cmyk.jpg", mode="CMYK", format="JPEG"), ["wrong_mode"]),
    "tiny.png": (_row("tiny.png", width=8, height=8), ["too_small"]),
    "huge.png": (_row("huge.png", width=5000), ["too_large"]),
    "gif.gif": (_row("gif.gif", format="GIF"), ["bad_format"]),
    "blast.png": (_row("blast.png", label="blast"), ["label_not_in_set"]),
    "zdup.png": (_row("zdup.png", sha256="sha-good3.png"), ["duplicate"]),
    "nosubject.png": (_row("nosubject.png", subject_id=""), ["no_subject"]),
    "curated.png": (_row("curated.png", sha256="old-sha"), ["already_curated"]),
    "leak.png": (_row("leak.png", phash="0123456789abcdef"), ["test_leak"]),
    "field.jpg": (_row("field.jpg", kind="field", label="", box_counts='{"WBC": 2, "Alien": 1}'),
                  ["label_not_in_set"]),
    "twofaults.png": (_row("twofaults.png", width=8, mode="CMYK"), ["too_small", "wrong_mode"]),
}


@pytest.fixture
def frame(cfg):
    df = pd.DataFrame(GOOD + [r for r, _ in FAULTS.values()], columns=METADATA_COLUMNS)
    # the leak reference differs from leak.png's hash in 3 bits: a near duplicate
    return prepare_frame(df, cfg, curated_sha256={"old-sha"}, test_phashes=["0123456789abcdee"])


def test_every_fault_gets_its_reason_and_good_rows_none(cfg, frame):
    out = run_suite(cfg, frame, run_name="unit")
    for path, (_, expected) in FAULTS.items():
        assert sorted(out.reasons[path]) == sorted(expected), path
    for row in GOOD:
        assert out.reasons[row["path"]] == [], row["path"]
    assert not out.success
    assert out.table_failures == []
    assert out.data_docs is not None and out.data_docs.is_file()
    assert "validations" in out.data_docs.parts  # this run's own page, not the index
    assert out.data_docs.is_file()
    assert SUITE_NAME in out.data_docs.read_text()


def test_duplicate_keeps_the_first_path_and_names_it(cfg, frame):
    row = frame.set_index("path").loc["zdup.png"]
    assert row["duplicate_of"] == "good3.png"
    assert pd.isna(frame.set_index("path").loc["good3.png", "duplicate_of"])


def test_undecodable_rows_are_not_also_called_small_or_badly_formatted(cfg, frame):
    out = run_suite(cfg, frame, run_name="unit")
    assert out.reasons["bomb.png"] == ["not_decodable:decompression_bomb"]
    assert out.reasons["empty.png"] == ["not_decodable:empty"]


def test_soft_bounds_warn_but_never_quarantine(tmp_path: Path):
    cfg = load_config(home=tmp_path, validation={"min_blur": 10.0, "mostly": 0.95})
    rows = [_row(f"g{i}.png") for i in range(9)] + [_row("blurry.png", blur=1.0),
                                                     _row("dark.png", exposure=0.5)]
    out = run_suite(cfg, prepare_frame(pd.DataFrame(rows), cfg), run_name="soft")
    assert out.reasons["blurry.png"] == [] and out.reasons["dark.png"] == []
    assert out.warnings["blurry.png"] == ["blurry"]
    assert out.warnings["dark.png"] == ["bad_exposure"]
    # 10 of 11 (91 %) meet each bound, below mostly=95 %: both fail as a whole, still no quarantine
    assert set(out.soft_failures) == {"blurry", "bad_exposure"}
    assert out.table_failures == []


def test_table_level_expectations_fail_the_batch(tmp_path: Path):
    cfg = load_config(home=tmp_path, validation={"min_batch_size": 5,
                                                 "class_share_range": (0.2, 0.8)})
    rows = [_row("a.png", label="all"), _row("b.png", label="all"), _row("c.png", label="all"),
            _row("d.png", label="hem")]
    out = run_suite(cfg, prepare_frame(pd.DataFrame(rows), cfg), run_name="table")
    assert set(out.table_failures) == {"batch_too_small"}
    rows += [_row(f"e{i}.png", label="all") for i in range(6)]  # 9 all : 1 hem
    out = run_suite(cfg, prepare_frame(pd.DataFrame(rows), cfg), run_name="table2")
    assert out.table_failures == ["class_imbalance"]
    assert all(not r for r in out.reasons.values())  # a table verdict names no single file


def test_suite_follows_the_config_and_is_persisted_once(tmp_path: Path):
    cfg = load_config(home=tmp_path, data={"task": "multiclass", "positive_class": None,
                                           "classes": ["Benign", "Early", "Pre", "Pro"]})
    rows = [_row("a.jpg", label="Early", subject_id=""), _row("b.jpg", label="all",
                                                                subject_id="")]
    for _ in range(2):
        out = run_suite(cfg, prepare_frame(pd.DataFrame(rows), cfg), run_name="again")
    assert out.reasons == {"a.jpg": [], "b.jpg": ["label_not_in_set"]}
    suites = list((cfg.gx_dir / "gx" / "expectations").glob("*.json"))
    assert [p.stem for p in suites] == [SUITE_NAME]
    saved = json.loads(suites[0].read_text())
    label = [e for e in saved["expectations"] if e["kwargs"].get("column") == "label"]
    assert label[0]["kwargs"]["value_set"] == ["Benign", "Early", "Pre", "Pro"]
    assert label[0]["meta"]["reason"] == "label_not_in_set"


def test_empty_frame_is_a_failed_batch_not_a_crash(cfg):
    frame = prepare_frame(pd.DataFrame(columns=METADATA_COLUMNS), cfg)
    out = run_suite(cfg, frame, run_name="empty")
    assert out.table_failures == ["batch_too_small"]


def test_missing_columns_are_refused(cfg):
    with pytest.raises(Exception, match="lacks columns"):
        prepare_frame(pd.DataFrame({"path": ["a"]}), cfg)


@pytest.mark.parametrize(("a", "b", "hit"), [
    ("0000000000000000", "000000000000000f", True),   # 4 bits
    ("0000000000000000", "000000000000001f", False),  # 5 bits
    ("ffffffffffffffff", "fffffffffffffff0", True),   # top bit set: no overflow
    ("", "0000000000000000", False),                  # no hash, no match
])
def test_hamming_threshold(a: str, b: str, hit: bool):
    assert hamming_matches([a], [b]).tolist() == [hit]


def test_same_picture_tells_a_resave_from_another_cell(tmp_path: Path):
    a, b = make_cell_batch(tmp_path / "cells", n_subjects_per_class=1, images_per_subject=2,
                           size=96)[:2]
    Image.open(a).save(tmp_path / "resaved.jpg", "JPEG", quality=80)
    assert same_picture(a, tmp_path / "resaved.jpg")
    assert not same_picture(a, b)
    (tmp_path / "junk.png").write_bytes(b"junk")
    assert not same_picture(a, tmp_path / "junk.png")


def test_pixel_confirmation_overrules_a_hash_coincidence(cfg):
    rows = [_row("twin.png", phash="0123456789abcdef"), _row("stranger.png",
                                                              phash="0123456789abcdee")]
    asked: list[tuple[str, list[str]]] = []

    def confirm(path: str, ids: list[str]) -> bool:
        asked.append((path, ids))
        return path == "twin.png"

    frame = prepare_frame(pd.DataFrame(rows), cfg, test_phashes={"t1": "0123456789abcdef",
                                                                 "t2": "fedcba9876543210"},
                          confirm_leak=confirm)
    assert frame.set_index("path")["leaks_test"].to_dict() == {"stranger.png": False,
                                                               "twin.png": True}
    assert sorted(asked) == [("stranger.png", ["t1"]), ("twin.png", ["t1"])]
