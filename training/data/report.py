"""The data steward's report on one batch: ``summary.json`` and ``quarantine.html``.

``index.html`` beside the batch folders lists every batch reported so far with its verdict
(accepted, rejected, or failed: could not be read at all, and why) and links to its page.

``quarantine.html`` is one self-contained page (no scripts, no external files): every file the
batch lost, a small thumbnail (base64 PNG) or a grey box where the file cannot be decoded, its
reasons, what it duplicates, and a link to the GX Data Docs that hold the full suite results.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

__all__ = [
    "MAX_THUMBNAILS", "THUMBNAIL_SIDE", "thumbnail_data_uri", "write_index", "write_report",
]

THUMBNAIL_SIDE = 96
MAX_THUMBNAILS = 400  # a rejected batch of thousands of files keeps the page a few MB at most

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ccc;padding:4px 8px;
text-align:left;vertical-align:middle}th{background:#f3f3f3}.bad{color:#a00}.ok{color:#070}
.ph{width:96px;height:96px;background:#ddd;color:#666;display:flex;align-items:center;
justify-content:center;font-size:.75em;text-align:center}code{font-size:.9em}
"""


def thumbnail_data_uri(path: Path, side: int = THUMBNAIL_SIDE) -> str | None:
    """A ``data:image/png;base64`` thumbnail, or None when the file cannot be shown.

    Only call it for files the metadata pass decoded (so within the pixel limit).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                im.draft("RGB", (side * 2, side * 2))
                if im.mode not in ("RGB", "RGBA", "L"):
                    im = _displayable(im)
                im = im.copy()
                im.thumbnail((side, side))
                if im.mode != "L":  # a 64-colour palette: a quarter of the bytes, looks the same
                    im = im.convert("RGB").quantize(64)
                buf = io.BytesIO()
                im.save(buf, "PNG", optimize=True)
    except Exception:  # noqa: BLE001 - a thumbnail is a courtesy: a placeholder will do
        return None
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _displayable(im: Image.Image) -> Image.Image:
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        import numpy as np

        arr = np.asarray(im, dtype=np.float32)
        top = float(arr.max()) or 1.0
        return Image.fromarray((arr / top * 255).clip(0, 255).astype("uint8"), "L")
    return im.convert("RGB")


def _cell(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _rows_html(rows: pd.DataFrame, root: Path) -> str:
    out = []
    for i, row in enumerate(rows.itertuples(index=False)):
        thumb = None
        if i < MAX_THUMBNAILS and bool(row.decodable):
            thumb = thumbnail_data_uri(root / row.path)
        if thumb:
            image = f'<img src="{thumb}" alt="{_cell(row.path)}">'
        else:
            why = (row.error or "not shown") if i < MAX_THUMBNAILS else "thumbnail omitted"
            image = f'<div class="ph">{_cell(why)}</div>'
        out.append(
            "<tr>"
            f"<td>{image}</td><td><code>{_cell(row.path)}</code></td>"
            f"<td>{_cell(row.kind)}</td><td>{_cell(row.label)}</td>"
            f'<td class="bad">{_cell(", ".join(row.reasons))}</td>'
            f"<td><code>{_cell(row.duplicate_of or '')}</code></td>"
            "</tr>"
        )
    return "\n".join(out)


def _expectations_html(expectations: list[dict[str, Any]]) -> str:
    out = []
    for e in expectations:
        verdict = ('<span class="ok">pass</span>' if e["success"]
                   else '<span class="bad">FAIL</span>')
        unexpected = e.get("unexpected_count")
        out.append(
            f"<tr><td>{_cell(e['expectation'])}</td><td>{_cell(e.get('column') or '')}</td>"
            f"<td>{_cell(e['reason'])}</td><td>{_cell(e['severity'])}/{_cell(e['level'])}</td>"
            f"<td>{verdict}</td><td>{_cell('' if unexpected is None else unexpected)}</td></tr>"
        )
    return "\n".join(out)


def _files_html(summary: dict[str, Any]) -> str:
    """Where every file of the batch went, and the files that are no record (with why)."""
    files = summary.get("files")
    ignored = summary.get("ignored") or {}
    if not files and not ignored:
        return ""
    counts = (f"<p>{files['present']} file(s) in the batch: {files['curated']} curated, "
              f"{files['quarantined']} quarantined, {files['ignored']} ignored (left in landing)."
              "</p>" if files else "")
    rows = "".join(f"<tr><td><code>{_cell(p)}</code></td><td>{_cell(why)}</td></tr>"
                   for p, why in sorted(ignored.items()))
    return (f"<h2>Files</h2>{counts}<h2>Ignored files ({len(ignored)})</h2>"
            f"<table><tr><th>path</th><th>why</th></tr>{rows}</table>")


def _threshold_how(drift: dict[str, Any]) -> str:
    """Where the batch's drift threshold came from (training.data.drift.threshold_for)."""
    mode, cal = drift.get("threshold_mode", "fixed"), drift.get("calibration") or {}
    if mode == "calibrated":
        return _cell(f"calibrated: {cal.get('note', '')}, floor {cal.get('floor', 0):.4f} "
                     f"(null median {cal.get('null_median', 0):.4f})")
    if mode == "fixed_fallback":
        return _cell(f"fixed validation.drift_threshold, not calibrated: {cal.get('note', '')}")
    return "fixed validation.drift_threshold (validation.drift_threshold_mode: fixed)"


