"""The gradient fingerprint (``explaind_trace.fingerprint``) against a per-tensor reference:
bit sums exact modulo 2⁶⁴ (Python integers), samples at the named positions bit for bit,
norms in float64; the numpy path (contiguous float32/float64 CPU gradients) and the torch
path (every other gradient) give the same fingerprints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from explaind_trace import fingerprint

_INTS = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}


def _reference(name: str, g: torch.Tensor) -> dict:
    flat = g.detach().contiguous().reshape(-1)
    raw = flat.view(fingerprint._INT[flat.element_size()]).numpy().astype(np.int64)
    total = sum(int(v) for v in raw.tolist()) % 2**64  # exact, then two's complement
    bits = total - 2**64 if total >= 2**63 else total
    pos = fingerprint.positions(name, flat.numel())
    norm = float(np.linalg.norm(flat.double().numpy())) if flat.numel() else 0.0
    return {"bits": bits, "norm": norm, "at": flat[pos]}


def _grads(dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    big = 1e300 if dtype == torch.float64 else 1e4  # float64 bit patterns overflow int64 sums
    return {
        "w": torch.randn(37, 11, generator=g).to(dtype),
        "b": torch.randn(5, generator=g).to(dtype),  # fewer elements than SAMPLES
        "one": torch.randn(1, generator=g).to(dtype),
        "empty": torch.zeros(0, dtype=dtype),
        "t": torch.randn(9, 13, generator=g).to(dtype).t(),  # not contiguous
        "large": (torch.randn(3000, generator=g) * big).to(dtype),
        "neg": -torch.rand(400, generator=g).to(dtype) - 1,  # all sign bits set
    }


def _same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for n in want:
        assert got[n]["bits"] == want[n]["bits"], n
        a, b = got[n]["at"], want[n]["at"]
        assert a.dtype == b.dtype and a.shape == b.shape, n
        ints = fingerprint._INT[a.element_size()]
        assert torch.equal(a.view(ints), b.view(ints)), n
        assert got[n]["norm"] == pytest.approx(want[n]["norm"], rel=1e-5, abs=1e-30), n


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("numpy_path", [True, False])
def test_fingerprints_equal_a_per_tensor_reference(
    dtype: torch.dtype, numpy_path: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not numpy_path:
        monkeypatch.setattr(fingerprint, "_on_host", lambda g: False)
    grads = _grads(dtype, seed=3)
    cache: dict = {}
    for _ in range(2):  # the second call reads the cached positions
        got = fingerprint.fingerprints(grads, cache)
        _same(got, {n: _reference(n, g) for n, g in grads.items()})
    assert list(got) == list(grads)


def test_numpy_and_torch_paths_agree_and_one_changed_bit_shows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    grads = {**_grads(torch.float32, seed=4), "h": torch.randn(6, dtype=torch.float16)}
    fps = fingerprint.fingerprints(grads)
    monkeypatch.setattr(fingerprint, "_on_host", lambda g: False)
    _same(fps, fingerprint.fingerprints(grads))
    monkeypatch.undo()
    flipped = {n: g.clone() for n, g in grads.items()}
    bits = flipped["large"].view(torch.int32)
    bits[1234] ^= 1  # one bit of one element, not a sampled position
    assert 1234 not in fingerprint.positions("large", 3000)
    again = fingerprint.fingerprints(flipped)
    assert again["large"]["bits"] == fps["large"]["bits"] + (1 if bits[1234] & 1 else -1)
    assert all(again[n]["bits"] == fps[n]["bits"] for n in grads if n != "large")
    # each gradient matches its own fingerprint, as replay checks it
    for n, g in grads.items():
        assert fingerprint.matches(fps[n], g, n)
    assert not fingerprint.matches(fps["large"], flipped["large"], "large")
