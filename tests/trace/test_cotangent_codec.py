"""The loss-aware cotangent codec: bit-for-bit round trips, the row-wise fallback, the size
of real cross-entropy cotangents, and the refusal of logits that are not the recorded ones."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings

from explaind_trace import codec
from explaind_trace import cotangent_codec as cc
from explaind_trace.errors import CotangentDecodeError, TraceCorruptError

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LOSSES = [
    "mean",
    "sum",
    "weight",
    "ignore",
    "negated",
    "smoothing",
    "mse",
    "random",
    "partial",
    "perturbed",
    "divided",
    "masked",
    "upcast",
    "transposed",
]


def _bytes(t: torch.Tensor) -> bytes:
    return codec.tensor_to_bytes(t)


def _cotangent(z: torch.Tensor, loss: str, g: torch.Generator) -> torch.Tensor:
    """dL/dz of the loss named ``loss`` for logits ``z`` [..., V] (through autograd)."""
    v = z.shape[-1]
    rows = z.reshape(-1, v)
    n = rows.shape[0]
    y = torch.randint(0, v, (n,), generator=g)
    w = (torch.rand(v, generator=g) + 0.5).to(z.dtype)
    x = z.detach().clone().requires_grad_(True)
    flat = x.reshape(-1, v)
    if loss == "masked":  # a vocabulary mask: -inf logits outside the allowed classes
        with torch.no_grad():
            x[..., v // 2 :] = float("-inf")
        y = y % max(1, v // 2)
    if loss in ("mean", "masked", "perturbed", "divided"):
        out = F.cross_entropy(flat, y)
    elif loss == "sum":
        out = F.cross_entropy(flat, y, reduction="sum")
    elif loss == "transposed":  # class dimension 1: cross_entropy(logits.transpose(1, 2), y)
        if x.dim() == 3:
            out = F.cross_entropy(x.transpose(1, 2), y.reshape(x.shape[:2]))
        else:
            out = F.cross_entropy(flat, y)
    elif loss == "upcast":  # the loss in float32 on half logits (autocast, HF's logits.float())
        out = F.cross_entropy(flat.float(), y, reduction="sum") / 7
    elif loss == "weight":
        out = F.cross_entropy(flat, y, weight=w)
    elif loss == "ignore":
        y[torch.rand(n, generator=g) < 0.4] = -100
        y[0] = max(int(y[0]), 0)  # at least one counted row
        out = F.cross_entropy(flat, y, ignore_index=-100)
    elif loss == "negated":
        out = -F.cross_entropy(flat, y)
    elif loss == "smoothing":
        out = F.cross_entropy(flat, y, label_smoothing=0.1)
    elif loss == "mse":
        out = ((flat - 1) ** 2).mean()
    elif loss == "random":
        return torch.randn(z.shape, generator=g).to(z.dtype)
    elif loss == "partial":
        half = max(1, n // 2)
        out = F.cross_entropy(flat[:half], y[:half], reduction="sum") + (flat[half:] ** 2).sum()
    else:
        raise AssertionError(loss)
    (c,) = torch.autograd.grad(out, x)
    if loss == "perturbed":  # a few flipped low bits: ce rows with a residual
        bits = c.view(-1).view(cc.INTS[c.element_size()])
        at = torch.randint(0, bits.numel(), (max(1, bits.numel() // 50),), generator=g)
        bits[at] ^= 1
    if loss == "divided":  # DDP's cotangent / world_size
        c = c / 3
    return c


def _logits(shape: list[int], dtype: torch.dtype, scale: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


@settings(max_examples=150, deadline=None)
@given(
    dtype=st.sampled_from(FLOATS),
    lead=st.lists(st.integers(1, 6), min_size=1, max_size=2),  # [B, V] and [B, T, V]
    v=st.integers(2, 40),
    loss=st.sampled_from(LOSSES),
    scale=st.sampled_from([0.1, 1.0, 4.0, 30.0]),
    seed=st.integers(0, 2**31),
)
def test_roundtrip_is_bitwise(
    dtype: torch.dtype, lead: list[int], v: int, loss: str, scale: float, seed: int
) -> None:
    z = _logits([*lead, v], dtype, scale, seed)
    c = _cotangent(z, loss, torch.Generator().manual_seed(seed + 1))
    if loss == "masked":
        z[..., v // 2 :] = float("-inf")
    enc = codec.unpack(codec.pack(cc.encode_cotangent(z, c)))
    if cc.is_encoded(enc):
        got = cc.EncodedCotangent(enc, where="t: step 0").resolve(z.clone())
    else:
        got = codec.decode_tensor(enc)
    assert got.dtype == c.dtype and got.shape == c.shape
    assert _bytes(got) == _bytes(c)


@pytest.mark.parametrize("dtype", FLOATS)
def test_cross_entropy_rows_are_stored_as_targets_and_scales(dtype: torch.dtype) -> None:
    """mean/sum/class weights, [B, V] and a per-token [B, T, V] with ignore_index rows: the
    zero rows are found exactly and (nearly) every other row is (target, scale). Measured on
    this CPU: every row, with an empty residual; asserted loosely (90% of the rows), as the
    scale is estimated (to within one rounding, then its neighbours are tried), which is
    measured, not proven, to find the recorded one."""
    g = torch.Generator().manual_seed(0)
    for loss, shape in [("mean", [32, 97]), ("sum", [16, 10]), ("weight", [16, 10]),
                        ("ignore", [4, 12, 50])]:  # fmt: skip
        z = _logits(shape, dtype, 3.0, 1)
        c = _cotangent(z, loss, g)
        e = cc.EncodedCotangent(cc.encode_cotangent(z, c), where="t")
        kinds = e.kinds.tolist()
        zero = int((c.reshape(-1, shape[-1]) == 0).all(1).sum())
        assert kinds.count(cc.KIND_ZERO) == zero
        assert kinds.count(cc.KIND_CE) >= 0.9 * (len(kinds) - zero), (loss, kinds)
        assert _bytes(e.resolve(z)) == _bytes(c)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_float32_loss_on_half_logits_is_stored_as_wide_rows(dtype: torch.dtype) -> None:
    """cross_entropy(logits.float(), y) on half logits: the cotangent is the float32 one
    rounded; its rows are rebuilt in float32 and rounded (measured: bf16 every row, empty
    residual; fp16 every row but a few entries)."""
    z = _logits([4, 16, 300], dtype, 3.0, 15)
    c = _cotangent(z, "upcast", torch.Generator().manual_seed(16))
    enc = cc.encode_cotangent(z, c)
    e = cc.EncodedCotangent(enc, where="t")
    assert e.kinds.tolist().count(cc.KIND_CE_WIDE) >= 0.9 * 64
    assert len(codec.pack(enc)) * 10 < len(codec.pack(codec.encode_tensor(c)))
    assert _bytes(e.resolve(z)) == _bytes(c)


@pytest.mark.parametrize("dtype", FLOATS)
def test_a_loss_on_transposed_logits_is_stored_as_transposed_rows(dtype: torch.dtype) -> None:
    """cross_entropy(logits.transpose(1, 2), y) on [B, T, V] logits runs the softmax along
    dimension 1 of [B, V, T], other arithmetic than along the last one; such rows are rebuilt
    in that layout (measured: every row exact)."""
    z = _logits([4, 33, 200], dtype, 3.0, 17)
    c = _cotangent(z, "transposed", torch.Generator().manual_seed(18))
    enc = cc.encode_cotangent(z, c)
    e = cc.EncodedCotangent(enc, where="t")
    kinds = e.kinds.tolist()
    assert kinds.count(cc.KIND_CE_T) + kinds.count(cc.KIND_CE) >= 0.9 * len(kinds)
    assert kinds.count(cc.KIND_CE_T) > 0
    assert len(codec.pack(enc)) * 10 < len(codec.pack(codec.encode_tensor(c)))
    assert _bytes(e.resolve(z)) == _bytes(c)


def test_rows_without_the_structure_fall_back_row_by_row() -> None:
    g = torch.Generator().manual_seed(3)
    z = _logits([8, 20], torch.float32, 2.0, 4)
    c = _cotangent(z, "partial", g)
    e = cc.EncodedCotangent(cc.encode_cotangent(z, c), where="t")
    assert e.kinds.tolist() == [cc.KIND_CE] * 4 + [cc.KIND_GENERIC] * 4
    assert tuple(e.generic.shape) == (4, 20) and _bytes(e.resolve(z)) == _bytes(c)
    for loss in ("smoothing", "mse", "random"):  # nothing to gain: the generic tensor map
        c = _cotangent(z, loss, g)
        enc = cc.encode_cotangent(z, c)
        assert codec.is_tensor_map(enc) and _bytes(codec.decode_tensor(enc)) == _bytes(c)
    # not logits: a vector output, another dtype, another shape
    for out, cot in [(torch.randn(5), torch.randn(5)), (z.double(), c), (z[:, :10], c[:, :10] * 0)]:
        assert codec.is_tensor_map(cc.encode_cotangent(out, cot if out.dim() == 1 else c))


def test_a_perturbed_row_keeps_its_target_and_a_sparse_residual() -> None:
    z = _logits([16, 50], torch.float32, 2.0, 5)
    c = _cotangent(z, "mean", torch.Generator().manual_seed(6))
    c.view(torch.int32)[3, 7] ^= 1 << 3
    e = cc.EncodedCotangent(cc.encode_cotangent(z, c), where="t")
    assert set(e.kinds.tolist()) == {cc.KIND_CE}
    assert e.res_idx.tolist() == [3 * 50 + 7] and e.res_val.tolist() == [8]
    assert _bytes(e.resolve(z)) == _bytes(c)


def test_real_cross_entropy_backward_is_far_smaller_than_the_generic_codec() -> None:
    """A linear classifier's CE backward on real logits (and a per-token LM head): the
    codec's map is a small fraction of the generic one (measured: 24 KB -> 0.5 KB,
    0.8 MB -> 1.2 KB; the bound here is loose, 1/10, as the residual may be nonempty on
    another CPU's kernels)."""
    torch.manual_seed(0)
    for x_shape, v, y_shape in [((64, 32), 97, (64,)), ((4, 50, 32), 1000, (4, 50))]:
        x, head = torch.randn(x_shape), torch.nn.Linear(32, v)
        logits = head(x)
        y = torch.randint(0, v, y_shape)
        (c,) = torch.autograd.grad(F.cross_entropy(logits.reshape(-1, v), y.reshape(-1)), logits)
        enc = cc.encode_cotangent(logits, c)
        small = len(codec.pack(enc))
        generic = len(codec.pack(codec.encode_tensor(c)))
        assert small * 10 < generic, (small, generic)
        assert _bytes(cc.EncodedCotangent(enc, where="t").resolve(logits)) == _bytes(c)


