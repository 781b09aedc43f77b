"""One input contract: the batch validation and the endpoint give every file the same verdict.

The corpus (``training.dev.malformed``: truncated, zero-byte, decompression bomb, 16-bit, float,
CMYK, alpha, palette, EXIF-rotated, non-images, huge, tiny, ...) is generated, never committed.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from serving.decode import BadImage, ImageTooLarge, decode_upload
from training.config import load_config
from training.contract import (
    CONTRACT_CODES,
    CONVERSIONS,
    InputContract,
    check_image,
    to_rgb,
)
from training.dev.malformed import corpus
from training.errors import ConfigError
from training.preprocess import decode_image

CORPUS = corpus()


def _contract_reasons(reasons: list[str]) -> tuple[str, ...]:
    """The reasons of the validation that are the contract's (not duplicate, label, ...)."""
    return tuple(sorted(r for r in reasons
                        if r.startswith("not_decodable:") or r in CONTRACT_CODES))


@pytest.fixture(scope="module")
def validation_verdicts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, ...]]:
    """What the batch validation (metadata extractor + GX suite) says about each file."""
    from training.data.importers import ImageRecord
    from training.data.metadata import extract_metadata
    from training.data.validation import prepare_frame, run_suite

    tmp = tmp_path_factory.mktemp("contract")
    cfg = load_config(home=tmp / "home", validation={"workers": 1})
    root = tmp / "batch"
    root.mkdir()
    for name, (data, _) in CORPUS.items():
        (root / name).write_bytes(data)
    records = [ImageRecord(path=name, kind="cell", label="all") for name in CORPUS]
    meta = extract_metadata(root, records, "corpus", workers=1,
                            max_pixels=cfg.validation.max_pixels)
    outcome = run_suite(cfg, prepare_frame(meta, cfg), run_name="corpus")
    return {name: _contract_reasons(outcome.reasons[name]) for name in CORPUS}


def _endpoint_verdict(data: bytes) -> tuple[tuple[str, ...], Image.Image | None, str]:
    contract = InputContract.for_serving(load_config())
    try:
        return (), decode_upload(data, contract=contract), ""
    except BadImage as exc:
        return tuple(sorted(exc.reasons)), None, str(exc)


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_validation_and_endpoint_agree_on_every_file(name: str, validation_verdicts) -> None:
    data, expected = CORPUS[name]
    reasons, img, message = _endpoint_verdict(data)
    assert validation_verdicts[name] == reasons == tuple(sorted(expected))
    if reasons:
        assert all(code in message for code in reasons), message  # the message names them
        return
    # accepted: the endpoint's pixels are exactly what training reads from the same bytes
    trained = decode_image(data, max_pixels=load_config().validation.max_pixels)
    assert img is not None and img.mode == "RGB" and trained.mode == "RGB"
    assert np.array_equal(np.asarray(img), np.asarray(trained))
    verdict, _ = check_image(data, InputContract.for_validation(load_config()))
    assert verdict.ok and verdict.conversion == CONVERSIONS[verdict.mode]


def test_exif_orientation_is_applied_on_both_sides() -> None:
    data, _ = CORPUS["exif_rotated.jpg"]
    assert decode_image(data).size == (48, 64)
    assert _endpoint_verdict(data)[1].size == (48, 64)


def test_serving_has_a_smaller_pixel_budget_of_its_own() -> None:
    cfg = load_config()
    serving, validation = InputContract.for_serving(cfg), InputContract.for_validation(cfg)
    assert serving.max_pixels < validation.max_pixels
    assert serving.max_pixels >= serving.max_side ** 2  # an image within max_side always fits
    assert (serving.formats, serving.modes, serving.min_side, serving.max_side) == (
        validation.formats, validation.modes, validation.min_side, validation.max_side)
    small = InputContract.for_serving(load_config(serving={"max_pixels": 40 * 40}))
    with pytest.raises(BadImage, match="not_decodable:decompression_bomb") as info:
        decode_upload(CORPUS["good_rgb.png"][0], contract=small)
    assert info.value.reasons == ("not_decodable:decompression_bomb",)
    with pytest.raises(ImageTooLarge, match="file_too_large"):
        decode_upload(CORPUS["good.jpg"][0], contract=InputContract.for_serving(
            load_config(serving={"max_image_bytes": 100})))


def test_conversions_of_the_awkward_modes() -> None:
    grey16 = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert np.asarray(to_rgb(grey16)).max() == 255  # scaled, not clipped from 65535 to 255...
    grey16 = Image.fromarray(np.full((4, 4), 257 * 100, dtype=np.uint16))
    assert (np.asarray(to_rgb(grey16)) == 100).all()  # ...so mid-grey stays mid-grey
    floats = Image.fromarray(np.full((4, 4), 300.0, dtype=np.float32))
    assert (np.asarray(to_rgb(floats)) == 255).all()


def test_a_mode_without_a_documented_conversion_cannot_be_allowed() -> None:
    with pytest.raises(ConfigError, match="no documented conversion"):
        load_config(validation={"allowed_modes": ["RGB", "LAB"]})
    assert load_config(validation={"allowed_modes": ["RGB", "CMYK"]}).validation.allowed_modes

