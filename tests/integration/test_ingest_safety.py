"""Nothing a data steward or an app sends is lost, silently skipped or half-read (issue 9).

Against the local backend and a real S3-protocol server on loopback (moto's HTTP server).
"""

from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path

import pytest

from training.config import Config, load_config
from training.data import dataset
from training.dev.synth import make_cell_batch, write_ready

pytestmark = pytest.mark.integration

SMALL = {"n_subjects_per_class": 2, "images_per_subject": 3, "size": 48}


def _s3_config(home: Path, endpoint: str, bucket: str, **overrides: object) -> Config:
    return load_config(home=home, validation={"workers": 1}, storage={
        "landing_uri": f"s3://{bucket}/landing", "curated_uri": f"s3://{bucket}/curated",
        "quarantine_uri": f"s3://{bucket}/quarantine", "s3_endpoint_url": endpoint},
        **overrides)


# ------------------------------------------------------------------ 1: concurrent curation
def _curate_in_child(cfg: Config, batch_id: str, barrier, results) -> None:
    """One curation in its own process; both meet at a barrier after reading the manifest.

    The barrier is soft (it times out): with a lock around read-and-write, the second
    curation only reads the manifest after the first wrote it, and must not wait forever.
    """
    from training.data import curation

    real = dataset.assign_splits
    met = threading.Event()

    def assign_then_meet(df, c):
        out = real(df, c)
        if not met.is_set():
            met.set()
            try:
                barrier.wait(timeout=4)
            except threading.BrokenBarrierError:
                pass
        return out

    dataset.assign_splits = assign_then_meet
    try:
        results[batch_id] = curation.validate_batch(cfg, batch_id).status
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        results[batch_id] = f"error: {exc!r}"


def _race(configs: dict[str, Config]) -> dict[str, str]:
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(len(configs))
    with ctx.Manager() as manager:
        results = manager.dict()
        procs = [ctx.Process(target=_curate_in_child, args=(cfg, batch_id, barrier, results))
                 for batch_id, cfg in configs.items()]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=300)
        return dict(results)


def _newest_batches(cfg: Config) -> list[str]:
    return dataset.load_manifest(cfg)[1].batch_ids


def test_concurrent_local_curations_keep_both_batches(tmp_path: Path):
    cfg = load_config(home=tmp_path / "home", validation={"workers": 1})
    for seed, batch_id in enumerate(("left", "right")):
        make_cell_batch(cfg.home / "landing" / batch_id, seed=seed + 1, **SMALL)
        write_ready(cfg.home / "landing" / batch_id)
    assert _race({"left": cfg, "right": cfg}) == {"left": "accepted", "right": "accepted"}
    manifest, ds = dataset.load_manifest(cfg)
    assert ds.version == 2 and ds.batch_ids == ["left", "right"]
    assert len(manifest) == 24 and manifest["sha256"].is_unique


def test_concurrent_s3_curations_on_two_hosts_keep_both_batches(tmp_path, s3_endpoint,
                                                                s3_bucket):
    """Two workers with their own state dirs (no shared lock): the conditional write decides."""
    from training.data.landing import upload_batch

    hosts = {b: _s3_config(tmp_path / f"host-{b}", s3_endpoint, s3_bucket)
             for b in ("left", "right")}
    for seed, batch_id in enumerate(hosts):
        make_cell_batch(tmp_path / "src" / batch_id, seed=seed + 1, **SMALL)
        upload_batch(hosts[batch_id], tmp_path / "src" / batch_id, batch_id)
    assert _race(hosts) == {"left": "accepted", "right": "accepted"}
    manifest, ds = dataset.load_manifest(hosts["left"])
    assert ds.version == 2 and ds.batch_ids == ["left", "right"]
    assert len(manifest) == 24 and manifest["sha256"].is_unique


