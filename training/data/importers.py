"""Batch importers: recognise how a landing batch is laid out and list its images as records.

A batch arrives in the on-disk layout its source uses; the platform does not ask uploaders to
convert. :func:`detect_layout` tries, in this order (the first that matches wins):

``manifest``       ``manifest.csv`` at the root: ``path,label,subject_id[,source]``, paths
                   relative to the root. A listed file that does not exist is still a record
                   (error ``missing_file``), so the steward sees it in the quarantine list.
``cnmc``           C-NMC 2019 names ``UID_<subject>_<image>_<cell>_<all|hem>.<ext>`` anywhere
                   under the root (most files must match). Label = suffix, subject = 2nd token
                   (``H`` prefix = healthy donor).
``yolo``           ``images/`` (optionally ``train|val|test/``) with a ``labels/`` mirror and
                   ``data.yaml`` (``names`` as list or dict). Smear fields, boxes from the labels.
``voc``            Pascal VOC ``JPEGImages/`` + ``Annotations/*.xml``; boxes converted to YOLO
                   text, class ids in order of first appearance (see :func:`class_names`).
``class_folders``  ``<Class>/<image>`` below the root (e.g. ALL 4-class); no subject ids.

Names starting with ``.``, the ``_READY`` marker and text sidecars (``.txt``, ``.md``, ``.xml``,
``.yaml``, ...; see ``SIDECAR_SUFFIXES``) are never images. Any other file is a record, even with
an odd extension, so a mislabelled upload is quarantined with a reason instead of vanishing.
Files are only listed and label files parsed here; pixels are read by ``training.data.metadata``.
Every file that is not a record gets a reason from :func:`unlisted_files` (batch metadata, a
label file, a document, outside the layout's image folder, ...), so the steward's report can
account for every file of the batch.
"""

from __future__ import annotations

import csv
import os
import re
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import yaml

from training.errors import DataValidationError

__all__ = [
    "LAYOUTS",
    "ImageRecord",
    "class_names",
    "detect_layout",
    "given_split",
    "import_batch",
    "unlisted_files",
]

GIVEN_SPLITS = ("train", "val", "test")
LAYOUTS = ("manifest", "cnmc", "yolo", "voc", "class_folders")
READY_MARKER = "_READY"
MANIFEST = "manifest.csv"
SIDECAR_SUFFIXES = frozenset(
    {".txt", ".md", ".rst", ".xml", ".yaml", ".yml", ".json", ".csv", ".html", ".pdf", ".py"}
)
SIDECAR_NAMES = frozenset({"LICENSE", "LICENCE", "README", "NOTICE", "COPYING"})
CNMC_NAME = re.compile(
    r"^UID_(?P<subject>[A-Za-z0-9]+)_(?P<image>[A-Za-z0-9]+)_(?P<cell>[A-Za-z0-9]+)"
    r"_(?P<label>all|hem)\.(?P<ext>[A-Za-z0-9]+)$",
    re.IGNORECASE,
)
_LOOKED_FOR = (
    f"{MANIFEST} at the root; C-NMC file names UID_<subject>_<image>_<cell>_<all|hem>.<ext>; "
    "YOLO images/ + labels/ + data.yaml; Pascal VOC JPEGImages/ + Annotations/; "
    "class folders <Class>/<image>"
)
_COORD_TOLERANCE = 1e-3  # YOLO coordinates a rounding step outside [0, 1] are still accepted


@dataclass
class ImageRecord:
    """One image of a batch as the importer sees it (no pixels read yet)."""

    path: str  # relative POSIX path inside the batch
    kind: str  # "cell" | "field"
    label: str = ""  # class name of a cell image; "" for fields
    subject_id: str = ""  # donor id where the layout has one
    yolo_labels: str = ""  # YOLO label text of a field (class cx cy w h per line)
    # class name -> boxes the label file declares; kept when error is bad_label_file, so the
    # steward sees what was declared, while yolo_labels is then "" (nothing invalid is passed on)
    box_counts: dict[str, int] = field(default_factory=dict)
    error: str = ""  # "" | "missing_file" | "bad_label_file"
    source: str = ""  # free text from a manifest's optional ``source`` column


# ------------------------------------------------------------------------------- listing
def _ignored(name: str) -> bool:
    return name.startswith(".") or name == READY_MARKER


