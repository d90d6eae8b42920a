"""Several quadrature nodes in one row pass (explaind_kernel/node_pass.py) and node weights on the
seeds of the rules' backward, against an independent reference in float64.

Reference: Σ_k w_k J(x; θ + s_k·Δθ) with each J from torch.func at the node's own point (or
plain autograd input by input), written and added separately. Tolerance 1e-12 relative to the
largest entry, as in test_persample.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from explaind_kernel import jacobian as jacobian_mod
from explaind_kernel import node_pass as node_pass_mod
from explaind_kernel import rowjac
from explaind_kernel.functional import FunctionalModel
from explaind_kernel.persample import capture, registry
from explaind_kernel.persample import linear as linear_rules
from explaind_kernel.persample.embedding import embedding_rule

from .test_persample import CPU, _assert_rows_equal, _setup, _side

SHIFTABLE = [
    "linear_3d_embedding_layernorm_sdpa",
    "conv1d_conv2d_batchnorm_eval",
    "root_parameters_read_directly",
]  # every hooked module has a shift: kink pieces at per-row points too


def _step(params, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn(v.shape, generator=g, dtype=torch.float64) * 0.1 for k, v in params.items()
    }


def _reference(fm, x, params, delta, bufs, nodes, weights):
    """Σ_k w_k J(θ + s_k·Δθ): one torch.func Jacobian per node, scaled and added."""
    side = _side(fm, x, rules=False)
    total = None
    for s, w in zip(nodes.tolist(), weights.tolist()):
        jac = side.jacobian({k: params[k] + s * delta[k] for k in params}, bufs)
        total = (
            {k: v * w for k, v in jac.items()}
            if total is None
            else {k: total[k] + w * jac[k] for k in jac}
        )
    return total


GAUSS3 = (
    np.array([0.5 - 0.5 * np.sqrt(0.6), 0.5, 0.5 + 0.5 * np.sqrt(0.6)]),
    np.array([5 / 18, 8 / 18, 5 / 18]),
)


PAIRS = {  # (input per pair, s, w): 3, 2 and 4 pairs; 6, 5 and 4; 5, 1 and 1; 9 each
    "one_pass": (
        np.array([0, 0, 0, 1, 1, 2, 2, 2, 2]),
        np.array([0.1, 0.4, 0.8, 0.3, 0.7, 0.05, 0.2, 0.6, 0.95]),
        np.array([0.3, 0.5, 0.2, 0.6, 0.4, 0.1, 0.2, 0.3, 0.4]),
    ),
    "two_passes": (
        np.repeat([0, 1, 2], [6, 5, 4]),
        np.linspace(0.02, 0.98, 15),
        np.linspace(0.1, 0.3, 15),
    ),
    "skewed": (
        np.array([0, 0, 0, 0, 0, 1, 2]),
        np.array([0.1, 0.3, 0.5, 0.7, 0.9, 0.4, 0.4]),
        np.array([0.2, 0.2, 0.2, 0.2, 0.2, 1.0, 1.0]),
    ),
}
PAIRS["nine_each"] = (
    np.repeat([0, 1, 2], 9),
    np.tile(np.linspace(0.05, 0.95, 9), 3),
    np.full(27, 0.1),
)
#: passes: buckets of similar pair counts ({4, 3} and {2}; {6, 5} and {4}; {5} and {1}), one
#: pass each (the rows of MAX_GROUP nodes); nine pairs each: passes of 4, 4 and 1 groups
PASSES = {"one_pass": 2, "two_passes": 2, "skewed": 2, "nine_each": 3}


@pytest.mark.parametrize("name", SHIFTABLE)
@pytest.mark.parametrize("rule", ["gauss2", "gauss3", "midpoint6"])
def test_nodes_in_one_pass_equal_the_sum_of_per_node_jacobians(name, rule, monkeypatch) -> None:
    """All nodes of a rule in one pass (midpoint6: two passes of MAX_GROUP = 4 and 2 nodes),
    every parameter by a rule (no torch.func inside the pass), checked per row on the way."""
    fm, params, bufs, x = _setup(name)
    delta = _step(params)
    if rule == "gauss2":
        nodes, weights = np.array([0.5 - 0.5 / 3**0.5, 0.5 + 0.5 / 3**0.5]), np.array([0.5, 0.5])
    elif rule == "gauss3":
        nodes, weights = GAUSS3
    else:
        nodes, weights = (np.arange(6) + 0.5) / 6, np.full(6, 1 / 6)

    def no_fallback(*a, **k):
        raise AssertionError("torch.func fallback used")

    monkeypatch.setattr(rowjac, "func_jacobian", no_fallback)
    side = _side(fm, x, check_every=1)
    fm.set_modes(False)
    got, spent = side.integrated_jacobian(params, delta, bufs, nodes, weights)
    assert side.rules, "the per-row check rejected the fused pass"
    assert side._evals == -(-len(nodes) // node_pass_mod.MAX_GROUP)  # one evaluation per pass
    assert spent == len(nodes)
    monkeypatch.undo()
    _assert_rows_equal(got, _reference(fm, x, params, delta, bufs, nodes, weights))


@pytest.mark.parametrize("route", ["nodes", "pieces"])
def test_uncovered_parameters_in_a_fused_pass_are_weighted_and_summed(route, monkeypatch) -> None:
    """A parameter no rule covers goes through torch.func (at the rows' own points, for
    pieces) inside the pass; its rows must be weighted and summed like the rules' ones."""
    fm, params, bufs, x = _setup("linear_3d_embedding_layernorm_sdpa")
    delta = _step(params)
    nodes, weights = GAUSS3
    real = capture.RowCapture.gradients

    def without_head(self, *a, **k):
        grads, failed = real(self, *a, **k)
        return grads, failed | {"head.weight"}

    monkeypatch.setattr(capture.RowCapture, "gradients", without_head)
    side = _side(fm, x, check_every=1)
    fm.set_modes(False)
    if route == "nodes":
        got, _ = side.integrated_jacobian(params, delta, bufs, nodes, weights)
        ref = _reference(fm, x, params, delta, bufs, nodes, weights)
    else:
        rows, s, w = PAIRS["two_passes"]
        got = node_pass_mod.piece_pass(side, params, delta, bufs, rows, s, w)
        ref = _side(fm, x, rules=False)._jacobian_at(params, delta, bufs, rows, s, w)
    assert side.rules
    monkeypatch.undo()
    _assert_rows_equal(got, ref)