def test_a_manifest_version_is_never_overwritten(tmp_path, s3_endpoint, s3_bucket, monkeypatch):
    from training.errors import StorageError

    for cfg in (load_config(home=tmp_path / "local"),
                _s3_config(tmp_path / "s3", s3_endpoint, s3_bucket)):
        store = dataset.curated_storage(cfg)
        assert store.create("manifests/v0001.csv", b"first")
        assert not store.create("manifests/v0001.csv", b"second")
        assert store.read_bytes("manifests/v0001.csv") == b"first"
        assert dataset.latest_version(store) == 1  # LATEST was never written: probed
        store.write_text("manifests/LATEST", "1")
        assert store.create("manifests/v0002.csv", b"third")  # LATEST lags behind
        assert dataset.latest_version(store) == 2
        with monkeypatch.context() as m:  # another writer took the version we read as next
            m.setattr(dataset, "latest_version", lambda s: 1)
            with pytest.raises(StorageError, match="written by another curation"):
                dataset.write_manifest(cfg, dataset.pd.DataFrame(
                    columns=dataset.MANIFEST_COLUMNS))
        assert store.read_bytes("manifests/v0002.csv") == b"third"


# ------------------------------------------------------------- 2: half-uploaded batches
def _with_manifest(root: Path, seed: int) -> list[Path]:
    """A C-NMC cell batch plus a ``manifest.csv`` naming every image, and a late file."""
    files = make_cell_batch(root, seed=seed, **SMALL)
    (root / "zz_late.png").write_bytes(files[0].read_bytes()[:-1] + b"\x00")
    lines = ["path,label,subject_id"] + [
        f"{p.relative_to(root).as_posix()},{p.stem.split('_')[-1]},{p.stem.split('_')[1]}"
        for p in sorted(root.rglob("*.png"))]
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_an_upload_is_invisible_until_its_last_file(tmp_path, s3_endpoint, s3_bucket,
                                                    monkeypatch):
    """Data files, then manifest.csv, then _READY; discovery finds nothing before the end."""
    from training.data.batches import discover_batches
    from training.data.landing import upload_batch
    from training.storage import S3Storage

    cfg = _s3_config(tmp_path / "home", s3_endpoint, s3_bucket)
    files = _with_manifest(tmp_path / "src", seed=7)
    order: list[str] = []
    real_copy = S3Storage.copy_in

    def copy_then_look(self, src, key):
        real_copy(self, src, key)
        order.append(key.split("/", 1)[1])
        if order[-1] != "manifest.csv":  # a consistent manifest.csv completes the batch
            assert discover_batches(cfg) == [], f"discovered after uploading only {order}"

    monkeypatch.setattr(S3Storage, "copy_in", copy_then_look)
    upload_batch(cfg, tmp_path / "src", "steward-1")
    assert len(order) == len(files) and order[-1] == "manifest.csv"
    assert [b.batch_id for b in discover_batches(cfg)] == ["steward-1"]


def test_a_half_uploaded_manifest_batch_is_not_discovered(tmp_path, s3_endpoint, s3_bucket):
    """A manifest that landed before (some of) its images, or was cut short, waits."""
    from training.data.batches import discover_batches, landing_storage
    from training.data.curation import validate_batch

    cfg = _s3_config(tmp_path / "home", s3_endpoint, s3_bucket)
    root = tmp_path / "src"
    files = _with_manifest(root, seed=8)
    store = landing_storage(cfg)
    manifest = (root / "manifest.csv").read_bytes()
    store.write_bytes("b/manifest.csv", manifest[: len(manifest) - 6])  # cut mid-row
    assert discover_batches(cfg) == []
    store.write_bytes("b/manifest.csv", manifest)
    for path in files[:3]:  # an uploader that sends the manifest first
        store.copy_in(path, f"b/{path.relative_to(root).as_posix()}")
    assert discover_batches(cfg) == []
    result = validate_batch(cfg, "b")
    assert result.status == "skipped" and "marker" in result.message
    assert not list(dataset.curated_storage(cfg).list())  # nothing read, nothing written
    for path in files[3:]:
        store.copy_in(path, f"b/{path.relative_to(root).as_posix()}")
    assert [(b.batch_id, b.marker) for b in discover_batches(cfg)] == [("b", "manifest.csv")]
    result = validate_batch(cfg, "b")
    assert (result.status, result.images) == ("accepted", len(files) - 1)  # all but manifest


