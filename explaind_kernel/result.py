"""The typed result of a path-kernel computation, with its completeness residual.

Every array is a float64 numpy array whose two leading axes are (test input N, explained
output O). The decomposition it carries is exact by construction of the engine:

    f_T = f_0 + data.sum(-1) + weight_decay + nondata + initial_state
              + residual + quadrature_error + buffer_drift

and `completeness_residual` is what is left of that identity (rounding only).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from .config import KeepOptions
from .errors import ResultFileError
from .result_file import decode_fields

__all__ = [
    "KernelResult",
    "KeepOptions",
    "TERM_FIELDS",
    "STEP_FIELDS",
    "JOINT_FIELDS",
    "COMPONENT_FIELDS",
    "SAMPLE_FIELDS",
]

RESULT_FORMAT = "explaind.kernel_result"
RESULT_VERSION = 1

#: The [N, O] scalar terms of the decomposition, in report order.
TERM_FIELDS = (
    "weight_decay",
    "nondata",
    "initial_state",
    "residual",
    "quadrature_error",
    "buffer_drift",
)
#: Per-step versions of the terms, each [N, O, T].
STEP_FIELDS = (
    "step_data",
    "step_weight_decay",
    "step_nondata",
    "step_initial_state",
    "step_residual",
    "step_quadrature_error",
    "step_buffer_drift",
)
#: Optional joint slices, chosen up front with `KeepOptions`.
JOINT_FIELDS = ("sample_component", "sample_window", "component_window")
#: [N, O, C] per component (and its data part).
COMPONENT_FIELDS = ("components", "component_data")
#: Fields with a training-sample axis (axis 2), in `sample_ids` order.
SAMPLE_FIELDS = ("data", "sample_component", "sample_window")


@dataclass
class KernelResult:
    """Exact decomposition of f(x; θ_T) over training samples, components and steps.

    Shapes (N test inputs, O explained outputs per input, S training samples, C components,
    T steps, W step windows; P_n the shape of parameter n):

    f0, fT, weight_decay, nondata, initial_state, residual, quadrature_error, buffer_drift:
        [N, O]
    data:                                   [N, O, S]  (samples in `sample_ids` order)
    step_data, step_<term>:                 [N, O, T]
    components, component_data:             [N, O, C]  (components in `component_names` order)
    sample_component: [N, O, S, C_params]; sample_window: [N, O, S, W];
    component_window: [N, O, C, W]; param_scores: {name: P_n}; step_nodes: [T].

    `extra` holds the target's name ("target"), the labels ([N], when given), the final
    model's predicted class per input ("predicted", [N], when the output holds classes) and
    the digest of the test inputs and targets ("inputs_digest"); `to_frame()` is the tidy
    per-(input, output) table.
    """

    # identity
    trace_id: str
    config: dict[str, Any]
    output_names: list[str]
    sample_ids: list[int | str]  # the user's ids as given (ints stay ints), or content ids
    component_names: list[str]  # parameter tensors first, then user slices ("slice:NAME")
    component_kinds: list[str]  # "param" | "slice"
    window_edges: list[int]  # W+1 step boundaries, first 0, last T
    num_steps: int
    # [N, O]
    f0: np.ndarray
    fT: np.ndarray
    weight_decay: np.ndarray
    nondata: np.ndarray
    initial_state: np.ndarray
    residual: np.ndarray
    quadrature_error: np.ndarray
    buffer_drift: np.ndarray
    # [N, O, S]: data contributions per distinct training sample, summed over steps
    data: np.ndarray
    # [N, O, T]
    step_data: np.ndarray
    step_weight_decay: np.ndarray
    step_nondata: np.ndarray
    step_initial_state: np.ndarray
    step_residual: np.ndarray
    step_quadrature_error: np.ndarray
    step_buffer_drift: np.ndarray
    # [N, O, C]: Σ_t J̄_t[c]·Δθ_t[c] per component (all sources: data, decay, non-data, residual)
    components: np.ndarray
    # [N, O, C]: the data part of `components` (sum over samples), parameter tensors only for slices
    component_data: np.ndarray
    # optional joint slices (None when not kept)
    sample_component: np.ndarray | None = None
    sample_window: np.ndarray | None = None
    component_window: np.ndarray | None = None
    param_scores: dict[str, np.ndarray] | None = None
    # per-step quadrature node counts actually used (adaptive mode may raise them)
    step_nodes: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # ---------------------------------------------------------------- derived
    def to_frame(self) -> Any:
        """A tidy pandas DataFrame, one row per (test input, explained output): test, output,
        label, predicted, f0, data, every term, completeness_residual and fT (f0 + data + the
        terms + completeness_residual = fT)."""
        import pandas as pd

        n, o = self.f0.shape
        cols: dict[str, Any] = {
            "test": np.repeat(np.arange(n), o),
            "output": np.tile(np.asarray(self.output_names, dtype=object), n),
        }
        for key in ("labels", "predicted"):
            v = self.extra.get(key)
            if isinstance(v, np.ndarray) and v.ndim == 1 and v.shape[0] == n:
                cols["label" if key == "labels" else key] = np.repeat(v, o)
        cols["f0"] = self.f0.reshape(-1)
        cols["data"] = self.data_total.reshape(-1)
        for name in TERM_FIELDS:
            cols[name] = getattr(self, name).reshape(-1)
        cols["completeness_residual"] = self.completeness_residual.reshape(-1)
        cols["fT"] = self.fT.reshape(-1)
        return pd.DataFrame(cols)

    @property
    def num_inputs(self) -> int:
        return int(self.f0.shape[0])

    @property
    def num_outputs(self) -> int:
        return int(self.f0.shape[1])

    @property
    def data_total(self) -> np.ndarray:
        """[N, O] sum of all training-sample contributions."""
        return self.data.sum(axis=-1)

    @property
    def reconstructed(self) -> np.ndarray:
        """[N, O] f_0 plus every reported term."""
        out = self.f0 + self.data_total
        for name in TERM_FIELDS:
            out = out + getattr(self, name)
        return out

    @property
    def completeness_residual(self) -> np.ndarray:
        """[N, O] f_T minus the reconstruction: rounding only, by construction."""
        return self.fT - self.reconstructed

    def completeness(self) -> tuple[float, float]:
        """(max |reconstructed − actual|, that divided by max |actual|)."""
        max_abs = float(np.max(np.abs(self.completeness_residual))) if self.fT.size else 0.0
        scale = float(np.max(np.abs(self.fT))) if self.fT.size else 0.0
        return max_abs, (max_abs / scale if scale > 0 else max_abs)

    def completeness_line(self) -> str:
        """The one-line summary printed by the CLI."""
        max_abs, rel = self.completeness()
        return f"completeness: max_abs={max_abs:.3e} rel={rel:.3e}"

    @property
    def step_total(self) -> np.ndarray:
        """[N, O, T] the measured change of f over each step (sum of all step terms)."""
        return sum(getattr(self, name) for name in STEP_FIELDS)

    # ------------------------------------------------------------------ file
    def save(self, path: str | Path) -> Path:
        """Write the result as msgpack + raw little-endian float64 bytes (no pickle)."""
        path = Path(path)
        payload: dict[str, Any] = {"format": RESULT_FORMAT, "version": RESULT_VERSION}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            payload[f.name] = _encode(value)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(msgpack.packb(payload, use_bin_type=True))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> KernelResult:
        """Read a result written by `save`; never runs code from the file."""
        path = Path(path)
        try:
            payload = msgpack.unpackb(path.read_bytes(), raw=False, strict_map_key=False)
        except (OSError, ValueError, TypeError, msgpack.UnpackException) as e:
            raise ResultFileError(
                f"{path} is not a readable ExPLAIND kernel result ({e}); "
                "write one with `explaind kernel` or KernelResult.save()."
            ) from e
        if not isinstance(payload, dict) or payload.get("format") != RESULT_FORMAT:
            raise ResultFileError(
                f"{path} is not an ExPLAIND kernel result file; "
                "write one with `explaind kernel` or KernelResult.save()."
            )
        if payload.get("version", 0) > RESULT_VERSION:
            raise ResultFileError(
                f"{path} was written by a newer ExPLAIND (result version {payload['version']}, "
                f"this one reads up to {RESULT_VERSION}); upgrade explaind."
            )
        return cls(**decode_fields(cls, payload, path))


def _encode(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        arr = np.ascontiguousarray(value)
        return {
            "__nd__": True,
            "dtype": arr.dtype.newbyteorder("<").str,
            "shape": list(arr.shape),
            "data": arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes(),
        }
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value
