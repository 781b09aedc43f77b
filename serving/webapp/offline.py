"""GX Data Docs without the internet: CDN links rewritten to the copies in ``static/vendor``.

GX 1.x Data Docs load Bootstrap, jQuery, bootstrap-table, Font Awesome, Vega and more from
public CDNs; on a clinical network without internet they render as unstyled text. The pages
are served by the web app with every such URL rewritten to the vendored file (same versions,
from npm; licences beside them in ``static/vendor/LICENSES``). The optional dark-mode sheet
(``@forevolve/bootstrap-dark``, 880 KB) is dropped instead: the light theme is complete
without it. Any other external ``<script src>`` or stylesheet that a future GX adds is removed,
so a page never waits for a network that is not there (``test_no_external_urls`` lists them).
"""

from __future__ import annotations

import re

__all__ = ["CDN_MAP", "DROPPED", "external_urls", "rewrite_data_docs"]

CDN_MAP = {
    "https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css":
        "bootstrap/bootstrap.min.css",
    "https://stackpath.bootstrapcdn.com/bootstrap/4.3.1/js/bootstrap.min.js":
        "bootstrap/bootstrap.min.js",
    "https://code.jquery.com/jquery-3.7.1.min.js": "jquery/jquery.min.js",
    "https://cdnjs.cloudflare.com/ajax/libs/popper.js/1.12.9/umd/popper.min.js":
        "popper/popper.min.js",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.css":
        "bootstrap-table/bootstrap-table.min.css",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.js":
        "bootstrap-table/bootstrap-table.min.js",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/extensions/filter-control/"
    "bootstrap-table-filter-control.min.js":
        "bootstrap-table/bootstrap-table-filter-control.min.js",
    "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/"
    "bootstrap-table-filter-control.css": "bootstrap-table/bootstrap-table-filter-control.min.css",
    "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/"
    "bootstrap-table-filter-control.min.css":
        "bootstrap-table/bootstrap-table-filter-control.min.css",
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/css/"
    "bootstrap-datepicker.min.css": "bootstrap-datepicker/bootstrap-datepicker.min.css",
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/js/"
    "bootstrap-datepicker.min.js": "bootstrap-datepicker/bootstrap-datepicker.min.js",
    "https://cdnjs.cloudflare.com/ajax/libs/font-awesome/6.6.0/css/all.min.css":
        "fontawesome/css/all.min.css",
    "https://cdn.jsdelivr.net/npm/vega@5": "vega/vega.min.js",
    "https://cdn.jsdelivr.net/npm/vega-lite@5": "vega/vega-lite.min.js",
    "https://cdn.jsdelivr.net/npm/vega-embed@6": "vega/vega-embed.min.js",
}
DROPPED = ("https://cdn.jsdelivr.net/npm/@forevolve/bootstrap-dark@1.1.0/dist/css/"
           "bootstrap-prefers-dark.css",)

_TAG_URL = re.compile(r"""<(?:link|script)\b[^>]*?(?:href|src)\s*=\s*["'](https?://[^"']+)["']""",
                      re.IGNORECASE)
_LINK_TAG = re.compile(r"<link\b[^>]*>", re.IGNORECASE)
_SCRIPT_TAG = re.compile(r"<script\b[^>]*\bsrc\s*=\s*[\"']https?://[^>]*>\s*</script>",
                         re.IGNORECASE)


def external_urls(page: str) -> list[str]:
    """URLs that a ``<link>`` or ``<script>`` tag of the page would fetch from the network."""
    return sorted(set(_TAG_URL.findall(page)))


def rewrite_data_docs(page: str, vendor_base: str) -> str:
    """Point every known CDN asset at ``vendor_base/<file>``; drop the rest (see module doc)."""
    vendor_base = vendor_base.rstrip("/")
    for url, local in CDN_MAP.items():
        page = page.replace(url, f"{vendor_base}/{local}")

    def drop_link(match: re.Match[str]) -> str:
        tag = match.group(0)
        return "" if re.search(r"""href\s*=\s*["']https?://""", tag, re.IGNORECASE) and \
            re.search(r"stylesheet", tag, re.IGNORECASE) else tag

    page = _LINK_TAG.sub(drop_link, page)
    return _SCRIPT_TAG.sub("", page)