def test_other_logits_raise_instead_of_a_wrong_cotangent() -> None:
    z = _logits([8, 30], torch.float32, 2.0, 7)
    c = _cotangent(z, "mean", torch.Generator().manual_seed(8))
    e = cc.EncodedCotangent(cc.encode_cotangent(z, c), where="t.lmdb: step 3, forward 0")
    off = z.clone()
    off.view(torch.int32)[2, 5] += 1  # one ulp: the recorded cotangent, or an error
    try:
        assert _bytes(e.resolve(off)) == _bytes(c)
    except CotangentDecodeError:
        pass
    off[2, 5] += 0.01  # a replay that is not bitwise the recorded one
    with pytest.raises(CotangentDecodeError, match=r"step 3, forward 0.*cotangent_codec='generic'"):
        e.resolve(off)
    with pytest.raises(CotangentDecodeError, match="needs the replayed output"):
        e.resolve(None)
    with pytest.raises(CotangentDecodeError, match="dtype torch.float64"):
        e.resolve(z.double())
    assert isinstance(CotangentDecodeError("x"), TraceCorruptError)


def test_damaged_maps_are_refused_before_decoding() -> None:
    z = _logits([6, 10], torch.float32, 2.0, 9)
    c = _cotangent(z, "partial", torch.Generator().manual_seed(10))
    good = cc.encode_cotangent(z, c)
    bad_kinds = codec.encode_tensor(torch.full((6,), 7, dtype=torch.uint8))
    bad_target = codec.encode_tensor(torch.full((3,), 10, dtype=torch.int64))
    cases = [
        ({"dtype": "int64"}, "not that of logits"),
        ({"shape": [6]}, "not that of logits"),
        ({"shape": [1 << 30, 1 << 20]}, "more than"),
        ({"kinds": bad_kinds}, "row kind"),
        ({"kinds": codec.encode_tensor(torch.full((6,), 3, dtype=torch.uint8))}, "wide ce row"),
        ({"kinds": codec.encode_tensor(torch.full((6,), 4, dtype=torch.uint8))}, "transposed"),
        ({"target": bad_target}, "target index"),
        ({"res_idx": codec.encode_tensor(torch.tensor([10**6]))}, "differs|pair up"),
        ({"digest": "x"}, "checksum"),
        ({"scale": codec.encode_tensor(torch.zeros(3, dtype=torch.float64))}, "dtype"),
    ]
    for change, match in cases:
        with pytest.raises(TraceCorruptError, match=match):
            cc.EncodedCotangent({**good, **change}, where="t")
    pos = codec.encode_tensor(torch.tensor([10**6]))
    val = codec.encode_tensor(torch.tensor([1], dtype=torch.int32))
    with pytest.raises(TraceCorruptError, match="residual position"):
        cc.EncodedCotangent({**good, "res_idx": pos, "res_val": val}, where="t")


