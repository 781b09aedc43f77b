"""Near-duplicates across the split: found under the manifest lock, resolved by the split.

The suite (:mod:`training.data.validation`) refuses byte-duplicates within a batch, content
already curated and near-duplicates of the frozen *test* split, all before the manifest lock.
That leaves three ways for one picture to reach both sides of the split:

* a re-encoded copy of a curated **train/val** image filed under another subject (the suite
  compares new files with the test split only);
* two copies of one image **inside one batch** under different subjects (the suite's duplicate
  check is byte-exact);
* two **concurrent batches** holding the same picture: each was checked against the manifest as
  it was before either was written.

So the check here runs inside :func:`training.data.dataset.append_manifest`'s ``extend``
callback, under the manifest lock, on the final manifest: every new row is compared with every
row of the manifest and with the other new rows. A pair is a *twin* when the perceptual hashes
lie within ``cfg.validation.near_duplicate_hamming`` bits and the pixels confirm it
(:func:`training.data.validation.same_picture`: on dark single-cell images many different cells
share a close pHash); byte-identical files are twins at distance 0.

Resolution (deterministic, nothing deleted): twins are dealt as one unit
(:func:`training.data.dataset.split_units`): a new image follows the split its twin already
has, and with it every image of its subject, so subjects still never straddle; twins that are
both new are dealt together. A new image whose twins sit in two different frozen splits cannot
follow both: it is left out of the manifest and quarantined (``near_duplicate_conflict``); a new
file byte-identical to a row another batch wrote meanwhile is quarantined as
``already_curated``. The outcome is measured again after the split (``remaining``: twin pairs on
two splits, which must be 0) and stored as ``manifests/vNNNN.leakage.json``; the counts go to
the ``CuratedDataset`` record and the batch's ledger entry.

Pairs between two rows that were both in the manifest before are not re-examined: they were
checked when the younger one arrived (versions written before this check existed were not).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

from training.config import Config
from training.data.dataset import assign_splits, split_units
from training.data.validation import hamming_neighbours

__all__ = ["LeakageCheck", "Twin", "check_and_assign", "find_twins"]

CONFLICT = "near_duplicate_conflict"
ALREADY = "already_curated"


@dataclass(frozen=True)
class Twin:
    """Two rows of the manifest that show the same picture."""

    a: str  # sha256 of the earlier row (the manifest's, or the first new one by position)
    b: str
    distance: int  # pHash bits that differ (0 for byte-identical files)


@dataclass
class LeakageCheck:
    """What the near-duplicate check of one new manifest version found and did."""

    batch_id: str
    max_hamming: int
    new_rows: int = 0  # rows this batch adds (before quarantine)
    manifest_rows: int = 0  # rows they were compared with (the newest manifest)
    candidates: int = 0  # pHash pairs within max_hamming, before the pixel check
    pairs_found: int = 0  # confirmed twin pairs
    straddling_before: int = 0  # of them on two splits had each image its own group
    moved: int = 0  # new rows whose split differs from that plain assignment
    quarantined: int = 0  # new rows left out (see the module doc)
    remaining: int = 0  # twin pairs on two splits after the resolution: must be 0
    pairs: list[dict[str, Any]] = field(default_factory=list)  # a, b, distance, splits
    quarantine: dict[str, str] = field(default_factory=dict)  # source path -> reason

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in (
            "pairs_found", "straddling_before", "moved", "quarantined", "remaining")}


def _distance(a: str, b: str) -> int:
    return int(int(a, 16) ^ int(b, 16)).bit_count()


def find_twins(phashes: Sequence[str], new: Sequence[bool], max_hamming: int,
               confirm: Callable[[int, int], bool] | None = None,
               shas: Sequence[str] | None = None) -> tuple[list[tuple[int, int, int]], int]:
    """Pairs ``(i, j, distance)`` of row positions, ``i < j``, at least one of them new.

    Candidates are pHashes within ``max_hamming`` bits (or equal ``shas``); ``confirm(i, j)``
    checks the pixels (None: the hash decides). Returns the pairs and the number of candidates.
    """
    new_idx = [i for i, n in enumerate(new) if n]
    near = hamming_neighbours([phashes[i] for i in new_idx], list(phashes), max_hamming)
    candidates: set[tuple[int, int]] = set()
    for i, refs in zip(new_idx, near, strict=True):
        candidates.update((min(i, j), max(i, j)) for j in refs if j != i)
    if shas is not None:  # byte-identical rows are twins even without a pHash
        first: dict[str, int] = {}
        for i, sha in enumerate(shas):
            if sha in first and (new[i] or new[first[sha]]):
                candidates.add((first[sha], i))
            first.setdefault(sha, i)
    out = []
    for i, j in sorted(candidates):
        same_bytes = shas is not None and shas[i] == shas[j]
        if same_bytes or confirm is None or confirm(i, j):
            dist = 0 if same_bytes or not (phashes[i] and phashes[j]) else _distance(
                phashes[i], phashes[j])
            out.append((i, j, dist))
    return out, len(candidates)


def _straddling(splits: Sequence[str], pairs: Sequence[tuple[int, int, int]]) -> int:
    return sum(1 for i, j, _ in pairs if splits[i] != splits[j])


def check_and_assign(
    combined: pd.DataFrame, new: Sequence[bool], phashes: Sequence[str], cfg: Config,
    batch_id: str, confirm: Callable[[int, int], bool] | None = None,
) -> tuple[pd.DataFrame, LeakageCheck]:
    """Assign splits to ``combined`` (old manifest rows + this batch's new rows, split empty)
    so that no twin pair straddles the split; returns the frame and the check's record.

    ``new[i]``: row ``i`` is this batch's; ``phashes[i]``: its perceptual hash ("" unknown);
    ``confirm(i, j)``: whether rows ``i`` and ``j`` really show the same picture.
    """
    combined = combined.reset_index(drop=True)
    check = LeakageCheck(batch_id=batch_id, max_hamming=cfg.validation.near_duplicate_hamming,
                         new_rows=int(sum(new)), manifest_rows=int(len(new) - sum(new)))
    shas = list(combined["sha256"])
    pairs, check.candidates = find_twins(phashes, new, check.max_hamming, confirm, shas)
    plain = assign_splits(combined, cfg, quiet=True)  # what the split would be without twins
    check.straddling_before = _straddling(list(plain["split"]), pairs)

    # A new row whose twins hold two different frozen splits cannot follow both: left out.
    groups = list(plain["split_group"])
    frozen = [s if not n else "" for s, n in zip(combined["split"].fillna(""), new, strict=True)]
    units = split_units(groups, [(i, j) for i, j, _ in pairs])
    held: dict[str, set[str]] = {}
    for unit, split in zip(units, frozen, strict=True):
        if split:
            held.setdefault(unit, set()).add(split)
    drop = set()
    for i, j, _ in pairs:
        if len(held.get(units[i], ())) > 1:
            drop.update(k for k in (i, j) if new[k])
    for i in sorted(drop):
        check.quarantine[str(combined.at[i, "source"])] = CONFLICT
    keep = [k for k in range(len(combined)) if k not in drop]
    position = {k: n for n, k in enumerate(keep)}
    kept_pairs = [(position[i], position[j], d) for i, j, d in pairs
                  if i in position and j in position]
    kept = combined.iloc[keep].reset_index(drop=True)
    out = assign_splits(kept, cfg, twins=[(i, j) for i, j, _ in kept_pairs])

    before = dict(zip(plain["sha256"], plain["split"], strict=True))
    kept_new = [new[k] for k in keep]
    check.moved = int(sum(1 for sha, split, n in zip(out["sha256"], out["split"], kept_new,
                                                     strict=True) if n and before[sha] != split))
    check.quarantined = len(check.quarantine)
    splits = list(out["split"])
    check.remaining = _straddling(splits, kept_pairs)
    check.pairs_found = len(pairs)
    for i, j, d in pairs:
        entry: dict[str, Any] = {"a": shas[i], "b": shas[j], "distance": d,
                                 "split_before": [plain.at[i, "split"], plain.at[j, "split"]]}
        if i in position and j in position:
            entry["split_after"] = [splits[position[i]], splits[position[j]]]
        else:
            entry["split_after"] = None  # one of them was quarantined
        entry["sources"] = [str(combined.at[i, "source"]), str(combined.at[j, "source"])]
        check.pairs.append(entry)
    return out, check


def as_hex_or_blank(values: Sequence[Any]) -> list[str]:
    """pHash strings as the index stores them; anything else (NaN, None) is unknown ("")."""
    return [v if isinstance(v, str) and v and all(c in "0123456789abcdef" for c in v) else ""
            for v in values]

