"""DDP recording: 2 gloo processes, each recording its shard; the reader merges the ranks.

Tolerances: Σ Jᵀc over both ranks' forwards vs the recorded (all-reduced) gradient differs
only by fp32 summation order (1e-5 relative); kernel completeness as in tests/kernel (1e-4).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.func import functional_call

import explaind_trace as et
from explaind_kernel import compute_kernel
from explaind_trace import codec
from explaind_trace.schema import META, PROGRESS
from explaind_trace.stores import open_store
from tests.trace import trace_helpers as th

ROOT = Path(__file__).resolve().parents[2]
WORLD, STEPS, BATCH = 2, 6, 8

CHILD = """
import sys, torch, torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
import explaind_trace as et
from tests.trace import trace_helpers as th

rank, world, init, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
bucket_view = sys.argv[5] == "1"
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
torch.manual_seed(0)
# gradient_as_bucket_view: DDP replaces .grad by a view of its bucket after the all-reduce
model = DDP(th.MLP(bn=False, p=0.1), gradient_as_bucket_view=bucket_view)
opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
x, y = th.data(n=48)
torch.manual_seed(1 + rank)  # different dropout masks per rank
with et.record(model, opt, store=path, checkpoint_every=4) as rec:
    for t in range(6):
        idx = (torch.arange(8) + 8 * t) % 48
        shard = idx[rank::world]
        rec.set_sample_ids(shard.tolist())
        opt.zero_grad()
        F.cross_entropy(model(x[shard]), y[shard]).backward()
        opt.step()
