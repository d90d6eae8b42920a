"""The state record (``ckpt/{t:08d}`` and ``final``): encoded and decoded side by side.

    {"step": int,
     "params": {name: tensor},            # θ at that instant
     "buffers": {name: tensor},           # buffers after that step's forwards
     "optimizer_state": {param name: {key: tensor | plain value}},
     "optimizer_digest": str}             # final only: SHA-256 of the optimizer state

The final record keeps θ_T and the buffers (what the kernel evaluates the trained model
with) but not the optimizer state, which nothing downstream of the trace needs and replay
rebuilds from the last checkpoint anyway: its digest (`optimizer_digest`) checks that rebuild
bit for bit, as the whole state did, for a third of the bytes with Adam. Older traces' final
records hold the state itself and are compared as before.

One record type, ``records.Checkpoint``, is both what the recorder captures and what the
reader returns.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import torch

from . import codec
from .encoder import TensorEncoder
from .errors import TraceCorruptError
from .records import Checkpoint
from .schema import FINAL, ckpt_key

if TYPE_CHECKING:
    from .bounds import HeaderBounds

__all__ = [
    "encode_state",
    "encode_checkpoint",
    "encode_final",
    "decode_state",
    "decode_tensors",
    "optimizer_digest",
]


def optimizer_digest(state: dict[str, dict[str, Any]]) -> str:
    """SHA-256 (hex) of a name-keyed optimizer state: names and keys in sorted order, each
    tensor by dtype, shape and bytes, each plain value by type and value (numbers as the
    float they equal, so an int 3 and a float 3.0, which replay treats as the same, agree)."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(f"p:{name}\0".encode())
        entry = state[name]
        for key in sorted(entry):
            v = entry[key]
            h.update(f"k:{key}\0".encode())
            if isinstance(v, torch.Tensor):
                t = v.detach().to("cpu").contiguous()
                h.update(f"t:{t.dtype}:{tuple(t.shape)}\0".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            elif isinstance(v, bool) or v is None or isinstance(v, str):
                h.update(f"v:{type(v).__name__}:{v}\0".encode())
            else:
                h.update(f"n:{float(v)!r}\0".encode())
    return h.hexdigest()


def encode_state(enc: TensorEncoder, s: Checkpoint) -> dict[str, Any]:
    """The stored map of a state record (its payload counted as ``checkpoints``)."""
    return enc.count(
        "checkpoints",
        {
            "step": s.step,
            "params": enc.tensors(s.params),
            "buffers": enc.buffers(s.buffers),
            "optimizer_state": {
                name: {
                    k: enc.tensor(v) if isinstance(v, torch.Tensor) else v for k, v in st.items()
                }
                for name, st in s.optimizer_state.items()
            },
        },
    )


def decode_tensors(d: Any) -> dict[str, torch.Tensor]:
    """A stored ``{name: tensor map}`` back as tensors."""
    if not isinstance(d, dict):
        raise TraceCorruptError("expected a map of tensors")
    return {str(k): codec.decode_tensor(v) for k, v in d.items()}


def decode_state(
    raw: Any, where: str = "a checkpoint record", bounds: HeaderBounds | None = None
) -> Checkpoint:
    """A state record back from its stored map (checked against the trace header when
    ``bounds`` is given)."""
    try:
        if bounds is None:
            tensor = lambda name, k, v: codec.decode_tensor(v, where=where)  # noqa: E731
            params, buffers = decode_tensors(raw["params"]), decode_tensors(raw["buffers"])
        else:
            tensor = lambda name, k, v: bounds.state_tensor(name, k, v, where)  # noqa: E731
            params = bounds.params_map(raw["params"], f"{where}, params")
            buffers = bounds.buffer_map(raw["buffers"], f"{where}, buffers")
            missing = sorted(bounds.params.keys() - params.keys())
            if missing:
                raise TraceCorruptError(f"{where}: parameter {missing[0]!r} is missing")
        state = {
            name: {k: tensor(name, k, v) if codec.is_tensor_map(v) else v for k, v in st.items()}
            for name, st in raw["optimizer_state"].items()
        }
        step = raw["step"]
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise TraceCorruptError(f"{where}: its step {step!r:.40} is not a step index")
        digest = raw.get("optimizer_digest")
        if digest is not None and not (
            isinstance(digest, str)
            and len(digest) == 64
            and all(c in "0123456789abcdef" for c in digest)
        ):
            raise TraceCorruptError(f"{where}: its optimizer digest {digest!r:.40} is not SHA-256")
        return Checkpoint(
            step=step,
            params=params,
            buffers=buffers,
            optimizer_state=state,
            optimizer_digest=digest,
        )
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise TraceCorruptError(f"{where} is malformed ({e!r})") from e


def encode_checkpoint(enc: TensorEncoder, s: Checkpoint) -> tuple[str, dict[str, Any]]:
    """``(ckpt/{step}, map)`` of a checkpoint taken before step ``s.step``."""
    return ckpt_key(s.step), encode_state(enc, s)


def encode_final(enc: TensorEncoder, s: Checkpoint) -> list[tuple[str, bytes]]:
    """The stored ``final`` record: θ_T and the buffers when recording ended, and the digest
    of the optimizer state in place of the state itself."""
    digest = s.optimizer_digest or optimizer_digest(s.optimizer_state)
    trimmed = Checkpoint(step=s.step, params=s.params, buffers=s.buffers, optimizer_state={})
    return enc.pack([(FINAL, {**encode_state(enc, trimmed), "optimizer_digest": digest})])
