"""`build_report`: one call from a KernelResult to report.html, report.md, CSVs and PNGs.

The report reads top-down: the title, the completeness line, a short summary, the table of
terms and the reconstructed-vs-actual scatter; then one explanation card per test input
for the first `cards` inputs (explain(result, i): its input, label, prediction, terms,
proponents and opponents, modules, step curve); then the aggregates over all rows —
training steps (with named phases when given), model components, training data.

Aggregates say what they aggregate. When every row explains one comparable value per test
input (one output of a named target: loss, margin, label, predicted) they are signed means
over the inputs; otherwise (several outputs, e.g. the logits of different classes, whose
signs mean different things) they are means of |·|. A section or plot appears only when
the result holds what it shows. The CSVs hold every row.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from explaind_kernel.result import TERM_FIELDS, KernelResult

from .._common import slice_indices
from ..data import data_attribution, top_samples
from ..errors import ReportError, ViewError
from ..groups import GroupSpec
from ..joint import component_window_view, group_component_view, group_window_view
from ..model import component_attribution, module_attribution, param_score_table, slice_attribution
from ..training import cumulative_curve, phase_boundaries, step_attribution
from ..views import Attribution
from . import plots
from .cards import card_blocks
from .document import Document, Heading, Image, Paragraph, Table
from .html import render_html
from .markdown import render_markdown, write_csvs
from .phases import Phase, phase_table
from .samples import image_of, sample_array, text_of

__all__ = ["ReportPaths", "build_report"]

log = logging.getLogger(__name__)

_MAX_ROWS = 30  # rows of a table or heatmap before the rest is merged or cut
_DETAIL_ROWS = 3  # (test, output) rows whose proponents/opponents are listed in the report


@dataclass(frozen=True)
class ReportPaths:
    """Where `build_report` wrote things: name → path for the CSVs and the PNG plots."""

    out_dir: Path
    html: Path
    markdown: Path
    csvs: dict[str, Path]
    plots: dict[str, Path]


def _terms_frame(result: KernelResult) -> pd.DataFrame:
    """Per (test, output) row: f_0, data, every term, reconstruction, f_T and what is left."""
    n, o = result.f0.shape
    cols: dict[str, Any] = {
        "test": np.repeat(np.arange(n), o),
        "output": np.tile(np.asarray(result.output_names, dtype=object), n),
        "f0": result.f0.reshape(-1),
        "data": result.data_total.reshape(-1),
    }
    for name in TERM_FIELDS:
        cols[name] = getattr(result, name).reshape(-1)
    cols["reconstructed"] = result.reconstructed.reshape(-1)
    cols["fT"] = result.fT.reshape(-1)
    cols["completeness_residual"] = result.completeness_residual.reshape(-1)
    return pd.DataFrame(cols)


@dataclass(frozen=True)
class _Agg:
    """How aggregates over the (input, output) rows are formed, and how that is said."""

    signed: bool
    what: str  # e.g. "mean over the 16 test inputs"
    value: str  # the explained value, e.g. "margin"

    @classmethod
    def of(cls, r: KernelResult) -> _Agg:
        target = r.extra.get("target")
        value = r.output_names[0] if r.num_outputs == 1 else "output"
        if r.num_outputs == 1 and target not in (None, "all"):
            return cls(True, f"mean over the {r.num_inputs} test inputs", value)
        return cls(
            False, f"mean |·| over the {r.num_inputs}×{r.num_outputs} (input, output) rows", value
        )

    def __call__(self, v: np.ndarray) -> np.ndarray:
        return v.mean(axis=(0, 1)) if self.signed else np.abs(v).mean(axis=(0, 1))

    @property
    def unit(self) -> str:
        return f"contribution to {self.value}" + ("" if self.signed else " (|·|)")


def _term_table(terms: pd.DataFrame) -> pd.DataFrame:
    """One row per quantity: mean |·| and max |·| over all (test, output) rows."""
    rows = []
    for name in terms.columns[2:]:
        v = np.abs(terms[name].to_numpy())
        rows.append((name, v.mean(), v.max()))
    return pd.DataFrame.from_records(rows, columns=["quantity", "mean |·|", "max |·|"])


def _summary(view: Attribution, agg: _Agg) -> tuple[pd.DataFrame, int]:
    """The aggregate per part (strongest first by mean |·|, at most _MAX_ROWS), then terms."""
    v = view.values
    strength = np.abs(v).mean(axis=(0, 1))
    parts = [i for i, k in enumerate(view.kinds) if k != "term"]
    terms = [i for i, k in enumerate(view.kinds) if k == "term"]
    shown = sorted(parts, key=lambda i: -strength[i])[:_MAX_ROWS] + terms
    frame = pd.DataFrame(
        {
            view.axis: pd.Series([view.labels[i] for i in shown], dtype=object),
            "kind": [view.kinds[i] for i in shown],
            ("mean" if agg.signed else "mean |·|"): agg(v)[shown],
            "max |·|": np.abs(v).max(axis=(0, 1))[shown],
        }
    )
    return frame, len(parts) - min(len(parts), _MAX_ROWS)


def _summary_text(r: KernelResult) -> str:
    """Two sentences: what was explained, and where the change came from."""
    target = r.extra.get("target", "the outputs")
    mods = module_attribution(r)
    parts = [i for i, k in enumerate(mods.kinds) if k != "term"]
    strongest = max(parts, key=lambda i: np.abs(mods.values[..., i]).sum()) if parts else None
    outputs = ", ".join(r.output_names[:4]) + (" …" if r.num_outputs > 4 else "")
    text = (
        f"Explained: {target} ({outputs}) of {r.num_inputs} test inputs, over {r.num_steps} "
        f"steps and {len(r.sample_ids)} training samples (trace {r.trace_id}). On average over "
        f"the (input, output) rows f_T − f_0 = {np.mean(r.fT - r.f0):+.4g}: training data "
        f"{np.mean(r.data_total):+.4g}, weight decay {np.mean(r.weight_decay):+.4g}, every "
        f"other term {np.mean(r.fT - r.f0 - r.data_total - r.weight_decay):+.4g}"
    )
    if strongest is not None:
        text += f"; the module with the largest contribution is {mods.labels[strongest]}"
    return text + "."


def _cap(
    matrix: np.ndarray, labels: Sequence[str], other: str, axis: int
) -> tuple[np.ndarray, list[str]]:
    """Keep the _MAX_ROWS strongest entries along `axis`, the rest summed into `other`."""
    matrix = np.moveaxis(matrix, axis, 0)
    if matrix.shape[0] <= _MAX_ROWS:
        return np.moveaxis(matrix, 0, axis), list(labels)
    strength = np.abs(matrix).reshape(matrix.shape[0], -1).sum(axis=1)
    keep = sorted(np.argsort(-strength, kind="stable")[: _MAX_ROWS - 1])
    rest = [i for i in range(matrix.shape[0]) if i not in set(keep)]
    out = np.concatenate([matrix[keep], matrix[rest].sum(axis=0, keepdims=True)], axis=0)
    return np.moveaxis(out, 0, axis), [labels[i] for i in keep] + [other]


class _Builder:
    def __init__(self, result: KernelResult, out_dir: Path, title: str, top_k: int) -> None:
        self.result = result
        self.out_dir = out_dir
        self.top_k = top_k
        self.doc = Document(title)
        self.csv: dict[str, pd.DataFrame] = {}
        self.agg = _Agg.of(result)

    def image(self, name: str, fig: Any, alt: str) -> None:
        self.doc.add(Image(f"{name}.png", plots.figure_png(fig), alt))

    def opening(self) -> None:
        r = self.result
        terms = _terms_frame(r)
        self.csv["terms"] = terms
        self.csv["result"] = r.to_frame()
        self.doc.add(
            Paragraph(r.completeness_line(), role="completeness"), Paragraph(_summary_text(r))
        )
        self.doc.add(
            Table(_term_table(terms), "Decomposition f_T = f_0 + data + terms: |·| over all rows")
        )
        self.image("completeness", plots.completeness_figure(r), "reconstructed vs actual outputs")

    def cards(self, n: int, inputs: Any, samples: Any, train_labels: Any) -> None:
        r = self.result
        if n < 1:
            return
        self.doc.add(
            Heading(f"One prediction at a time: the first {min(n, r.num_inputs)} test inputs")
        )
        for i in range(min(n, r.num_inputs)):
            _, blocks = card_blocks(
                r,
                i,
                inputs=inputs,
                samples=samples,
                train_labels=train_labels,
                k=self.top_k // 2 or 1,
            )
            self.doc.add(*blocks)

    def steps(self, history: pd.DataFrame | None, phases: Any, groups: Any) -> None:
        r, agg = self.result, self.agg
        self.doc.add(Heading("Training steps"))
        spans = [(float(a), float(b), name) for name, a, b in phases or ()]
        if history is not None:
            steps = history["step"].to_numpy()
            curves = {c: history[c].to_numpy() for c in history.columns if c != "step"}
            fig = plots.curve_figure(
                steps, curves, ylabel="value", title="Training curves", spans=spans
            )
            self.image("history", fig, "training curves")
        per_step = step_attribution(r)
        mean = agg(per_step.values)  # [T, F]
        cumulative = np.concatenate([np.zeros((1, mean.shape[1])), np.cumsum(mean, axis=0)])
        ylabel = f"cumulative {agg.unit}, {agg.what}"
        self.image(
            "steps",
            plots.steps_figure(
                np.asarray(per_step.edges), cumulative, per_step.terms, ylabel=ylabel
            ),
            "cumulative contributions over training",
        )
        windows = step_attribution(r, edges="windows")
        self.csv["steps"] = windows.to_frame()
        self.csv["curve"] = cumulative_curve(r)
        self.csv["phases"] = phase_boundaries(r)
        wmean = agg(windows.values)
        table = pd.DataFrame(wmean, columns=list(windows.terms))
        table.insert(0, "window_stop", windows.edges[1:])
        table.insert(0, "window_start", windows.edges[:-1])
        if agg.signed:
            table["total"] = wmean.sum(axis=1)
        self.doc.add(Table(table.head(_MAX_ROWS), f"Per step window: {agg.unit}, {agg.what}"))
        if phases:
            frame = phase_table(
                r, phases, component_groups=groups, reduce="mean" if agg.signed else "abs"
            )
            self.csv["phase_drivers"] = frame
            self.doc.add(
                Heading("What drove each phase", level=3),
                Table(frame, f"Per phase: change, strongest components and samples ({agg.what})"),
            )

    def components(self) -> None:
        r, agg = self.result, self.agg
        self.doc.add(Heading("Model components"))
        comps = component_attribution(r)
        self.csv["components"] = comps.to_frame()
        self.csv["modules"] = module_attribution(r).to_frame()
        if slice_indices(r):
            self.csv["slices"] = slice_attribution(r).to_frame()
        frame, cut = _summary(module_attribution(r), agg)
        self.doc.add(Table(frame, f"Per module (sum of its tensors): {agg.unit}, {agg.what}"))
        frame, cut = _summary(comps, agg)
        self.doc.add(Table(frame, f"Per parameter tensor: {agg.unit}, {agg.what}"))
        if cut:
            self.doc.add(Paragraph(f"{cut} weaker tensors not shown; see components.csv.", "note"))
        if r.param_scores is not None:
            self.csv["param_scores"] = param_score_table(r)
        if r.component_window is None:
            return
        cw = component_window_view(r)
        self.csv["component_window"] = cw.to_frame()
        matrix, rows = _cap(agg(cw.values), cw.row_labels, "(other tensors)", 0)
        fig = plots.heatmap_figure(
            matrix,
            rows,
            cw.col_labels,
            title=f"Component × step window ({agg.what})",
            xlabel="step window",
            ylabel="parameter tensor",
            unit=agg.unit,
            signed=agg.signed,
        )
        self.image("component_window", fig, "component by step window heatmap")

    def data(self, groups: GroupSpec | None, default_group: Hashable | None) -> np.ndarray:
        r, agg = self.result, self.agg
        self.doc.add(Heading("Training data"))
        self.csv["data_samples"] = data_attribution(r).of_kind("sample").to_frame()
        if groups is not None:
            view = data_attribution(r, groups=groups, default_group=default_group)
            self.csv["data_groups"] = view.to_frame()
            frame, _ = _summary(view, agg)
            self.doc.add(Table(frame, f"Per group of training samples: {agg.unit}, {agg.what}"))
        strength = np.abs(r.data).sum(axis=(0, 1))
        top = np.argsort(-strength, kind="stable")[: self.top_k]
        if r.sample_window is not None:
            self.csv["group_window"] = group_window_view(
                r, groups=groups, default_group=default_group
            ).to_frame()
        if r.sample_component is None:
            return top
        if groups is None:
            heat_groups: GroupSpec = {r.sample_ids[s]: r.sample_ids[s] for s in top}
            heat_default: Hashable | None = "(other samples)"
            self.csv["group_component"] = group_component_view(r).to_frame()
        else:
            heat_groups, heat_default = groups, default_group
        gc = group_component_view(r, groups=heat_groups, default_group=heat_default)
        if groups is not None:
            self.csv["group_component"] = gc.to_frame()
        labels = [str(x) for x in gc.row_labels]
        matrix, rows = _cap(agg(gc.values), labels, "(other groups)", 0)
        matrix, cols = _cap(matrix, gc.col_labels, "(other tensors)", 1)
        label = "group of training samples" if groups is not None else "training sample"
        fig = plots.heatmap_figure(
            matrix,
            rows,
            cols,
            title=f"Data × component ({agg.what})",
            xlabel="parameter tensor",
            ylabel=label,
            unit=agg.unit,
            signed=agg.signed,
        )
        self.image("group_component", fig, "data group by component heatmap")
        return top

    def samples(self, top: np.ndarray, samples: Mapping[str, Any] | None) -> None:
        r = self.result
        self.doc.add(Heading("Top training samples"))
        signed = r.data.sum(axis=(0, 1))
        strength = np.abs(r.data).sum(axis=(0, 1))
        table = pd.DataFrame(
            {
                "rank": np.arange(1, len(top) + 1),
                "sample": [r.sample_ids[s] for s in top],
                "sum_abs": strength[top],
                "sum": signed[top],
            }
        )
        images: list[tuple[str, np.ndarray]] = []
        if samples is not None:
            previews = []
            for rank, s in enumerate(top, start=1):
                sid = r.sample_ids[s]
                if sid not in samples:
                    previews.append("(not given)")
                    continue
                arr = sample_array(samples[sid])
                img = image_of(arr) if arr is not None else None
                if img is not None:
                    images.append((f"#{rank} {str(sid)[:10]}\n{signed[s]:+.3g}", img))
                    previews.append("(image, see figure)")
                else:
                    previews.append(text_of(samples[sid]))
            table["input"] = previews
        self.doc.add(
            Table(table, "By Σ |contribution| over all (input, output) rows; sum: signed total")
        )
        if images:
            self.image("top_samples", plots.sample_images_figure(images), "top training samples")
        detail = top_samples(r, self.top_k)
        self.csv["top_samples"] = detail
        shown = detail[
            detail["test"] * r.num_outputs
            + detail["output"].map({name: j for j, name in enumerate(r.output_names)})
            < _DETAIL_ROWS
        ]
        self.doc.add(
            Table(shown, "Proponents and opponents of the first rows (all in top_samples.csv)")
        )


def build_report(
    result: KernelResult,
    out_dir: str | Path,
    *,
    samples: Mapping[str, Any] | None = None,
    title: str = "ExPLAIND report",
    top_k: int = 10,
    groups: GroupSpec | None = None,
    default_group: Hashable | None = None,
    cards: int = 3,
    inputs: Any = None,
    train_labels: Any = None,
    history: pd.DataFrame | None = None,
    phases: Sequence[Phase] | None = None,
    component_groups: Mapping[str, Sequence[str]] | None = None,
) -> ReportPaths:
    """Write report.html (self-contained), report.md, CSVs of the views and PNG plots.

    samples: optional sample_id → input row (tensor/ndarray), shown as images when
        image-shaped and as tokens/values otherwise. groups/default_group: an optional
        grouping of training samples (see `data_attribution`).
    cards: explanation cards for the first `cards` test inputs (0: none); inputs: the test
        inputs given to compute_kernel, shown on the cards; train_labels: training labels
        (mapping id → label, sequence indexed by int ids, or a function), shown next to
        proponents and opponents.
    history: a DataFrame with a "step" column and metric columns (e.g. train and test
        accuracy), drawn as training curves; phases: named step ranges (name, start, stop)
        on the result's window edges, shaded on the curves and explained by which
        components (component_groups: group → component names) and samples drove them.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ViewError(f"top_k must be a positive integer, got {top_k!r}")
    if isinstance(cards, bool) or not isinstance(cards, int) or cards < 0:
        raise ViewError(f"cards must be an integer ≥ 0, got {cards!r}")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ReportError(f"cannot create the report directory {out}: {e}") from e
    b = _Builder(result, out, title, top_k)
    b.opening()
    b.cards(cards, inputs, samples, train_labels)
    b.steps(history, phases, component_groups)
    b.components()
    top = b.data(groups, default_group)
    b.samples(top, samples)
    b.doc.add(Heading("Files"), Paragraph("CSV: " + ", ".join(f"{n}.csv" for n in b.csv)))
    try:
        plot_paths = {}
        for img in b.doc.images:
            path = out / img.name
            path.write_bytes(img.png)
            plot_paths[Path(img.name).stem] = path
        html_path = out / "report.html"
        html_path.write_text(render_html(b.doc), encoding="utf-8")
        md_path = out / "report.md"
        md_path.write_text(render_markdown(b.doc), encoding="utf-8")
        csvs = write_csvs(b.csv, out)
    except OSError as e:
        raise ReportError(f"cannot write the report into {out}: {e}") from e
    log.info("report written to %s (%d plots, %d CSVs)", out, len(plot_paths), len(csvs))
    return ReportPaths(out, html_path, md_path, csvs, plot_paths)
