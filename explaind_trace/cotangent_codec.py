"""Loss-aware cotangent codec: a softmax cross-entropy cotangent as (target, scale) per row.

The cotangent of ``cross_entropy(z, y)`` at the logits ``z`` ([..., V]) is, per row,
``c = a·e_y − a·softmax(z)`` for the target ``y`` and the row's loss gradient ``a`` (−1/N for a
mean, −1 for a sum, −w_y/Σw with class weights, 0 for an ``ignore_index`` row). Given the
logits, ``(y, a)`` determine the whole row. Per row the codec stores a kind:

- ``zero``: every bit is zero (padding and ``ignore_index`` rows);
- ``ce``: ``y``, ``a`` and the XOR of the recorded bits with the reconstruction from the
  logits (sparse: positions and values; empty when the reconstruction is exact);
- ``wide ce``: the same for half-precision logits whose loss ran in float32 (autocast, or a
  model's ``logits.float()``): the row is the float32 cotangent rounded, rebuilt that way
  (the float32 scale is the middle of the interval every entry of the row bounds it to);
- ``generic``: the row itself, by the generic tensor codec (label smoothing, MSE, anything
  without the structure, or a reconstruction that differs in more than a quarter of the row).

The reconstruction is torch's own CPU arithmetic of the cross-entropy backward
(``log_softmax`` forward, then ``_log_softmax_backward_data`` of the one-hot NLL gradient) in
the logits' dtype, so on CPU in float32/float64/float16/bfloat16 the residual is usually empty.
Correctness never depends on that: decoding is bit-exact given the same logits bits, whatever
the residual. Logits that differ from the recorded ones (a replay that is not bitwise
deterministic, another device or torch build) give another reconstruction; a checksum of the
recorded cotangent bytes turns that into ``CotangentDecodeError``, never a wrong cotangent.

Encoded leaf (a msgpack-ready map; its ``codec`` key tells it from a plain tensor map)::

    {"codec": "ce-v1", "dtype": "float32", "shape": [..., V], "hash": "xxh3-64",
     "digest": 8 bytes, "kinds": uint8 [N], "target": int64 [n_ce],
     "scale": float32 [n_ce] (float64 for float64 logits),
     "res_idx": int64 [m] (flat positions in the n_ce × V block of ce rows),
     "res_val": int [m] (XOR of the bit patterns), "generic": dtype [n_generic, V]}

Pure: torch and the tensor codec, no I/O. Decoding checks every field before allocating.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor

from . import codec
from .errors import CotangentDecodeError, TraceCorruptError
from .trees import build_tree, output_tree

try:
    import xxhash
except ImportError:  # pragma: no cover - xxhash is a dependency
    xxhash = None

__all__ = [
    "CODEC",
    "KIND_ZERO",
    "KIND_CE",
    "KIND_GENERIC",
    "KIND_CE_WIDE",
    "encode_cotangent",
    "is_encoded",
    "EncodedCotangent",
    "DeferredCotangent",
    "deferred_tree",
    "reconstruct",
]

CODEC = "ce-v1"
#: row kinds; KIND_CE_WIDE: a half-precision row whose loss ran in float32 (the logits cast up,
#: the float32 cotangent rounded back), rebuilt in float32 and rounded
KIND_ZERO, KIND_CE, KIND_GENERIC, KIND_CE_WIDE = 0, 1, 2, 3
_HALF = {"float16", "bfloat16"}
_KEYS = frozenset(
    ("codec", "dtype", "shape", "hash", "digest", "kinds", "target", "scale")
    + ("res_idx", "res_val", "generic")
)
_FLOATS = {"float64", "float32", "float16", "bfloat16"}
_INTS = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_BLOCK = 1 << 22  # elements analysed at once (bounds the encoder's temporaries)
_MAX_MISMATCH = 4  # a ce row differs from its reconstruction in at most V / this entries


def _bits(t: Tensor) -> Tensor:
    return t.view(_INTS[t.element_size()])


def _digest(data: bytes | Any, alg: str) -> bytes:
    if alg == "xxh3-64":
        if xxhash is None:
            raise TraceCorruptError(
                "a cotangent is checked with xxh3-64 but the xxhash package is not installed; "
                "install it (pip install xxhash) to read the trace."
            )
        return xxhash.xxh3_64_digest(data)
    return hashlib.blake2b(data, digest_size=8).digest()


_HASH = "xxh3-64" if xxhash is not None else "blake2b-64"


def reconstruct(
    logits: Tensor, target: Tensor, scale: Tensor, log_probs: Tensor | None = None
) -> Tensor:
    """The cross-entropy cotangent of rows ``logits`` [n, V] with targets [n] and scales [n]
    (the NLL gradient at the target), by torch's CPU backward arithmetic in the logits' dtype
    (``log_probs``: ``log_softmax(logits, -1)`` when already at hand)."""
    ls = torch.log_softmax(logits, -1) if log_probs is None else log_probs
    go = torch.zeros_like(ls).scatter_(-1, target[:, None], scale[:, None].to(ls.dtype))
    return torch._log_softmax_backward_data(go, ls, -1, logits.dtype)


def _scale_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype scales are stored in: float64 for float64 logits, else float32 (which holds
    every half-precision value and the float32 scale of a wide row exactly)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rebuild(z: Tensor, y: Tensor, a: Tensor, wide: bool, ls: Tensor | None = None) -> Tensor:
    """``reconstruct`` in the logits' dtype, or (``wide``) in float32 rounded to it."""
    if wide:
        return reconstruct(z.float(), y, a.float(), ls).to(z.dtype)
    return reconstruct(z, y, a.to(z.dtype), ls)


