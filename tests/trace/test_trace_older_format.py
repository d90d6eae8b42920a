"""A trace written before this version's format changes still reads, value for value.

``data/trace-v1-unsealed`` was recorded by the code of commit 33e0138 (schema version 1, records
without checksums, a header without ``options``): 3 AdamW steps of a BatchNorm + dropout MLP,
checkpoint every 2 steps, user sample ids. ``DIGEST`` is what that commit's own reader gave
for every value below; the reader of today must give the same bytes.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torch

import explaind_trace as et

DATA = Path(__file__).parent / "data" / "trace-v1-unsealed"
DIGEST = "b1ffb54760e6f858fb8a03b8d945af1a70e6a11357c37d4167ff0df26611f0fe"


def _digest(reader: et.TraceReader) -> str:
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
        feed(r.params_at(t))
    for c in [*r.checkpoint_steps, r.num_steps]:
        ck = r.checkpoint(c)
        feed([ck.step, ck.params, dict(ck.buffers), ck.optimizer_state])
    for rs in r.replay():
        feed([rs.params, rs.next_params, rs.state_before, rs.state_after])
    feed(r.sample("s5"))
    feed(r.check_drift().checkpoints)
    return h.hexdigest()


def test_a_trace_of_the_first_format_reads_value_for_value(tmp_path) -> None:
    copy = tmp_path / "trace"
    shutil.copytree(DATA, copy)
    assert (copy / "step" / "00000000").read_bytes()[:1] != b"\xc1"  # written without checksums
    with et.open_trace(f"dir://{copy}") as reader:
        assert reader.meta.schema_version == 1 and "options" not in reader.meta.raw
        assert reader.meta.options == et.RecordOptions(checkpoint_every=2)
        assert reader.num_steps == 3 and reader.finished and reader.check_drift().exact
        assert _digest(reader) == DIGEST
