"""The state record (``ckpt/{t:08d}`` and ``final``): encoded and decoded side by side.

    {"step": int,
     "params": {name: tensor},            # θ at that instant
     "buffers": {name: tensor},           # buffers after that step's forwards
     "optimizer_state": {param name: {key: tensor | plain value}}}

One record type, ``records.Checkpoint``, is both what the recorder captures and what the
reader returns.
"""

from __future__ import annotations

from typing import Any

import torch

from . import codec
from .encoder import TensorEncoder
from .errors import TraceCorruptError
from .records import Checkpoint
from .schema import FINAL, ckpt_key

__all__ = [
    "encode_state",
    "encode_checkpoint",
    "encode_final",
    "decode_state",
    "decode_tensors",
]


def encode_state(enc: TensorEncoder, s: Checkpoint) -> dict[str, Any]:
    """The stored map of a state record."""
    return {
        "step": s.step,
        "params": enc.tensors(s.params),
        "buffers": enc.buffers(s.buffers),
        "optimizer_state": {
            name: {k: enc.tensor(v) if isinstance(v, torch.Tensor) else v for k, v in st.items()}
            for name, st in s.optimizer_state.items()
        },
    }


def decode_tensors(d: Any) -> dict[str, torch.Tensor]:
    """A stored ``{name: tensor map}`` back as tensors."""
    if not isinstance(d, dict):
        raise TraceCorruptError("expected a map of tensors")
    return {str(k): codec.decode_tensor(v) for k, v in d.items()}


def decode_state(raw: Any, where: str = "a checkpoint record") -> Checkpoint:
    """A state record back from its stored map."""
    try:
        state = {
            name: {
                k: codec.decode_tensor(v) if codec.is_tensor_map(v) else v for k, v in st.items()
            }
            for name, st in raw["optimizer_state"].items()
        }
        return Checkpoint(
            step=int(raw["step"]),
            params=decode_tensors(raw["params"]),
            buffers=decode_tensors(raw["buffers"]),
            optimizer_state=state,
        )
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise TraceCorruptError(f"{where} is malformed ({e!r})") from e


def encode_checkpoint(enc: TensorEncoder, s: Checkpoint) -> tuple[str, dict[str, Any]]:
    """``(ckpt/{step}, map)`` of a checkpoint taken before step ``s.step``."""
    return ckpt_key(s.step), encode_state(enc, s)


def encode_final(enc: TensorEncoder, s: Checkpoint) -> list[tuple[str, bytes]]:
    """The stored ``final`` record: the state when recording ended."""
    return enc.pack([(FINAL, encode_state(enc, s))])
