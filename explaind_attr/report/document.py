"""A report as an ordered list of blocks, rendered to HTML and markdown alike.

Keeping the content format-neutral means both renderers show the same things in the same
order: the builder decides what comes first (the completeness residual), not the renderer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

__all__ = ["Document", "Heading", "Image", "Paragraph", "Table", "format_cells"]


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    text: str
    role: str = "text"  # "text" | "completeness" | "note"


@dataclass(frozen=True)
class Table:
    frame: pd.DataFrame
    caption: str = ""


@dataclass(frozen=True)
class Image:
    name: str  # file name of the PNG next to the report
    png: bytes
    alt: str


@dataclass
class Document:
    title: str
    blocks: list[Heading | Paragraph | Table | Image] = field(default_factory=list)

    def add(self, *blocks: Heading | Paragraph | Table | Image) -> None:
        self.blocks.extend(blocks)

    @property
    def images(self) -> list[Image]:
        return [b for b in self.blocks if isinstance(b, Image)]


def _cell(value: object) -> str:
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.4g}"
    return str(value)


def format_cells(frame: pd.DataFrame) -> tuple[list[str], list[Sequence[str]]]:
    """(header, rows) with floats at 4 significant digits, everything else as str()."""
    header = [str(c) for c in frame.columns]
    rows = [[_cell(v) for v in row] for row in frame.itertuples(index=False, name=None)]
    return header, rows
