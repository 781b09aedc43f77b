"""The curated dataset: a content-addressed store plus versioned manifests with frozen splits.

Curated store layout (any :class:`~training.storage.Storage`):

    images/<sha[:2]>/<sha256>.<ext>   every accepted image, once, named by its content
    labels/<sha256>.txt               YOLO boxes of a smear field (class cx cy w h, normalised)
    manifests/v0001.csv ...           one row per image (columns: MANIFEST_COLUMNS)
    manifests/LATEST                  a hint: the newest version number when it was written

A manifest version is immutable and written once: :meth:`Storage.create` refuses a version that
exists, so two curations racing for version N+1 cannot both win. The loser re-reads the newest
manifest and appends its rows to that (:func:`append_manifest`); writers on one machine also
queue on a file lock under the state dir, so they rarely race at all. ``LATEST`` is written after
the version it names and may lag behind (a crash, or two writers finishing out of order), so
:func:`latest_version` reads it as a starting point and probes for newer versions.

The split of an image, once assigned, never changes: new versions copy old rows and only deal
splits to new subjects (see :func:`assign_splits`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import pandas as pd

from training.config import Config
from training.errors import DataValidationError, StorageError
from training.locks import file_lock
from training.records import CuratedDataset
from training.storage import Storage, open_storage

__all__ = [
    "MANIFEST_COLUMNS", "append_manifest", "assign_splits", "curated_storage", "latest_version",
    "leakage_key", "load_manifest", "manifest_lock", "materialize", "measured_split_kind",
    "split_group", "split_units", "test_set_sha256", "write_manifest",
]

MANIFEST_COLUMNS = [
    "sha256", "key", "kind", "label", "subject_id", "batch_id", "source", "width", "height",
    "split", "split_group", "label_key",
]
SPLITS = ("train", "val", "test")
# the counts of a version's near-duplicate check that its CuratedDataset record carries
LEAKAGE_SUMMARY = ("pairs_found", "straddling_before", "moved", "quarantined", "remaining")
MANIFEST_ATTEMPTS = 20  # conflicts in a row before append_manifest gives up
log = logging.getLogger("leukoflow.dataset")


def curated_storage(cfg: Config) -> Storage:
    return open_storage(cfg.uri("curated"), cfg.storage.s3_endpoint_url, cfg.storage.s3_region)


def latest_version(store: Storage) -> int:
    """Newest manifest version, 0 when nothing was curated yet.

    ``LATEST`` may lag behind the versions written (see the module docstring): the versions
    after it are probed, so the answer is the newest version that exists.
    """
    version = 0
    if store.exists("manifests/LATEST"):
        version = int(store.read_text("manifests/LATEST").strip() or 0)
    while store.exists(_manifest_key(version + 1)):
        version += 1
    return version


def _manifest_key(version: int) -> str:
    return f"manifests/v{version:04d}.csv"


def leakage_key(version: int) -> str:
    """The near-duplicate check of a version (``training.data.leakage``), beside its manifest."""
    return f"manifests/v{version:04d}.leakage.json"


def load_manifest(cfg: Config, version: int | None = None) -> tuple[pd.DataFrame, CuratedDataset]:
    """Read a manifest version (default: the newest) and describe it."""
    store = curated_storage(cfg)
    version = version or latest_version(store)
    if version == 0:
        raise DataValidationError(
            f"the curated store {store.uri} holds no dataset yet: validate a batch first"
        )
    raw = store.read_bytes(_manifest_key(version))
    df = pd.read_csv(io.BytesIO(raw), dtype=str, keep_default_na=False)
    for col in ("width", "height"):
        df[col] = pd.to_numeric(df[col], errors="coerce").fillna(0).astype(int)
    leakage = None
    if store.exists(leakage_key(version)):
        record = json.loads(store.read_text(leakage_key(version)))
        leakage = {k: record[k] for k in LEAKAGE_SUMMARY if k in record}
        leakage["uri"] = f"{store.uri}/{leakage_key(version)}"
    ds = CuratedDataset(
        version=version,
        manifest_uri=f"{store.uri}/{_manifest_key(version)}",
        manifest_sha256=hashlib.sha256(raw).hexdigest(),
        n_cells=int((df["kind"] == "cell").sum()),
        n_fields=int((df["kind"] == "field").sum()),
        batch_ids=sorted(set(df["batch_id"])),
        leakage=leakage,
    )
    return df, ds


def _manifest_bytes(df: pd.DataFrame) -> bytes:
    """The CSV of a manifest: rows sorted, so equal content = equal bytes."""
    missing = set(MANIFEST_COLUMNS) - set(df.columns)
    if missing:
        raise DataValidationError(f"manifest lacks columns {sorted(missing)}")
    df = df[MANIFEST_COLUMNS].sort_values(["kind", "sha256"]).reset_index(drop=True)
    return df.to_csv(index=False).encode()


@contextlib.contextmanager
def manifest_lock(cfg: Config) -> Iterator[None]:
    """Hold the lock of the curated store's manifests (one file per store under the state dir).

    ``flock`` locks belong to an open file, so threads of one process queue as processes do.
    Across machines the conditional write in :func:`append_manifest` is what keeps versions
    apart; this lock only spares writers on one machine from racing and retrying.
    """
    name = hashlib.sha256(cfg.uri("curated").encode()).hexdigest()[:16]
    with file_lock(cfg.state_dir / "locks" / f"manifest-{name}.lock"):
        yield


def _publish(store: Storage, version: int, data: bytes) -> bool:
    """Create manifest ``version`` unless it exists; then point ``LATEST`` at it."""
    if not store.create(_manifest_key(version), data):
        return False
    store.write_text("manifests/LATEST", str(version))
    return True


def write_manifest(cfg: Config, df: pd.DataFrame) -> CuratedDataset:
    """Write ``df`` as the next manifest version (rows sorted, so equal content = equal bytes).

    ``df`` is the whole dataset: if another writer takes the next version meanwhile, this
    raises rather than write ``df`` after it (that would drop the other writer's rows from the
    newest version). To add rows to whatever is newest, use :func:`append_manifest`.
    """
    store = curated_storage(cfg)
    data = _manifest_bytes(df)
    with manifest_lock(cfg):
        version = latest_version(store) + 1
        if not _publish(store, version, data):
            raise StorageError(f"manifest version {version} of {store.uri} was written by "
                               "another curation meanwhile: nothing written")
    return load_manifest(cfg, version)[1]


def append_manifest(cfg: Config,
                    extend: Callable[[pd.DataFrame], pd.DataFrame | None],
                    on_published: Callable[[int], None] | None = None) -> int:
    """Write ``extend(newest manifest)`` as the next version; return the version now newest.

    ``extend`` gets the newest manifest (an empty frame before the first) and returns the
    complete next one, or None when it has nothing to add. If another writer takes the next
    version first, the newest manifest is read again and ``extend`` called again, so rows of
    concurrent curations all reach the newest version; nothing is ever overwritten.
    ``extend`` runs under the manifest lock, so checks made there see the final manifest;
    ``on_published(version)`` too, right after the version was written (e.g. its sidecars).
    """
    store = curated_storage(cfg)
    with manifest_lock(cfg):
        for attempt in range(MANIFEST_ATTEMPTS):
            version = latest_version(store)
            old = (load_manifest(cfg, version)[0] if version
                   else pd.DataFrame(columns=MANIFEST_COLUMNS))
            new = extend(old)
            if new is None:
                return version
            if _publish(store, version + 1, _manifest_bytes(new)):
                if on_published is not None:
                    on_published(version + 1)
                return version + 1
            log.info("manifest version %d of %s was taken by another writer: retrying on it",
                     version + 1, store.uri)
            time.sleep(random.uniform(0, 0.05 * 2 ** min(attempt, 5)))
    raise StorageError(f"could not write a new manifest version of {store.uri}: "
                       f"{MANIFEST_ATTEMPTS} concurrent writers got there first")


def split_group(row: pd.Series, level: str = "subject") -> str:
    """Images of one subject travel together; without a subject (or at image level), each
    image is its own group."""
    subject = str(row.get("subject_id") or "") if level == "subject" else ""
    return f"subject:{subject}" if subject else f"image:{row['sha256']}"


def _hash01(text: str, salt: str) -> float:
    digest = hashlib.sha256(f"{salt}:{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_units(groups: Sequence[str], twins: Iterable[tuple[int, int]] = ()) -> list[str]:
    """The unit each row is dealt with: its split group, merged with the groups of its twins.

    ``twins`` are pairs of row positions that show the same picture (near-duplicates, see
    :mod:`training.data.leakage`); their groups are joined (union-find) and a unit is named
    by its smallest group id, so the result does not depend on the order of the pairs.
    Without twins every unit is its own split group.
    """
    parent: dict[str, str] = {g: g for g in groups}

    def root(g: str) -> str:
        while parent[g] != g:
            parent[g] = parent[parent[g]]
            g = parent[g]
        return g

    for i, j in twins:
        a, b = root(groups[i]), root(groups[j])
        if a != b:
            parent[max(a, b)] = min(a, b)
    return [root(g) for g in groups]


def assign_splits(df: pd.DataFrame, cfg: Config,
                  twins: Iterable[tuple[int, int]] = (), *, quiet: bool = False) -> pd.DataFrame:
    """Deal ``train/val/test`` to rows whose ``split`` is empty; keep every existing assignment.

    Groups (subjects, or single images) are taken in the order of a salted hash of their id;
    each goes, within its kind and label stratum, to the split furthest below its target share
    of images. Deterministic, stratified, and a group already seen keeps its split, so the test
    set of earlier versions is never reshuffled and no subject sits on both sides.

    ``twins`` (pairs of row positions of ``df``, which must have a 0..n-1 index) join the
    groups of near-duplicate images into one unit (:func:`split_units`): a new image follows
    the split its twin already has, and twins that are both new are dealt together.

    A stratum of two or more units always has one in test, and of three or more one in val
    (:func:`_hold_out_each_stratum`), so no class is missing from the held-out splits.
    ``quiet``: a trial assignment (the leakage check's comparison) logs no such move.
    """
    df = df.reset_index(drop=True)
    df["split_group"] = [g or split_group(r, cfg.split.level) for g, (_, r) in zip(
        df.get("split_group", pd.Series([""] * len(df), index=df.index)), df.iterrows(),
        strict=True)]
    df["split"] = df["split"].fillna("") if "split" in df else ""
    df["_unit"] = split_units(list(df["split_group"]), twins)
    targets = {"test": cfg.split.test_fraction, "val": cfg.split.val_fraction}
    targets["train"] = 1.0 - sum(targets.values())

    known = df[df["split"] != ""].groupby("_unit")["split"].first().to_dict()
    df.loc[df["split"] == "", "split"] = df["_unit"].map(known).fillna("")

    # A unit's stratum is its most common (kind, label).
    df["_stratum"] = df["kind"] + "/" + df["label"].fillna("")
    stratum_of = df.groupby("_unit")["_stratum"].agg(lambda s: s.value_counts().index[0])
    size_of = df.groupby("_unit").size()
    for stratum, units in stratum_of.groupby(stratum_of):
        members = df["_stratum"] == stratum
        counts = {s: int((df.loc[members, "split"] == s).sum()) for s in SPLITS}
        new = [u for u in units.index if u not in known]
        for unit in sorted(new, key=lambda u: _hash01(u, cfg.split.salt)):
            total = sum(counts.values()) + int(size_of[unit])
            deficit = {s: targets[s] * total - counts[s] for s in SPLITS}
            chosen = max(SPLITS, key=lambda s: (deficit[s], -SPLITS.index(s)))
            df.loc[df["_unit"] == unit, "split"] = chosen
            counts[chosen] += int(size_of[unit])
            known[unit] = chosen
        _hold_out_each_stratum(df, list(units.index), set(new), size_of, cfg.split.salt,
                               quiet=quiet)
    return df.drop(columns=["_stratum", "_unit"])


def _hold_out_each_stratum(df: pd.DataFrame, units: list[str], new: set[str],
                           size_of: pd.Series, salt: str, quiet: bool = False) -> None:
    """Give test (from 2 units) and val (from 3) at least one unit of a stratum, in place.

    The share rule alone can deal every unit of a small stratum to train: C-NMC fold 1 has three
    healthy donors, and once a near-duplicate pair joined two of them into one 400-image unit,
    both units went to train and the test split held one class (no ROC AUC, no ``hem`` recall).
    Only units new to this call move (frozen splits stay frozen), train keeps at least one, and
    the smallest unit moves, so the shares are disturbed least.
    """
    split_of = df.groupby("_unit")["split"].first()
    for needed, min_units in (("test", 2), ("val", 3)):
        if len(units) < min_units or any(split_of[u] == needed for u in units):
            continue
        in_train = [u for u in units if split_of[u] == "train"]
        movable = [u for u in in_train if u in new]
        if len(in_train) < 2 or not movable:
            continue
        unit = min(movable, key=lambda u: (int(size_of[u]), _hash01(u, salt)))
        df.loc[df["_unit"] == unit, "split"] = needed
        split_of[unit] = needed
        if not quiet:
            log.info("split: the stratum of %s had no %s unit: %s (%d rows) dealt to %s",
                     unit, needed, unit, int(size_of[unit]), needed)


def measured_split_kind(rows: pd.DataFrame) -> str:
    """'subject' only if every test row has a subject and no test subject is in train/val.

    Measured from the rows, not assumed from the config: C-NMC split at image level has
    subject ids everywhere, yet its subjects sit on both sides, so it is an 'image' split.
    """
    subjects = rows["subject_id"].fillna("").astype(str).str.strip()
    test = rows["split"] == "test"
    if not test.any() or (subjects[test] == "").any():
        return "image"
    return "image" if set(subjects[test]) & set(subjects[~test]) else "subject"


def test_set_sha256(df: pd.DataFrame) -> str:
    """A fingerprint of a test set, so two evaluations can prove they used the same images."""
    shas = sorted(df.loc[df["split"] == "test", "sha256"])
    return hashlib.sha256("\n".join(shas).encode()).hexdigest()


def materialize(cfg: Config, df: pd.DataFrame, cache_dir: Path) -> pd.DataFrame:
    """Add ``path`` (and ``label_path``) columns pointing at local files, downloading if needed.

    A local curated store is used in place; an S3 store is copied once into ``cache_dir``
    (content-addressed, so a file already there is never fetched again).
    """
    store = curated_storage(cfg)
    df = df.copy()

    def local(key: str) -> str:
        if not key:
            return ""
        path = store.local_path(key)
        if path is None:
            path = cache_dir / key
            if not path.exists():
                store.download(key, path)
        return str(path)

    df["path"] = [local(k) for k in df["key"]]
    df["label_path"] = [local(k) for k in df["label_key"]]
    return df
