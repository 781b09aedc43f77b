"""Stain normalisation in the one preprocessing function (Reinhard, Macenko)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from training.dev.synth import _render_cell
from training.preprocess import (
    PreprocessParams,
    fit_stain_reference,
    normalise_stain,
    preprocess_image,
)

SIZE = 96


def _cell(seed: int, label: str = "all") -> Image.Image:
    return _render_cell(np.random.default_rng(seed), label, 300, np.ones(3, np.float32))


def _tinted(img: Image.Image, tint: tuple[float, float, float], gain: float = 1.0) -> Image.Image:
    """A copy of one cell as another lab's stain and scanner would render it."""
    arr = np.asarray(img, dtype=np.float32) * np.asarray(tint, np.float32) * gain
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _fg_error(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference (0-255) over the pixels that are cell in either image."""
    mask = np.any(a > 12, axis=-1) | np.any(b > 12, axis=-1)
    return float(np.abs(a[mask] - b[mask]).mean())


_HE = np.array([[0.65, 0.07], [0.70, 0.99], [0.29, 0.11]])  # haematoxylin, eosin (Ruifrok)


def _two_stain(seed: int, label: str, he: np.ndarray, strength: tuple[float, float]) -> Image.Image:
    """One cell as two stains with vectors ``he`` would render it (Beer-Lambert, I0 = 240).

    The concentrations come from the synthetic cell's own structure: its darker half (the
    nucleus) holds haematoxylin, the rest eosin, in proportion to its optical density, so
    two renders differ in stain only, the model Macenko assumes.
    """
    arr = np.asarray(_render_cell(np.random.default_rng(seed), label, SIZE,
                                  np.ones(3, np.float32)), dtype=np.float64)
    mask = np.any(arr > 12, axis=-1)
    density = (-np.log((arr[mask] + 1.0) / 240.0)).sum(axis=1) / 4.0
    nucleus = density > np.median(density)
    conc = np.stack([np.where(nucleus, density, 0.1 * density),
                     np.where(nucleus, 0.1 * density, density)])
    conc *= np.asarray(strength)[:, None]
    he = he / np.linalg.norm(he, axis=0)
    out = arr.copy()
    out[mask] = np.clip(240.0 * np.exp(-(he @ conc)).T - 1.0, 13, 255)
    return Image.fromarray(out.astype(np.uint8))


def _pair(method: str) -> tuple[Image.Image, Image.Image, list[Image.Image]]:
    """Two differently tinted copies of one cell, and training cells of a third tint."""
    cells = [(1, "all"), (2, "hem"), (3, "all"), (4, "hem")]
    if method == "reinhard":  # a tint per channel and a gain: another scanner's colours
        train = [_cell(s, lab) for s, lab in cells]
        cell = _cell(7)
        return (_tinted(cell, (1.12, 0.86, 0.98), 1.05), _tinted(cell, (0.84, 0.95, 1.15), 0.9),
                train)
    train = [_two_stain(s, lab, _HE, (1.0, 1.0)) for s, lab in cells]
    return (_two_stain(7, "all", np.array([[0.55, 0.15], [0.75, 0.95], [0.37, 0.25]]),
                       (1.4, 0.7)),
            _two_stain(7, "all", np.array([[0.72, 0.05], [0.62, 0.98], [0.30, 0.20]]),
                       (0.7, 1.4)), train)


@pytest.mark.parametrize("method", ["reinhard", "macenko"])
def test_two_tints_of_one_cell_map_to_nearly_the_same_pixels(method: str) -> None:
    plain = PreprocessParams(SIZE)
    pink, blue, train_cells = _pair(method)
    ref = fit_stain_reference([preprocess_image(c, plain) for c in train_cells], method)
    params = PreprocessParams(SIZE, stain=method, stain_reference=ref)
    raw = _fg_error(preprocess_image(pink, plain), preprocess_image(blue, plain))
    normed = _fg_error(preprocess_image(pink, params), preprocess_image(blue, params))
    assert raw > 15, raw  # the tints really differ without normalisation
    assert normed < raw / 3, (raw, normed)
    assert normed < 6, normed


def test_params_round_trip_and_the_border_stays_black() -> None:
    plain = PreprocessParams(SIZE)
    ref = fit_stain_reference([preprocess_image(_cell(1), plain)], "reinhard")
    params = PreprocessParams(SIZE, source_size=300, stain="reinhard", stain_reference=ref)
    again = PreprocessParams.from_dict(params.to_dict())
    assert again == params
    assert PreprocessParams.from_dict({"image_size": 32}).stain == "none"  # older models
    out = preprocess_image(_cell(5), again)
    raw = preprocess_image(_cell(5), plain)
    background = ~np.any(raw > 12, axis=-1)
    assert (out[background] == raw[background]).all()


def test_reference_is_required_and_blank_images_pass_through() -> None:
    with pytest.raises(ValueError, match="fitted reference"):
        PreprocessParams(SIZE, stain="macenko")
    with pytest.raises(ValueError, match="too few foreground"):
        fit_stain_reference([np.zeros((8, 8, 3), np.uint8)], "reinhard")
    ref = fit_stain_reference([preprocess_image(_cell(1), PreprocessParams(SIZE))], "macenko")
    black = np.zeros((SIZE, SIZE, 3), np.uint8)
    assert (normalise_stain(black, "macenko", ref) == black).all()
    flat = np.full((SIZE, SIZE, 3), 128, np.uint8)  # one colour: no stains to separate
    out = normalise_stain(flat, "macenko", ref)
    assert out.shape == flat.shape and out.dtype == np.uint8


def test_fit_preprocess_fits_on_the_given_train_files_only(tmp_path) -> None:
    from training.classifier.inputs import fit_preprocess, load_uint8

    paths = []
    for i, tint in enumerate([(1.2, 0.9, 1.0), (1.1, 0.8, 1.0), (0.8, 1.0, 1.2)]):
        path = tmp_path / f"cell{i}.png"
        _tinted(_cell(i + 1), tint).save(path)
        paths.append(str(path))
    hp = {"image_size": SIZE, "source_size": None, "segmentation": "none",
          "stain_normalisation": "reinhard", "stain_fit_images": 2}
    params = fit_preprocess(hp, paths[:2])
    assert params.stain == "reinhard"
    plain = PreprocessParams(SIZE)
    expected = fit_stain_reference([load_uint8(p, plain) for p in paths[:2]], "reinhard")
    assert params.stain_reference == pytest.approx(expected)
    assert params.stain_reference != pytest.approx(
        fit_stain_reference([load_uint8(p, plain) for p in paths], "reinhard"))
    assert fit_preprocess({**hp, "stain_normalisation": "none"}, paths) == plain
