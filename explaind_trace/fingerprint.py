"""A small per-step fingerprint of the gradient the optimizer saw (``gradients="recompute"``).

Per parameter tensor with a gradient, three things, all computed on the gradient's device:

- ``bits``: the sum of the gradient's bit patterns read as integers (int64, wrapping). Any
  change of any element changes it (barring changes that cancel exactly modulo 2⁶⁴), and
  integer addition is exact in every order, so it is the same number on CPU and GPU: the
  bitwise check. One pass over the gradient, no copy (a ``view`` of the bits).
- ``norm``: the L2 norm (accumulated in the gradient's dtype, at least float32), for naming
  the cause of a mismatch (a clipped gradient is the recomputed one times a factor < 1).
- ``at``: ``SAMPLES`` values at fixed pseudo-random positions (a golden-ratio sequence seeded
  by the parameter's name), stored exactly: a difference proportional to θ at those positions
  is an L2 term in the loss; a uniform ratio is clipping; anything else a hook or a loss term
  that does not come through the recorded output.

No random projection: it would cost a pass with a random vector per step and catch nothing
the integer sum misses. Stored packed (``encode``): 48 bytes per float32 tensor per step.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .errors import TraceCorruptError

__all__ = [
    "SAMPLES",
    "positions",
    "fingerprints",
    "matches",
    "likely_cause",
    "encode",
    "decode",
]

#: sampled values per tensor (traces written before schema version 2 have 32; a fingerprint
#: is compared at as many positions as it holds values)
SAMPLES = 8
_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_PHI = (math.sqrt(5.0) - 1.0) / 2.0


def positions(name: str, numel: int, k: int = SAMPLES) -> list[int]:
    """``min(k, numel)`` fixed positions in a tensor of ``numel`` elements, from its name."""
    if numel <= k:
        return list(range(numel))
    h = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")
    start = h / 2.0**64
    return [int(((start + i * _PHI) % 1.0) * numel) for i in range(k)]


def _bits(g: torch.Tensor) -> torch.Tensor:
    return g.view(_INT[g.element_size()]).sum(dtype=torch.int64)


def _norm(flat: torch.Tensor) -> torch.Tensor:
    """The L2 norm as float64, accumulated in the gradient's dtype (float32 for half types):
    it only names a mismatch's cause (a clipping factor to 1%), and a float64 upcast of
    every gradient cost more than the rest of the fingerprint on the bench models."""
    wide = torch.float32 if flat.element_size() < 4 else None
    return torch.linalg.vector_norm(flat, dtype=wide).double()


def fingerprints(
    grads: Mapping[str, torch.Tensor], cache: dict[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """``{name: {"bits": int, "norm": float, "at": tensor}}`` of dense gradients (CPU values;
    one device-to-host copy for all tensors of other devices). ``cache`` keeps the positions
    per name.

    Contiguous float32/float64 CPU gradients go through numpy (``_host``): three numpy
    calls per tensor where torch took six; on the gradients of bench_trace_bytes.py's p = 97
    model (12 tensors), 0.21 against 0.53 ms per call alone, 0.38 against 0.58-0.75 ms in a
    training step. The same bit sums and samples, the norm in the gradient's dtype
    (``tests/trace/test_fingerprint.py`` checks both paths against a per-tensor reference)."""
    cache = {} if cache is None else cache
    host = {n: g for n, g in grads.items() if _on_host(g)}
    out = _host(host, cache) if host else {}
    rest = {n: g for n, g in grads.items() if n not in host}
    if rest:
        out.update(_device(rest, cache))
    return {n: out[n] for n in grads}


def _on_host(g: torch.Tensor) -> bool:
    return g.is_cpu and g.dtype in (torch.float32, torch.float64) and g.is_contiguous()


def _host(grads: Mapping[str, torch.Tensor], cache: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, g in grads.items():
        a = g.detach().numpy().reshape(-1)
        idx = cache.get(name)
        if not isinstance(idx, np.ndarray):
            idx = cache[name] = np.array(positions(name, a.size), dtype=np.int64)
        ints = a.view(np.int32 if a.itemsize == 4 else np.int64)
        out[name] = {
            "bits": int(ints.sum(dtype=np.int64)),
            "norm": float(np.sqrt(np.dot(a, a))),
            "at": torch.from_numpy(a[idx]),
        }
    return out


def _device(grads: Mapping[str, torch.Tensor], cache: dict[str, Any]) -> dict[str, dict[str, Any]]:
    bits, norms, samples, names = [], [], [], []
    for name, g in grads.items():
        g = g.detach()
        idx = cache.get(name)
        if not isinstance(idx, torch.Tensor) or idx.device != g.device:
            idx = cache[name] = torch.tensor(
                positions(name, g.numel()), dtype=torch.int64, device=g.device
            )
        flat = g.reshape(-1)
        bits.append(_bits(flat))
        norms.append(_norm(flat))
        samples.append(flat[idx])
        names.append(name)
    host_bits = torch.stack(bits).cpu().tolist()
    host_norms = torch.stack(norms).cpu().tolist()
    return {
        n: {"bits": int(b), "norm": float(v), "at": s.cpu()}
        for n, b, v, s in zip(names, host_bits, host_norms, samples)
    }


def _one(g: torch.Tensor, name: str, k: int) -> dict[str, Any]:
    """The fingerprint of one gradient, sampled at ``k`` positions."""
    flat = g.detach().reshape(-1)
    idx = torch.tensor(positions(name, flat.numel(), k), device=flat.device, dtype=torch.long)
    return {"bits": int(_bits(flat)), "at": flat[idx].cpu()}


def matches(expected: Mapping[str, Any], got: torch.Tensor, name: str) -> bool:
    """Whether ``got`` has the fingerprint ``expected`` bit for bit."""
    at = expected["at"]
    fp = _one(got, name, at.numel())
    return (
        fp["bits"] == expected["bits"]
        and fp["at"].dtype == at.dtype
        and fp["at"].shape == at.shape
        and torch.equal(fp["at"].view(_INT[at.element_size()]), at.view(_INT[at.element_size()]))
    )


def likely_cause(
    expected: Mapping[str, Any], got: torch.Tensor, theta: torch.Tensor, name: str
) -> str:
    """The most likely reason the optimizer's gradient (``expected``) of parameter ``name``
    is not ``got``, the gradient through the recorded output at parameters ``theta``."""
    want = expected["at"].double()
    flat = got.detach().reshape(-1).double().cpu()
    pos = positions(name, flat.numel(), want.numel())
    if len(pos) != want.numel():
        return "the recorded fingerprint does not fit this parameter"
    have = flat[pos]
    t_at = theta.detach().reshape(-1).double().cpu()[pos]
    norm_got = float(torch.linalg.vector_norm(flat))
    norm_want = float(expected["norm"])
    scale = max(float(want.abs().max()), float(have.abs().max()), 1e-30)
    diff = want - have
    off = float(diff.abs().max())  # a fit must explain the difference to 1% of its size
    if off <= 1e-4 * scale:
        return (
            "the values differ only in the last bits: a nondeterministic kernel (e.g. a GPU "
            "reduction or atomics), a different accumulation order, or a replay model "
            "configured otherwise than the trained one (e.g. a key/value cache on, which "
            "changes the memory layout attention runs on)"
        )
    if norm_got > 0 and norm_want < norm_got:
        r = norm_want / norm_got
        if float((want - r * have).abs().max()) <= 1e-2 * off:
            return f"the gradient was scaled by {r:.4g} before the step: gradient clipping"
    denom = float(t_at @ t_at)
    if denom > 0:
        lam = float(diff @ t_at) / denom
        if lam != 0 and float((diff - lam * t_at).abs().max()) <= 1e-2 * off:
            return (
                f"the difference is {lam:.4g}·θ: an L2 term on the parameters in the loss "
                "(not through the model output)"
            )
    if off <= 1e-2 * scale:
        return (
            f"the values differ slightly (up to {off / scale:.1g} of their size): the forward "
            "ran with other numerics than in training (a nondeterministic or another kernel, "
            "another device or torch build, autocast or precision settings)"
        )
    return (
        "a gradient hook, or a loss term that does not come through the recorded model output "
        "(or the model passed for replay differs from the trained one outside its trained "
        "parameters, e.g. in frozen weights)"
    )


def encode(
    fps: Mapping[str, Mapping[str, Any]], tensor: Any, names: list[str] | None = None
) -> dict[str, Any]:
    """The stored map of a step's fingerprints (``tensor`` encodes a tensor).

    Packed (``{"packed": 1, "of", "bits", "norm", "counts", "at"}``: the parameters by
    their position in ``names``, the trace header's list, then one tensor per field, the
    sampled values of all tensors side by side) when ``names`` is given, names every
    fingerprinted parameter and the sampled values share one dtype; else per parameter
    ``{name: {"bits", "norm", "at"}}``, as traces before schema version 2 stored them."""
    index = {n: i for i, n in enumerate(names or ())}
    ats = [f["at"] for f in fps.values()]
    if fps and all(n in index for n in fps) and len({a.dtype for a in ats}) == 1:
        return {
            "packed": 1,
            "of": [index[n] for n in fps],
            "bits": tensor(torch.tensor([int(f["bits"]) for f in fps.values()], dtype=torch.int64)),
            "norm": tensor(
                torch.tensor([float(f["norm"]) for f in fps.values()], dtype=torch.float64)
            ),
            "counts": [a.numel() for a in ats],
            "at": tensor(torch.cat([a.reshape(-1) for a in ats])),
        }
    return {
        n: {"bits": int(f["bits"]), "norm": float(f["norm"]), "at": tensor(f["at"])}
        for n, f in fps.items()
    }


def _ints(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)


def _decode_packed(
    raw: dict[str, Any], where: str, tensor: Any, names: list[str] | None
) -> dict[str, dict[str, Any]]:
    bad = TraceCorruptError(f"{where}: the packed gradient fingerprints are malformed")
    of, counts = raw.get("of"), raw.get("counts")
    if names is None or not _ints(of) or not _ints(counts) or len(of) != len(counts):
        raise bad
    if len(set(of)) != len(of) or not all(0 <= i < len(names) for i in of):
        raise bad
    at = f"{where}, fingerprints"
    bits, norm, values = (tensor(raw.get(k), f"{at}, {k}") for k in ("bits", "norm", "at"))
    n = len(of)
    if (
        bits.dtype != torch.int64
        or norm.dtype != torch.float64
        or bits.shape != (n,)
        or norm.shape != (n,)
        or values.dim() != 1
        or any(c < 0 for c in counts)
        or sum(counts) != values.numel()
    ):
        raise bad
    parts = torch.split(values, counts)
    return {
        names[i]: {"bits": int(b), "norm": float(v), "at": part.clone()}
        for i, b, v, part in zip(of, bits.tolist(), norm.tolist(), parts)
    }


def decode(
    raw: Any, where: str, tensor: Any, names: list[str] | None = None
) -> dict[str, dict[str, Any]]:
    """A step's fingerprints back from their stored map (``tensor(obj, where)`` decodes a
    tensor; ``names``: the trace header's parameter names, which packed maps refer to)."""
    if not isinstance(raw, dict):
        raise TraceCorruptError(f"{where}: the gradient fingerprints are malformed")
    if raw.get("packed") == 1:
        return _decode_packed(raw, where, tensor, names)
    out = {}
    for n, f in raw.items():
        ok = (
            isinstance(f, dict)
            and isinstance(f.get("bits"), int)
            and not isinstance(f.get("bits"), bool)
            and isinstance(f.get("norm"), float)
        )
        if not ok:
            raise TraceCorruptError(f"{where}: the gradient fingerprint of {n!r} is malformed")
        out[str(n)] = {
            "bits": f["bits"],
            "norm": f["norm"],
            "at": tensor(f["at"], f"{where}, fingerprint of {n!r}"),
        }
    return out