# ---------------------------------------------- 3: console folder objects, failing batches
def _console_upload(cfg: Config, src: Path, batch_id: str) -> None:
    """Upload as a person does in the MinIO/AWS console: zero-byte ``folder/`` objects too."""
    from training.data.batches import landing_storage
    from training.data.landing import upload_batch

    store = landing_storage(cfg)
    store.write_bytes(f"{batch_id}/", b"")
    for folder in sorted({p.parent for p in src.rglob("*") if p.is_file()} - {src}):
        store.write_bytes(f"{batch_id}/{folder.relative_to(src).as_posix()}/", b"")
    upload_batch(cfg, src, batch_id)


def _emit(cfg: Config, results: list[dict | None], monkeypatch) -> tuple[dict, dict]:
    """Run the ingest DAG's ``emit_dataset`` task callable on these validate results."""
    from training.dev.localenv import airflow_env

    repo = Path(__file__).resolve().parents[2]
    for key, value in airflow_env(cfg).items():
        monkeypatch.setenv(key, value)
    monkeypatch.syspath_prepend(str(repo / "plugins"))
    from airflow.dag_processing.dagbag import DagBag
    from leukoflow_dag_support import CURATED_DATASET

    bag = DagBag(dag_folder=str(repo / "dags" / "leukoflow_ingest.py"), safe_mode=False)
    task = bag.dags["ingest_validate"].get_task("emit_dataset")
    assert task.trigger_rule == "all_done"  # runs even when a validate task crashed

    class Event:
        extra: dict = {}

    events = {CURATED_DATASET: Event()}
    out = task.python_callable(results=results, params={"config": {
        "home": str(cfg.home), "storage": cfg.storage.model_dump()}}, outlet_events=events)
    return out, events[CURATED_DATASET].extra


def test_console_folder_objects_do_not_stop_a_batch(tmp_path, s3_endpoint, s3_bucket):
    from training.data.batches import discover_batches
    from training.data.curation import validate_batch

    cfg = _s3_config(tmp_path / "home", s3_endpoint, s3_bucket)
    make_cell_batch(tmp_path / "src", seed=9, **SMALL)
    _console_upload(cfg, tmp_path / "src", "console")
    assert [b.batch_id for b in discover_batches(cfg)] == ["console"]
    result = validate_batch(cfg, "console")
    assert (result.status, result.images, result.accepted) == ("accepted", 12, 12)


def test_a_failing_batch_does_not_stop_the_dataset_event(tmp_path, s3_endpoint, s3_bucket,
                                                          monkeypatch):
    import json

    from training.data.batches import discover_batches, landing_storage, read_ledger
    from training.data.curation import validate_batch

    cfg = _s3_config(tmp_path / "home", s3_endpoint, s3_bucket)
    make_cell_batch(tmp_path / "good", seed=10, **SMALL)
    _console_upload(cfg, tmp_path / "good", "good")
    store = landing_storage(cfg)  # a file and a folder of the same name: cannot be staged
    store.write_bytes("clash/cells", b"not a folder")
    store.write_bytes("clash/cells/UID_1_1_1_all.png", b"png")
    store.write_bytes("clash/_READY", b"")
    assert [b.batch_id for b in discover_batches(cfg)] == ["clash", "good"]

    results = [validate_batch(cfg, b).to_dict() for b in ("clash", "good")]
    assert [r["status"] for r in results] == ["failed", "accepted"]
    ledger = read_ledger(cfg, "clash")
    assert ledger.status == "failed" and "cannot be staged" in ledger.message
    summary = json.loads((cfg.reports_dir / "clash" / "summary.json").read_text())
    assert summary["status"] == "failed" and "cannot be staged" in summary["rejection_reason"]
    index = (cfg.reports_dir / "index.html").read_text()
    assert "clash" in index and "failed" in index and "cannot be staged" in index
    assert "good" in index and "accepted" in index
    assert discover_batches(cfg) == []  # recorded: not retried on every run
    assert validate_batch(cfg, "clash").to_dict() == results[0]

    # None: a validate task that crashed
    dataset_record, extra = _emit(cfg, [*results, None], monkeypatch)
    assert dataset_record["batch_ids"] == ["good"] and extra == {"version": 1}


