"""Explanation cards: one test input per card, as the report shows the first few.

Each card is `explain(result, i)` laid out as report blocks: the headline (label,
prediction, f_0 → f_T), the input itself, the exact terms, the top proponents and
opponents with their inputs, labels and ids, the modules, and the step curve with the
windows of largest change shaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from explaind_kernel.result import KernelResult

from ..explanation import Explanation, explain, headline, input_text
from . import plots
from .document import Heading, Image, Paragraph, Table
from .samples import image_of, sample_array

__all__ = ["card_blocks"]

_MODULES = 8  # modules listed per card (largest |contribution| first)


def _side_table(frame: pd.DataFrame) -> pd.DataFrame:
    shown = frame.copy()
    shown["input"] = [input_text(v) if v is not None else "" for v in shown["input"]]
    if shown["label"].isna().all():
        shown = shown.drop(columns="label")
    if (shown["input"] == "").all():
        shown = shown.drop(columns="input")
    return shown


def _images(frame: pd.DataFrame, role: str) -> list[tuple[str, np.ndarray]]:
    out = []
    for rank, sid, value, x in zip(frame["rank"], frame["sample"], frame["value"], frame["input"]):
        arr = None if x is None else sample_array(x)
        img = image_of(arr) if arr is not None else None
        if img is not None:
            out.append((f"{role} #{rank} {str(sid)[:10]}\n{value:+.3g}", img))
    return out


def card_blocks(
    result: KernelResult,
    i: int,
    *,
    inputs: Any = None,
    samples: Mapping[Any, Any] | None = None,
    train_labels: Any = None,
    k: int = 5,
) -> tuple[Explanation, list[Any]]:
    """(the Explanation of test input i, the report blocks of its card)."""
    e = explain(result, i, k=k, inputs=inputs, samples=samples, train_labels=train_labels)
    blocks: list[Any] = [Heading(headline(e), level=3)]
    if e.input is not None:
        img = image_of(e.input)
        if img is not None:
            png = plots.figure_png(plots.image_figure(img), dpi=70)
            blocks.append(Image(f"card{i}_input.png", png, f"test input {i}"))
        else:
            blocks.append(Paragraph(f"input: {input_text(e.input)}"))
    change = e.fT - e.f0
    data = float(e.terms.set_index("term").loc["data", "value"])
    blocks.append(
        Paragraph(
            f"Of the change {change:+.4g}, the training data contributed {data:+.4g}; the "
            "table lists every term (they add up to fT)."
        )
    )
    blocks.append(Table(e.terms, f"Terms of {e.output} for test input {i}"))
    for title, frame in (("Proponents", e.proponents), ("Opponents", e.opponents)):
        if len(frame):
            push = "up" if title == "Proponents" else "down"
            blocks.append(
                Table(_side_table(frame), f"{title}: training samples that pushed {push}")
            )
    pictures = _images(e.proponents, "+") + _images(e.opponents, "−")
    if pictures:
        fig = plots.sample_images_figure(pictures, ncols=min(5, len(pictures)))
        blocks.append(Image(f"card{i}_samples.png", plots.figure_png(fig), f"samples {i}"))
    mods = e.modules.reindex(e.modules["value"].abs().sort_values(ascending=False).index)
    blocks.append(Table(mods.head(_MODULES), "Modules (largest |contribution| first)"))
    steps = np.arange(result.num_steps + 1)
    cumulative = np.concatenate([[0.0], e.steps["cumulative"].to_numpy()])
    spans = [
        (float(a), float(b), f"{c:+.3g}")
        for a, b, c in zip(e.windows["window_start"], e.windows["window_stop"], e.windows["change"])
    ]
    fig = plots.curve_figure(
        steps,
        {e.output: e.f0 + cumulative},
        ylabel=f"{e.output}",
        title=f"{e.output} over training (shaded: the windows of largest change)",
        spans=spans,
        size=(6.0, 2.6),
    )
    blocks.append(Image(f"card{i}_curve.png", plots.figure_png(fig), f"step curve {i}"))
    return e, blocks
