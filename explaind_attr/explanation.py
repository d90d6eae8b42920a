"""One prediction at a time: `explain(result, i)` gathers everything the kernel says about
test input i into a small typed object — the input, its label and the prediction, the
decomposition f(x; θ₀) → f(x; θ_T) term by term, the training samples that pushed the output
up (proponents) and down (opponents) with their inputs, labels and ids, the contribution of
each module, and the step curve with the windows where the output changed most.

Every table is a pandas DataFrame; `Explanation._repr_html_` renders the whole card in a
notebook, and the report shows one card per test input for the first few inputs. The parts
add up: the terms to f_T, the samples plus the non-data terms to f_T − f_0, the modules
plus quadrature and drift to f_T − f_0, the steps to f_T − f_0 (`Explanation.check`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

import numpy as np
import pandas as pd

from explaind_kernel.result import TERM_FIELDS, KernelResult

from .errors import ViewError
from .model import module_attribution

__all__ = ["Explanation", "explain"]

#: Steps around a change that make one "window of largest change" (at most this many).
_WINDOWS = 3


@dataclass(frozen=True)
class Explanation:
    """What the kernel says about one (test input, explained output).

    index, output:     the test input's row in the result and the explained output's name.
    input:             the test input (an array: image, tokens or values), when given.
    label, predicted:  its label and the final model's predicted class (None when unknown).
    f0, fT:            the explained value before and after training.
    terms:             DataFrame term, value: f0, data, every non-data term, the completeness
                       residual and fT — the terms before fT add up to fT.
    proponents, opponents: DataFrames rank, sample, value, label, input (the k training
                       samples that pushed the value up / down the most).
    modules:           DataFrame module, kind, value (module sums, then quadrature and drift).
    steps:             DataFrame step, change, cumulative (f(θ_{t+1}) − f(θ_t) per step).
    windows:           DataFrame window_start, window_stop, change: the step windows of the
                       result with the largest |change|, largest first.
    """

    index: int
    output: str
    input: np.ndarray | None
    label: Any
    predicted: Any
    f0: float
    fT: float
    terms: pd.DataFrame
    proponents: pd.DataFrame
    opponents: pd.DataFrame
    modules: pd.DataFrame
    steps: pd.DataFrame
    windows: pd.DataFrame

    def check(self, atol: float = 1e-9) -> float:
        """The largest gap of the identities the parts satisfy (terms add up to f_T; steps
        and modules to f_T − f_0); raises ViewError when one exceeds `atol` (relative to the
        output's scale)."""
        scale = max(abs(self.fT), abs(self.f0), 1.0)
        before = self.terms["value"].to_numpy()[:-1].sum()
        gaps = [
            abs(before - self.fT),
            abs(self.steps["change"].sum() - (self.fT - self.f0)),
            abs(self.modules["value"].sum() - (self.fT - self.f0)),
        ]
        worst = max(gaps) / scale
        if worst > atol:
            raise ViewError(f"the explanation of test input {self.index} does not add up: {gaps}")
        return worst

    # ------------------------------------------------------------------ notebook
    def _repr_html_(self) -> str:
        return explanation_html(self)


def _row_of(values: Any, i: int) -> Any:
    if values is None:
        return None
    try:
        v = values[i]
    except (IndexError, KeyError, TypeError):
        return None
    return v.item() if hasattr(v, "item") and getattr(v, "ndim", 1) == 0 else v


def _output_index(result: KernelResult, i: int, output: int | str | None) -> int:
    names = list(result.output_names)
    if output is None:
        if len(names) == 1:
            return 0
        pred = _row_of(result.extra.get("predicted"), i)
        target = result.extra.get("target")
        return int(pred) if target == "all" and pred is not None and pred < len(names) else 0
    if isinstance(output, str):
        if output not in names:
            raise ViewError(f"output {output!r} is not one of the result's outputs {names}")
        return names.index(output)
    if isinstance(output, bool) or not 0 <= int(output) < len(names):
        raise ViewError(f"output must be a name or an index in 0..{len(names) - 1}, got {output!r}")
    return int(output)


def _label_of(labels: Any, sid: Any) -> Any:
    if labels is None:
        return None
    if callable(labels):
        return labels(sid)
    if isinstance(labels, Mapping):
        return labels.get(sid)
    if isinstance(sid, int | np.integer):
        return _row_of(labels, int(sid))
    return None


def _side(
    result: KernelResult,
    values: np.ndarray,
    order: np.ndarray,
    samples: Mapping[Any, Any] | None,
    train_labels: Any,
) -> pd.DataFrame:
    ids = [result.sample_ids[s] for s in order]
    frame = pd.DataFrame(
        {
            "rank": np.arange(1, len(order) + 1),
            "sample": pd.Series(ids, dtype=object),
            "value": values[order],
        }
    )
    frame["label"] = [_label_of(train_labels, sid) for sid in ids]
    frame["input"] = [samples.get(sid) if samples is not None else None for sid in ids]
    return frame


def explain(
    result: KernelResult,
    i: int,
    *,
    output: int | str | None = None,
    k: int = 5,
    inputs: Any = None,
    samples: Mapping[Any, Any] | None = None,
    train_labels: Mapping[Any, Any] | Sequence[Any] | Callable[[Any], Any] | None = None,
) -> Explanation:
    """Explain test input `i` of `result` (one explained output; see `Explanation`).

    output:       the output's name or index (default: the only one; for outputs="all" the
                  predicted class; else the first).
    k:            proponents and opponents to list.
    inputs:       the test inputs given to compute_kernel (to show input i), optional.
    samples:      training sample id → input row (e.g. `samples_from_trace`), optional.
    train_labels: the training labels, as a mapping id → label, a sequence indexed by int
                  ids, or a function of the id; optional.
    """
    n = result.num_inputs
    if isinstance(i, bool) or not isinstance(i, int | np.integer) or not 0 <= i < n:
        raise ViewError(f"i must be a test input index in 0..{n - 1}, got {i!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ViewError(f"k must be a positive integer, got {k!r}")
    i = int(i)
    j = _output_index(result, i, output)
    f0, fT = float(result.f0[i, j]), float(result.fT[i, j])
    terms = [("f0", f0), ("data", float(result.data_total[i, j]))]
    terms += [(name, float(getattr(result, name)[i, j])) for name in TERM_FIELDS]
    terms += [("completeness_residual", float(result.completeness_residual[i, j]))]
    terms += [("fT", fT)]
    data = result.data[i, j]
    up = np.argsort(-data, kind="stable")
    down = np.argsort(data, kind="stable")
    up = up[data[up] > 0][:k]
    down = down[data[down] < 0][:k]
    mod = module_attribution(result)
    modules = pd.DataFrame(
        {"module": list(mod.labels), "kind": list(mod.kinds), "value": mod.values[i, j]}
    )
    change = result.step_total[i, j]
    steps = pd.DataFrame(
        {"step": np.arange(result.num_steps), "change": change, "cumulative": np.cumsum(change)}
    )
    edges = np.asarray(result.window_edges)
    per_window = np.add.reduceat(change, edges[:-1]) if change.size else np.zeros(0)
    top = np.argsort(-np.abs(per_window), kind="stable")[:_WINDOWS]
    windows = pd.DataFrame(
        {
            "window_start": edges[:-1][top],
            "window_stop": edges[1:][top],
            "change": per_window[top],
        }
    )
    from .report.samples import sample_array

    if isinstance(inputs, (tuple, list)) and inputs and hasattr(inputs[0], "shape"):
        inputs = inputs[0]  # an (x, y) pair or positional inputs: show the first
    x = sample_array(_row_of(inputs, i)) if inputs is not None else None
    return Explanation(
        index=i,
        output=result.output_names[j],
        input=x,
        label=_row_of(result.extra.get("labels"), i),
        predicted=_row_of(result.extra.get("predicted"), i),
        f0=f0,
        fT=fT,
        terms=pd.DataFrame(terms, columns=["term", "value"]),
        proponents=_side(result, data, up, samples, train_labels),
        opponents=_side(result, data, down, samples, train_labels),
        modules=modules,
        steps=steps,
        windows=windows,
    )


# ---------------------------------------------------------------------- rendering


def input_text(value: Any) -> str:
    """A one-line rendering of an input row (tokens, values, or "image H×W")."""
    from .report.samples import image_of, sample_array, text_of

    if value is None:
        return ""
    arr = sample_array(value)
    if arr is not None and image_of(arr) is not None:
        return "image " + "×".join(str(s) for s in arr.shape)
    return text_of(value)


def _table_html(frame: pd.DataFrame) -> str:
    shown = frame.copy()
    if "input" in shown:
        shown["input"] = [input_text(v) for v in shown["input"]]
    return shown.to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0)


def headline(e: Explanation) -> str:
    """One sentence: the label and prediction, and f_0 → f_T."""
    parts = [f"test input {e.index}"]
    if e.label is not None:
        parts.append(f"label {e.label}")
    if e.predicted is not None:
        parts.append(f"predicted {e.predicted}")
    return ", ".join(parts) + f": {e.output} went from {e.f0:.4g} to {e.fT:.4g}"


def explanation_html(e: Explanation) -> str:
    """The card as HTML (input image inline when image-shaped)."""
    from .report.plots import figure_png, image_figure
    from .report.samples import image_of

    out = [f"<div class='explaind-card'><h3>{escape(headline(e))}</h3>"]
    if e.input is not None:
        img = image_of(e.input)
        if img is not None:
            import base64

            png = base64.b64encode(figure_png(image_figure(img), dpi=60)).decode("ascii")
            out.append(f"<img src='data:image/png;base64,{png}' alt='test input {e.index}'>")
        else:
            out.append(f"<p>input: {escape(input_text(e.input))}</p>")
    for title, frame in (
        ("Terms (they add up to fT)", e.terms),
        ("Proponents (pushed the value up)", e.proponents),
        ("Opponents (pushed the value down)", e.opponents),
        ("Modules", e.modules),
        ("Windows of largest change", e.windows),
    ):
        out.append(f"<h4>{escape(title)}</h4>{_table_html(frame)}")
    out.append("</div>")
    return "\n".join(out)