# ------------------------------------------------------------ 4: every file accounted for
def test_every_file_of_a_batch_is_accounted_for(tmp_path, s3_endpoint, s3_bucket):
    import io
    import json

    import boto3
    import pandas as pd

    from training.data.batches import discover_batches
    from training.data.curation import validate_batch
    from training.data.landing import upload_batch
    from training.dev.synth import make_bad_files

    cfg = _s3_config(tmp_path / "home", s3_endpoint, s3_bucket)
    src = tmp_path / "src"
    make_cell_batch(src, seed=11, **SMALL)
    make_bad_files(src / "fold_0" / "all", seed=11)
    (src / "protocol.pdf").write_bytes(b"%PDF-1.4 the lab's protocol")
    (src / "notes.txt").write_text("scanned on the old microscope\n")
    (src / "fold_0" / "scan.xyz").write_bytes(b"\x00\x01 unknown format")
    (src / ".DS_Store").write_bytes(b"\x00")
    upload_batch(cfg, src, "mixed")
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")

    def bucket() -> dict[str, str]:
        return {o["Key"]: o["ETag"] for o in s3.list_objects_v2(Bucket=s3_bucket)["Contents"]}

    landing_before = {k: v for k, v in bucket().items() if k.startswith("landing/")}
    result = validate_batch(cfg, "mixed")
    assert result.status == "accepted"

    summary = json.loads((cfg.reports_dir / "mixed" / "summary.json").read_text())
    files = {p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()} | {"_READY"}
    counts = summary["files"]
    assert counts["present"] == len(files)
    assert counts["curated"] + counts["quarantined"] + counts["ignored"] == len(files)
    assert summary["ignored"] == {"_READY": "batch_metadata", ".DS_Store": "hidden_file",
                                  "notes.txt": "not_an_image:.txt",
                                  "protocol.pdf": "not_an_image:.pdf"}
    manifest, _ = dataset.load_manifest(cfg)
    curated = {s.split("/", 1)[1] for s in manifest["source"]}
    raw = s3.get_object(Bucket=s3_bucket, Key="quarantine/mixed/reasons.csv")["Body"].read()
    quarantined = set(pd.read_csv(io.BytesIO(raw), dtype=str)["path"])
    assert "fold_0/scan.xyz" in quarantined
    groups = (curated, quarantined, set(summary["ignored"]))
    assert set().union(*groups) == files and sum(map(len, groups)) == len(files)  # disjoint
    page = (cfg.reports_dir / "mixed" / "quarantine.html").read_text()
    assert "Ignored files (4)" in page and "not_an_image:.pdf" in page

    after = bucket()
    assert {k: v for k, v in after.items() if k.startswith("landing/")} == landing_before
    assert validate_batch(cfg, "mixed") == result and discover_batches(cfg) == []
    assert bucket() == after  # a second ingest changes nothing


# ------------------------------------------------------ 5: near-duplicates across the split
def _reencode(src: Path, dest: Path) -> Path:
    """A JPEG re-encoding of ``src``: other bytes, the same picture."""
    from PIL import Image

    dest.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as im:
        im.convert("RGB").save(dest, "JPEG", quality=90)
    return dest


def _plain_splits(cfg: Config, files: list[Path]) -> dict[str, str]:
    """Where the plain assignment (no twin check) deals these C-NMC files in a fresh store."""
    import hashlib

    import pandas as pd

    rows = [{"sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "key": "", "kind": "cell",
             "label": p.stem.split("_")[-1], "subject_id": p.stem.split("_")[1], "batch_id": "b",
             "source": p.name, "width": 64, "height": 64, "split": "", "split_group": "",
             "label_key": ""} for p in files]
    out = dataset.assign_splits(pd.DataFrame(rows), cfg)
    return dict(zip(out["source"], out["split"], strict=True))


