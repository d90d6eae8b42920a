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
