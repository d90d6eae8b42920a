"""A trace written before this version's format changes still reads, value for value.

``data/trace-v1-unsealed`` was recorded by the code of commit 33e0138 (schema version 1, records
without checksums, a header without ``options``): 3 AdamW steps of a BatchNorm + dropout MLP,
checkpoint every 2 steps, user sample ids. ``DIGEST`` is what that commit's own reader gave
for every value below; the reader of today must give the same bytes.

Decoding is machine-independent: ``DECODE_DIGEST`` (every stored value: steps, forwards,
buffers, checkpoints, a sample) was computed by that commit's reader and must match on any
machine. Replay is arithmetic: its results, and a recompute trace's gradients, are bitwise
those of the recording only on a machine whose float kernels round as the recording one's
did (an AMD EPYC with AVX-512 replays the Intel-recorded fixtures 1-2 ulps apart, whatever
ATEN_CPU_CAPABILITY or MKL_CBWR say). There the replay digests are checked in full;
elsewhere the replay stays within a few fp32 ulps of the stored checkpoints, and the
recompute trace's mismatch is detected and named, never explained as exact.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torch

import explaind_trace as et
from tests.trace import trace_helpers as th

DATA = Path(__file__).parent / "data" / "trace-v1-unsealed"
DIGEST = "b1ffb54760e6f858fb8a03b8d945af1a70e6a11357c37d4167ff0df26611f0fe"
DECODE_DIGEST = "8753689e351781f7c9ac12c4d285a0697f7ef59eeb74489826c39a2523d3afd1"


def _hasher():
    """A sha256 and the function that feeds it tensors (dtype, shape, bytes), maps (sorted
    keys), sequences and plain values."""
    h = hashlib.sha256()

    def feed(obj) -> None:
        if isinstance(obj, torch.Tensor):
            h.update(str((obj.dtype, tuple(obj.shape))).encode())
            h.update(obj.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(obj, dict):
            for k in sorted(obj):
                h.update(str(k).encode())
                feed(obj[k])
        elif isinstance(obj, list | tuple):
            for o in obj:
                feed(o)
        else:
            h.update(repr(obj).encode())

    return h, feed


def _digest(reader: et.TraceReader, *, replayed: bool = True) -> str:
    """Every value the reader gives; ``replayed=False``: the stored ones alone (no replay
    arithmetic: no θ_t between checkpoints, no replay, no drift)."""
    h, feed = _hasher()

    r = reader
    for t in range(r.num_steps):
        s = r.step(t)
        feed([s.grads, s.groups, s.buffers, s.tensor_hyperparams])
        for f in s.forwards:
            feed(
                [
                    *(f.args, f.kwargs, f.cotangent, f.ids, f.rng_state, f.training),
                    *(f.mode_overrides, f.buffers, f.grad_scale, f.content_ids),
                ]
            )
        feed(r.buffers_at(t))
        if replayed:
            feed(r.params_at(t))
    for c in [*r.checkpoint_steps, r.num_steps]:
        ck = r.checkpoint(c)
        feed([ck.step, ck.params, dict(ck.buffers), ck.optimizer_state])
    if replayed:
        for rs in r.replay():
            feed([rs.params, rs.next_params, rs.state_before, rs.state_after])
    feed(r.sample("s5"))
    if replayed:
        feed(r.check_drift().checkpoints)
    return h.hexdigest()


def test_a_trace_of_the_first_format_reads_value_for_value(tmp_path) -> None:
    copy = tmp_path / "trace"
    shutil.copytree(DATA, copy)
    assert (copy / "step" / "00000000").read_bytes()[:1] != b"\xc1"  # written without checksums
    with et.open_trace(f"dir://{copy}") as reader:
        assert reader.meta.schema_version == 1 and "options" not in reader.meta.raw
        assert reader.meta.options == et.RecordOptions(checkpoint_every=2)
        assert reader.num_steps == 3 and reader.finished
        assert _digest(reader, replayed=False) == DECODE_DIGEST
        drift = reader.check_drift()
        if drift.exact:  # this machine rounds as the recording one did
            assert _digest(reader) == DIGEST
        else:
            for step, worst in drift.checkpoints.items():
                scale = max(float(p.abs().max()) for p in reader.checkpoint(step).params.values())
                assert worst <= 8 * 2.0**-23 * scale, (step, worst, scale)
            assert all(v == 0.0 for v in drift.state.values())


RECOMPUTE = Path(__file__).parent / "data" / "trace-v1-recompute"
RECOMPUTE_DIGEST = "4e7bee22d771e1dafd59208c0787f378b0c8b394521cb90e02826a1f908d0869"
#: the stored values alone (fingerprints, forwards, RNG states), as 01b847f's reader gave them
RECOMPUTE_DECODE_DIGEST = "d577ccbb60c9321d2e9965de4d7e5fac0d7760737df5f8be6b44a0cb30d9dc56"


def _recompute_digest(reader: et.TraceReader, *, replayed: bool = True) -> str:
    """Every value of the recompute trace's steps (fingerprints, forwards, RNG states) and
    of its replay with the model, as ``_digest`` feeds them (``replayed=False``: without the
    replay)."""
    h, feed = _hasher()

    for t in range(reader.num_steps):
        s = reader.step(t)
        feed([s.groups, s.buffers, s.tensor_hyperparams])
        feed({n: [f["bits"], f["norm"], f["at"]] for n, f in s.fingerprints.items()})
        for f in s.forwards:
            feed([f.args, f.kwargs, f.ids, f.rng_state, f.training, f.content_ids])
    if replayed:
        for rs in reader.replay(model=th.MLP(bn=True, p=0.2)):
            feed([rs.params, rs.next_params, rs.state_before, rs.state_after])
    return h.hexdigest()


def test_a_recompute_trace_of_schema_version_1_reads_value_for_value(tmp_path) -> None:
    """``data/trace-v1-recompute``, recorded by the code of commit 01b847f: 4 AdamW steps of a
    BatchNorm + dropout MLP, gradients="recompute", cotangent_codec="auto", checkpoint every 2;
    its fingerprints are per parameter with 32 samples, its RNG states whole, its row ids hex
    strings and its hyperparameters whole. ``RECOMPUTE_DIGEST`` is what that commit's reader
    gave; replay recomputes every gradient and checks it against those fingerprints."""
    copy = tmp_path / "trace"
    shutil.copytree(RECOMPUTE, copy)
    with et.open_trace(f"dir://{copy}") as reader:
        assert reader.meta.schema_version == 1 and reader.gradients == "recompute"
        raw = reader._raw_step(1)
        assert "groups" in raw and isinstance(raw["forwards"][0]["rows"], list)
        assert len(next(iter(reader.step(1).fingerprints.values()))["at"]) == 32
        assert _recompute_digest(reader, replayed=False) == RECOMPUTE_DECODE_DIGEST
        try:
            digest = _recompute_digest(reader)
        except et.GradientMismatchError as e:  # a machine that rounds otherwise: named
            assert "step 0" in str(e) and "differ only in the last bits" in str(e)
        else:
            assert digest == RECOMPUTE_DIGEST