def _straddling_twins(cfg: Config, manifest) -> list[tuple[str, str]]:
    """Near-duplicate pairs of the curated images (pHash + pixels) on different splits."""
    from training.data.importers import ImageRecord
    from training.data.leakage import find_twins
    from training.data.metadata import extract_metadata
    from training.data.validation import same_picture

    local = dataset.materialize(cfg, manifest, cfg.home / "cache")
    meta = extract_metadata(Path("/"), [ImageRecord(path=p, kind="cell") for p in local["path"]],
                            "check", workers=1)
    paths, splits = list(local["path"]), list(local["split"])
    pairs, _ = find_twins(list(meta["phash"]), [True] * len(paths),
                          cfg.validation.near_duplicate_hamming,
                          confirm=lambda i, j: same_picture(Path(paths[i]), Path(paths[j])),
                          shas=list(local["sha256"]))
    return [(paths[i], paths[j]) for i, j, _ in pairs if splits[i] != splits[j]]


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_near_duplicate_follows_its_twin_across_the_split(tmp_path: Path):
    """Good cells, a JPEG re-encoding of one under another subject id, an unrecognised file and
    broken images: every file accounted for, the twins on one split, nothing deleted, rerun
    idempotent; the check is recorded beside the manifest version and in the ledger."""
    import json

    from training.data.batches import read_ledger
    from training.data.curation import validate_batch
    from training.dev.synth import make_bad_files

    cfg = load_config(home=tmp_path / "home", validation={"workers": 1})
    src = cfg.home / "landing" / "dups"
    good = make_cell_batch(src, seed=12, n_subjects_per_class=3, images_per_subject=3, size=64)
    make_bad_files(src / "fold_0" / "hem", seed=12)
    (src / "fold_0" / "scan.xyz").write_bytes(b"\x00\x01 unknown format")
    original = good[0]
    label = original.stem.split("_")[-1]
    for number in range(9000, 9100):  # a subject the plain assignment puts on another split
        copy = src / "fold_0" / label / f"UID_{number}_1_1_{label}.jpg"
        _reencode(original, copy)
        plain = _plain_splits(cfg, [*good, copy])
        if plain[copy.name] != plain[original.name]:
            break
        copy.unlink()
    else:
        pytest.fail("no subject id puts the copy on another split: the test cannot show a leak")
    write_ready(src)
    landing_before = _tree(src)

    result = validate_batch(cfg, "dups")
    assert result.status == "accepted", result.message
    summary = json.loads((cfg.reports_dir / "dups" / "summary.json").read_text())
    counts = summary["files"]
    assert counts["present"] == len(landing_before)
    assert counts["curated"] + counts["quarantined"] + counts["ignored"] == counts["present"]
    assert counts["curated"] == len(good) + 1  # the copy is curated, not lost

    manifest, ds = dataset.load_manifest(cfg)
    split_of = {s.rsplit("/", 1)[1]: sp for s, sp in zip(manifest["source"], manifest["split"],
                                                         strict=True)}
    assert split_of[copy.name] == split_of[original.name]
    assert _straddling_twins(cfg, manifest) == []

    record = json.loads(dataset.curated_storage(cfg).read_text(dataset.leakage_key(ds.version)))
    assert record["pairs_found"] >= 1 and record["straddling_before"] >= 1
    assert record["moved"] >= 1 and record["remaining"] == 0
    assert any({p["sources"][0].rsplit("/", 1)[1], p["sources"][1].rsplit("/", 1)[1]}
               == {original.name, copy.name} for p in record["pairs"])
    assert ds.leakage is not None and ds.leakage["remaining"] == 0
    assert ds.leakage["pairs_found"] == record["pairs_found"]
    ledger = read_ledger(cfg, "dups")
    assert ledger.leakage["remaining"] == 0 and ledger.leakage["record"].endswith(
        "v0001.leakage.json")
    assert summary["leakage"] == ledger.leakage

    assert _tree(src) == landing_before  # nothing deleted or changed in landing
    curated_after = _tree(cfg.home / "curated")
    assert validate_batch(cfg, "dups") == result
    assert _tree(cfg.home / "curated") == curated_after  # a second ingest changes nothing
    assert _tree(src) == landing_before


