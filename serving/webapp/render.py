"""What the pages draw, server-side: probability bars (inline SVG), boxes on a field, data URIs.

Nothing here loads a script or a font from anywhere: charts are SVG in the page, boxes are drawn
into the PNG with Pillow's built-in font.
"""

from __future__ import annotations

import base64
import html
import io
from collections import Counter
from typing import Any

from PIL import Image, ImageDraw, ImageFont

__all__ = ["box_counts", "data_uri", "draw_boxes", "probability_svg", "thumbnail"]

_PALETTE = ("#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2")
DISPLAY_SIDE = 900  # longest side of an image shown on a page


def data_uri(png: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(png).decode("ascii")


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def thumbnail(img: Image.Image, side: int = 300) -> bytes:
    """The uploaded image scaled to fit ``side`` (never up), as PNG bytes."""
    out = img.convert("RGB").copy()
    out.thumbnail((side, side))
    return _png(out)


def probability_svg(probabilities: dict[str, float], best: str) -> str:
    """Horizontal bars, one per class, largest first; the predicted class is highlighted."""
    rows = sorted(probabilities.items(), key=lambda kv: -kv[1])
    width, bar_x, bar_w, row_h = 420, 110, 240, 26
    height = row_h * len(rows) + 8
    parts = [f'<svg class="probs" xmlns="http://www.w3.org/2000/svg" width="{width}" '
             f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
             'aria-label="class probabilities">']
    for i, (label, p) in enumerate(rows):
        y = 4 + i * row_h
        w = max(0.0, min(1.0, float(p))) * bar_w
        color = "#b5172b" if label == best else "#7a8ca3"
        name = html.escape(str(label))
        parts.append(
            f'<g class="bar" data-label="{name}" data-probability="{p:.6f}">'
            f'<text x="{bar_x - 8}" y="{y + 17}" text-anchor="end" font-size="14">{name}</text>'
            f'<rect x="{bar_x}" y="{y + 3}" width="{bar_w}" height="{row_h - 8}" fill="#eef0f3"/>'
            f'<rect x="{bar_x}" y="{y + 3}" width="{w:.1f}" height="{row_h - 8}" '
            f'fill="{color}"/>'
            f'<text x="{bar_x + bar_w + 8}" y="{y + 17}" font-size="14">{p * 100:.1f}%</text>'
            "</g>")
    parts.append("</svg>")
    return "".join(parts)


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)  # Pillow's embedded font (FreeType)
    except (TypeError, OSError):  # Pillow without FreeType: the bitmap font
        return ImageFont.load_default()


def draw_boxes(img: Image.Image, boxes: list[dict[str, Any]], classes: list[str]) -> bytes:
    """The field with every box drawn and labelled ``label confidence``; PNG bytes.

    Scaled down to ``DISPLAY_SIDE`` first, boxes with it, so line widths stay readable.
    """
    out = img.convert("RGB").copy()
    scale = min(1.0, DISPLAY_SIDE / max(out.size))
    if scale < 1.0:
        out = out.resize((round(out.width * scale), round(out.height * scale)))
    draw = ImageDraw.Draw(out)
    font = _font(max(12, out.width // 50))
    line = max(2, out.width // 300)
    for box in boxes:
        label = str(box["label"])
        color = _PALETTE[(classes.index(label) if label in classes else len(classes))
                         % len(_PALETTE)]
        x1, y1, x2, y2 = (float(box[k]) * scale for k in ("x1", "y1", "x2", "y2"))
        draw.rectangle((x1, y1, x2, y2), outline=color, width=line)
        text = f"{label} {float(box['confidence']):.2f}"
        left, top, right, bottom = draw.textbbox((x1, y1), text, font=font)
        ty = y1 - (bottom - top) - 4 if y1 - (bottom - top) - 4 >= 0 else y1
        draw.rectangle((x1, ty, x1 + (right - left) + 6, ty + (bottom - top) + 4), fill=color)
        draw.text((x1 + 3, ty + 1 - (top - y1)), text, fill="white", font=font)
    return _png(out)


def box_counts(boxes: list[dict[str, Any]]) -> list[tuple[str, int]]:
    """(class, count) sorted by count, then name."""
    return sorted(Counter(str(b["label"]) for b in boxes).items(), key=lambda kv: (-kv[1], kv[0]))