def test_a_field_damaged_into_another_valid_value_is_caught_by_the_checksum() -> None:
    """A record written without checksums can be damaged into values that still decode (a
    target moved, a scale changed): the rebuilt cotangent then fails its own checksum."""
    z = _logits([8, 30], torch.float32, 2.0, 11)
    c = _cotangent(z, "mean", torch.Generator().manual_seed(12))
    good = cc.encode_cotangent(z, c)
    e = cc.EncodedCotangent(good, where="t")
    target, scale = e.target.clone(), e.scale.clone()
    target[0] = (target[0] + 1) % 30
    scale[3] = scale[3] * 2
    for change in ({"target": codec.encode_tensor(target)}, {"scale": codec.encode_tensor(scale)}):
        damaged = cc.EncodedCotangent({**good, **change}, where="t: step 2, forward 0")
        with pytest.raises(CotangentDecodeError, match="checksum mismatch"):
            damaged.resolve(z)


_hostile_leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=6)
    | st.binary(max_size=24)
)
_hostile_tensor = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from([*codec.DTYPES, "object"]),
        "shape": st.lists(st.integers(-2, 1 << 41), max_size=3) | _hostile_leaf,
        "codec": st.sampled_from([*codec.CODECS, "pickle"]),
        "data": st.binary(max_size=64) | _hostile_leaf,
    }
)


