"""Field-by-field validation of a loaded KernelResult file.

A result file is msgpack with raw array bytes, so loading runs no code; this module makes
sure that what it holds is a KernelResult at all: every required field present, each of
the right type, every array float and of the shape that N (test inputs), O (explained
outputs), S (training samples), C (components), T (steps) and W (step windows) fix.
Anything else raises ``ResultFileError`` naming the file and the field.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ResultFileError

__all__ = ["decode_fields"]

_MAX_DEPTH = 32
_DTYPES = {"<f8", "<f4", "<f2", "<i8", "<i4", "<i2", "|i1", "|u1", "|b1", "<u8", "<u4"}
_STR_LISTS = ("output_names", "component_names", "component_kinds")  # sample_ids: int or str
_FINE = ("f0", "fT", "weight_decay", "nondata", "initial_state", "residual")
_FINE += ("quadrature_error", "buffer_drift")


def decode_fields(cls: type, payload: dict[str, Any], path: Path) -> dict[str, Any]:
    """The constructor arguments of ``cls`` (KernelResult) from a loaded payload, checked."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    missing = [
        n
        for n, f in fields.items()
        if n not in payload
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise _bad(path, missing[0], f"is missing (and {len(missing) - 1} more field(s))")
    kw = {n: _decode(payload[n], path, n, 0) for n in fields if n in payload}
    _check(kw, path, cls)
    return kw


def _bad(path: Path, field: str, what: str) -> ResultFileError:
    return ResultFileError(
        f"{path} is not a valid ExPLAIND kernel result: field {field!r} {what}. The file is "
        "damaged or was not written by KernelResult.save(); compute the result again."
    )


def _decode(value: Any, path: Path, field: str, depth: int) -> Any:
    if depth > _MAX_DEPTH:
        raise _bad(path, field, f"nests deeper than {_MAX_DEPTH} levels")
    if isinstance(value, dict):
        if value.get("__nd__") is True:
            return _array(value, path, field)
        return {str(k): _decode(v, path, field, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, path, field, depth + 1) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise _bad(path, field, f"holds a {type(value).__name__} value, which no result field has")


def _array(value: dict[str, Any], path: Path, field: str) -> np.ndarray:
    dtype, shape, data = value.get("dtype"), value.get("shape"), value.get("data")
    if dtype not in _DTYPES:
        raise _bad(path, field, f"has an unsupported array dtype {dtype!r}")
    if not isinstance(shape, list) or not all(
        isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 1 << 40 for s in shape
    ):
        raise _bad(path, field, f"has an invalid array shape {shape!r:.80}")
    if not isinstance(data, bytes):
        raise _bad(path, field, "has array data that is not bytes")
    dt = np.dtype(dtype)
    numel = 1
    for s in shape:
        numel *= s
    if numel * dt.itemsize != len(data):
        raise _bad(path, field, f"has {len(data)} bytes of data for shape {shape} and {dtype}")
    return np.frombuffer(data, dtype=dt).reshape(shape).astype(dt.newbyteorder("="))


def _check(kw: dict[str, Any], path: Path, cls: type) -> None:
    def need(name: str, ok: bool, what: str) -> None:
        if not ok:
            raise _bad(path, name, what)

    need("trace_id", isinstance(kw["trace_id"], str), "is not a string")
    need("config", isinstance(kw["config"], dict), "is not a map")
    for name in _STR_LISTS:
        v = kw[name]
        need(
            name,
            isinstance(v, list) and all(isinstance(s, str) for s in v),
            "is not a list of strings",
        )
    ids = kw["sample_ids"]
    need(
        "sample_ids",
        isinstance(ids, list)
        and (
            all(isinstance(s, str) for s in ids)
            or all(isinstance(s, int) and not isinstance(s, bool) for s in ids)
        ),
        "is not a list of ids of one type (all ints or all strings)",
    )
    T = kw["num_steps"]
    need(
        "num_steps",
        isinstance(T, int) and not isinstance(T, bool) and T >= 0,
        "is not a step count",
    )
    edges = kw["window_edges"]
    need(
        "window_edges",
        isinstance(edges, list)
        and len(edges) >= 2
        and all(isinstance(e, int) and not isinstance(e, bool) for e in edges)
        and edges[0] == 0
        and edges[-1] == T
        and all(a < b for a, b in zip(edges, edges[1:])),
        f"is not an increasing list of step boundaries from 0 to num_steps={T}",
    )
    f0 = kw["f0"]
    need("f0", isinstance(f0, np.ndarray) and f0.ndim == 2, "is not an [N, O] array")
    N, O = f0.shape  # noqa: E741 - the axis names of docs/architecture.md
    S, C, W = len(kw["sample_ids"]), len(kw["component_names"]), len(edges) - 1
    need(
        "output_names",
        len(kw["output_names"]) == O,
        f"has {len(kw['output_names'])} names for O={O} outputs",
    )
    kinds = kw["component_kinds"]
    need(
        "component_kinds",
        len(kinds) == C and set(kinds) <= {"param", "slice"},
        f"is not one 'param'/'slice' per component (C={C})",
    )
    P = kinds.count("param")
    shapes: dict[str, tuple[int, ...]] = {n: (N, O) for n in _FINE}
    shapes["data"] = (N, O, S)
    for n in ("components", "component_data"):
        shapes[n] = (N, O, C)
    for f in dataclasses.fields(cls):
        if f.name.startswith("step_") and f.name != "step_nodes":
            shapes[f.name] = (N, O, T)
    optional = {
        "sample_component": (N, O, S, P),
        "sample_window": (N, O, S, W),
        "component_window": (N, O, C, W),
        "step_nodes": (T,),
    }
    for name, shape in [*shapes.items(), *optional.items()]:
        v = kw.get(name)
        if v is None and name in optional:
            continue
        need(name, isinstance(v, np.ndarray), f"is not an array (expected shape {shape})")
        need(
            name,
            v.shape == shape,
            f"has shape {v.shape}, expected {shape} for N={N}, O={O}, S={S}, C={C}, T={T}, W={W}",
        )
        need(
            name,
            v.dtype.kind in "fiu" and not (name != "step_nodes" and v.dtype.kind != "f"),
            f"has dtype {v.dtype}, expected floats",
        )
    scores = kw.get("param_scores")
    if scores is not None:
        need("param_scores", isinstance(scores, dict), "is not a map of arrays")
        for n, v in scores.items():
            need(
                "param_scores",
                n in kw["component_names"] and isinstance(v, np.ndarray) and v.dtype.kind == "f",
                f"entry {n!r:.60} is not a float array of a component",
            )
    need("extra", isinstance(kw.get("extra", {}), dict), "is not a map")
