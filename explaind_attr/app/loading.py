"""The command line's ways of naming things: MODULE:NAME, FILE.npy and FILE.npz.

`--model MODULE:FACTORY` calls FACTORY(); `--inputs` is FILE.npy (the inputs), FILE.npz
(arrays ``x`` and, optionally, ``y``: inputs and labels) or MODULE:FUNCTION, whose FUNCTION()
returns a tensor, an ``(inputs, labels)`` tuple or a Dataset yielding ``(x, y)``;
`--labels FILE.npy` gives labels and wins over any that come with the inputs. Arrays are read
with ``allow_pickle=False``: nothing read from a file can run code.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from ..errors import UsageError

__all__ = ["import_object", "load_array", "load_inputs", "load_model"]


def import_object(spec: str, what: str) -> Any:
    """Resolve MODULE:NAME, importing MODULE with the current directory on sys.path."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(
            f"{what} must look like MODULE:NAME (e.g. mymodel:make_model), got {spec!r}"
        )
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UsageError(
            f"cannot import module {module_name!r} for {what} ({e}); run explaind from the "
            "directory that holds it, or make it importable"
        ) from e
    try:
        return getattr(module, attr)
    except AttributeError as e:
        raise UsageError(f"module {module_name!r} has no attribute {attr!r} ({what})") from e


def load_array(path: str, what: str) -> Any:
    """A tensor from a .npy file (no pickle)."""
    import numpy as np
    import torch

    try:
        return torch.from_numpy(np.load(path, allow_pickle=False))
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read {what} from {path!r}: {e}") from e


def _load_npz(path: str) -> tuple[Any, Any]:
    import numpy as np
    import torch

    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read --inputs from {path!r}: {e}") from e
    if "x" not in arrays:
        raise UsageError(
            f"{path} holds arrays {sorted(arrays)} but no 'x'; save the inputs as x (and the "
            "labels as y): numpy.savez(path, x=inputs, y=labels)"
        )
    y = arrays.get("y")
    return torch.from_numpy(arrays["x"]), None if y is None else torch.from_numpy(y)


def load_model(spec: str) -> Any:
    """Call the MODULE:FACTORY named by `spec`; it must return an nn.Module."""
    import torch

    factory = import_object(spec, "--model")
    model = factory()
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"--model {spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def load_inputs(spec: str, labels_path: str | None = None) -> tuple[Any, Any]:
    """(inputs, labels) from FILE.npy, FILE.npz or MODULE:FUNCTION; --labels wins.

    A FUNCTION's 2-tuple is taken as (inputs, labels); anything else (a tensor, a Dataset,
    a dict of keyword tensors) is passed on as the inputs, to be read by the engine.
    """
    labels = None
    if spec.endswith(".npy"):
        inputs = load_array(spec, "--inputs")
    elif spec.endswith(".npz"):
        inputs, labels = _load_npz(spec)
    else:
        value = import_object(spec, "--inputs")()
        if isinstance(value, tuple) and len(value) == 2:
            inputs, labels = value
        else:
            inputs = value
    if labels_path is not None:
        labels = load_array(labels_path, "--labels")
    return inputs, labels
