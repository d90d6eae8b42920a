"""A self-contained HTML rendering: inline CSS, PNGs as base64 data URIs, no external links."""

from __future__ import annotations

import base64
from html import escape

from .document import Document, Heading, Image, Paragraph, Table, format_cells

__all__ = ["render_html"]

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1100px; color: #222; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.3em; }
h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
p.completeness { font-family: ui-monospace, monospace; font-size: 1.05em; background: #f3f6fa;
                 border-left: 4px solid #1f77b4; padding: 0.4em 0.8em; margin-top: 0; }
p.note { color: #666; font-style: italic; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
th { background: #f0f0f0; }
td.text, th.text { text-align: left; }
caption { caption-side: top; text-align: left; color: #555; padding-bottom: 0.3em; }
img { max-width: 100%; display: block; margin: 0.6em 0; }
"""


def _table(block: Table) -> str:
    header, rows = format_cells(block.frame)
    numeric = [block.frame[c].dtype.kind in "iuf" for c in block.frame.columns]
    cls = ["" if n else ' class="text"' for n in numeric]
    out = ["<table>"]
    if block.caption:
        out.append(f"<caption>{escape(block.caption)}</caption>")
    out.append("<tr>" + "".join(f"<th{c}>{escape(h)}</th>" for c, h in zip(cls, header)) + "</tr>")
    for row in rows:
        out.append("<tr>" + "".join(f"<td{c}>{escape(v)}</td>" for c, v in zip(cls, row)) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def render_html(doc: Document) -> str:
    """The whole report as one HTML page with everything embedded."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(doc.title)}</title>",
        f"<style>{_CSS}</style>",
        "</head><body>",
        f"<h1>{escape(doc.title)}</h1>",
    ]
    for block in doc.blocks:
        if isinstance(block, Heading):
            level = min(max(block.level, 2), 4)
            parts.append(f"<h{level}>{escape(block.text)}</h{level}>")
        elif isinstance(block, Paragraph):
            parts.append(f'<p class="{escape(block.role)}">{escape(block.text)}</p>')
        elif isinstance(block, Table):
            parts.append(_table(block))
        elif isinstance(block, Image):
            data = base64.b64encode(block.png).decode("ascii")
            parts.append(f'<img src="data:image/png;base64,{data}" alt="{escape(block.alt)}">')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
