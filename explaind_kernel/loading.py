"""Resolve the command-line conventions MODULE:NAME and FILE.npy (shared by `explaind` and
`python -m explaind_kernel`). `.npy` files are read with allow_pickle=False."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from .errors import InputError


def import_object(spec: str, what: str) -> Any:
    """Resolve MODULE:NAME, importing MODULE with the current directory on sys.path."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise InputError(
            f"{what} must look like MODULE:NAME (e.g. mymodel:make_model), got {spec!r}"
        )
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise InputError(
            f"cannot import module {module_name!r} for {what} ({e}); run explaind from the "
            "directory that holds it, or make it importable"
        ) from e
    try:
        return getattr(module, attr)
    except AttributeError as e:
        raise InputError(f"module {module_name!r} has no attribute {attr!r} ({what})") from e


def load_npy(path: str, what: str) -> Any:
    """A tensor from a .npy file (no pickle)."""
    import numpy as np
    import torch

    try:
        return torch.from_numpy(np.load(path, allow_pickle=False))
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {what} from {path!r}: {e}") from e


def load_model(spec: str) -> Any:
    """Call the MODULE:FACTORY named by `spec`; it must return an nn.Module."""
    import torch

    factory = import_object(spec, "--model")
    model = factory()
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"--model {spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def load_inputs(spec: str, labels_path: str | None = None) -> tuple[Any, Any]:
    """(inputs, labels) from FILE.npy or MODULE:FUNCTION; --labels wins over returned ones."""
    labels = None
    if spec.endswith(".npy"):
        inputs = load_npy(spec, "--inputs")
    else:
        value = import_object(spec, "--inputs")()
        if isinstance(value, (tuple, list)) and len(value) == 2:
            inputs, labels = value
        else:
            inputs = value
    if labels_path is not None:
        labels = load_npy(labels_path, "--labels")
    return inputs, labels
