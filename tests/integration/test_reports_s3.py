"""Steward reports published to an S3 bucket (the compose stack's MinIO) and read back by the
web app's page data, through a real S3-protocol server on loopback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serving.webapp import pages_data
from training.config import load_config
from training.reports import publish_report

pytestmark = pytest.mark.integration


def _site(root: Path) -> Path:
    """A GX-like Data Docs site: index, one validation page, a stylesheet."""
    page = root / "validations" / "suite" / "b1" / "20261201T000000Z" / "abc.html"
    page.parent.mkdir(parents=True)
    page.write_text('<html><head><link rel="stylesheet" '
                    'href="https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css">'
                    '</head><body><div class="card">b1</div></body></html>')
    (root / "index.html").write_text("<html>index</html>")
    (root / "static" / "styles").mkdir(parents=True)
    (root / "static" / "styles" / "data_docs_custom_styles.css").write_text("body{}")
    return page


def test_reports_and_data_docs_go_to_the_bucket(tmp_path: Path, s3_endpoint: str,
                                                s3_bucket: str) -> None:
    cfg = load_config(home=tmp_path / "home", storage={
        "reports_uri": f"s3://{s3_bucket}/reports", "s3_endpoint_url": s3_endpoint})
    report = tmp_path / "worker-disk" / "b1"
    report.mkdir(parents=True)
    (report / "summary.json").write_text(json.dumps({
        "batch_id": "b1", "status": "accepted", "images": 5, "accepted": 4, "quarantined": 1}))
    (report / "quarantine.html").write_text('<p><a href="file:///x/abc.html">GX Data Docs</a></p>')
    page = _site(tmp_path / "gx" / "local_site")

    out = publish_report(cfg, "b1", report, page)
    assert out["data_docs_page"] == "validations/suite/b1/20261201T000000Z/abc.html"
    again = publish_report(cfg, "b1", report, None)  # a rerun elsewhere keeps the page
    assert again["data_docs_page"] == out["data_docs_page"]
    assert again["published_at"] == out["published_at"]

    import shutil

    shutil.rmtree(tmp_path / "worker-disk")  # the worker's disk is gone: the bucket has it all
    shutil.rmtree(tmp_path / "gx")
    [row] = pages_data.batches(cfg)
    assert (row["batch_id"], row["quarantined"], row["has_quarantine_page"]) == ("b1", 1, True)
    html = pages_data.quarantine_html(cfg, "b1", "/app")
    assert f'href="/app/docs/{out["data_docs_page"]}"' in html and "file://" not in html
    data, media = pages_data.docs_file(cfg, out["data_docs_page"])
    assert media == "text/html" and b'class="card"' in data
    css, media = pages_data.docs_file(cfg, "static/styles/data_docs_custom_styles.css")
    assert media == "text/css"
    for bad in ("../b1/summary.json", "static/../../b1/summary.json", ".hidden"):
        with pytest.raises(LookupError):
            pages_data.docs_file(cfg, bad)
    with pytest.raises(LookupError):
        pages_data.batch(cfg, "../etc")
