"""User sample ids: ints or strings, one type per trace, kept as given.

By default a recorded row's id is the content hash of its bytes (32 hex characters), so
unmodified loaders work and repeated epochs map to the same sample. `Recorder.set_sample_ids`
gives the rows of the next forward the user's own ids instead — typically dataset indices
(a dataset that yields its index) — and those keep their type: an int id is an int in the
trace, in every kernel result, view, CSV and report.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .errors import RecordingError

__all__ = ["MAX_ID_LEN", "check_sample_ids"]

MAX_ID_LEN = 200
_INT64 = 1 << 63


def check_sample_ids(ids: Iterable[Any], kind: type | None) -> tuple[list[int | str], type]:
    """The ids as a list of plain ints or strings, and their type.

    `ids` may be a list, a 1-D integer tensor or numpy array; `kind` is the type of the ids
    given before in this trace (None: none yet). Refuses bools, floats, other objects,
    strings over MAX_ID_LEN characters, ints outside int64, and a type other than `kind`.
    """
    if hasattr(ids, "tolist") and not isinstance(ids, (str, bytes)):
        ids = ids.tolist()  # tensors, numpy arrays: numpy/torch ints become Python ints
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise RecordingError(
            f"set_sample_ids() needs a sequence of ids (one per batch row), got "
            f"{type(ids).__name__}"
        )
    out: list[int | str] = []
    for i in ids:
        if hasattr(i, "item") and not isinstance(i, (int, str)):
            i = i.item()  # a 0-d tensor or numpy scalar
        if isinstance(i, bool) or not isinstance(i, (int, str)):
            raise RecordingError(f"sample ids must be ints or strings, got {type(i).__name__}")
        if isinstance(i, str) and len(i) > MAX_ID_LEN:
            raise RecordingError(f"sample id {i[:30]!r}... is longer than {MAX_ID_LEN} characters")
        if isinstance(i, int) and not -_INT64 <= i < _INT64:
            raise RecordingError(f"sample id {i} does not fit in 64 bits")
        this = int if isinstance(i, int) else str
        if kind is not None and this is not kind:
            raise RecordingError(
                f"sample ids of mixed types: {i!r} is a {this.__name__}, but this trace's ids "
                f"are {kind.__name__}s; give every forward ids of one type (e.g. dataset "
                "indices as ints)"
            )
        kind = this
        out.append(i)
    return out, kind if kind is not None else int
