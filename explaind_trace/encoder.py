"""The writer thread's tensor encoder: tensors into ``codec`` maps, with reuse and GIL pacing.

The record modules (``steps.py``, ``state.py``) lay out each record; this object turns the
tensors in it into stored maps and counts bytes. It is used by the writer thread only (not
thread-safe). ``raw_bytes`` counts the gradient bytes as fp32 plus the input batch bytes;
``stored_bytes`` the bytes handed to the store (without the progress record).

Values that repeat from record to record are encoded once: a buffer mapping handed over
again (the recorder shares one mapping of copies while the buffers are unchanged, e.g. a
step's buffers and the next forward's); RNG states are stored against a shared base state
(``rngstates.py``).
Sample row ids come from ``RowIds``, which hashes a row again only when it is not cached.

``kind_bytes`` counts the encoded tensor payloads by kind (``KINDS``: the input rows and
constant inputs, the output cotangents, the gradients, the gradient fingerprints of a trace
recorded without gradients, the checkpoint states, the buffers and RNG states of steps and
forwards); the rest of ``stored_bytes`` is record structure
(msgpack, ids, hyperparameters, seals).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import torch

from . import codec
from .cotangent_codec import encode_cotangent
from .gate import WriterGate
from .packing import PackedTensors
from .rngstates import RngEncoder
from .rowids import RowIds

__all__ = ["TensorEncoder", "GilPacer", "yield_gil", "KINDS", "payload_bytes"]

logger = logging.getLogger(__name__)

#: the kinds ``TensorEncoder.kind_bytes`` counts (see the module docstring)
KINDS = ("inputs", "cotangents", "gradients", "fingerprints", "checkpoints", "buffers", "rng")


def payload_bytes(obj: Any) -> int:
    """The bytes of every tensor payload (``data``, and the codec's ``digest``) in ``obj``."""
    if isinstance(obj, dict):
        if codec.is_tensor_map(obj):
            return len(obj["data"])
        return sum(payload_bytes(v) for v in obj.values())
    if isinstance(obj, list):
        return sum(payload_bytes(v) for v in obj)
    return len(obj) if isinstance(obj, bytes) else 0


def yield_gil() -> None:
    """Hand the GIL to the training thread now. The writer runs stretches of pure Python
    (hashing rows, packing maps); without explicit hand-offs a training thread that asks for
    the GIL can wait a whole switch interval (5 ms) each time, which showed as a 20% slowdown."""
    time.sleep(0)


class GilPacer:
    """``yield_gil()`` at most once per ``interval`` seconds of the writer's work.

    A hand-off costs the writer a sleep and a wake-up, which on a busy machine preempts
    the training thread; pacing bounds the training thread's wait for the GIL (about one
    interval) without a hand-off after every small encode step. With a ``gate``
    (``gate.WriterGate``), each call first waits until the gate lets the writer run.
    """

    def __init__(self, interval: float = 0.0002, *, gate: WriterGate | None = None) -> None:
        self.interval = interval
        self.gate = gate
        self._last = time.perf_counter()

    def __call__(self) -> None:
        if self.gate is not None:
            self.gate.wait()
        now = time.perf_counter()
        if now - self._last >= self.interval:
            yield_gil()
            self._last = time.perf_counter()


class TensorEncoder:
    """Tensors into stored maps; remembers which samples are stored (see module docstring)."""

    def __init__(
        self,
        *,
        grad_codec: str = "lossless",
        cotangent_codec: str = "generic",
        level: int = 1,
        checksums: bool = True,
        gate: WriterGate | None = None,
    ) -> None:
        self.lossy = "bf16" if grad_codec == "bf16" else None
        self.cotangent_codec = cotangent_codec
        self._codec_failed = False  # warned once that the cotangent codec failed
        self.kind_bytes = dict.fromkeys(KINDS, 0)
        self.level = level
        self.checksums = checksums
        self.known_samples: set[str] = set()
        self.raw_bytes = 0
        self.stored_bytes = 0
        self.pace = GilPacer(gate=gate)
        self.row_ids = RowIds()
        self._last_buffers: tuple[Mapping[str, torch.Tensor], dict[str, Any]] | None = None
        self.rngs = RngEncoder(level)
        #: the trace header's parameter names, in order (set from the header when it is
        #: written; the packed fingerprints name parameters by their position in it)
        self.param_names: list[str] | None = None
        #: the header's hyperparameters per param group (steps store what differs from them)
        self.header_groups: list[dict[str, Any]] | None = None

    def count(self, kind: str, encoded: Any) -> Any:
        """``encoded``, its payload bytes counted under ``kind``."""
        self.kind_bytes[kind] = self.kind_bytes.get(kind, 0) + payload_bytes(encoded)
        return encoded

    def cotangent(self, output: torch.Tensor | None, c: torch.Tensor) -> dict[str, Any]:
        """A cotangent: by the cotangent codec from its output (``cotangent_codec="auto"``
        and the output kept), else by the tensor codec."""
        encoded = None
        if output is not None and self.cotangent_codec == "auto":
            try:
                encoded = encode_cotangent(output, c, level=self.level)
            except (RuntimeError, ValueError, IndexError, MemoryError) as e:
                # the codec is an optimisation: the run stays recorded, this cotangent as is
                if not self._codec_failed:
                    logger.warning(
                        "the cotangent codec failed (%s: %s); storing cotangents it cannot "
                        "encode with the tensor codec",
                        type(e).__name__,
                        e,
                    )
                    self._codec_failed = True
            self.pace()
        if encoded is None:
            encoded = self.tensor(c)
        return self.count("cotangents", encoded)

    def tensor(self, t: torch.Tensor, *, lossy: bool = False) -> dict[str, Any]:
        encoded = codec.encode_tensor(t, lossy=self.lossy if lossy else None, level=self.level)
        self.pace()
        return encoded

    def gradients(self, d: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """A step's gradients: packed when they were copied into one flat tensor of one dtype
        and the header names them all (``{"packed": 1, "of": [header position], "data":
        tensor map of the flat bytes}``, one compression instead of one per tensor: per-call
        costs dominated small models' steps); else ``tensors(d, lossy=True)``."""
        names = self.param_names
        flat = d.flat() if isinstance(d, PackedTensors) and not self.lossy else None
        if flat is None or names is None or not set(d) <= set(names):
            return self.tensors(d, lossy=True)
        index = {n: i for i, n in enumerate(names)}
        data = codec.encode_bytes(
            codec.tensor_u8(flat), codec.dtype_name(flat.dtype), [flat.numel()], level=self.level
        )
        self.pace()
        return {"packed": 1, "of": [index[n] for n in d], "data": data}

    def tensors(self, d: Mapping[str, torch.Tensor], *, lossy: bool = False) -> dict[str, Any]:
        if isinstance(d, PackedTensors) and not (lossy and self.lossy):
            # the same maps as encode_tensor(view), from slices of the packed bytes
            out = {}
            for name, dtype, shape, raw in d.byte_items():
                out[name] = codec.encode_bytes(
                    raw, codec.dtype_name(dtype), shape, level=self.level
                )
                self.pace()
            return out
        return {k: self.tensor(v, lossy=lossy) for k, v in d.items()}

    def buffers(self, d: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """``tensors(d)``, reused when ``d`` is the mapping encoded last (held, so its id is too)."""
        last = self._last_buffers
        if last is not None and last[0] is d:
            return last[1]
        encoded = self.tensors(d)
        self._last_buffers = (d, encoded)
        return encoded

    def rng(self, slot: str, state: torch.Tensor, out: list[tuple[str, Any]]) -> dict[str, Any]:
        """A forward's RNG state against the current base of ``slot`` (``rngstates.py``); a
        new base record is appended to ``out``."""
        field, base = self.rngs.encode(slot, state, out)
        if base is not None:
            self.count("rng", base)
        self.pace()
        return self.count("rng", field)

    def pack(self, items: list[tuple[str, Any]]) -> list[tuple[str, bytes]]:
        """msgpack each ``(key, map)``; counts the stored bytes."""
        out = []
        for key, value in items:
            out.append((key, codec.pack(value, checksum=self.checksums)))
            self.stored_bytes += len(out[-1][1])
            self.pace()
        return out