def _is_sidecar(name: str) -> bool:
    p = PurePosixPath(name)
    return p.suffix.lower() in SIDECAR_SUFFIXES or p.stem.upper() in SIDECAR_NAMES


def _walk(root: Path) -> list[str]:
    """Every candidate image under ``root`` as a sorted relative POSIX path."""
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not _ignored(d)]
        rel_dir = Path(dirpath).relative_to(root)
        for name in filenames:
            if not _ignored(name) and not _is_sidecar(name):
                out.append((rel_dir / name).as_posix())
    return sorted(out)


def _under(files: list[str], folder: str) -> list[str]:
    prefix = folder.rstrip("/") + "/"
    return [f for f in files if f.startswith(prefix)]


# ----------------------------------------------------------------------------- detection
def _is_cnmc(files: list[str]) -> bool:
    hits = sum(1 for f in files if CNMC_NAME.match(PurePosixPath(f).name))
    return hits > 0 and hits * 2 >= len(files)


def detect_layout(root: Path) -> str:
    """Name the layout of the batch folder ``root`` (one of ``LAYOUTS``).

    Raises ``DataValidationError`` naming the folder and what was looked for when none fits.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataValidationError(f"batch folder {root} does not exist or is not a folder")
    if (root / MANIFEST).is_file():
        return "manifest"
    files = _walk(root)
    if _is_cnmc(files):
        return "cnmc"
    if (root / "images").is_dir() and (root / "labels").is_dir():
        return "yolo"
    if (root / "JPEGImages").is_dir() and (root / "Annotations").is_dir():
        return "voc"
    if any("/" in f for f in files):
        return "class_folders"
    top = sorted(p.name for p in root.iterdir())[:10]
    raise DataValidationError(
        f"batch folder {root} matches no known layout; looked for: {_LOOKED_FOR}. "
        f"Found {len(files)} candidate image file(s); top-level entries: {top or 'none'}"
    )


# ------------------------------------------------------------------------------ importers
def _import_manifest(root: Path) -> list[ImageRecord]:
    with open(root / MANIFEST, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = {"path", "label", "subject_id"} - set(columns)
        if missing:
            raise DataValidationError(
                f"{root / MANIFEST}: missing column(s) {sorted(missing)}; "
                f"expected path,label,subject_id[,source], found {columns}"
            )
        rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
    records: list[ImageRecord] = []
    resolved_root = root.resolve()
    for line, row in enumerate(rows, start=2):
        rel = row["path"].replace("\\", "/")
        target = (root / rel).resolve()
        if not rel or PurePosixPath(rel).is_absolute() or not target.is_relative_to(resolved_root):
            raise DataValidationError(
                f"{root / MANIFEST} line {line}: path {rel!r} must be a relative path inside "
                "the batch folder"
            )
        records.append(ImageRecord(
            path=PurePosixPath(rel).as_posix(), kind="cell", label=row["label"],
            subject_id=row["subject_id"], source=row.get("source", ""),
            error="" if target.is_file() else "missing_file",
        ))
    return records


def _import_cnmc(root: Path) -> list[ImageRecord]:
    records = []
    for rel in _walk(root):
        m = CNMC_NAME.match(PurePosixPath(rel).name)
        label, subject = (m["label"].lower(), m["subject"]) if m else ("", "")
        records.append(ImageRecord(path=rel, kind="cell", label=label, subject_id=subject))
    return records


def _yaml_names(root: Path) -> list[str]:
    path = root / "data.yaml"
    if not path.is_file():
        raise DataValidationError(
            f"YOLO batch {root} has images/ and labels/ but no data.yaml: class names unknown"
        )
    try:
        names = (yaml.safe_load(path.read_text()) or {}).get("names")
    except (yaml.YAMLError, AttributeError) as exc:
        raise DataValidationError(f"{path} is not a YAML mapping: {exc}") from exc
    if isinstance(names, dict):
        try:
            ids = sorted(int(k) for k in names)
        except ValueError as exc:
            raise DataValidationError(f"{path}: names keys must be class ids, got {names}") from exc
        if ids != list(range(len(ids))):
            raise DataValidationError(f"{path}: class ids must be 0..n-1, got {ids}")
        return [str(names[k] if k in names else names[str(k)]) for k in ids]
    if isinstance(names, list) and names:
        return [str(n) for n in names]
    raise DataValidationError(f"{path}: 'names' must be a non-empty list or dict, got {names!r}")


def _parse_yolo(text: str, names: list[str]) -> tuple[str, dict[str, int], bool]:
    """(canonical label text, boxes declared per class, every line valid)."""
    lines, counts, ok = [], Counter(), True
    lo, hi = -_COORD_TOLERANCE, 1 + _COORD_TOLERANCE
    for raw in text.splitlines():
        tokens = raw.split()
        if not tokens:
            continue
        try:
            cls = int(tokens[0])
            values = [float(t) for t in tokens[1:]]
        except ValueError:
            ok = False
            continue
        if 0 <= cls < len(names):
            counts[names[cls]] += 1
        else:
            ok = False
        if len(values) != 4 or not all(lo <= v <= hi for v in values) or min(values[2:]) <= 0:
            ok = False
        lines.append(" ".join(tokens))
    return "\n".join(lines), dict(counts), ok


def _import_yolo(root: Path) -> list[ImageRecord]:
    names = _yaml_names(root)
    records = []
    for rel in _under(_walk(root), "images"):
        label_path = root / "labels" / PurePosixPath(rel).relative_to("images").with_suffix(".txt")
        rec = ImageRecord(path=rel, kind="field")
        if label_path.is_file():  # no label file = background image, as in Ultralytics
            try:
                text, rec.box_counts, ok = _parse_yolo(label_path.read_text(), names)
            except (OSError, UnicodeDecodeError):
                ok = False
            if ok:
                rec.yolo_labels = text
            else:
                rec.error = "bad_label_file"
        records.append(rec)
    return records


VocBox = tuple[str, float, float, float, float]  # name, xmin, ymin, xmax, ymax


def _voc_objects(xml_path: Path) -> tuple[str, int, int, list[VocBox]] | None:
    """(filename, width, height, boxes) of one annotation file, or None if unparseable."""
    try:
        tree = ET.parse(xml_path).getroot()
        size = tree.find("size")
        width = int(float(size.findtext("width", "0"))) if size is not None else 0
        height = int(float(size.findtext("height", "0"))) if size is not None else 0
        objects: list[VocBox] = []
        for obj in tree.iter("object"):
            box = obj.find("bndbox")
            name = (obj.findtext("name") or "").strip()
            x0, y0, x1, y1 = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
            if not name:
                return None
            objects.append((name, x0, y0, x1, y1))
        return (tree.findtext("filename") or "").strip(), width, height, objects
    except (ET.ParseError, AttributeError, TypeError, ValueError, OSError):
        return None


def _voc_parse_all(root: Path) -> dict[Path, tuple[str, int, int, list[VocBox]] | None]:
    return {x: _voc_objects(x) for x in sorted((root / "Annotations").glob("*.xml"))}


def _voc_names(parsed: dict[Path, tuple[str, int, int, list[VocBox]] | None]) -> list[str]:
    """Class names in order of first appearance over the sorted annotation files.

    For BCCD that is WBC, RBC, Platelets: the order TXL-PBC's data.yaml uses too.
    """
    seen: dict[str, None] = {}
    for item in parsed.values():
        for name, *_ in item[3] if item else []:
            seen.setdefault(name)
    return list(seen)


def _voc_to_yolo(objects: list[VocBox], width: int, height: int, names: list[str]) -> str:
    def clip(v: float) -> float:
        return min(1.0, max(0.0, v))

    lines = []
    for name, x0, y0, x1, y1 in objects:
        cx, cy = clip((x0 + x1) / 2 / width), clip((y0 + y1) / 2 / height)
        w, h = clip((x1 - x0) / width), clip((y1 - y0) / height)
        lines.append(f"{names.index(name)} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
    return "\n".join(lines)


def _import_voc(root: Path) -> list[ImageRecord]:
    annotations = _voc_parse_all(root)
    names = _voc_names(annotations)
    images = _under(_walk(root), "JPEGImages")
    by_stem = {PurePosixPath(p).stem: p for p in images}
    records: dict[str, ImageRecord] = {p: ImageRecord(path=p, kind="field") for p in images}
    for xml_path, parsed in annotations.items():
        rel = by_stem.get(xml_path.stem)
        if rel is None:  # an annotation whose image never arrived
            filename = parsed[0] if parsed and parsed[0] else f"{xml_path.stem}.jpg"
            rel = f"JPEGImages/{PurePosixPath(filename).name}"
            records[rel] = ImageRecord(path=rel, kind="field", error="missing_file")
        rec = records[rel]
        if parsed is None:
            rec.error = rec.error or "bad_label_file"
            continue
        _, width, height, objects = parsed
        rec.box_counts = dict(Counter(o[0] for o in objects))
        if (width <= 0 or height <= 0) and not rec.error:
            width, height = _image_size(root / rel)
        if width <= 0 or height <= 0 or any(x1 <= x0 or y1 <= y0 for _, x0, y0, x1, y1 in objects):
            rec.error = rec.error or "bad_label_file"
            continue
        rec.yolo_labels = _voc_to_yolo(objects, width, height, names)
    return [records[k] for k in sorted(records)]


def _image_size(path: Path) -> tuple[int, int]:
    """Header-only size, for VOC files whose XML omits ``<size>``."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except Exception:  # noqa: BLE001 - the metadata pass reports why the image is bad
        return 0, 0