def _drift_html(drift: dict[str, Any] | None) -> str:
    """The batch against the champion's training rows (training.data.drift)."""
    if not drift:
        return ""
    if drift.get("status") != "measured":
        return f"<h2>Drift</h2><p>Not measured: {_cell(drift.get('note', ''))}</p>"
    verdict = ('<b class="bad">drifted</b>: the model was not trained on images like these'
               if drift["drifted"] else "within the threshold")
    shifts = "".join(f"<li><code>{_cell(k)}</code>: {v:+.2f} SD</li>"
                     for k, v in drift.get("top_shifts", {}).items())
    return (f"<h2>Drift</h2><p>MMD² of image statistics {drift['score']:.4f} (threshold "
            f"{drift['threshold']:.4f}, permutation p = {drift['p_value']:.3f}): {verdict}. "
            f"Reference: {_cell(drift['reference'])}; {drift['n_batch']} batch images.</p>"
            f"<p>Threshold: {_threshold_how(drift)}</p>"
            f"<p>Largest mean shifts (in reference SDs):</p><ul>{shifts}</ul>"
            + (f"<p>Champion's embedding: MMD² {drift['embedding_score']:.4f} (permutation p = "
               f"{drift['embedding_p_value']:.3f}; {_cell(drift['embedding_note'])}).</p>"
               if drift.get("embedding_score") is not None else
               f"<p>Champion's embedding: {_cell(drift.get('embedding_note') or 'not measured')}"
               "</p>"))


def _page(summary: dict[str, Any], rows: pd.DataFrame, root: Path,
          expectations: list[dict[str, Any]]) -> str:
    docs = summary.get("data_docs")
    docs_link = (f'<a href="{html.escape(Path(docs).as_uri())}">GX Data Docs</a>'
                 if docs else "GX Data Docs were not built")
    status = summary["status"]
    reasons = "".join(f"<li><code>{_cell(k)}</code>: {v}</li>"
                      for k, v in sorted(summary["reasons"].items()))
    warns = "".join(f"<li><code>{_cell(k)}</code>: {v} file(s)</li>"
                    for k, v in sorted(summary.get("warnings", {}).items()))
    rejection = (f'<p class="bad"><b>Batch rejected:</b> {_cell(summary["rejection_reason"])}</p>'
                 if summary.get("rejection_reason") else "")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>leukoflow quarantine: {_cell(summary['batch_id'])}</title><style>{_CSS}</style></head>