def _estimate_wide(c: Tensor, ls: Tensor, y: Tensor) -> Tensor:
    """The float32 scale ``a`` of half-precision rows ``c`` whose float32 cotangent was
    rounded: each entry j ≠ y bounds it, −e_j·a ∈ c_j ± half an ulp of c_j; the middle of
    the intersection over the row (ls: float32 log-probabilities)."""
    e = torch.exp(ls).double()
    cd = c.double()
    half = (torch.nextafter(c.abs(), torch.full_like(c, float("inf"))).double() - cd.abs()) / 2
    valid = (c != 0) & (e > 0) & torch.isfinite(half)
    valid.scatter_(1, y[:, None], False)
    lo = torch.where(valid, -(cd + half) / e, float("-inf")).amax(1)
    hi = torch.where(valid, -(cd - half) / e, float("inf")).amin(1)
    mid = torch.where(torch.isfinite(lo) & torch.isfinite(hi), (lo + hi) / 2, 0.0)
    return mid.float()


def _estimate(c: Tensor, ls: Tensor, y: Tensor) -> Tensor:
    """The scale ``a`` of rows ``c`` with targets ``y``: the median of −c_j/e_j over the (at
    most 8) entries of largest log-probability ``ls`` that are not the target, where
    c_j = −e_j·a up to one rounding (e_j = exp(ls_j) as the backward computes it, half
    dtypes in float32)."""
    masked = ls.scatter(1, y[:, None], float("-inf"))
    top = masked.topk(min(8, c.shape[1] - 1), dim=1).indices
    e = torch.exp(ls.gather(1, top).to(torch.promote_types(ls.dtype, torch.float32))).double()
    est = -(c.gather(1, top).double() / e)
    a = est.median(1).values
    return torch.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0).to(c.dtype)