def _import_class_folders(root: Path) -> list[ImageRecord]:
    return [
        ImageRecord(path=rel, kind="cell", label=rel.split("/", 1)[0] if "/" in rel else "")
        for rel in _walk(root)
    ]


_IMPORTERS = {
    "manifest": _import_manifest,
    "cnmc": _import_cnmc,
    "yolo": _import_yolo,
    "voc": _import_voc,
    "class_folders": _import_class_folders,
}


def given_split(layout: str, path: str) -> str:
    """The split a layout names for an image (``images/<train|val|test>/...`` of a YOLO batch),
    or "" when it names none: what ``split.keep_given`` keeps."""
    parts = PurePosixPath(path).parts
    if layout == "yolo" and len(parts) > 2 and parts[0] == "images" and parts[1] in GIVEN_SPLITS:
        return parts[1]
    return ""


def import_batch(root: Path, batch_id: str) -> tuple[str, list[ImageRecord]]:
    """Detect the layout of ``root`` and list its images; returns ``(layout, records)``.

    ``batch_id`` names the batch in error messages; records are sorted by path.
    """
    root = Path(root)
    try:
        layout = detect_layout(root)
    except DataValidationError as exc:
        raise DataValidationError(f"batch {batch_id!r}: {exc}") from exc
    records = sorted(_IMPORTERS[layout](root), key=lambda r: r.path)
    if not records:
        raise DataValidationError(
            f"batch {batch_id!r} at {root} looks like layout {layout!r} but holds no images"
        )
    return layout, records


