"""Seeded row passes (explaind_kernel/persample/seeds.py): the forward over the base rows, the
backward seeded with every explained output at once, against independent references in float64.

References: the expanded pass (each input repeated once per explained output, one backward of
the sum) and torch.func / plain autograd per input. Tolerance 1e-12 relative to the largest
entry, as in test_persample.py (the same products summed in another order).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from explaind_kernel import rowjac
from explaind_kernel.functional import FunctionalModel
from explaind_kernel.persample import capture, seeds

from .test_node_pass import GAUSS3, PAIRS, SHIFTABLE, _reference, _step
from .test_persample import CASES, CPU, _assert_rows_equal, _setup, _side


def _capture(fm, params):
    return fm.row_capture(list(params))


def _spy(monkeypatch, name: str) -> list:
    """Count the calls of seeds.`name` (the seeded backward, a base-row rule)."""
    seen: list = []
    real = getattr(seeds, name)

    def spy(*a, **k):
        seen.append(1)
        return real(*a, **k)

    monkeypatch.setattr(seeds, name, spy)
    monkeypatch.setattr(capture, name, spy, raising=False)  # (imported there)
    if name in ("_linear", "_layer_norm", "_embedding"):  # the table holds the functions
        for cls, (fits, rule, stock) in list(seeds._BASE.items()):
            if rule is real:
                monkeypatch.setitem(seeds._BASE, cls, (fits, spy, stock))
    return seen


@pytest.mark.parametrize("name", list(CASES))
def test_seeded_rows_equal_the_expanded_pass_and_autograd(name, monkeypatch) -> None:
    """At θ, every model of the per-row table (sequence-first attention: rows on dim 1): the
    seeded pass (no fallback) equals the expanded one and plain autograd per input."""
    fm, params, bufs, x = _setup(name)
    fm.set_modes(False)
    used = _spy(monkeypatch, "seeded_backward")
    side = _side(fm, x)
    width = side.width(params, bufs)
    got = rowjac.rule_jacobian(side, params, bufs, (x,), side.index, width)
    assert used and _capture(fm, params).seeded, "the seeded pass fell back"
    _capture(fm, params).seeded = False  # now the expanded pass
    expanded = rowjac.rule_jacobian(side, params, bufs, (x,), side.index, width)
    ref = _side(fm, x, mode="autograd").jacobian(params, bufs)
    _assert_rows_equal(got, expanded)
    _assert_rows_equal(got, ref)


@pytest.mark.parametrize("shape", [(3, 1000, 5, 33), (2, 64, 4, 512), (4, 40, 3, 7)])
def test_blocked_products_equal_float64_sums(shape, monkeypatch) -> None:
    """The Linear rule's blocked products (blocks of output rows, a tail where the rows do
    not divide) equal the T-term sums written out, in float64."""
    m, n, t, width = shape
    g = torch.randn(m, t, n, dtype=torch.float64).transpose(1, 2)  # the rule's strided view
    a = torch.randn(m, t, width, dtype=torch.float64)
    ref = sum(g[:, :, k, None] * a[:, None, k, :] for k in range(t))
    monkeypatch.setattr(seeds, "BLOCKED_FROM", 1)  # every product in blocks
    got = seeds._bmm_blocked(g, a, torch.empty(m, n, width, dtype=torch.float64))
    assert float((got - ref).abs().max()) <= 1e-12 * float(ref.abs().max())


@pytest.mark.parametrize("entries", [1, 64])  # blocks of one row; blocks and tails
@pytest.mark.parametrize("name", ["linear_3d_embedding_layernorm_sdpa", "mixed_covered_uncovered"])
def test_seeded_rows_in_blocks_equal_autograd(name, entries, monkeypatch) -> None:
    """With every Linear product in blocks of output rows, the seeded rows still equal the
    expanded pass and plain autograd per input."""
    monkeypatch.setattr(seeds, "BLOCKED_FROM", 1)
    monkeypatch.setattr(seeds, "BLOCK_ENTRIES", entries)
    fm, params, bufs, x = _setup(name)
    fm.set_modes(False)
    side = _side(fm, x)
    width = side.width(params, bufs)
    got = rowjac.rule_jacobian(side, params, bufs, (x,), side.index, width)
    assert _capture(fm, params).seeded, "the seeded pass fell back"
    _capture(fm, params).seeded = False
    expanded = rowjac.rule_jacobian(side, params, bufs, (x,), side.index, width)
    ref = _side(fm, x, mode="autograd").jacobian(params, bufs)
    _assert_rows_equal(got, expanded)
    _assert_rows_equal(got, ref)


@pytest.mark.parametrize("name", SHIFTABLE)
def test_seeded_pieces_at_their_own_points_equal_torch_func(name, monkeypatch) -> None:
    """Kink pieces (inputs at their own points, groups of unequal size, weights on the seeds)
    and shared nodes by seeded passes equal Σ w·J from torch.func at each point."""
    fm, params, bufs, x = _setup(name)
    delta = _step(params)
    fm.set_modes(False)
    used = _spy(monkeypatch, "seeded_backward")
    side = _side(fm, x, check_every=1)
    rows, s, w = PAIRS["one_pass"]
    from explaind_kernel.node_pass import piece_pass

    got = piece_pass(side, params, delta, bufs, rows, s, w)
    ref = _side(fm, x, rules=False)._jacobian_at(params, delta, bufs, rows, s, w)
    assert side.rules and used and _capture(fm, params).seeded
    _assert_rows_equal(got, ref)
    nodes, weights = GAUSS3
    got, _ = side.integrated_jacobian(params, delta, bufs, nodes, weights)
    assert side.rules and _capture(fm, params).seeded
    _assert_rows_equal(got, _reference(fm, x, params, delta, bufs, nodes, weights))


def test_linear_layer_norm_and_embedding_rules_at_the_base_rows_are_used(monkeypatch) -> None:
    """On the SDPA block the Linear, LayerNorm and Embedding calls (a padding row; positions
    shared by every row) stay at the base rows (seeds.py's rules), over three nodes' forwards
    merged; the result equals the expanded pass."""
    fm, params, bufs, x = _setup("linear_3d_embedding_layernorm_sdpa")
    delta = _step(params)
    fm.set_modes(False)
    lin, ln = _spy(monkeypatch, "_linear"), _spy(monkeypatch, "_layer_norm")
    emb = _spy(monkeypatch, "_embedding")
    nodes, weights = GAUSS3
    side = _side(fm, x)
    got, _ = side.integrated_jacobian(params, delta, bufs, nodes, weights)
    assert (len(lin), len(ln), len(emb)) == (3, 1, 2)  # qkv, out, head; ln; tok, pos
    _capture(fm, params).seeded = False
    expanded, _ = _side(fm, x).integrated_jacobian(params, delta, bufs, nodes, weights)
    _assert_rows_equal(got, expanded)


class _Doubler(torch.autograd.Function):
    """y = 2x, with a backward the batched (vmapped) backward cannot run: it reads a number
    out of its gradient (`.item()`, which vmap refuses)."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return 2 * x

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return g * (2.0 + 0.0 * g.reshape(-1)[0].item())


class _Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(_Doubler.apply(self.fc1(x))))


