"""The champion's own view of a batch: penultimate-layer features, and their drift.

Image statistics (:mod:`training.data.drift`) see a change of stain or scanner; the model's
embedding sees what the model itself sees: whether the batch lands where its training rows
landed in the space the last Dense layer reads. ``python -m training.classifier.embedding``
is the child process the ingest task starts for it (TensorFlow must not enter a process that
may hold torch): it loads the logged classifier, embeds two lists of files and writes the
MMD² with its permutation p-value as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["embed", "main"]


def embed(model: Any, paths: list[str], params: Any, batch_size: int = 32) -> np.ndarray:
    """Penultimate-layer features ``(n, d)``: the input of the model's last (Dense) layer."""
    import keras

    from training.classifier.inputs import make_dataset

    head = keras.Model(model.inputs, model.layers[-1].input)
    ds = make_dataset(paths, None, int(model.output_shape[-1]), params, batch_size=batch_size,
                      cache=False)
    out = np.asarray(head.predict(ds, verbose=0), dtype=np.float64)
    return out.reshape(len(paths), -1)


def main(argv: list[str] | None = None) -> int:
    """``--model-dir D --reference R.txt --batch B.txt --out drift.json`` (one path a line)."""
    from training.classifier.predict import load_classifier
    from training.data.drift import drift_score
    from training.entry import child_process_setup
    from training.preprocess import PreprocessParams

    parser = argparse.ArgumentParser(prog="python -m training.classifier.embedding",
                                     description=__doc__)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--reference", type=Path, required=True)
    parser.add_argument("--batch", type=Path, required=True)
    parser.add_argument("--permutations", type=int, default=200)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    child_process_setup()
    model, meta = load_classifier(args.model_dir)
    params = PreprocessParams.from_dict(meta["preprocess"])
    ref, batch = ([p for p in f.read_text().splitlines() if p]
                  for f in (args.reference, args.batch))
    out = drift_score(embed(model, ref, params), embed(model, batch, params),
                      n_permutations=args.permutations, names=None)
    args.out.write_text(json.dumps({k: out[k] for k in ("score", "p_value", "n_reference",
                                                          "n_batch", "dimensions")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