def class_names(root: Path, layout: str) -> list[str]:
    """Class names indexed by the ids in ``ImageRecord.yolo_labels`` (fields); [] otherwise."""
    root = Path(root)
    if layout == "yolo":
        return _yaml_names(root)
    if layout == "voc":
        return _voc_names(_voc_parse_all(root))
    return []


def unlisted_files(root: Path, layout: str, record_paths: set[str]) -> dict[str, str]:
    """Every file under ``root`` that is not one of ``record_paths``, with why it is not.

    Reasons: ``batch_metadata`` (completion marker, the batch's manifest.csv), ``hidden_file``,
    ``label_file`` / ``layout_file`` (YOLO labels and data.yaml, VOC annotations: read with
    their image), ``not_an_image:<suffix>`` (documents and other sidecars), ``not_in_manifest``
    (a manifest batch's file the manifest does not name), ``outside_image_folder`` (YOLO/VOC
    files outside ``images/`` or ``JPEGImages/``), ``not_listed`` otherwise.
    """
    root = Path(root)
    out: dict[str, str] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel in record_paths:
            continue
        parts = PurePosixPath(rel).parts
        if rel in (READY_MARKER, MANIFEST):
            why = "batch_metadata"
        elif any(part.startswith(".") for part in parts):
            why = "hidden_file"
        elif layout == "yolo" and rel == "data.yaml":
            why = "layout_file"
        elif (layout == "yolo" and parts[0] == "labels" and rel.endswith(".txt")) or (
                layout == "voc" and parts[0] == "Annotations" and rel.endswith(".xml")):
            why = "label_file"
        elif _is_sidecar(path.name):
            why = f"not_an_image:{PurePosixPath(rel).suffix.lower() or path.name}"
        elif layout == "manifest":
            why = "not_in_manifest"
        elif layout in ("yolo", "voc"):
            why = "outside_image_folder"
        else:
            why = "not_listed"
        out[rel] = why
    return out
