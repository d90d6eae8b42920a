"""Several quadrature nodes of a step in one row pass: Σ_k w_k ∂f/∂θ(θ + s_k·Δθ) by the rules.

Nodes (`node_pass`): inside one row capture the chunk's rows run one forward per node θ_k, and
one backward of Σ_k w_k·(explained sum at θ_k) — the weights ride on the seeds — gives every
module call its weighted output gradients; a Linear's or Embedding's calls of all nodes go to
its rule as one call, tokens side by side (persample/capture.py, `capture_points`,
`gradients(merge=True)`), any other rule's are summed. Kink pieces (`piece_pass`) put each
input at its own points: a row's G pieces are G consecutive rows at θ + s·Δθ through the
capture's per-row shift, summed by `gradients(groups)` (the folded tokens are a view), the
inputs with similar piece counts in one pass. Either way the rows' Jacobians at the nodes are
never written separately, scaled and added (on the p = 97 Transformer those passes over
[R, P] cost more than the products themselves).

Every `check_every`-th pass of the test side (the first included) is checked per row: J̄·v for
a random v must equal Σ_k w_k J(θ + s_k·Δθ)·v by reverse-over-reverse autograd at each node
(rowjac.exact_jv), all rows; for kink pieces the first two inputs' rows against torch.func at
their own points (TestSide._point_reference). A failure hands the test side to torch.func for
good, as the per-node rules do.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from .kinks import record_switches
from .persample import Shift
from .rowjac import exact_jv, points_jacobian, random_direction, rows_agree, rule_jacobian

log = logging.getLogger(__name__)

#: nodes per pass at most: a layer without a folding rule (a convolution) holds this many row
#: copies of its per-row gradients before they are summed
MAX_GROUP = 4
#: kink pieces: inputs whose pair counts differ by less than this factor go in one pass
PAD = 1.5


def node_pass(
    side,
    theta: Mapping[str, Tensor],
    delta: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    nodes: np.ndarray,
    weights: np.ndarray,
) -> dict[str, Tensor] | None:
    """{name: [R, *shape]} Σ_k w_k ∂f/∂θ(θ + s_k·Δθ) over the nodes, in passes of up to
    MAX_GROUP nodes, or None when the rules cannot treat the model or fail the check (then
    `side.rules` is False and the caller takes the torch.func route)."""
    side.fm.row_capture(list(theta)).workspace.release()  # the last step's J̄ is done with
    s = np.repeat(np.asarray(nodes, dtype=np.float64)[:, None], side.n, 1)
    w = np.repeat(np.asarray(weights, dtype=np.float64)[:, None], side.n, 1)
    return _passes(side, theta, delta, buffers, s, w)


def piece_pass(side, theta, delta, buffers, rows: np.ndarray, s: np.ndarray, w: np.ndarray):
    """{name: [R, *shape]} Σ_j w_j ∂f/∂θ(θ + s_j·Δθ) at test input rows[j] (kink pieces),
    summed per input: inputs with similar pair counts go together (`_buckets`), their q-th
    pairs in group q, or None as `node_pass`, or when the model has no per-row points (then
    the caller takes the pairs in blocks)."""
    n = side.n
    if not side.fm.row_capture(list(theta)).shiftable:
        return None
    cap = side.fm.row_capture(list(theta))
    cap.workspace.release()  # the last step's J̄ is done with
    counts = np.bincount(rows, minlength=n)
    order = np.argsort(rows, kind="stable")
    rank = np.empty(rows.size, dtype=np.int64)  # the pair's place among its input's pairs
    rank[order] = np.arange(rows.size) - np.repeat(np.cumsum(counts) - counts, counts)
    sg, wg = np.zeros((int(counts.max()), n)), np.zeros((int(counts.max()), n))
    sg[rank, rows], wg[rank, rows] = s, w
    side.fm.set_modes(False)
    width = side.width(theta, buffers)
    total: dict[str, Tensor] = {}
    for c, ins in _buckets(counts):
        step = max(1, MAX_GROUP * n // ins.size)  # rows per pass: those of MAX_GROUP nodes
        part = _passes(side, theta, delta, buffers, sg[:c, ins], wg[:c, ins], ins, step)
        if part is None:
            return None
        at = torch.as_tensor(ins, device=next(iter(theta.values())).device)
        for k, v in part.items():
            if k not in total:  # every input is in one bucket: all rows get written
                total[k] = cap.workspace.empty((n, width, *v.shape[1:]), v.dtype, v.device)
            total[k].index_copy_(0, at, v.reshape(ins.size, width, *v.shape[1:]))
    return {k: v.reshape(n * width, *v.shape[2:]) for k, v in total.items()}


def _buckets(counts: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """Inputs by pair count, (c, inputs) with every count in (c / PAD, c]: the inputs with
    fewer than c pairs are padded with zero-weight pairs (at most PAD times the rows)."""
    out, left = [], sorted({int(c) for c in counts if c > 0}, reverse=True)
    while left:
        top = left[0]
        take = [c for c in left if c * PAD > top]
        left = left[len(take) :]
        out.append((top, np.nonzero(np.isin(counts, take))[0]))
    return out


def _passes(side, theta, delta, buffers, s, w, ins=None, step: int = MAX_GROUP):
    """Σ over groups q of w[q, i]·∂f/∂θ(x_i; θ + s[q, i]·Δθ) per input i (of `ins`, by
    default all), in passes of up to `step` groups."""
    side.fm.set_modes(False)
    space = side.fm.row_capture(list(theta)).workspace
    total: dict[str, Tensor] | None = None
    owned = False  # whether `total` is this function's own sum (else the first pass's output)
    for lo in range(0, s.shape[0], step):
        hi = lo + step
        part = _group(side, theta, delta, buffers, s[lo:hi], w[lo:hi], ins)
        if part is None:
            return None
        if total is None:
            total = part
        elif not owned:  # a rule may hand back a tensor the capture shares (a tap's g): the
            # sum goes into buffers of its own, where the later passes are added in place
            total = {
                k: torch.add(total[k], v, out=space.empty(v.shape, v.dtype, v.device))
                for k, v in part.items()
            }
            owned = True
        else:
            for k, v in part.items():
                total[k].add_(v)
        del part
        space.reclaim()  # the next pass writes into the buffers of the one just added
    return total


def _group(side, theta, delta, buffers, s: np.ndarray, w: np.ndarray, ins):
    ref = next(iter(theta.values()))
    width = side.width(theta, buffers)
    xs, index = side.inputs, side.index
    if ins is not None:
        at = torch.as_tensor(ins, device=ref.device)
        xs, index = tuple(x[at] for x in xs), index[at]
    shared = bool(np.all(s == s[:, :1]) and np.all(w == w[:, :1]))  # nodes, not pieces
    try:
        if shared:  # one forward per node, no per-row points
            points = [{k: theta[k] + sq * delta[k] for k in theta} for sq in s[:, 0].tolist()]
            jac = points_jacobian(side, xs, index, points, w[:, 0].tolist(), buffers, width)
        else:
            st = torch.as_tensor(s.T.copy(), dtype=ref.dtype, device=ref.device)  # [m, G]
            wt = torch.as_tensor(w.T.copy(), dtype=ref.dtype, device=ref.device)
            shift = (st, delta)
            jac = rule_jacobian(
                side, theta, buffers, xs, index, width, shift, weights=wt, groups=s.shape[0]
            )
    except (RuntimeError, NotImplementedError, ValueError) as e:
        log.warning("per-row layer rules failed (%s); using torch.func", e)
        jac = None
    if jac is not None and side._evals % side.check_every == 0:
        if not _holds(side, jac, theta, delta, buffers, xs, index, s, w):
            jac = None
    side._evals += 1
    if jac is None:
        side.rules = False
    return jac


def _holds(side, jac, theta, delta, buffers, xs, index, s: np.ndarray, w: np.ndarray) -> bool:
    """J̄·v equals Σ_q w_q J(θ + s_q·Δθ)·v row by row: for nodes shared by every input by
    reverse-over-reverse autograd on all rows, for per-input points (kink pieces) by
    torch.func (or autograd) on the first two inputs' rows."""
    v = random_direction(theta, seed=side._evals)
    try:
        if np.all(s == s[:, :1]):
            rows = jac
            exact = None
            for sq, wq in zip(s[:, 0].tolist(), w[:, 0].tolist()):
                point = {k: theta[k] + sq * delta[k] for k in theta}
                jv = exact_jv(side, point, buffers, xs, index)(v) * wq
                exact = jv if exact is None else exact + jv
        else:
            m = min(2, int(xs[0].shape[0]))
            sub = tuple(x[:m] for x in xs)
            exact = _point_jv(side, theta, delta, buffers, sub, index[:m], s[:, :m], w[:, :m], v)
            rows = {k: j[: exact.numel()] for k, j in jac.items()}
        ok = rows_agree(rows, v, exact)
    except (RuntimeError, NotImplementedError) as e:
        log.warning("the per-row rules could not be checked (%s); using torch.func", e)
        return False
    if not ok:
        log.warning(
            "per-row layer rules at the quadrature nodes disagree with autograd on this model "
            "(rows interact, or a parameter is used outside its module's forward); using "
            "torch.func for the test side"
        )
    return ok