@pytest.mark.fallback
def test_a_backward_that_cannot_be_batched_falls_back_to_the_expanded_pass(caplog) -> None:
    """The seeded backward fails on a custom autograd function: the test side says so, takes
    the expanded pass from then on, and stays exact."""
    torch.manual_seed(0)
    model = _Custom()
    fm = FunctionalModel(model, output_module=None, device=CPU, dtype=torch.float64)
    params = {k: v.detach().double() for k, v in model.named_parameters()}
    x = torch.randn(3, 4, dtype=torch.float64)
    fm.set_modes(False)
    side = _side(fm, x)
    with caplog.at_level(logging.WARNING):
        got = side.jacobian(params, {})
    assert "backward over all explained outputs at once failed" in caplog.text
    assert not _capture(fm, params).seeded and side.rules
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    y = fm(leaves, {}, (x,))
    rows = [
        torch.autograd.grad(y[i, o], list(leaves.values()), retain_graph=True)
        for i in range(3)
        for o in range(3)
    ]  # one plain backward per (input, output)
    ref = {k: torch.stack([r[j] for r in rows]) for j, k in enumerate(leaves)}
    _assert_rows_equal(got, ref)


@pytest.mark.parametrize("wrong", ["layout", "base_rule"])
def test_a_wrong_seeded_result_is_caught_per_row(wrong, monkeypatch) -> None:
    """Rolling the rows of the seeded gradients' layout (a custom module's, expanded for its
    local rule) or of the base-row Linear rule keeps every sum over rows but is wrong per row:
    the node-pass check hands the test side to torch.func, and the result stays exact."""
    model = "mixed_covered_uncovered" if wrong == "layout" else "linear_3d_embedding_layernorm_sdpa"
    fm, params, bufs, x = _setup(model)
    delta = _step(params)
    fm.set_modes(False)
    if wrong == "layout":
        real = seeds._grad_rows
        monkeypatch.setattr(seeds, "_grad_rows", lambda *a: real(*a).roll(1, 0))
    else:
        fits, rule, stock = seeds._BASE[nn.Linear]

        def rolled(*a):
            return {k: v.roll(1, 0) for k, v in rule(*a).items()}

        monkeypatch.setitem(seeds._BASE, nn.Linear, (fits, rolled, stock))
    nodes, weights = GAUSS3
    side = _side(fm, x)
    got, _ = side.integrated_jacobian(params, delta, bufs, nodes, weights)
    assert not side.rules
    monkeypatch.undo()
    _assert_rows_equal(got, _reference(fm, x, params, delta, bufs, nodes, weights))


