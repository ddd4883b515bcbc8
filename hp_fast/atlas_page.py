"""The head atlas page: one self-contained HTML file (inline CSS and JS, no network).

``render_page(data)`` fills ``atlas_template.html`` (shipped with the package) with the
title and the atlas data, inlined as JSON in a ``<script type="application/json">`` block.
The JSON is made safe to inline: ``<``, ``>`` and ``&`` are written as ``\\u003c`` etc., so
no token text can close the script block.
"""
from __future__ import annotations

import html
import json
from importlib import resources

TEMPLATE = "atlas_template.html"
DATA_SLOT = "__ATLAS_DATA__"
TITLE_SLOT = "__ATLAS_TITLE__"


def template_text() -> str:
    """The page template (package data)."""
    return resources.files("hp_fast").joinpath(TEMPLATE).read_text(encoding="utf-8")


def inline_json(data: dict) -> str:
    """JSON of ``data`` that can sit inside a <script> element (no NaN: strict JSON)."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False)
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def render_page(data: dict) -> str:
    """The full HTML page for ``data`` (an atlas dict, ``hp_fast.atlas.build_atlas``)."""
    parts = template_text().split(DATA_SLOT)
    if len(parts) != 2 or TITLE_SLOT not in parts[0]:
        raise RuntimeError(f"{TEMPLATE} lacks its {DATA_SLOT} or {TITLE_SLOT} slot; reinstall hp_fast")
    title = html.escape(str(data.get("title", "Head atlas")))
    head, tail = (p.replace(TITLE_SLOT, title) for p in parts)
    return head + inline_json(data) + tail
