"""Training-sample rows as pictures or text: decide which, and prepare them for display.

A row is shown as an image when it is image-shaped — (C, H, W) with C in {1, 3}, or
(H, W), with H, W ≥ 2, after dropping leading axes of size one beyond three — and as
text otherwise: integer rows as tokens, floating rows as values, both truncated.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["image_of", "sample_array", "text_of"]

_MAX_ITEMS = 24


def sample_array(value: Any) -> np.ndarray | None:
    """The row as a numpy array (tensors detached to CPU), or None when it is not array-like.

    A tuple or list of arrays (several positional inputs) gives its first element.
    """
    if isinstance(value, (tuple, list)) and value and all(_is_arraylike(v) for v in value):
        value = value[0]
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor without importing torch
        value = value.detach().cpu()
        if getattr(value, "dtype", None) is not None and "bfloat16" in str(value.dtype):
            value = value.float()
        value = value.numpy()
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError):
        return None
    if arr.dtype.kind not in "biuf":
        return None
    return arr


def _is_arraylike(value: Any) -> bool:
    return isinstance(value, np.ndarray) or (hasattr(value, "detach") and hasattr(value, "shape"))


def image_of(arr: np.ndarray) -> np.ndarray | None:
    """An (H, W) or (H, W, 3) float image in [0, 1] when `arr` is image-shaped, else None."""
    while arr.ndim > 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and min(arr.shape[1:]) >= 2:
        img = arr[0] if arr.shape[0] == 1 else np.moveaxis(arr, 0, -1)
    elif arr.ndim == 2 and min(arr.shape) >= 2:
        img = arr
    else:
        return None
    img = img.astype(np.float64)
    finite = np.isfinite(img)
    if not finite.any():
        return np.zeros_like(img)
    lo, hi = float(img[finite].min()), float(img[finite].max())
    img = np.where(finite, img, lo)
    return (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)


def text_of(value: Any, max_items: int = _MAX_ITEMS) -> str:
    """A short one-line rendering: tokens for integer rows, values for float rows."""
    arr = sample_array(value)
    if arr is None:
        text = repr(value)
        return text if len(text) <= 200 else text[:199] + "…"
    flat = arr.reshape(-1)
    more = " …" if flat.size > max_items else ""
    shape = f"shape {tuple(arr.shape)}: " if arr.ndim != 1 else ""
    if arr.dtype.kind in "biu":
        return f"{shape}tokens: " + " ".join(str(int(v)) for v in flat[:max_items]) + more
    return f"{shape}values: " + " ".join(f"{float(v):.3g}" for v in flat[:max_items]) + more


def samples_from_trace(reader: Any, ids: Any) -> dict[str, Any]:
    """Input rows of the sample `ids` stored in a trace (an open TraceReader): the tensor of a
    single-input model, or the first input of a multi-input one. Unknown ids are left out."""
    out: dict[str, Any] = {}
    for sid in ids:
        try:
            row = reader.sample(sid)
        except (KeyError, LookupError):
            continue
        out[sid] = row[0] if isinstance(row, tuple) else row
    return out