def test_concurrent_batches_with_one_picture_are_checked_under_the_lock(tmp_path: Path):
    """Two batches racing: one holds a byte copy and a re-encoding of the other's image. The
    byte copy is curated once and quarantined (already_curated) in the later batch; the
    re-encoding lands on its twin's split, whichever batch goes first."""
    import io
    import json

    import pandas as pd

    cfg = load_config(home=tmp_path / "home", validation={"workers": 1})
    landing = cfg.home / "landing"
    left = make_cell_batch(landing / "left", seed=21, **SMALL)
    make_cell_batch(landing / "right", seed=22, **SMALL)
    label = left[0].stem.split("_")[-1]
    byte_copy = landing / "right" / "fold_0" / label / f"UID_8001_1_1_{label}.png"
    byte_copy.write_bytes(left[0].read_bytes())
    reencoded = _reencode(left[1], landing / "right" / "fold_0" / label /
                          f"UID_8002_1_1_{label}.jpg")
    for batch in ("left", "right"):
        write_ready(landing / batch)
    assert _race({"left": cfg, "right": cfg}) == {"left": "accepted", "right": "accepted"}

    manifest, ds = dataset.load_manifest(cfg)
    assert ds.version == 2 and manifest["sha256"].is_unique
    names = [s.rsplit("/", 1)[1] for s in manifest["source"]]
    split_of = dict(zip(names, manifest["split"], strict=True))
    assert split_of[reencoded.name] == split_of[left[1].name]
    assert (left[0].name in names) != (byte_copy.name in names)  # curated exactly once
    later = "right" if left[0].name in names else "left"
    lost = byte_copy.name if later == "right" else left[0].name
    raw = (cfg.home / "quarantine" / later / "reasons.csv").read_bytes()
    reasons = pd.read_csv(io.BytesIO(raw), dtype=str).set_index("path")["reasons"]
    assert {p.rsplit("/", 1)[1]: r for p, r in reasons.items()}[lost] == "already_curated"
    for batch in ("left", "right"):
        counts = json.loads((cfg.reports_dir / batch / "summary.json").read_text())["files"]
        assert counts["curated"] + counts["quarantined"] + counts["ignored"] == counts["present"]
    assert sum(json.loads((cfg.reports_dir / b / "summary.json").read_text())["files"][
        "curated"] for b in ("left", "right")) == len(manifest)
    assert _straddling_twins(cfg, manifest) == []


# -------------------------------------------- 6: discovery by the ledger and one folder listing
def test_discovery_lists_folders_and_the_ledger_not_every_file(tmp_path, s3_endpoint, s3_bucket,
                                                               monkeypatch):
    """Batch ids come from a delimiter listing, processed ones from the ledger's keys: no full
    listing of the landing zone, no per-batch request for a batch already processed."""
    from training.data.batches import discover_batches, landing_storage, write_ledger
    from training.records import ValidationResult
    from training.storage import S3Storage

    cfg = _s3_config(tmp_path / "home", s3_endpoint, s3_bucket)
    landing = landing_storage(cfg)
    for i in range(30):
        for name in ("fold_0/all/a.png", "fold_0/hem/b.png", "_READY"):
            landing.write_bytes(f"b{i:03d}/{name}", b"x")
    landing.write_bytes("b900/", b"")  # a console folder object, nothing else yet
    landing.write_bytes("b901/cells/c.png", b"x")  # still uploading: no marker
    landing.write_bytes("stray.txt", b"x")  # a file at the top: no batch
    for i in range(25):
        write_ledger(cfg, ValidationResult(f"b{i:03d}", "accepted", "cnmc", 2, 2, 0, {}, "",
                                           None))
    calls: list[tuple[str, str]] = []
    real_list, real_exists = S3Storage.list, S3Storage.exists

    def list_(self, prefix=""):
        calls.append(("list", self.prefix + prefix))
        return real_list(self, prefix)

    def exists(self, key):
        calls.append(("exists", self.prefix + key))
        return real_exists(self, key)

    monkeypatch.setattr(S3Storage, "list", list_)
    monkeypatch.setattr(S3Storage, "exists", exists)
    assert [b.batch_id for b in discover_batches(cfg)] == [f"b{i:03d}" for i in range(25, 30)]
    assert ("list", "landing/") not in calls  # no walk of every file in the landing zone
    assert ("list", "curated/batches/") in calls
    probed = {key.split("/")[1] for op, key in calls if op == "exists"}
    assert probed == {f"b{i:03d}" for i in range(25, 30)} | {"b900", "b901"}
    assert landing.list_dirs("") == [*(f"b{i:03d}" for i in range(30)), "b900", "b901"]
    assert landing.list_dirs("b000/fold_0") == ["all", "hem"]
