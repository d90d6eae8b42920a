"""Helpers shared by the integration tests: hook counting and trace checks."""

from __future__ import annotations

import uuid

import torch

import explaind_trace as et


def hook_count(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Every module, parameter and optimizer-step hook attached to ``model``/``optimizer``."""
    n = 0
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
    for p in model.parameters():
        n += len(p._post_accumulate_grad_hooks or {}) + len(p._backward_hooks or {})
    n += len(optimizer._optimizer_step_pre_hooks) + len(optimizer._optimizer_step_post_hooks)
    return n


def assert_released(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """No hook left, and a new recorder may attach to the same model and optimizer."""
    assert hook_count(model, optimizer) == 0
    rec = et.Recorder(model, optimizer, store=et.MemoryStore(f"released-{uuid.uuid4().hex}"))
    rec.start()
    rec.close()
    assert hook_count(model, optimizer) == 0


def assert_final_is_model(trace: et.TraceReader, model: torch.nn.Module) -> None:
    """θ_T in the trace equals the trained model's parameters bit for bit."""
    final = trace.final()
    assert final is not None
    params = dict(model.named_parameters())
    assert list(final.params) == trace.param_names
    for name in trace.param_names:
        got, want = final.params[name], params[name].detach().cpu()
        assert got.dtype == want.dtype and torch.equal(got, want), name
