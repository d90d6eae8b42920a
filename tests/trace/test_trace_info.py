"""describe()/format_info(): the numbers `explaind info` shows."""

from __future__ import annotations

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
