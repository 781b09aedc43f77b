"""Embedding drift (training.classifier.embedding) sees a change of stain in a model's features.

TensorFlow runs in a subprocess (this file executed as a script), as in test_gradcam.py: TF and
torch must not share the pytest process. The probe embeds a reference, a fresh batch of the
same generator and that batch restained with a tiny random-weight Keras classifier, and reports
the embedding MMD² of each batch as JSON; the tests assert on that report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _probe(out_dir: Path) -> dict:  # pragma: no cover - runs in the subprocess
    import keras

    from tests.unit.test_drift import _restained
    from training.classifier.embedding import embed
    from training.data.drift import drift_score
    from training.dev.synth import make_cell_batch
    from training.preprocess import PreprocessParams

    keras.utils.set_random_seed(0)
    ref = make_cell_batch(out_dir / "ref", n_subjects_per_class=3, images_per_subject=8,
                          size=64, seed=1)
    fresh = make_cell_batch(out_dir / "fresh", n_subjects_per_class=2, images_per_subject=8,
                            size=64, seed=2)
    stained = _restained(fresh, out_dir / "stained", (1.15, 0.95, 0.85))
    inp = keras.Input((32, 32, 3))
    h = keras.layers.Rescaling(1 / 255)(inp)
    h = keras.layers.Conv2D(8, 3, activation="relu")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    h = keras.layers.Dense(8, activation="relu")(h)
    model = keras.Model(inp, keras.layers.Dense(2, activation="softmax")(h))  # never trained
    params = PreprocessParams(image_size=32)
    reference = embed(model, [str(p) for p in ref], params, batch_size=16)
    report = {"dimensions": int(reference.shape[1]), "n_reference": len(reference)}
    for name, files in (("fresh", fresh), ("stained", stained)):
        out = drift_score(reference, embed(model, [str(p) for p in files], params),
                          n_permutations=100, names=None)
        report[name] = {k: out[k] for k in ("score", "p_value", "n_batch", "shift")}
    return report


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("embedding")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, __file__, str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "report.json").read_text())


def test_a_restained_batch_is_farther_in_the_embedding_than_a_fresh_one(probe: dict) -> None:
    assert probe["dimensions"] == 8 and probe["n_reference"] == 48
    fresh, stained = probe["fresh"], probe["stained"]
    assert fresh["n_batch"] == stained["n_batch"] == 32
    assert stained["score"] > fresh["score"] >= 0
    assert stained["p_value"] <= fresh["p_value"]
    assert fresh["shift"] == {}  # unnamed features: no per-feature shifts


if __name__ == "__main__":
    target = Path(sys.argv[1])
    (target / "report.json").write_text(json.dumps(_probe(target)))
