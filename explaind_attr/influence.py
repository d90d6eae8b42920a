"""Self-influence: each training sample's contribution to its own target at the end of
training — the kernel with the training inputs as test inputs, read on the diagonal.

K(x_i; i) summed over the steps where sample i was used is the exact share of f(x_i; θ_T)
that i's own gradients put there. Large values flag samples the model had to memorise
(often mislabelled or atypical ones); this is the usual way to surface them.

Cost: one kernel over all S training samples as test inputs (S rows per explained output),
so it suits runs whose training set is small enough to explain in full; `ids=` restricts it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from explaind_kernel.result import KernelResult

from .errors import ViewError

__all__ = ["self_influence", "self_influence_of"]


def _training_ids(reader: Any) -> list[Any]:
    """Every training sample id of the trace, in order of first use."""
    seen: dict[Any, None] = {}
    for t in range(reader.num_steps):
        for f in reader.step(t).forwards:
            seen.update(dict.fromkeys(f.ids))
    return list(seen)


def _labels_for(ids: Sequence[Any], labels: Any) -> Any:
    if labels is None:
        return None
    if callable(labels):
        return torch.as_tensor([labels(i) for i in ids])
    if isinstance(labels, Mapping):
        missing = [i for i in ids if i not in labels]
        if missing:
            raise ViewError(f"labels has no entry for training samples {missing[:5]}")
        return torch.as_tensor([labels[i] for i in ids])
    if not all(isinstance(i, int) for i in ids):
        raise ViewError(
            "labels given as a sequence need int sample ids (dataset indices) to index it; "
            "these ids are not ints: pass a mapping id -> label or a function instead"
        )
    arr = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(np.asarray(labels))
    bad = [i for i in ids if not 0 <= i < len(arr)]
    if bad:
        raise ViewError(f"training sample ids {bad[:5]} are out of range for {len(arr)} labels")
    return arr[list(ids)]


def self_influence_of(result: KernelResult, ids: Sequence[Any]) -> pd.DataFrame:
    """Read the diagonal of a kernel whose test input r is training sample ids[r]: columns
    rank, sample, output, self_influence (K(x_i; i), summed over steps), value (f(x_i; θ_T)),
    share (self_influence / |value|), ranked by self_influence, largest first."""
    if len(ids) != result.num_inputs:
        raise ViewError(f"{len(ids)} ids for a result of {result.num_inputs} test inputs")
    column = {sid: j for j, sid in enumerate(result.sample_ids)}
    rows = []
    for r, sid in enumerate(ids):
        j = column.get(sid)
        for o, name in enumerate(result.output_names):
            k = float(result.data[r, o, j]) if j is not None else 0.0
            value = float(result.fT[r, o])
            rows.append((sid, name, k, value, k / abs(value) if value else np.nan))
    frame = pd.DataFrame(rows, columns=["sample", "output", "self_influence", "value", "share"])
    frame["sample"] = pd.Series([r[0] for r in rows], dtype=object)
    frame = frame.sort_values("self_influence", ascending=False, kind="stable")
    frame.insert(0, "rank", np.arange(1, len(frame) + 1))
    return frame.reset_index(drop=True)


def self_influence(
    trace: Any,
    model: torch.nn.Module,
    *,
    outputs: Any = None,
    labels: Mapping[Any, Any] | Sequence[Any] | Callable[[Any], Any] | None = None,
    ids: Sequence[Any] | None = None,
    **options: Any,
) -> tuple[pd.DataFrame, KernelResult]:
    """Each training sample's contribution to its own target at θ_T, ranked.

    trace:   a trace path/URL or an open reader; its stored rows are the inputs.
    outputs: the target (default: "loss" with labels, else "predicted").
    labels:  the training labels: a mapping id → label, a sequence indexed by int ids
             (dataset indices), or a function of the id.
    ids:     the samples to score (default: every sample of the trace).
    options: compute_kernel's keyword options (dtype, quadrature, ...).
    Returns (the ranked table of `self_influence_of`, the kernel result it was read from).
    """
    from explaind_kernel import compute_kernel
    from explaind_trace import open_trace

    owned = not hasattr(trace, "meta")
    reader = open_trace(trace) if owned else trace
    try:
        chosen = list(ids) if ids is not None else _training_ids(reader)
        if not chosen:
            raise ViewError("the trace records no training samples to score")
        rows = [reader.sample(sid) for sid in chosen]
        if isinstance(rows[0], tuple):
            inputs: Any = tuple(torch.stack([r[k] for r in rows]) for k in range(len(rows[0])))
        else:
            inputs = torch.stack(rows)
        y = _labels_for(chosen, labels)
        target = outputs if outputs is not None else ("loss" if y is not None else "predicted")
        result = compute_kernel(reader, model, inputs, outputs=target, labels=y, **options)
    finally:
        if owned:
            reader.close()
    return self_influence_of(result, chosen), result
