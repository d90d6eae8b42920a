"""Errors raised by the framework integrations. Each message says what happened, why, and what to do.

This module needs neither Lightning nor transformers, so ``integrations.errors`` can be
imported (and its classes caught) without the optional extras.

Errors of the recorder itself (``explaind_trace.UnsupportedOptimizerError``,
``explaind_trace.RecordingError``, ...) pass through the integrations unchanged.
"""

from __future__ import annotations

from explaind_trace.errors import ExplaindError

__all__ = [
    "ExplaindError",
    "IntegrationError",
    "MissingExtraError",
    "UnsupportedSetupError",
    "CallbackStateError",
]


class IntegrationError(ExplaindError):
    """Base class of every error the integrations raise."""


class MissingExtraError(IntegrationError, ImportError):
    """The training framework an integration needs is not installed (an optional extra)."""


class UnsupportedSetupError(IntegrationError):
    """The trainer is configured in a way a trace cannot capture faithfully (strategy,
    precision, number of optimizers, compiled model, ...); raised before training starts."""


class CallbackStateError(IntegrationError):
    """A callback is used out of order: reused for a second run, or the model it records
    did not behave as the callback needs (e.g. its forward was never called)."""
