"""The search report: HTML pages that show each query beside its top-k gallery matches.

A page holds ``per_page`` queries, one row each: the query image, then its matches, each with its
rank, distance and decision, framed in the decision's colour (same: green, different: red, not
decided: grey). Pages are self-contained: every image is embedded as a JPEG data URI at most
``THUMB_HEIGHT`` pixels high, so a page opens quickly and still shows its images after the gallery
moves. Page 1 is ``report.html``, page n ``report-<n>.html``, linked to each other. An image that
cannot be read when the report is written is shown as a grey box with its name.
"""
from __future__ import annotations

import base64
import html
import io
import os.path as osp
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

from PIL import Image

__all__ = ["THUMB_HEIGHT", "DECISION_COLOURS", "GENERATOR", "QueryRow", "page_name", "thumbnail_uri",
           "render_pages"]

THUMB_HEIGHT = 128
DECISION_COLOURS = {"same": "#2e7d32", "different": "#c62828", "not decided": "#9e9e9e"}
GENERATOR = "torchreid-ext-search"  # <meta name="generator">: marks the pages this module writes


class QueryRow(NamedTuple):
    """One query and its matches, best first: ``(gallery path, distance, decision)``."""

    query: str
    matches: List[Tuple[str, float, str]]


def page_name(page: int) -> str:
    """File name of page ``page`` (1-based)."""
    return "report.html" if page == 1 else f"report-{page}.html"


def thumbnail_uri(path: str, height: int = THUMB_HEIGHT) -> Optional[str]:
    """``data:image/jpeg;base64,...`` of the image scaled down to at most ``height`` pixels high
    (never up), or None when it cannot be read."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    if img.height > height:
        img = img.resize((max(1, round(img.width * height / img.height)), height), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_STYLE = """
body { font-family: sans-serif; margin: 16px; background: #fafafa; color: #222; }
h1 { font-size: 20px; margin: 0 0 4px 0; }
.info, .nav { font-size: 13px; margin: 4px 0 12px 0; }
.legend span { display: inline-block; padding: 1px 6px; margin-right: 8px; border: 3px solid; }
.query-row { display: flex; align-items: flex-start; gap: 8px; padding: 8px 0; border-top: 1px solid #ddd; }
figure { margin: 0; text-align: center; font-size: 11px; }
figure img, figure .missing { display: block; height: %(h)dpx; border: 4px solid; box-sizing: content-box; }
figure .missing { width: %(w)dpx; background: #ccc; overflow: hidden; word-break: break-all; }
.query img, .query .missing { border-color: #1565c0; }
figcaption { max-width: 140px; overflow-wrap: anywhere; }
.name { color: #666; }
.arrow { align-self: center; font-size: 20px; color: #888; }
"""


def _figure(uri: Optional[str], path: str, caption: str, classes: str, colour: str = "", height: int = 128,
            tooltip: str = "") -> str:
    style = f' style="border-color: {colour}"' if colour else ""
    title = html.escape(tooltip or path)
    if uri is None:
        img = f'<div class="missing"{style} title="{title}">{html.escape(osp.basename(path))} (not readable)</div>'
    else:
        img = f'<img src="{uri}" alt="{html.escape(osp.basename(path))}" title="{title}"{style}>'
    return f'<figure class="{classes}">{img}<figcaption>{caption}</figcaption></figure>'


def _nav(page: int, pages: int) -> str:
    if pages == 1:
        return '<div class="nav">page 1 of 1</div>'
    links = [f'<a href="{page_name(p)}">{p}</a>' if p != page else f"<b>{p}</b>" for p in range(1, pages + 1)]
    prev = f'<a class="prev" href="{page_name(page - 1)}">previous</a> ' if page > 1 else ""
    nxt = f' <a class="next" href="{page_name(page + 1)}">next</a>' if page < pages else ""
    return f'<div class="nav">{prev}page {page} of {pages}: {" ".join(links)}{nxt}</div>'


def render_pages(rows: Sequence[QueryRow], per_page: int = 20, title: str = "Search results",
                 info: str = "", height: int = THUMB_HEIGHT) -> List[Tuple[str, str]]:
    """``[(file name, html), ...]``: the pages of ``rows``, ``per_page`` queries each.

    ``info`` (plain text) is shown under the title: the model, the threshold and where it came from.
    Images are read here; each is encoded once however often it appears.
    """
    if per_page < 1:
        raise ValueError(f"per_page = {per_page} must be an integer >= 1")
    uris: Dict[str, Optional[str]] = {}

    def uri(path: str) -> Optional[str]:
        if path not in uris:
            uris[path] = thumbnail_uri(path, height)
        return uris[path]

    pages = max(1, -(-len(rows) // per_page))
    legend = "".join(f'<span style="border-color: {c}">{d}</span>' for d, c in DECISION_COLOURS.items())
    out = []
    for page in range(1, pages + 1):
        first = (page - 1) * per_page
        body = []
        for number, row in enumerate(rows[first:first + per_page], start=first + 1):
            cells = [_figure(uri(row.query), row.query, f"query {number}<br>{html.escape(osp.basename(row.query))}",
                             "query", height=height), '<div class="arrow">&rarr;</div>']
            for rank, (path, distance, decision) in enumerate(row.matches, start=1):
                caption = (f'<span class="rank">#{rank}</span> <span class="distance">{distance:.4g}</span><br>'
                           f'<span class="decision">{html.escape(decision)}</span><br>'
                           f'<span class="name">{html.escape(osp.basename(path))}</span>')
                cells.append(_figure(uri(path), path, caption, f"match {decision.replace(' ', '-')}",
                                     DECISION_COLOURS.get(decision, "#9e9e9e"), height,
                                     f"{path}\nrank {rank}, distance {distance:.6g}, {decision}"))
            body.append(f'<div class="query-row" data-query="{html.escape(row.query)}">{"".join(cells)}</div>')
        nav = _nav(page, pages)
        out.append((page_name(page), "\n".join([
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f'<meta name="generator" content="{GENERATOR}">',
            f"<title>{html.escape(title)} ({page}/{pages})</title>",
            f"<style>{_STYLE % {'h': height, 'w': height // 2}}</style></head><body>",
            f"<h1>{html.escape(title)}</h1>",
            f'<div class="info">{html.escape(info)}</div>' if info else "",
            f'<div class="legend">{legend}</div>',
            nav, *body, nav,
            "</body></html>",
        ])))
    return out