def _analyse(
    z: Tensor, c: Tensor, neg: Tensor, pos: Tensor, *, wide: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """Per row of ``c`` [n, V] (nonzero rows with ``neg``/``pos`` negative/positive entries):
    the best target, scale (float64) and the number of entries its reconstruction misses
    (V + 1 where no candidate applies); ``wide``: as a float32 loss on half logits."""
    n, v = c.shape
    ls = torch.log_softmax(z.float() if wide else z, -1)
    # a < 0 (a loss to minimise): one negative entry, at the target; a > 0: one positive
    first = c.argmin(1)
    flip = (neg > pos).nonzero().squeeze(1)
    if flip.numel():
        first[flip] = c[flip].argmax(1)
    tie = (neg == pos).nonzero().squeeze(1)  # V = 2, or all but two entries zero: try both
    other = first.clone()
    if tie.numel():
        other[tie] = c[tie].argmax(1)
    best_m = torch.full((n,), v + 1, dtype=torch.int64)
    best_y, best_a = first.clone(), torch.zeros(n, dtype=torch.float64)
    cb = _bits(c)
    for y, only in ((first, None), (other, other != first)):
        if only is not None and not bool(only.any()):
            continue
        a0 = _estimate_wide(c, ls, y) if wide else _estimate(c, ls, y)
        inf = torch.full_like(a0, float("inf"))
        # the estimate is the scale or one of its neighbours (one rounding apart)
        for a in (a0, torch.nextafter(a0, inf), torch.nextafter(a0, -inf)):
            todo = best_m > 0 if only is None else (best_m > 0) & only
            rows = todo.nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            whole = rows.numel() == n
            zr, lr = (z, ls) if whole else (z[rows], ls[rows])
            r = _rebuild(zr, y[rows], a[rows], wide, lr)
            m = (_bits(r) != (cb if whole else cb[rows])).sum(1)
            better = m < best_m[rows]
            sel = rows[better]
            best_m[sel], best_y[sel], best_a[sel] = m[better], y[sel], a[sel].double()
    return best_y, best_a, best_m


def _rebuild_rows(z: Tensor, rows: Tensor, target: Tensor, scale: Tensor, kinds: Tensor) -> Tensor:
    """The reconstruction of logits rows ``z[rows]`` (``target``/``scale``/``kinds`` indexed
    like ``z``'s rows), each by its kind's arithmetic."""
    out = torch.empty(rows.numel(), z.shape[1], dtype=z.dtype)
    wide = kinds[rows] == KIND_CE_WIDE
    for flag, sel in ((False, (~wide).nonzero().squeeze(1)), (True, wide.nonzero().squeeze(1))):
        if sel.numel():
            r = rows[sel]
            out[sel] = _rebuild(z[r], target[r], scale[r], flag)
    return out


def encode_cotangent(output: Tensor, cotangent: Tensor, *, level: int = 1) -> dict[str, Any]:
    """Encode ``cotangent`` (dL/d``output``) with the codec when ``output`` is a floating
    tensor of the same shape and dtype with a class dimension ([..., V], V ≥ 2); otherwise
    (or when no row has the structure, or the tensor codec takes fewer bytes) the generic tensor
    map of ``codec.encode_tensor``."""
    name = codec.dtype_name(cotangent.dtype)
    generic = cotangent.dim() < 2 or cotangent.shape[-1] < 2 or cotangent.numel() == 0
    if (
        generic
        or name not in _FLOATS
        or output.shape != cotangent.shape
        or output.dtype != cotangent.dtype
    ):
        return codec.encode_tensor(cotangent, level=level)
    v = cotangent.shape[-1]
    c = cotangent.detach().cpu().contiguous().reshape(-1, v)
    z = output.detach().cpu().contiguous().reshape(-1, v)
    n = c.shape[0]
    kinds = torch.full((n,), KIND_GENERIC, dtype=torch.uint8)
    target = torch.zeros(n, dtype=torch.int64)
    scale = torch.zeros(n, dtype=torch.float64)
    missed = torch.zeros(n, dtype=torch.bool)  # a ce row whose reconstruction is not exact
    cb = _bits(c)
    step = max(1, _BLOCK // v)
    for start in range(0, n, step):
        stop = min(n, start + step)
        block = c[start:stop]
        neg, pos = (block < 0).sum(1), (block > 0).sum(1)
        signless = (neg + pos == 0).nonzero().squeeze(1)  # zeros (or -0.0: not zero bits)
        if signless.numel():
            zero = (cb[start:stop][signless] == 0).all(1)
            kinds[start + signless[zero]] = KIND_ZERO
        # a·(e_y − p) has the sign of −a everywhere but at the target: a cheap, exact filter
        # (MSE or random rows, with mixed signs, do not pass it)
        keep = (torch.minimum(neg, pos) <= 1) & (neg + pos > 0)
        live = keep.nonzero().squeeze(1)
        if live.numel() == 0:
            continue
        whole = live.numel() == stop - start
        zl, cl = (z[start:stop], block) if whole else (z[start:stop][live], block[live])
        y, a, m = _analyse(zl, cl, neg[live], pos[live])
        ok = m * _MAX_MISMATCH <= v
        wide_rows = torch.zeros(0, dtype=torch.int64)
        if name in _HALF and bool((m > 0).any()):  # maybe a float32 loss on half logits
            rest = (m > 0).nonzero().squeeze(1)
            yw, aw, mw = _analyse(zl[rest], cl[rest], neg[live][rest], pos[live][rest], wide=True)
            win = (mw < m[rest]) & (mw * _MAX_MISMATCH <= v)
            ok[rest[win]] = False
            wide_rows = live[rest[win]] + start
            kinds[wide_rows] = KIND_CE_WIDE
            target[wide_rows], scale[wide_rows] = yw[win], aw[win]
            missed[wide_rows[mw[win] > 0]] = True
        live = live + start
        kinds[live[ok]] = KIND_CE
        target[live[ok]], scale[live[ok]] = y[ok], a[ok]
        missed[live[ok & (m > 0)]] = True
    ce = ((kinds == KIND_CE) | (kinds == KIND_CE_WIDE)).nonzero().squeeze(1)
    if ce.numel() == 0 and bool((kinds == KIND_GENERIC).all()):
        return codec.encode_tensor(cotangent, level=level)
    # the XOR residual of the ce rows that missed (positions in the n_ce × V block)
    pos = missed[ce].nonzero().squeeze(1)
    idx, diff = [torch.zeros(0, dtype=torch.int64)], [torch.zeros(0, dtype=cb.dtype)]
    for start in range(0, pos.numel(), step):
        at = pos[start : start + step]
        rows = ce[at]
        x = torch.bitwise_xor(_bits(_rebuild_rows(z, rows, target, scale, kinds)), cb[rows])
        nz = x.nonzero()
        idx.append(at[nz[:, 0]] * v + nz[:, 1])
        diff.append(x[nz[:, 0], nz[:, 1]])
    idx_t, diff_t = torch.cat(idx), torch.cat(diff)
    gen = c[kinds == KIND_GENERIC]
    t = lambda x: codec.encode_tensor(x, level=level)  # noqa: E731
    encoded = {
        "codec": CODEC,
        "dtype": name,
        "shape": list(cotangent.shape),
        "hash": _HASH,
        "digest": _digest(codec.tensor_u8(c), _HASH),
        "kinds": t(kinds),
        "target": t(target[ce]),
        "scale": t(scale[ce].to(_scale_dtype(c.dtype))),
        "res_idx": t(idx_t),
        "res_val": t(diff_t),
        "generic": t(gen),
    }
    # never more bytes than the tensor codec (small outputs, mostly generic rows)
    if 2 * _payload(encoded) >= c.numel() * c.element_size():
        plain = codec.encode_tensor(cotangent, level=level)
        if _payload(plain) <= _payload(encoded):
            return plain
    return encoded


def _payload(obj: dict[str, Any]) -> int:
    return sum(
        len(v["data"]) if codec.is_tensor_map(v) else len(v) if isinstance(v, bytes) else 0
        for v in (obj.values() if not codec.is_tensor_map(obj) else [obj])
    )


def is_encoded(obj: Any) -> bool:
    """Whether ``obj`` is a map this codec wrote (a plain tensor map is not)."""
    return isinstance(obj, dict) and obj.get("codec") == CODEC and obj.keys() == _KEYS


class EncodedCotangent:
    """A decoded, checked codec map; ``resolve(output)`` rebuilds the cotangent bit for bit.

    ``needs_output``: whether any row is stored as (target, scale), so the logits are needed;
    when not, ``resolve(None)`` suffices. ``where`` names the record and field in errors.
    """

    def __init__(self, obj: Any, *, where: str, max_bytes: int | None = None) -> None:
        if not is_encoded(obj):
            raise TraceCorruptError(f"{where}: not a {CODEC} cotangent map")
        name, shape = obj["dtype"], obj["shape"]
        if (
            not isinstance(name, str)
            or name not in _FLOATS
            or not isinstance(shape, list)
            or not 2 <= len(shape) <= codec.MAX_DEPTH
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
            or shape[-1] < 2
        ):
            raise TraceCorruptError(
                f"{where}: its dtype {name!r:.40} or shape {shape!r:.80} is not that of logits"
            )
        if not isinstance(obj["hash"], str) or obj["hash"] not in ("xxh3-64", "blake2b-64"):
            raise TraceCorruptError(f"{where}: its checksum is malformed")
        if not isinstance(obj["digest"], bytes):
            raise TraceCorruptError(f"{where}: its checksum is malformed")
        self.where, self.dtype_name, self.shape = where, name, tuple(shape)
        self.dtype = codec.DTYPES[name]
        v = shape[-1]
        n = 1
        for s in shape[:-1]:
            n *= s
        limit = max_bytes if max_bytes is not None else 1 << 36
        if n * v * self.dtype.itemsize > limit:
            raise TraceCorruptError(
                f"{where}: its shape {shape} would take more than the {limit} bytes this record "
                "can hold; the record is damaged. Restore the trace from a copy."
            )
        dec = lambda key, **kw: codec.decode_tensor(  # noqa: E731
            obj[key], where=f"{where}, {key}", max_bytes=limit, **kw
        )
        self.kinds = dec("kinds", shape=(n,), dtype="uint8")
        if bool((self.kinds > KIND_CE_WIDE).any()):
            raise TraceCorruptError(f"{where}: a row kind is not zero, ce, generic or wide ce")
        if name not in _HALF and bool((self.kinds == KIND_CE_WIDE).any()):
            raise TraceCorruptError(f"{where}: a wide ce row in {name} logits")
        n_ce = int(((self.kinds == KIND_CE) | (self.kinds == KIND_CE_WIDE)).sum())
        n_gen = int((self.kinds == KIND_GENERIC).sum())
        self.target = dec("target", shape=(n_ce,), dtype="int64")
        self.scale = dec("scale", shape=(n_ce,), dtype=codec.dtype_name(_scale_dtype(self.dtype)))
        self.generic = dec("generic", shape=(n_gen, v), dtype=name)
        self.res_idx = dec("res_idx", dtype="int64")
        self.res_val = dec("res_val", dtype=codec.dtype_name(_INTS[self.dtype.itemsize]))
        m = self.res_idx.shape
        if len(m) != 1 or tuple(self.res_val.shape) != tuple(m):
            raise TraceCorruptError(f"{where}: its residual positions and values do not pair up")
        if n_ce and bool(((self.target < 0) | (self.target >= v)).any()):
            raise TraceCorruptError(f"{where}: a target index is outside 0..{v - 1}")
        if m[0] and bool(((self.res_idx < 0) | (self.res_idx >= n_ce * v)).any()):
            raise TraceCorruptError(f"{where}: a residual position is outside its rows")
        self.n_ce, self.v = n_ce, v
        self.hash, self.digest = obj["hash"], obj["digest"]

    @property
    def needs_output(self) -> bool:
        return self.n_ce > 0

    def resolve(self, output: Tensor | None) -> Tensor:
        """The recorded cotangent, rebuilt from ``output`` (the logits of the same forward,
        replayed bit for bit); raises ``CotangentDecodeError`` when they are not the recorded
        ones (the checksum of the recorded bytes does not match)."""
        v = self.v
        c = torch.zeros(self.kinds.shape[0], v, dtype=self.dtype)
        if self.n_ce:
            if output is None:
                raise CotangentDecodeError(
                    f"{self.where}: this cotangent is stored by the cross-entropy codec and "
                    "needs the replayed output of its forward to be rebuilt."
                )
            z = output.detach()
            if tuple(z.shape) != self.shape or z.dtype != self.dtype:
                raise CotangentDecodeError(
                    f"{self.where}: the replayed output has shape {tuple(z.shape)} and dtype "
                    f"{z.dtype}, the recorded one {self.shape} and {self.dtype}; replay the "
                    "forward in the recorded dtype with a model of the traced architecture."
                )
            z = z.cpu().contiguous().reshape(-1, v)
            ce = ((self.kinds == KIND_CE) | (self.kinds == KIND_CE_WIDE)).nonzero().squeeze(1)
            n = self.kinds.shape[0]
            target = torch.zeros(n, dtype=torch.int64).index_copy_(0, ce, self.target)
            scale = torch.zeros(n, dtype=self.scale.dtype).index_copy_(0, ce, self.scale)
            r = _bits(_rebuild_rows(z, ce, target, scale, self.kinds)).reshape(-1)
            r[self.res_idx] = torch.bitwise_xor(r[self.res_idx], self.res_val)
            c[ce] = r.view(self.dtype).reshape(-1, v)
        c[self.kinds == KIND_GENERIC] = self.generic
        if _digest(codec.tensor_u8(c), self.hash) != self.digest:
            raise CotangentDecodeError(
                f"{self.where}: the cotangent rebuilt from the replayed logits does not match "
                "the recorded one (checksum mismatch): the replayed forward did not give the "
                "recorded logits bit for bit (a nondeterministic kernel, another device or "
                "torch build), or the record is damaged. Replay on the recording device and "
                "torch build, or record the run with cotangent_codec='generic'."
            )
        return c.reshape(self.shape)


class DeferredCotangent:
    """The cotangent of one recorded forward whose cross-entropy leaves need the replayed
    output: ``resolve(output)`` gives the cotangent tree (CPU tensors of the recorded dtype),
    ``output`` being the output tree of the same forward replayed at θ_t in the recorded
    mode, dtype and device (``explaind_trace.reforward``)."""

    def __init__(self, node: Any, leaves: list[Any], where: str) -> None:
        self.node, self.leaves, self.where = node, leaves, where

    def resolve(self, output: Any) -> Any:
        """The recorded cotangent tree, rebuilt from the replayed ``output`` tree."""
        _, outs = output_tree(output)
        if len(outs) != len(self.leaves):
            raise CotangentDecodeError(
                f"{self.where}: the replayed output has {len(outs)} tensors, the recorded one "
                f"{len(self.leaves)}; replay with a model of the traced architecture."
            )
        values = [
            leaf.resolve(out) if isinstance(leaf, EncodedCotangent) else leaf
            for leaf, out in zip(self.leaves, outs)
        ]
        return build_tree(self.node, [], values)

    def __repr__(self) -> str:
        pending = sum(isinstance(x, EncodedCotangent) for x in self.leaves)
        return f"DeferredCotangent({pending} of {len(self.leaves)} leaves from the output)"


def deferred_tree(node: Any, leaves: list[Any], where: str) -> Any:
    """The cotangent tree of a forward: built now when no leaf needs the output, else a
    ``DeferredCotangent``."""
    if any(isinstance(x, EncodedCotangent) for x in leaves):
        build_tree(node, [], leaves)  # a malformed structure fails now, not when resolved
        return DeferredCotangent(node, leaves, where)
    return build_tree(node, [], leaves)