def _point_jv(side, theta, delta, buffers, xs, index, s: np.ndarray, w: np.ndarray, v) -> Tensor:
    """[m·O] Σ_q w[q, i]·J(x_i; θ + s[q, i]·Δθ)·v for the m inputs `xs`, one reference
    Jacobian (side._point_reference) per group."""
    ref = next(iter(theta.values()))
    m = s.shape[1]
    width = side.width(theta, buffers)
    total = None
    for sq, wq in zip(s, w):
        st = torch.as_tensor(sq, dtype=ref.dtype, device=ref.device)
        wt = torch.as_tensor(wq, dtype=ref.dtype, device=ref.device).repeat_interleave(width)
        jac = side._point_reference(theta, delta, buffers, xs, index, st)
        jv = sum(j.reshape(m * width, -1) @ v[k].reshape(-1) for k, j in jac.items()) * wt
        total = jv if total is None else total + jv
    return total


def probe_pass(side, theta, delta, buffers, grid: list[float]) -> list | None:
    """kinks.record_switches at every point θ + s·Δθ of `grid` in one forward — the inputs
    tiled once per point, each row at its own point through the row capture's shift — as a
    list of one record per point; None when the model has no per-row points (then the caller
    runs one forward per point). Kink places only steer the quadrature (the engine measures
    its error exactly), and these equal the per-point forwards' to rounding."""
    cap = side.fm.row_capture(list(theta))
    if not cap.shiftable:
        return None
    g, n = len(grid), side.n
    ref = next(iter(theta.values()))
    xs = tuple(x.repeat(g, *[1] * (x.dim() - 1)) for x in side.inputs)
    index = side.index.repeat(g, *[1] * (side.index.dim() - 1))
    s = torch.as_tensor(grid, dtype=ref.dtype, device=ref.device).repeat_interleave(n)
    try:
        with cap.capture(g * n, theta, Shift(s, delta)) as run:
            switches, sens = record_switches(
                lambda: side.selector(side._call(run, buffers, xs), index), g * n
            )
    finally:
        cap.discard()

    def at(t: Tensor, k: int) -> Tensor:
        return t.reshape(g, n, -1)[k]

    return [
        ([[at(v, k) for v in op] for op in switches], [at(t, k) for t in sens]) for k in range(g)
    ]
