"""describe()/format_info(): the numbers `explaind info` shows."""

from __future__ import annotations

import pytest
import torch

import explaind_trace as et
from explaind_trace.info import describe, format_info
from tests.trace import trace_helpers as th


def test_describe_and_format(tmp_path) -> None:
    path = tmp_path / "i.lmdb"
    torch.manual_seed(0)
    model = th.MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = th.data()
    with et.record(model, opt, store=path, checkpoint_every=3):
        th.train(model, opt, None, x, y, steps=7)
    d = describe(path)
    assert d["steps"] == 7 and d["skipped_steps"] == 0 and d["finished"]
    assert d["checkpoints"] == [0, 3, 6]
    assert d["parameters"] == sum(p.numel() for p in model.parameters()) and d["param_tensors"] == 6
    assert d["optimizer"] == "torch.optim.sgd.SGD"
    assert d["bytes_on_disk"] > 0 and d["stored_bytes"] > 0
    raw = 7 * 4 * d["parameters"] + 7 * 8 * 6 * 4  # fp32 grads + the fp32 input batches
    assert d["raw_bytes"] == raw and d["compression_ratio"] == raw / d["stored_bytes"]
    assert d["drift"]["exact"] and d["drift"]["checked"] == [3, 6, 7]
    text = format_info(d)
    assert "7 committed, 0 skipped" in text and "exact" in text and "lossless" in text


def _dir_trace(tmp_path, steps: int = 7):
    path = tmp_path / "v"
    torch.manual_seed(0)
    model = th.MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = th.data()
    with et.record(model, opt, store=f"dir://{path}", checkpoint_every=3):
        th.train(model, opt, None, x, y, steps=steps)
    return path


def test_verify_reports_damaged_records_and_the_last_intact_step(tmp_path) -> None:
    from explaind_trace.info import format_verify, verify_trace

    path = _dir_trace(tmp_path)
    report = verify_trace(f"dir://{path}")
    assert report.ok and report.intact_steps == 7 and report.last_intact_step == 6
    assert report.records > 7 and report.bytes > 0
    (path / "step" / "00000004").write_bytes(b"\x93not a record")
    report = verify_trace(f"dir://{path}")
    assert list(report.damaged) == ["step/00000004"] and report.last_intact_step == 3
    assert "step/00000004" in format_verify(report) and "steps 0..3 of 7" in format_verify(report)


def test_cli_info_verify_exits_2_with_one_line(tmp_path, capsys) -> None:
    from explaind_attr import cli

    path = _dir_trace(tmp_path)
    assert cli.main(["info", "--verify", f"dir://{path}"]) == 0
    assert "damaged   none" in capsys.readouterr().out
    (path / "ckpt" / "00000003").write_bytes(b"")
    assert cli.main(["info", "--verify", f"dir://{path}"]) == 2
    captured = capsys.readouterr()
    assert "ckpt/00000003" in captured.out
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("explaind: error: ")
    assert "1 damaged record(s) (ckpt/00000003); steps 0..2 of 7" in err[0]


def test_bytes_per_step_by_kind_and_the_cotangent_codec(tmp_path) -> None:
    """The kinds count the stored tensor payloads (checked against the stored step records);
    the cross-entropy codec shrinks the cotangents of a 20-class classifier."""
    from explaind_trace import codec
    from explaind_trace.schema import step_key

    per = {}
    for name in ("generic", "auto"):
        path = tmp_path / f"{name}.lmdb"
        torch.manual_seed(0)
        model = th.MLP(d_out=20)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = th.data(classes=20)
        with et.record(model, opt, store=path, checkpoint_every=3, cotangent_codec=name):
            th.train(model, opt, None, x, y, steps=6)
        d = describe(path, check_drift=False)
        assert d["cotangent_codec"] == name
        per[name] = d["bytes_per_step"]
        assert per[name]["fingerprints"] == 0 and per[name]["other"] > 0
        assert sum(per[name].values()) * 6 == pytest.approx(d["stored_bytes"], rel=1e-12)
        with et.open_trace(path) as trace:
            recs = [codec.unpack(trace.store.get(step_key(t)))["grads"] for t in range(6)]
            # schema 2 packs a step's gradients into one tensor when they share a dtype
            grads = sum(
                len(m["data"])
                for g in recs
                for m in ([g["data"]] if g.get("packed") == 1 else g.values())
            )
        assert per[name]["gradients"] * 6 == pytest.approx(grads, rel=1e-12)
        text = format_info(d)
        assert ("auto (cross-entropy codec" in text) == (name == "auto") and "per step" in text
    assert per["auto"]["gradients"] == per["generic"]["gradients"]
    assert per["auto"]["cotangents"] * 2 < per["generic"]["cotangents"]
