"""KernelResult.load validates a result file field by field (types, shapes from N, O, S, C, T, W)."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from explaind_kernel import KernelResult, ResultFileError
from explaind_kernel.result import STEP_FIELDS, TERM_FIELDS

N, O, S, C, T = 2, 3, 4, 2, 5  # noqa: E741 - the axis names of docs/architecture.md


def _result() -> KernelResult:
    rng = np.random.default_rng(0)
    arr = lambda *shape: rng.standard_normal(shape)  # noqa: E731
    return KernelResult(
        trace_id="abc",
        config={"quadrature": "gauss:2"},
        output_names=["a", "b", "c"],
        sample_ids=[f"s{i}" for i in range(S)],
        component_names=["w", "b"],
        component_kinds=["param", "param"],
        window_edges=[0, 2, T],
        num_steps=T,
        f0=arr(N, O),
        fT=arr(N, O),
        **{name: arr(N, O) for name in TERM_FIELDS},
        data=arr(N, O, S),
        **{name: arr(N, O, T) for name in STEP_FIELDS},
        components=arr(N, O, C),
        component_data=arr(N, O, C),
        sample_component=arr(N, O, S, C),
        component_window=arr(N, O, C, 2),
        param_scores={"w": arr(3, 3)},
        step_nodes=np.full(T, 2.0),
    )


def _payload(tmp_path) -> dict:
    path = _result().save(tmp_path / "r.explaind")
    return msgpack.unpackb(path.read_bytes(), raw=False)


def _write(tmp_path, payload: dict):
    path = tmp_path / "bad.explaind"
    path.write_bytes(msgpack.packb(payload, use_bin_type=True))
    return path


def test_a_saved_result_loads_back_exactly(tmp_path) -> None:
    res = _result()
    back = KernelResult.load(res.save(tmp_path / "r.explaind"))
    np.testing.assert_array_equal(back.data, res.data)
    np.testing.assert_array_equal(back.sample_component, res.sample_component)
    assert back.completeness_line() == res.completeness_line()


def _nd(shape, dtype="<f8", data=None):
    arr = np.zeros(shape, dtype=dtype)
    return {"__nd__": True, "dtype": dtype, "shape": list(shape), "data": data or arr.tobytes()}


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("f0", "hello", r"field 'f0' is not an \[N, O\] array"),
        ("data", _nd((N, O, S + 1)), r"field 'data' has shape \(2, 3, 5\), expected \(2, 3, 4\)"),
        ("step_residual", _nd((N, O)), r"'step_residual' has shape \(2, 3\), expected \(2, 3, 5\)"),
        ("components", _nd((N, O, C), "<i8"), "'components' has dtype int64, expected floats"),
        ("residual", _nd((N, O), data=b"123"), "'residual' has 3 bytes of data for shape"),
        ("residual", _nd((N, O), "<c16"), "unsupported array dtype '<c16'"),
        ("residual", {**_nd((N, O)), "shape": [-1, 3]}, "invalid array shape"),
        ("window_edges", [0, 3, 2], "'window_edges' is not an increasing list"),
        ("window_edges", [0, 2], "from 0 to num_steps=5"),
        ("num_steps", "five", "'num_steps' is not a step count"),
        ("sample_ids", [1, "s1", 2, 3], "'sample_ids' is not a list of ids of one type"),
        ("output_names", ["a"], "'output_names' has 1 names for O=3 outputs"),
        ("component_kinds", ["param", "other"], "'component_kinds' is not one 'param'/'slice'"),
        ("sample_component", _nd((N, O, S, C + 1)), "'sample_component' has shape"),
        ("step_nodes", _nd((T + 1,)), r"'step_nodes' has shape \(6,\), expected \(5,\)"),
        ("param_scores", {"nope": _nd((3,))}, "'param_scores' entry 'nope' is not"),
        ("config", "x", "'config' is not a map"),
        ("config", {"a": msgpack.ExtType(1, b"x")}, "'config' holds a ExtType value"),
    ],
)
def test_a_damaged_field_is_named(tmp_path, field, value, message) -> None:
    payload = _payload(tmp_path)
    payload[field] = value
    with pytest.raises(ResultFileError, match=message):
        KernelResult.load(_write(tmp_path, payload))


def test_missing_fields_deep_nesting_and_garbage_are_result_file_errors(tmp_path) -> None:
    payload = _payload(tmp_path)
    del payload["fT"]
    with pytest.raises(ResultFileError, match="field 'fT' is missing"):
        KernelResult.load(_write(tmp_path, payload))
    payload = _payload(tmp_path)
    deep: object = 1
    for _ in range(200):
        deep = [deep]
    payload["extra"] = {"x": deep}
    with pytest.raises(ResultFileError, match="'extra' nests deeper than 32 levels"):
        KernelResult.load(_write(tmp_path, payload))
    path = tmp_path / "junk.explaind"
    for junk in (b"", b"\xc1", msgpack.packb({(1, 2): 3}) + b"", b"\x81\x91\x01\x02"):
        path.write_bytes(junk)
        with pytest.raises(ResultFileError):
            KernelResult.load(path)
