"""Test inputs are split into (keys, tensors) and checked against the recorded training
forward before any sweep runs: each bad form gets an error that names it and the fix."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from explaind_kernel.errors import InputError
from explaind_kernel.inputs import check_against_trace, split_inputs


def _reader(args=(), kwargs=None):
    forward = SimpleNamespace(args=list(args), kwargs=dict(kwargs or {}))
    return SimpleNamespace(step=lambda t: SimpleNamespace(forwards=[forward]))


def test_split_keeps_positional_and_keyword_inputs() -> None:
    x, m = torch.zeros(3, 4), torch.ones(3, 4)
    assert split_inputs(x) == ((None,), (x,))
    keys, xs = split_inputs({"input_ids": x, "attention_mask": m})
    assert keys == ("input_ids", "attention_mask") and xs == (x, m)


@pytest.mark.parametrize(
    "bad, match",
    [
        ((), "inputs must be a tensor"),
        ((torch.zeros(3), [1, 2, 3]), "inputs must be a tensor"),
        ((torch.zeros(3, 2), torch.zeros(4, 2)), r"share a non-empty leading batch.*\(3, 2\)"),
        (torch.zeros(0, 2), "share a non-empty leading batch"),
    ],
)
def test_split_refuses_inputs_without_one_batch_dimension(bad, match) -> None:
    with pytest.raises(InputError, match=match):
        split_inputs(bad)


def test_inputs_must_be_passed_like_the_training_forward() -> None:
    reader = _reader(args=[torch.zeros(8, 5)], kwargs={"mask": torch.ones(8, 5)})
    check_against_trace(reader, (None, "mask"), (torch.zeros(2, 5), torch.ones(2, 5)))
    with pytest.raises(InputError, match=r"1 positional tensor input\(s\) and keyword tensors"):
        check_against_trace(reader, (None, "other"), (torch.zeros(2, 5), torch.ones(2, 5)))
    with pytest.raises(InputError, match=r"test input 0 has shape \(2, 6\).*rows of shape \(5,\)"):
        check_against_trace(reader, (None, "mask"), (torch.zeros(2, 6), torch.ones(2, 5)))
    with pytest.raises(InputError, match=r"torch.int64.*torch.float32"):
        check_against_trace(reader, (None,), (torch.zeros(2, 5, dtype=torch.long),))
