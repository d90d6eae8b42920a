"""Markdown rendering (images as relative links to the PNG files) and the CSV writer."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from .document import Document, Heading, Image, Paragraph, Table, format_cells

__all__ = ["render_markdown", "write_csvs"]


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(block: Table) -> list[str]:
    header, rows = format_cells(block.frame)
    lines = [f"*{_escape(block.caption)}*", ""] if block.caption else []
    lines.append("| " + " | ".join(_escape(h) for h in header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines.extend("| " + " | ".join(_escape(v) for v in row) + " |" for row in rows)
    return lines


def render_markdown(doc: Document) -> str:
    """The report as markdown; images point at the PNG files written next to it."""
    lines = [f"# {_escape(doc.title)}", ""]
    for block in doc.blocks:
        if isinstance(block, Heading):
            lines += ["#" * min(max(block.level, 2), 4) + " " + _escape(block.text), ""]
        elif isinstance(block, Paragraph):
            lines += [f"*{_escape(block.text)}*" if block.role == "note" else block.text, ""]
        elif isinstance(block, Table):
            lines += _table(block) + [""]
        elif isinstance(block, Image):
            lines += [f"![{_escape(block.alt)}]({block.name})", ""]
    return "\n".join(lines)


def write_csvs(frames: Mapping[str, pd.DataFrame], out_dir: Path) -> dict[str, Path]:
    """Write each frame to `<out_dir>/<name>.csv` (no index); returns name → path."""
    paths = {}
    for name, frame in frames.items():
        path = out_dir / f"{name}.csv"
        frame.to_csv(path, index=False)
        paths[name] = path
    return paths