@settings(max_examples=150, deadline=None)
@given(
    key=st.sampled_from(sorted(cc._KEYS)),
    value=_hostile_leaf | _hostile_tensor | st.lists(_hostile_leaf, max_size=4),
)
def test_hostile_fields_end_in_trace_corrupt_errors(key: str, value) -> None:
    z = _logits([6, 12], torch.float32, 2.0, 13)
    c = _cotangent(z, "partial", torch.Generator().manual_seed(14))
    good = cc.encode_cotangent(z, c)
    hostile = {**good, key: value}
    try:
        enc = cc.EncodedCotangent(hostile, where="t")
        got = enc.resolve(z)
    except TraceCorruptError:
        return
    assert _bytes(got) == _bytes(c)  # a value that decodes gives the recorded cotangent


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_the_scale_estimate_is_the_loss_gradient_or_a_neighbour(dtype, reduction) -> None:
    """The scale of a cross-entropy row is estimated from its entry of largest probability:
    on torch's own backward it is the loss gradient (−1 for a sum, −1/N for a mean) or one of
    its two neighbours, which ``fit`` then tries, for almost every row (measured 98-100%;
    asserted 95%, the rest go through the residual or the generic rows)."""
    from explaind_trace import cotangent_rows as cr

    g = torch.Generator().manual_seed(0)
    z = (torch.randn(256, 50, generator=g) * 3).to(dtype).requires_grad_(True)
    y = torch.randint(0, 50, (256,), generator=g)
    (c,) = torch.autograd.grad(F.cross_entropy(z, y, reduction=reduction), z)
    a = torch.full((256,), -1.0 if reduction == "sum" else -1 / 256, dtype=dtype)
    a0 = cr._estimate(c, torch.log_softmax(z.detach(), -1), y)
    inf = torch.full_like(a, float("inf"))
    near = (a0 == a) | (torch.nextafter(a0, inf) == a) | (torch.nextafter(a0, -inf) == a)
    assert int(near.sum()) >= 0.95 * 256, int(near.sum())


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_a_plain_cross_entropy_is_fitted_whole_by_one_shared_scale(
    dtype, reduction, monkeypatch
) -> None:
    """torch's own CE backward without weights or ignored rows: ``fit_shared`` finds the
    labels and the loss gradient (−1 for a sum, −1/N for a mean) for the whole block, so the
    row-by-row ``fit`` never runs, and the map has every row ce with an empty residual."""
    from explaind_trace import cotangent_rows as cr

    g = torch.Generator().manual_seed(7)
    z = (torch.randn(96, 97, generator=g) * 3).to(dtype).requires_grad_(True)
    y = torch.randint(0, 97, (96,), generator=g)
    (c,) = torch.autograd.grad(F.cross_entropy(z, y, reduction=reduction), z)
    z = z.detach()
    shared = cr.fit_shared(z, c)
    assert shared is not None
    assert torch.equal(shared[0], y)
    assert float(shared[1]) == (
        -1.0 if reduction == "sum" else float(torch.tensor(-1 / 96, dtype=torch.float64).to(dtype))
    )

    def refuse(*args, **kwargs):
        raise AssertionError("the row-by-row fit ran")

    monkeypatch.setattr(cc, "fit", refuse)
    e = cc.EncodedCotangent(codec.unpack(codec.pack(cc.encode_cotangent(z, c))), where="t")
    assert set(e.kinds.tolist()) == {cc.KIND_CE} and e.res_idx.numel() == 0
    assert torch.equal(e.target, y)
    assert _bytes(e.resolve(z)) == _bytes(c)


