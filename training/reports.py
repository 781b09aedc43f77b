"""Steward reports where the web app and the stewards can reach them (``storage.reports_uri``).

The validate stage writes ``summary.json`` and ``quarantine.html`` into ``{home}/reports/<batch>/``
on whatever machine ran it, and GX writes its Data Docs under ``{home}/gx``. :func:`publish_report`
copies both into the reports store, through :mod:`training.storage` like every other store:

    <reports>/<batch_id>/summary.json        the verdict and counts (as written by the stage)
    <reports>/<batch_id>/quarantine.html     thumbnails and reasons of the quarantined files
    <reports>/<batch_id>/published.json      {"data_docs_page": "<page under _data_docs/>",
                                              "published_at": "<first publication, UTC>"}
    <reports>/_data_docs/...                 the GX site: index, the batch's validation page,
                                             expectation suites, static styles

The embedded default ``file://{home}/reports`` is the folder the stage already writes to, so only
the Data Docs are copied; in the compose stack ``s3://leukoflow/reports`` on MinIO holds it all.
The web app (:mod:`serving.webapp`) reads the reports store only. Light module: config and
storage, no pandas, no GX.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from training.config import Config
from training.storage import Storage, open_storage

__all__ = ["DOCS_PREFIX", "batch_summaries", "publish_report", "reports_storage", "site_root"]

log = logging.getLogger("leukoflow.reports")

DOCS_PREFIX = "_data_docs"
REPORT_FILES = ("summary.json", "quarantine.html")


def reports_storage(cfg: Config) -> Storage:
    return open_storage(cfg.uri("reports"), cfg.storage.s3_endpoint_url, cfg.storage.s3_region)


def site_root(page: Path) -> Path | None:
    """The GX Data Docs site folder holding ``page`` (the nearest ancestor with index.html)."""
    for parent in page.parents:
        if (parent / "index.html").is_file():
            return parent
    return None


def _same_file(store: Storage, key: str, local: Path) -> bool:
    there = store.local_path(key)
    return there is not None and there.exists() and there.resolve() == local.resolve()


def publish_report(cfg: Config, batch_id: str, report_dir: str | Path | None,
                   data_docs: str | Path | None) -> dict[str, Any]:
    """Copy one batch's report and its Data Docs page (with the site around it) to the store.

    Idempotent: a rerun copies the same files again. Returns what was published.
    """
    store = reports_storage(cfg)
    published: dict[str, Any] = {"batch_id": batch_id, "reports_uri": store.uri, "files": 0}
    if report_dir:
        for name in REPORT_FILES:
            src = Path(report_dir) / name
            key = f"{batch_id}/{name}"
            if src.is_file() and not _same_file(store, key, src):
                store.copy_in(src, key)
                published["files"] += 1
    page = Path(data_docs) if data_docs else None
    root = site_root(page) if page and page.is_file() else None
    if page is not None and root is not None:
        rel = page.relative_to(root).as_posix()
        wanted = [page, root / "index.html"]
        wanted += [p for p in (root / "expectations").rglob("*.html")]
        wanted += [p for p in (root / "static").rglob("*") if p.is_file()]
        for src in wanted:
            key = f"{DOCS_PREFIX}/{src.relative_to(root).as_posix()}"
            if key.startswith(f"{DOCS_PREFIX}/static/") and store.exists(key):
                continue  # GX's own styles and images: the same for every batch
            if src.is_file() and not _same_file(store, key, src):
                store.copy_in(src, key)
                published["files"] += 1
        published["data_docs_page"] = rel
    key = f"{batch_id}/published.json"
    before = json.loads(store.read_text(key)) if store.exists(key) else {}
    # a rerun on a machine without the first run's files keeps what was published then
    published.setdefault("data_docs_page", before.get("data_docs_page"))
    published["published_at"] = (before.get("published_at")
                                 or datetime.now(UTC).isoformat(timespec="seconds"))
    store.write_text(key, json.dumps({"data_docs_page": published["data_docs_page"],
                                      "published_at": published["published_at"]}, indent=2))
    log.info("report of batch %s published to %s (%d file(s) copied)", batch_id, store.uri,
             published["files"])
    return published


def batch_summaries(store: Storage) -> list[dict[str, Any]]:
    """Every published batch's ``summary.json`` (+ its Data Docs page), newest first."""
    out = []
    for batch_id in store.list_dirs(""):
        if batch_id == DOCS_PREFIX or not store.exists(f"{batch_id}/summary.json"):
            continue
        try:
            summary = json.loads(store.read_text(f"{batch_id}/summary.json"))
        except ValueError:
            log.warning("batch %s: summary.json is not JSON; skipped", batch_id)
            continue
        summary.setdefault("batch_id", batch_id)
        if store.exists(f"{batch_id}/published.json"):
            summary.update(json.loads(store.read_text(f"{batch_id}/published.json")))
        summary["has_quarantine_page"] = store.exists(f"{batch_id}/quarantine.html")
        out.append(summary)
    return sorted(out, key=lambda s: (str(s.get("published_at") or ""), s["batch_id"]),
                  reverse=True)
