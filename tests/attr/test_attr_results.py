"""Saved results reload without pickle and are checked against their trace."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from explaind_attr import (
    ResultMismatchError,
    check_result_matches,
    data_attribution,
    load_result,
    trace_id_of,
)


def test_roundtrip_keeps_views(result, tmp_path):
    path = result.save(tmp_path / "r.explaind")
    back = load_result(path, trace_id="trace-A")
    np.testing.assert_array_equal(data_attribution(back).values, data_attribution(result).values)
    assert back.sample_ids == result.sample_ids


def test_result_from_another_trace_is_refused(result, tmp_path):
    check_result_matches(result, "trace-A")
    with pytest.raises(
        ResultMismatchError, match="comes from trace 'trace-A', not from trace 'trace-B'"
    ):
        check_result_matches(result, "trace-B")
    path = result.save(tmp_path / "r.explaind")
    with pytest.raises(ResultMismatchError, match="'trace-B'"):
        load_result(path, trace_id="trace-B")


def test_trace_id_of_readers_and_results(result):
    assert trace_id_of("abc") == "abc"
    assert trace_id_of(SimpleNamespace(trace_id="t1")) == "t1"
    reader = SimpleNamespace(meta=SimpleNamespace(raw={"schema_version": 1}))
    fingerprint = trace_id_of(reader)
    assert len(fingerprint) == 24 and fingerprint == trace_id_of(reader)
    assert (
        trace_id_of(SimpleNamespace(meta=SimpleNamespace(raw={"schema_version": 2}))) != fingerprint
    )
    assert trace_id_of(result) == "trace-A"
    check_result_matches(result, SimpleNamespace(trace_id="trace-A"))
    with pytest.raises(ResultMismatchError, match="cannot tell the trace id of a int"):
        trace_id_of(3)


def test_a_saved_result_is_reused_only_for_the_same_question(tmp_path, caplog):
    """Trace id, kernel configuration and a digest of the test inputs and targets must all
    match; anything else is recomputed, with a warning that says which one differs."""
    import torch
    from torch import nn

    import explaind_trace
    from explaind_attr import saved_result_for
    from explaind_kernel import compute_kernel

    def run(store, seed):
        torch.manual_seed(seed)
        model = nn.Linear(3, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with explaind_trace.record(model, opt, store=store):
            for _ in range(3):
                opt.zero_grad()
                model(torch.randn(4, 3)).pow(2).sum().backward()
                opt.step()

    a, b = str(tmp_path / "a.lmdb"), str(tmp_path / "b.lmdb")
    run(a, 0)
    run(b, 1)
    x, y = torch.randn(3, 3), torch.tensor([0, 1, 1])
    res = compute_kernel(a, nn.Linear(3, 2), x, outputs="margin", labels=y, progress=False)
    path = res.save(tmp_path / "r.explaind")
    same = dict(outputs="margin", labels=y, progress=False)
    assert saved_result_for(path, a, x, **same) is not None
    assert saved_result_for(path, a, (x, y), outputs="margin") is not None  # (x, y) is the same
    assert saved_result_for(path, a) is not None  # trace only
    cases = {
        "comes from trace": (b, x, same),
        "other test inputs or targets": (a, x + 1, same),
        "other test inputs or targets ": (a, x, {**same, "labels": 1 - y}),
        "other test inputs or targets  ": (a, x, {**same, "outputs": "loss"}),
        "configuration differs in ['quadrature']": (a, x, {**same, "quadrature": "gauss:3"}),
    }
    for why, (trace, inputs, kw) in cases.items():
        caplog.clear()
        assert saved_result_for(path, trace, inputs, **kw) is None, why
        assert why.strip() in caplog.text
    res.extra.pop("inputs_digest")
    old = res.save(tmp_path / "old.explaind")
    assert saved_result_for(old, a, x, **same) is None
    assert "records no digest" in caplog.text