<body>
<h1>Batch <code>{_cell(summary['batch_id'])}</code>: {_cell(status)}</h1>
{rejection}
<p>Layout <code>{_cell(summary['layout'])}</code>; {summary['images']} image(s),
{summary['accepted']} accepted, {summary['quarantined']} quarantined. {docs_link}.</p>
<h2>Quarantine reasons</h2><ul>{reasons or '<li>none</li>'}</ul>
<h2>Warnings (soft bounds; files kept)</h2><ul>{warns or '<li>none</li>'}</ul>
{_drift_html(summary.get("drift"))}
{_files_html(summary)}
<h2>Quarantined files ({len(rows)})</h2>
<table><tr><th>image</th><th>path</th><th>kind</th><th>label</th><th>reasons</th>
<th>duplicate of</th></tr>
{_rows_html(rows, root)}
</table>
<h2>Expectations</h2>
<table><tr><th>expectation</th><th>column</th><th>reason code</th><th>severity/level</th>
<th>result</th><th>unexpected</th></tr>
{_expectations_html(expectations)}
</table>
</body></html>
"""


def write_report(
    report_dir: Path,
    summary: dict[str, Any],
    quarantined: pd.DataFrame,
    root: Path,
    expectations: list[dict[str, Any]] | None = None,
) -> Path:
    """Write ``summary.json`` and ``quarantine.html`` into ``report_dir``; return the folder.

    ``summary`` needs batch_id, status, layout, images, accepted, quarantined, reasons,
    data_docs (and optionally warnings, rejection_reason). ``quarantined`` has one row per
    lost file with path, kind, label, decodable, error, reasons (list), duplicate_of; ``root``
    is the batch folder the paths are relative to.
    """
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True,
                                                        default=str))
    page = _page(summary, quarantined, Path(root), expectations or [])
    tmp = report_dir / ".quarantine.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(report_dir / "quarantine.html")
    return report_dir


def write_index(reports_dir: Path) -> Path:
    """Write ``reports_dir/index.html``: one row per ``<batch>/summary.json``, newest first."""
    reports_dir = Path(reports_dir)
    summaries = []
    for path in reports_dir.glob("*/summary.json"):
        try:
            summaries.append((path.stat().st_mtime, json.loads(path.read_text())))
        except (OSError, ValueError):
            continue  # being rewritten right now: the next index has it
    rows = []
    for _, s in sorted(summaries, key=lambda t: (-t[0], t[1].get("batch_id", ""))):
        status = str(s.get("status", ""))
        why = s.get("rejection_reason") or s.get("message") or ""
        cls = "ok" if status == "accepted" else "bad"
        batch = str(s.get("batch_id", ""))
        rows.append(
            f'<tr><td><a href="{html.escape(batch)}/quarantine.html"><code>{_cell(batch)}'
            f'</code></a></td><td class="{cls}">{_cell(status)}</td>'
            f"<td>{_cell(s.get('images', ''))}</td><td>{_cell(s.get('accepted', ''))}</td>"
            f"<td>{_cell(s.get('quarantined', ''))}</td>"
            f"<td>{_cell(s.get('files', {}).get('ignored', ''))}</td><td>{_cell(why)}</td></tr>"
        )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>leukoflow batches</title>
<style>{_CSS}</style></head><body>
<h1>Batches ({len(rows)})</h1>
<table><tr><th>batch</th><th>status</th><th>images</th><th>accepted</th><th>quarantined</th>
<th>ignored</th><th>why</th></tr>
{chr(10).join(rows)}
</table></body></html>
"""
    reports_dir.mkdir(parents=True, exist_ok=True)
    tmp = reports_dir / f".index.html.{os.getpid()}.tmp"
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(reports_dir / "index.html")
    return reports_dir / "index.html"