def test_a_wrong_fused_result_is_caught_per_row(monkeypatch) -> None:
    """Rolling the rows of the folded Linear rule keeps every sum over rows but is wrong per
    row: the node-pass check must hand the test side to torch.func, and the result stay exact."""
    fm, params, bufs, x = _setup("linear_3d_embedding_layernorm_sdpa")
    delta = _step(params)
    nodes, weights = GAUSS3
    right = linear_rules.linear_rule

    def rolled(module, call, rows):
        return {k: v.roll(1, 0) for k, v in right(module, call, rows).items()}

    monkeypatch.setitem(registry._RULES, nn.Linear, rolled)
    side = _side(fm, x)
    fm.set_modes(False)
    got, _ = side.integrated_jacobian(params, delta, bufs, nodes, weights)
    assert not side.rules
    monkeypatch.undo()
    _assert_rows_equal(got, _reference(fm, x, params, delta, bufs, nodes, weights))


@pytest.mark.parametrize("name", ["mha_batch_first", "mixed_covered_uncovered"])
def test_nodes_of_models_without_per_row_points_in_one_pass(name) -> None:
    """nn.MultiheadAttention (local rule, no shift) and a module without a rule: the nodes'
    forwards need no per-row points, so they still go in one pass."""
    fm, params, bufs, x = _setup(name)
    delta = _step(params)
    nodes, weights = GAUSS3
    side = _side(fm, x, check_every=1)
    fm.set_modes(False)
    got, _ = side.integrated_jacobian(params, delta, bufs, nodes, weights)
    assert side.rules and side._evals == 1
    _assert_rows_equal(got, _reference(fm, x, params, delta, bufs, nodes, weights))


