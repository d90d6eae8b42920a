"""What the Lightning and Hugging Face callbacks share: options, sample ids, one recording session."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

import explaind_trace

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TraceTarget:
    """Where a callback records and with which ``explaind_trace.RecordOptions`` (checked when
    the callback is made, so a bad value fails before training starts)."""

    store: Any
    options: explaind_trace.RecordOptions

    def __post_init__(self) -> None:
        if self.store is None:
            raise ValueError(
                "store is required: a path such as 'runs/a.lmdb', a 'scheme://' URL or an "
                "explaind_trace.Store; every callback writes one trace there."
            )
        if not isinstance(self.store, str | os.PathLike | explaind_trace.Store):
            raise TypeError(
                "store must be a path, a 'scheme://' URL or an explaind_trace.Store, got "
                f"{type(self.store).__name__}"
            )

    def warn_if_clipping(self, clip: Any, setting: str) -> None:
        """Say at the start that a ``gradients="recompute"`` trace cannot rebuild clipped
        gradients (its replay would stop at the first clipped step)."""
        if self.options.gradients == "recompute" and clip:
            logger.warning(
                "%s=%s clips gradients, which a gradients='recompute' trace cannot recompute: "
                "replay raises GradientMismatchError at the first clipped step. Record with "
                "gradients='auto' (gradients stored from the first checkpoint step where they "
                "differ) or 'stored', or turn clipping off.",
                setting,
                clip,
            )

    @classmethod
    def build(
        cls, store: Any, options: explaind_trace.RecordOptions | None, keywords: dict[str, Any]
    ) -> TraceTarget:
        """The target of a callback given ``store=`` and its recording options (see
        ``explaind_trace.RecordOptions.build``)."""
        return cls(store, explaind_trace.RecordOptions.build(options, keywords))

    def describe_store(self) -> str:
        return (
            os.fspath(self.store) if isinstance(self.store, str | os.PathLike) else repr(self.store)
        )

    def recorder(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, scaler: Any = None
    ) -> explaind_trace.Recorder:
        """A (not yet started) recorder with these options."""
        return explaind_trace.Recorder(
            model, optimizer, store=self.store, scaler=scaler, options=self.options
        )


def normalize_ids(ids: Any) -> list[int | str]:
    """Sample ids from a tensor, an array or any iterable of ints/strings, as a plain list."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex():
            raise TypeError(
                f"sample ids given as a tensor must be 1-D integers, got shape {tuple(ids.shape)} "
                f"and dtype {ids.dtype}"
            )
        return ids.detach().cpu().tolist()
    if hasattr(ids, "tolist") and not isinstance(ids, str | bytes):
        ids = ids.tolist()  # numpy arrays and the like
    if isinstance(ids, str | bytes) or not isinstance(ids, Iterable):
        raise TypeError(
            f"sample_ids must return a sequence of ints or strings (one per batch row), got "
            f"{type(ids).__name__}"
        )
    return list(ids)


class RecordingSession:
    """One started recorder plus the integration's own hooks; closing removes both.

    The integration's hooks are registered *before* the recorder's, so an optimizer step
    pre-hook of the integration runs first (the Lightning closure is evaluated before the
    recorder reads the gradients).
    """

    def __init__(
        self,
        recorder: explaind_trace.Recorder,
        own_hooks: Callable[[], list[Any]],
    ) -> None:
        self.recorder = recorder
        self._handles: list[Any] = []
        self.closed = False
        try:
            self._handles = list(own_hooks())
            recorder.start()
        except BaseException:
            self._remove_handles()
            raise

    def _remove_handles(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def close(self, error: BaseException | None = None) -> None:
        """Remove every hook and finish the trace (``error``: what ended training, if anything)."""
        if self.closed:
            return
        self.closed = True
        try:
            self._remove_handles()
        finally:
            self.recorder.close(error=error)
        if error is None:
            logger.info("trace finished: %d optimizer steps recorded", self.recorder.steps)
        else:
            logger.info(
                "trace closed after %d optimizer steps; training raised %s",
                self.recorder.steps,
                type(error).__name__,
            )


class SessionOwner:
    """The public state both callbacks expose over their `session` (a RecordingSession)."""

    session: RecordingSession | None

    @property
    def recorder(self) -> explaind_trace.Recorder | None:
        """The recorder of the current (or last) run, ``None`` before training starts."""
        return None if self.session is None else self.session.recorder

    @property
    def recording(self) -> bool:
        """Whether hooks are attached right now."""
        return self.session is not None and not self.session.closed

    def close(self, error: BaseException | None = None) -> None:
        """Close the recording now (idempotent); ``error`` is recorded as the trace's error."""
        session = self.session
        if session is None or session.closed:
            return
        session.close(error=error)