def test_grad_rows_lays_out_rows_input_output_group() -> None:
    """[O, m·G, ...] batched gradients become rows (j·O + o)·G + k, on dim 0 and dim 1."""
    o, m, g = 3, 2, 4
    grad = torch.arange(o * m * g * 5.0).reshape(o, m * g, 5)
    got = seeds._grad_rows(grad, 0, m * g, o, g)
    for j in range(m):
        for oo in range(o):
            for k in range(g):
                assert torch.equal(got[(j * o + oo) * g + k], grad[oo, j * g + k])
    seq = grad.reshape(o, 1, m * g, 5).expand(o, 2, m * g, 5)  # rows on dim 1
    got1 = seeds._grad_rows(seq, 1, m * g, o, g)
    assert torch.equal(got1[1], got)
    a = torch.arange(m * g * 5.0).reshape(m * g, 5)
    rows = seeds._rows(a, 0, m * g, o, g)
    assert torch.equal(rows[(1 * o + 2) * g + 3], a[1 * g + 3])
    assert np.array_equal(seeds._rows(a[:3], 0, m * g, o, g).numpy(), a[:3].numpy())


# ------------------------------------------------------------------ workspace
def test_the_workspace_lends_again_only_what_nobody_holds() -> None:
    """A buffer comes back at release() only when no tensor is left on it."""
    from explaind_kernel.persample.workspace import MIN_BYTES, Workspace

    ws = Workspace()
    n = MIN_BYTES // 8
    a = ws.empty((n,), torch.float64, CPU)
    b = ws.empty((2, n // 2), torch.float64, CPU)
    held = b[1:]  # a view keeps b's buffer
    pa, pb = a.data_ptr(), b.data_ptr()
    del a, b
    ws.release()
    c = ws.empty((n,), torch.float64, CPU)
    d = ws.empty((n,), torch.float64, CPU)
    assert c.data_ptr() == pa and d.data_ptr() not in (pa, pb)
    assert held.data_ptr() == pb + (n // 2) * 8
    small = ws.empty((4,), torch.float64, CPU)  # small tensors: the allocator's
    assert small.numel() == 4 and len(ws._lent) == 2
    sizes = [3 * n, n + 8, 2 * n]  # several free buffers: the smallest that fits is lent
    bufs = [ws.empty((k,), torch.float64, CPU) for k in sizes]
    ptrs = [b.data_ptr() for b in bufs]
    del bufs, c, d
    ws.release()
    got = [ws.empty((n + 4,), torch.float64, CPU) for _ in range(3)]
    assert [g.data_ptr() for g in got[:2]] == [ptrs[1], ptrs[2]]
    assert got[2].data_ptr() not in ptrs  # 3n is more than twice n + 4: not lent


def _workspace_model():
    """A Linear model large enough for the workspace's buffers, in float64 eval mode."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 40))
    fm = FunctionalModel(model, output_module=None, device=CPU, dtype=torch.float64)
    params = {k: v.detach().double() for k, v in model.named_parameters()}
    x = torch.randn(8, 64, dtype=torch.float64)
    fm.set_modes(False)
    return fm, params, x


def test_jacobians_of_earlier_steps_stay_intact_while_buffers_are_reused() -> None:
    """Two steps of fused nodes on a Linear model large enough for the workspace: a result
    the caller still holds is never overwritten; a dropped one's buffer is written again."""
    fm, params, x = _workspace_model()
    nodes, weights = GAUSS3
    side = _side(fm, x)
    d1, d2 = _step(params, seed=2), _step(params, seed=5)
    first, _ = side.integrated_jacobian(params, d1, {}, nodes, weights)
    kept = {k: v.clone() for k, v in first.items()}
    second, _ = side.integrated_jacobian(params, d2, {}, nodes, weights)
    for k in first:  # held: untouched, and not shared with the second result
        assert torch.equal(first[k], kept[k])
        assert first[k].data_ptr() != second[k].data_ptr()
    ptr = second["2.weight"].data_ptr()
    _assert_rows_equal(second, _reference(fm, x, params, d2, {}, nodes, weights))
    del second
    third, _ = side.integrated_jacobian(params, d1, {}, nodes, weights)
    assert third["2.weight"].data_ptr() == ptr  # the dropped result's memory, written again
    _assert_rows_equal(third, kept)


def test_kink_pieces_through_the_workspace_stay_on_the_rules() -> None:
    """piece_pass at the workspace's sizes, three buckets twice over (buffers lent, taken
    back, lent again in other shapes): the rules hold and equal torch.func at each point."""
    from explaind_kernel.node_pass import piece_pass

    fm, params, x = _workspace_model()
    counts = [2, 2, 2, 2, 2, 4, 4, 6]
    rows = np.repeat(np.arange(8), counts)
    s = np.concatenate([np.linspace(0.05, 0.95, c) for c in counts])
    w = np.concatenate([np.full(c, 1.0 / c) for c in counts])
    side = _side(fm, x, check_every=1)
    ref_side = _side(fm, x, rules=False)
    for seed in (2, 5):
        delta = _step(params, seed=seed)
        got = piece_pass(side, params, delta, {}, rows, s, w)
        assert side.rules
        _assert_rows_equal(got, ref_side._jacobian_at(params, delta, {}, rows, s, w))


def test_kink_pieces_in_several_passes_are_summed_into_buffers_of_their_own() -> None:
    """Nine pieces per input at the workspace's sizes: passes of 4, 4 and 1 groups, the first
    pass's output summed with the second into a lent buffer, the third added in place; a
    pass's buffers, once added, go to the next pass. Twice over: equal to torch.func."""
    from explaind_kernel.node_pass import piece_pass

    fm, params, x = _workspace_model()
    rows = np.repeat(np.arange(8), 9)
    s = np.tile(np.linspace(0.05, 0.95, 9), 8)
    w = np.full(rows.size, 1.0 / 9)
    side = _side(fm, x, check_every=1)
    ref_side = _side(fm, x, rules=False)
    space = fm.row_capture(list(params)).workspace
    for seed in (2, 5):
        delta = _step(params, seed=seed)
        got = piece_pass(side, params, delta, {}, rows, s, w)
        assert side.rules
        _assert_rows_equal(got, ref_side._jacobian_at(params, delta, {}, rows, s, w))
    assert space._free, "the added passes' buffers were taken back within the step"


def test_reclaim_takes_back_what_nobody_holds_and_keeps_lending_the_rest() -> None:
    """reclaim() frees the dropped buffers for the next pass of the step; a buffer still held
    stays lent, and the step's release() takes it back once it is dropped."""
    from explaind_kernel.persample.workspace import MIN_BYTES, Workspace

    ws = Workspace()
    n = MIN_BYTES // 8
    a, b = ws.empty((n,), torch.float64, CPU), ws.empty((n,), torch.float64, CPU)
    pa, pb = a.data_ptr(), b.data_ptr()
    del a
    ws.reclaim()
    again = ws.empty((n,), torch.float64, CPU)
    assert again.data_ptr() == pa
    assert ws.empty((n,), torch.float64, CPU).data_ptr() not in (pa, pb)  # b is held
    del b
    ws.release()
    assert pb in {t.data_ptr() for t in ws._free}


class _ReluNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.ln, self.fc2 = nn.Linear(64, 128), nn.LayerNorm(128), nn.Linear(128, 40)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.ln(torch.relu(self.fc1(x))))


def test_a_kernel_run_with_kink_pieces_stays_on_the_fast_path(caplog) -> None:
    """A ReLU network at the workspace's sizes (J of fc1: 21 MB) with kink splits: no route
    falls back (every fallback logs a warning) and the rewrite completes the real output."""
    import explaind_trace
    from explaind_kernel import compute_kernel

    torch.manual_seed(0)
    model, fresh = _ReluNet(), _ReluNet()
    fresh.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(32, 64), torch.randint(0, 40, (32,))
    store = "memory://seeded-relu"
    with explaind_trace.record(model, opt, store=store):
        for step in range(4):
            opt.zero_grad()
            nn.functional.cross_entropy(
                model(x[8 * step : 8 * step + 8]), y[8 * step : 8 * step + 8]
            ).backward()
            opt.step()
    with caplog.at_level(logging.WARNING, logger="explaind_kernel"):
        res = compute_kernel(store, fresh, x[:8], dtype="float64", progress=False, kink_splits=4)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert float(res.step_nodes.mean()) > 2.0  # kinks were cut
    with torch.no_grad():
        actual = model(x[:8]).double().numpy()
    assert np.max(np.abs(res.completeness_residual)) <= 1e-7 * np.max(np.abs(actual))


@pytest.mark.parametrize("block", [1 << 20, 64])
def test_the_per_row_check_in_blocks_accepts_exact_rows_and_catches_one_wrong(
    block, monkeypatch
) -> None:
    """rows_agree reads J in row blocks (here one block per tensor, and blocks of one row):
    J·v computed independently (an einsum in float64) passes; one entry of one row off by 1e-6
    of the row's scale is caught in that row."""
    monkeypatch.setattr(rowjac, "CHECK_BLOCK_BYTES", block)
    g = torch.Generator().manual_seed(0)
    jac = {
        "a": torch.randn(7, 3, 5, generator=g, dtype=torch.float64),
        "b": torch.randn(7, 4, generator=g, dtype=torch.float64),
    }
    v = {
        "a": torch.randn(3, 5, generator=g, dtype=torch.float64),
        "b": torch.randn(4, generator=g, dtype=torch.float64),
    }
    exact = torch.einsum("rij,ij->r", jac["a"], v["a"]) + jac["b"] @ v["b"]
    assert rowjac.rows_agree(jac, v, exact)
    wrong = {k: t.clone() for k, t in jac.items()}
    wrong["a"][5, 1, 2] += 1e-6 * float(jac["a"][5].abs().sum())
    assert not rowjac.rows_agree(wrong, v, exact)