def test_folded_groups_equal_the_per_row_rule_summed() -> None:
    """capture.gradients(groups): a Linear over [R·G, t, d] (a row's G consecutive) folded to
    [R, G·t, d] by one product equals the rule on all rows with the groups summed afterwards,
    and an einsum; an Embedding's indices [R·G, t] fold to [R, G·t] alike."""
    torch.manual_seed(0)
    lin = nn.Linear(5, 3).double()
    g_, r, t = 3, 4, 2
    a = torch.randn(g_ * r, t, 5, dtype=torch.float64)
    gout = torch.randn(g_ * r, t, 3, dtype=torch.float64)
    state = dict(lin.named_parameters())
    call = registry.Call((a,), {}, state, False, [], [gout])
    folded = capture._folded(call, g_ * r, g_)
    got = linear_rules.linear_rule(lin, folded, r)
    per_row = linear_rules.linear_rule(lin, call, g_ * r)
    summed = capture._summed(per_row, g_)
    ref_w = torch.einsum("rgto,rgti->roi", gout.view(r, g_, t, 3), a.view(r, g_, t, 5))
    for k in ("weight", "bias"):
        assert torch.allclose(got[k], summed[k], rtol=0, atol=1e-12)
    assert torch.allclose(got["weight"], ref_w, rtol=0, atol=1e-12)
    emb = nn.Embedding(7, 3, padding_idx=0).double()
    idx = torch.randint(0, 7, (g_ * r, t), generator=torch.Generator().manual_seed(3))
    call = registry.Call((idx,), {}, dict(emb.named_parameters()), False, [], [gout])
    got = embedding_rule(emb, capture._folded(call, g_ * r, g_), r)["weight"]
    ref = capture._summed(embedding_rule(emb, call, g_ * r), g_)["weight"]
    assert torch.allclose(got, ref, rtol=0, atol=1e-12) and float(ref.abs().max()) > 0
    cap = capture.RowCapture(lin, ["weight"])
    cap._rows = g_ * r
    with pytest.raises(ValueError, match="12 rows are not rows of 5 consecutive groups"):
        cap.gradients(5)
    cap.close()


@pytest.mark.parametrize("name", SHIFTABLE)
def test_kink_pieces_with_weights_on_the_seeds_equal_torch_func(name) -> None:
    """Kink pieces: pairs (input, s_j, w_j) in blocks, the weights on the rules' seeds, summed
    per input — against the same pairs by torch.func, scaled after."""
    fm, params, bufs, x = _setup(name)
    delta = _step(params)
    rows = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    s = np.array([0.1, 0.4, 0.8, 0.3, 0.7, 0.05, 0.2, 0.6, 0.95])
    w = np.array([0.3, 0.5, 0.2, 0.6, 0.4, 0.1, 0.2, 0.3, 0.4])
    fm.set_modes(False)
    side = _side(fm, x, check_every=1)
    got = side._jacobian_at(params, delta, bufs, rows, s, w)
    assert side.rules
    ref = _side(fm, x, rules=False)._jacobian_at(params, delta, bufs, rows, s, w)
    _assert_rows_equal(got, ref)