@pytest.mark.parametrize("loss", ["weight", "ignore", "negated", "smoothing", "mse", "random",
                                  "partial", "perturbed", "upcast"])  # fmt: skip
def test_the_shared_scale_declines_what_it_cannot_rebuild_exactly(loss: str) -> None:
    """Class weights, ignored rows, a maximised loss, label smoothing, MSE, random rows, a
    block that is cross-entropy only in its first rows, a flipped bit, a float32 loss on
    half logits: no shared scale, and the codec's row-by-row path still round-trips bit for
    bit."""
    from explaind_trace import cotangent_rows as cr

    dtype = torch.bfloat16 if loss == "upcast" else torch.float32
    z = _logits([40, 30], dtype, 3.0, 21)
    c = _cotangent(z, loss, torch.Generator().manual_seed(22))
    if loss == "partial":  # ce in the probed rows, MSE after them: caught by the whole check
        assert cr.fit_shared(z[:8], c[:8]) is not None
    assert cr.fit_shared(z, c) is None
    enc = codec.unpack(codec.pack(cc.encode_cotangent(z, c)))
    got = cc.EncodedCotangent(enc, where="t").resolve(z) if cc.is_encoded(enc) else None
    got = codec.decode_tensor(enc) if got is None else got
    assert _bytes(got) == _bytes(c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocks_mix_the_shared_scale_and_the_row_by_row_fit(dtype, monkeypatch) -> None:
    """A [B, T, V] leaf analysed in blocks of 16 rows (``_BLOCK`` made small): blocks of a
    plain cross-entropy are taken whole, the others (MSE, class weights, a loss on the
    transposed logits) row by row, and the leaf round-trips bit for bit."""
    monkeypatch.setattr(cc, "_BLOCK", 16 * 50)
    g = torch.Generator().manual_seed(30)
    z = _logits([6, 16, 50], dtype, 3.0, 31)
    x = z.clone().requires_grad_(True)
    y = torch.randint(0, 50, (6, 16), generator=g)
    w = (torch.rand(50, generator=g) + 0.5).to(dtype)
    loss = (
        F.cross_entropy(x[:2].reshape(-1, 50), y[:2].reshape(-1))  # blocks 0-1: shared scale
        + ((x[2] - 1) ** 2).mean()  # block 2: MSE, generic rows
        + F.cross_entropy(x[3], y[3], weight=w)  # block 3: one scale per row
        + F.cross_entropy(x[4:].transpose(1, 2), y[4:])  # blocks 4-5: the [B, V, T] loss
    )
    (c,) = torch.autograd.grad(loss, x)
    taken = []
    shared = cc.fit_shared
    monkeypatch.setattr(cc, "fit_shared", lambda z, c: taken.append(shared(z, c)) or taken[-1])
    e = cc.EncodedCotangent(codec.unpack(codec.pack(cc.encode_cotangent(z, c))), where="t")
    assert [t is not None for t in taken] == [True, True, False, False, False, False]
    kinds = e.kinds.reshape(6, 16)
    assert (kinds[:2] == cc.KIND_CE).all() and (kinds[2] == cc.KIND_GENERIC).all()
    assert int((kinds[3] == cc.KIND_CE).sum()) >= 14
    assert _bytes(e.resolve(z)) == _bytes(c)
