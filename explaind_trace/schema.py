"""The trace format at a glance: the keys of a trace, its version, and where each record is coded.

A trace is a key/value store of msgpack maps (tensors inside them as ``codec`` tensor maps;
nothing is pickled), each stored value sealed with a checksum by ``codec.pack``. Each record
kind is encoded and decoded side by side, in one module:

============================  ===============================  ==============================
key                           what it holds                    encode + decode
============================  ===============================  ==============================
``meta``                      the header: versions, names,     ``header.py``
                              shapes, optimizer, options
``progress``                  committed steps, finished,       ``writer.py`` / ``reader.py``
                              final, skipped, error
``step/{t:08d}``              gradients, hyperparameters,      ``steps.py``
                              forwards, buffers of step t
``sample/{content id}``       the input rows of one sample     ``steps.py``
``skip/{n:08d}``              forwards of a discarded step     ``steps.py``
``rng/{n:08d}``               a base RNG state that forwards   ``rngstates.py``
                              store their state against
``ckpt/{t:08d}``, ``final``   the state record (θ, buffers,    ``state.py``
                              optimizer state; final: its
                              SHA-256 digest instead)
============================  ===============================  ==============================

The input and output structures inside a forward are small trees (``trees.py``).

Versions: a reader reads every schema version up to ``SCHEMA_VERSION`` and refuses newer
ones with ``SchemaVersionError``. Version 2 made step records compact: RNG states against a
shared base state (``rng/`` records, ``rngstates.py``), gradient fingerprints packed with 8
samples per tensor (``fingerprint.py``), row content ids as 16-byte digests and
hyperparameters as their changes to the header's (``steps.py``); version 1 records (whole
RNG states, fingerprints per parameter with 32 samples, hex ids, whole hyperparameters) are
read as before. Fields added within a version (``options`` in the header) are optional and
read with their defaults when absent.
"""

from __future__ import annotations

import importlib.metadata

__all__ = [
    "SCHEMA_VERSION",
    "FORMAT",
    "META",
    "PROGRESS",
    "FINAL",
    "step_key",
    "ckpt_key",
    "skip_key",
    "sample_key",
    "rng_key",
    "key_index",
    "library_version",
]

SCHEMA_VERSION = 2
FORMAT = "explaind-trace"
META = "meta"
PROGRESS = "progress"
FINAL = "final"


def library_version() -> str:
    """The installed explaind version (``0.1.0`` when running from a source tree)."""
    try:
        return importlib.metadata.version("explaind")
    except importlib.metadata.PackageNotFoundError:
        return "0.1.0"


def step_key(t: int) -> str:
    return f"step/{t:08d}"


def ckpt_key(t: int) -> str:
    return f"ckpt/{t:08d}"


def skip_key(n: int) -> str:
    return f"skip/{n:08d}"


def sample_key(content_id: str) -> str:
    return f"sample/{content_id}"


def rng_key(n: int) -> str:
    return f"rng/{n:08d}"


def key_index(key: str) -> int:
    """The number in a ``step/``, ``ckpt/`` or ``skip/`` key."""
    return int(key.split("/", 1)[1])