@pytest.mark.parametrize("name", SHIFTABLE)
@pytest.mark.parametrize("pairs", list(PAIRS))
def test_kink_pieces_in_grouped_passes_equal_torch_func(name, pairs, monkeypatch) -> None:
    """node_pass.piece_pass: the inputs with c pairs together, input i's q-th pair in group q,
    folded products, checked per row against torch.func at the pairs' own points on the way
    (the "skewed" inputs 1 and 2 share their s: the pass without per-row points)."""
    fm, params, bufs, x = _setup(name)
    delta = _step(params)
    rows, s, w = PAIRS[pairs]
    perm = np.random.default_rng(0).permutation(rows.size)  # any order of the pairs
    fm.set_modes(False)

    def no_fallback(*a, **k):
        raise AssertionError("torch.func fallback used")

    side = _side(fm, x, check_every=1)
    real = rowjac.func_jacobian
    monkeypatch.setattr(rowjac, "func_jacobian", no_fallback)  # inside the passes
    monkeypatch.setattr(jacobian_mod, "func_jacobian", real)  # the check's reference
    got = node_pass_mod.piece_pass(side, params, delta, bufs, rows[perm], s[perm], w[perm])
    assert got is not None and side.rules
    assert side._evals == PASSES[pairs]
    monkeypatch.undo()
    ref = _side(fm, x, rules=False)._jacobian_at(params, delta, bufs, rows, s, w)
    _assert_rows_equal(got, ref)


def test_a_wrong_result_on_kink_pieces_is_caught_per_row(monkeypatch) -> None:
    fm, params, bufs, x = _setup("root_parameters_read_directly")
    delta = _step(params)
    rows, s, w = PAIRS["one_pass"]
    right = linear_rules.linear_rule

    def rolled(module, call, rows):
        return {k: v.roll(1, 0) for k, v in right(module, call, rows).items()}

    monkeypatch.setitem(registry._RULES, nn.Linear, rolled)
    fm.set_modes(False)
    side = _side(fm, x)
    assert node_pass_mod.piece_pass(side, params, delta, bufs, rows, s, w) is None
    assert not side.rules


class ReluTokens(nn.Module):
    """Tokens and a positional table of the root, a ReLU MLP, LayerNorm: kinks along a step."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(9, 6)
        self.pos = nn.Parameter(torch.randn(4, 6) * 0.3)
        self.fc1, self.ln, self.fc2 = nn.Linear(6, 16), nn.LayerNorm(16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(self.emb(x) + self.pos[: x.shape[1]]))
        return self.fc2(self.ln(h).mean(1))


def test_kink_probes_in_one_forward_equal_one_forward_per_point() -> None:
    """probe_pass: the switching values and sensitivities of every probe point from one
    forward at per-row points equal those of one forward per point, and so do the kinks."""
    from explaind_kernel.kinks import breakpoints

    torch.manual_seed(0)
    model = ReluTokens().double()
    fm = FunctionalModel(model, output_module=None, device=CPU, dtype=torch.float64)
    params = {k: v.detach() for k, v in model.named_parameters()}
    bufs: dict = {}
    x = torch.randint(0, 9, (3, 4), generator=torch.Generator().manual_seed(1))
    delta = {k: v * 10 for k, v in _step(params).items()}  # large enough to cross kinks
    fm.set_modes(False)
    side = _side(fm, x)
    grid = np.linspace(0.0, 1.0, 9).tolist()
    got = node_pass_mod.probe_pass(side, params, delta, bufs, grid)
    assert got is not None
    side.fuse_nodes = False  # the per-point forwards
    per_point = []
    real = node_pass_mod.record_switches
    ref = jacobian_mod.record_switches
    for s in grid:
        point = {k: params[k] + s * delta[k] for k in params}
        per_point.append(
            ref(lambda p=point: side.selector(side._call(p, bufs, (x,)), side.index), 3)
        )
    assert real is ref
    assert len(got) == len(per_point) and len(got[0][0]) == len(per_point[0][0]) > 0
    for (sw, sens), (sw_r, sens_r) in zip(got, per_point):
        for a, b in zip(sens, sens_r):
            assert torch.allclose(a, b, rtol=0, atol=1e-12)
        for op, op_r in zip(sw, sw_r):
            for a, b in zip(op, op_r):
                assert torch.allclose(a, b, rtol=0, atol=1e-12)
    cuts, cuts_r = breakpoints(grid, got, 3, 8), breakpoints(grid, per_point, 3, 8)
    assert sum(c.size for c in cuts_r) > 0
    for c, c_r in zip(cuts, cuts_r):
        np.testing.assert_allclose(c, c_r, rtol=0, atol=1e-12)