dist.destroy_process_group()
"""


@pytest.fixture(scope="module", params=[False, True], ids=["grad_copy", "bucket_view"])
def ddp_trace(request, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("ddp")
    path = tmp / "run.lmdb"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    init = f"file://{tmp / 'init'}"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                CHILD,
                str(r),
                str(WORLD),
                init,
                str(path),
                str(int(request.param)),
            ],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for r in range(WORLD)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()[-3000:]
    return path


def test_merged_reader_has_both_ranks(ddp_trace: Path) -> None:
    with et.open_trace(ddp_trace) as tr:
        assert tr.num_steps == STEPS and tr.finished and not tr.skips()
        assert (tr.meta.world_size, tr.meta.rank, tr.meta.cotangent_scale) == (2, 0, 0.5)
        assert tr.param_names == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
        x, _ = th.data(n=48)
        for t in range(STEPS):
            fwds = tr.step(t).forwards
            idx = [(i + 8 * t) % 48 for i in range(BATCH)]
            assert [f.rank for f in fwds] == [0, 1]
            assert [f.ids for f in fwds] == [idx[r::WORLD] for r in (0, 1)]  # ints stay ints
            for f in fwds:
                assert torch.equal(f.args[0], x[[int(i) for i in f.ids]])
        # a sample recorded by rank 1 is fetched from rank 1's store
        assert torch.equal(tr.sample(1), x[1])


def test_cotangents_sum_to_the_averaged_gradient(ddp_trace: Path) -> None:
    model = th.MLP(bn=False, p=0.1)
    with et.open_trace(ddp_trace) as tr:
        for rs in tr.replay():
            params = {n: p.clone().requires_grad_(True) for n, p in rs.params.items()}
            total = {n: torch.zeros_like(p) for n, p in params.items()}
            for f in rs.record.forwards:
                model.train(f.training)
                saved = torch.get_rng_state()
                torch.set_rng_state(f.rng_state)
                out = functional_call(model, params, f.args, f.kwargs)
                torch.set_rng_state(saved)
                grads = torch.autograd.grad(out, list(params.values()), f.cotangent)
                for n, g in zip(params, grads):
                    total[n] += g
            for n, g in rs.record.grads.items():
                err = (total[n] - g).abs().max().item()
                assert err <= 1e-5 * g.abs().max().item(), (rs.index, n, err)


def test_replay_is_bitwise(ddp_trace: Path) -> None:
    with et.open_trace(ddp_trace) as tr:
        last = list(tr.replay())[-1]
        final = tr.final()
        assert final is not None
        for n in tr.param_names:
            assert torch.equal(last.next_params[n], final.params[n])
        assert tr.check_drift().exact


def test_kernel_is_complete_over_both_ranks(ddp_trace: Path) -> None:
    test_x = torch.randn(3, 6, generator=torch.Generator().manual_seed(5))
    res = compute_kernel(str(ddp_trace), th.MLP(bn=False, p=0.1), test_x, progress=False)
    _, rel = res.completeness()
    assert rel <= 1e-4
    change = np.max(np.abs(res.fT - res.f0))
    assert np.max(np.abs(res.nondata)) <= 1e-3 * change


def test_rank_store_directly_is_refused(ddp_trace: Path) -> None:
    with pytest.raises(et.DistributedTraceError, match=r"only rank 1's forwards.*open rank 0"):
        et.open_trace(f"{ddp_trace}.rank1")


def _copy(src: str, dst: str, edit=None) -> None:
    a, b = open_store(src, readonly=True), open_store(dst, readonly=False)
    try:
        for k in a.keys():
            v = a.get(k)
            if edit is not None:
                v = edit(k, v)
            b.put(k, v)
        b.commit()
    finally:
        a.close()
        b.close()


def _with_progress(steps: int):
    def edit(key: str, value: bytes) -> bytes:
        if key != PROGRESS:
            return value
        return codec.pack({**codec.unpack(value), "steps": steps})

    return edit


def test_missing_or_disagreeing_rank_is_named(ddp_trace: Path, tmp_path: Path, caplog) -> None:
    base = str(tmp_path / "copy.lmdb")
    _copy(str(ddp_trace), base)
    with pytest.raises(et.DistributedTraceError, match=r"rank 1 of 2 .*copy\.lmdb\.rank1"):
        et.open_trace(base)
    # rank 1 two steps behind: not the same run
    _copy(f"{ddp_trace}.rank1", f"{base}.rank1", _with_progress(STEPS - 2))
    with pytest.raises(et.DistributedTraceError, match=r"rank 1 recorded 4 steps but rank 0 .*6"):
        et.open_trace(base)
    # one step behind (killed mid-step): the common prefix, with a warning
    other = str(tmp_path / "one.lmdb")
    _copy(str(ddp_trace), other)
    _copy(f"{ddp_trace}.rank1", f"{other}.rank1", _with_progress(STEPS - 1))
    with caplog.at_level(logging.WARNING), et.open_trace(other) as tr:
        assert tr.num_steps == STEPS - 1 and not tr.finished and tr.final() is None
        assert len(tr.step(STEPS - 2).forwards) == 2
    assert "using the 5 steps" in caplog.text
    # a different schema version
    older = str(tmp_path / "schema.lmdb")
    _copy(str(ddp_trace), older)

    def old_schema(key: str, value: bytes) -> bytes:
        if key != META:
            return value
        return codec.pack({**codec.unpack(value), "schema_version": 0})

    _copy(f"{ddp_trace}.rank1", f"{older}.rank1", old_schema)
    with pytest.raises(et.DistributedTraceError, match=r"rank 1's store .* schema version 0"):
        et.open_trace(older)


def _flip(key: str, at: int):
    def edit(k: str, value: bytes) -> bytes:
        if k != key:
            return value
        raw = bytearray(value)
        raw[at] ^= 0x10
        return bytes(raw)

    return edit


def test_verify_checks_every_rank_and_names_the_damaged_one(
    ddp_trace: Path, tmp_path: Path, capsys
) -> None:
    from explaind_attr import cli
    from explaind_trace.info import format_verify, verify_trace

    base = str(tmp_path / "v.lmdb")
    _copy(str(ddp_trace), base)
    _copy(f"{ddp_trace}.rank1", f"{base}.rank1")
    report = verify_trace(base)
    assert report.ok and [s.rank for s in report.stores] == [0, 1]
    assert [s.intact_steps for s in report.stores] == [STEPS, STEPS]
    assert report.stores[1].records > STEPS and report.records > report.stores[0].records
    # one flipped byte inside rank 1's record of step 3 (rank 0's store is intact)
    _copy(f"{ddp_trace}.rank1", f"{base}.rank1", _flip("step/00000003", 40))
    report = verify_trace(base)
    rank0, rank1 = report.stores
    assert rank0.ok and rank0.last_intact_step == STEPS - 1
    assert list(rank1.damaged) == ["step/00000003"] and rank1.last_intact_step == 2
    assert "checksum mismatch" in rank1.damaged["step/00000003"]
    assert "v.lmdb.rank1: record 'step/00000003'" in rank1.damaged["step/00000003"]
    assert list(report.damaged) == ["rank1:step/00000003"] and report.last_intact_step == 2
    text = format_verify(report)
    assert "intact    steps 0..2 of 6 on every rank" in text
    assert "rank 1    " + f"{base}.rank1" in text and "steps 0..5 of 6" in text
    assert cli.main(["info", "--verify", base]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 damaged record(s) (rank1:step/00000003)" in err[0]
    assert "steps 0..2 of 6 read back intact on every rank" in err[0]
    # a rank's store gone: reported for that rank, rank 0 still checked record by record
    import shutil

    shutil.rmtree(f"{base}.rank1")
    report = verify_trace(base)
    assert report.stores[0].ok and list(report.stores[1].damaged) == ["meta"]
    assert "no trace at" in report.stores[1].damaged["meta"] and report.intact_steps == 0
