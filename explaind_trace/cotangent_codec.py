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
- ``transposed ce``: a row of [B, T, V] logits whose loss took ``logits.transpose(1, 2)``
  (class dimension 1, where torch's softmax rounds otherwise), rebuilt in that layout;
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

The arithmetic (rebuilding rows, fitting targets and scales) is in ``cotangent_rows.py``.
Pure: torch and the tensor codec, no I/O. Decoding checks every field before allocating.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor

from . import codec
from .cotangent_rows import (
    CE_KINDS,
    INTS,
    KIND_CE,
    KIND_CE_T,
    KIND_CE_WIDE,
    KIND_GENERIC,
    KIND_ZERO,
    bits,
    fit,
    fit_shared,
    fit_transposed,
    rebuild_rows,
    reconstruct,
    scale_dtype,
)
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
    "KIND_CE_T",
    "encode_cotangent",
    "is_encoded",
    "EncodedCotangent",
    "DeferredCotangent",
    "deferred_tree",
    "reconstruct",
]

CODEC = "ce-v1"
_HALF = {"float16", "bfloat16"}
_KEYS = frozenset(
    ("codec", "dtype", "shape", "hash", "digest", "kinds", "target", "scale")
    + ("res_idx", "res_val", "generic")
)
_FLOATS = {"float64", "float32", "float16", "bfloat16"}
_BLOCK = 1 << 22  # elements analysed at once (bounds the encoder's temporaries)
_MAX_MISMATCH = 4  # a ce row differs from its reconstruction in at most V / this entries


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
    misses = torch.full((n,), v + 1, dtype=torch.int64)  # entries the row's rebuild misses
    negs, poss = torch.zeros(n, dtype=torch.int64), torch.zeros(n, dtype=torch.int64)
    exact = torch.zeros(n, dtype=torch.bool)  # rows the shared-scale fast path rebuilt
    cb = bits(c)
    step = max(1, _BLOCK // v)
    for start in range(0, n, step):
        stop = min(n, start + step)
        block = c[start:stop]
        shared = fit_shared(z[start:stop], block)
        if shared is not None:  # every row a ce row of one scale, rebuilt exactly
            kinds[start:stop], target[start:stop], scale[start:stop] = KIND_CE, *shared
            misses[start:stop], exact[start:stop] = 0, True
            continue
        neg, pos = (block < 0).sum(1), (block > 0).sum(1)
        negs[start:stop], poss[start:stop] = neg, pos
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
        y, a, m = fit(zl, cl, neg[live], pos[live])
        ok = m * _MAX_MISMATCH <= v
        wide_rows = torch.zeros(0, dtype=torch.int64)
        if name in _HALF and bool((m > 0).any()):  # maybe a float32 loss on half logits
            rest = (m > 0).nonzero().squeeze(1)
            yw, aw, mw = fit(zl[rest], cl[rest], neg[live][rest], pos[live][rest], wide=True)
            win = (mw < m[rest]) & (mw * _MAX_MISMATCH <= v)
            ok[rest[win]] = False
            wide_rows = live[rest[win]] + start
            kinds[wide_rows] = KIND_CE_WIDE
            target[wide_rows], scale[wide_rows] = yw[win], aw[win]
            missed[wide_rows[mw[win] > 0]] = True
            misses[wide_rows] = mw[win]
        live = live + start
        kinds[live[ok]] = KIND_CE
        target[live[ok]], scale[live[ok]] = y[ok], a[ok]
        missed[live[ok & (m > 0)]] = True
        misses[live[ok]] = m[ok]
    if bool(exact.all()):  # the common case: nothing left to fit, no residual
        none = torch.zeros(0, dtype=torch.int64)
        return _pack(cotangent, c, kinds, target, scale, none, none.to(cb.dtype), c[:0], level)
    shape = tuple(cotangent.shape)
    if len(shape) == 3:  # maybe a loss on logits.transpose(1, 2): the whole leaf at once
        signed = exact | ((torch.minimum(negs, poss) <= 1) & (negs + poss > 0))
        rows = (signed & (misses > 0)).nonzero().squeeze(1)
        if rows.numel() * 2 > int(signed.sum()):
            yt, at_, mt = fit_transposed(z, c, rows, negs, poss, shape)
            win = (mt < misses[rows]) & (mt * _MAX_MISMATCH <= v)
            sel = rows[win]
            kinds[sel], target[sel], scale[sel] = KIND_CE_T, yt[win], at_[win]
            missed[sel] = mt[win] > 0
    ce = torch.isin(kinds, torch.tensor(CE_KINDS, dtype=kinds.dtype)).nonzero().squeeze(1)
    if ce.numel() == 0 and bool((kinds == KIND_GENERIC).all()):
        return codec.encode_tensor(cotangent, level=level)
    # the XOR residual of the ce rows that missed (positions in the n_ce × V block)
    pos = missed[ce].nonzero().squeeze(1)
    idx, diff = [torch.zeros(0, dtype=torch.int64)], [torch.zeros(0, dtype=cb.dtype)]
    cache: dict[str, Tensor] = {}
    for start in range(0, pos.numel(), step):
        at = pos[start : start + step]
        rows = ce[at]
        rebuilt = rebuild_rows(z, rows, target, scale, kinds, shape, cache)
        x = torch.bitwise_xor(bits(rebuilt), cb[rows])
        nz = x.nonzero()
        idx.append(at[nz[:, 0]] * v + nz[:, 1])
        diff.append(x[nz[:, 0], nz[:, 1]])
    gen = c[kinds == KIND_GENERIC]
    return _pack(
        cotangent, c, kinds, target[ce], scale[ce], torch.cat(idx), torch.cat(diff), gen, level
    )


def _pack(
    cotangent: Tensor,
    c: Tensor,
    kinds: Tensor,
    target: Tensor,
    scale: Tensor,
    res_idx: Tensor,
    res_val: Tensor,
    generic: Tensor,
    level: int,
) -> dict[str, Any]:
    """The codec map of ``c`` (``cotangent`` as [N, V]) from its fields (``target`` and
    ``scale`` of the ce rows only), or the tensor codec's map when that takes fewer bytes."""
    t = lambda x: codec.encode_tensor(x, level=level)  # noqa: E731
    encoded = {
        "codec": CODEC,
        "dtype": codec.dtype_name(c.dtype),
        "shape": list(cotangent.shape),
        "hash": _HASH,
        "digest": _digest(codec.tensor_u8(c), _HASH),
        "kinds": t(kinds),
        "target": t(target),
        "scale": t(scale.to(scale_dtype(c.dtype))),
        "res_idx": t(res_idx),
        "res_val": t(res_val),
        "generic": t(generic),
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
        if bool((self.kinds > KIND_CE_T).any()):
            raise TraceCorruptError(f"{where}: a row kind is not one of the codec's")
        if name not in _HALF and bool((self.kinds == KIND_CE_WIDE).any()):
            raise TraceCorruptError(f"{where}: a wide ce row in {name} logits")
        if len(shape) != 3 and bool((self.kinds == KIND_CE_T).any()):
            raise TraceCorruptError(f"{where}: a transposed ce row in logits of shape {shape}")
        ce_rows = torch.isin(self.kinds, torch.tensor(CE_KINDS, dtype=torch.uint8))
        n_ce = int(ce_rows.sum())
        n_gen = int((self.kinds == KIND_GENERIC).sum())
        self.target = dec("target", shape=(n_ce,), dtype="int64")
        self.scale = dec("scale", shape=(n_ce,), dtype=codec.dtype_name(scale_dtype(self.dtype)))
        self.generic = dec("generic", shape=(n_gen, v), dtype=name)
        self.res_idx = dec("res_idx", dtype="int64")
        self.res_val = dec("res_val", dtype=codec.dtype_name(INTS[self.dtype.itemsize]))
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
            ce = torch.isin(self.kinds, torch.tensor(CE_KINDS, dtype=torch.uint8))
            ce = ce.nonzero().squeeze(1)
            n = self.kinds.shape[0]
            target = torch.zeros(n, dtype=torch.int64).index_copy_(0, ce, self.target)
            scale = torch.zeros(n, dtype=self.scale.dtype).index_copy_(0, ce, self.scale)
            r = bits(rebuild_rows(z, ce, target, scale, self.kinds, self.shape)).reshape(-1)
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
