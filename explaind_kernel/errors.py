"""Errors raised by explaind_kernel. Each message says what happened, why, and what to do."""

from __future__ import annotations

from explaind_trace.errors import ExplaindError, UnsupportedOptimizerError

__all__ = [
    "ExplaindError",
    "KernelError",
    "ModelMismatchError",
    "InputError",
    "UnsupportedOptimizerError",
    "EmptyTraceError",
    "ResultFileError",
]


class KernelError(ExplaindError):
    """Base class of every error explaind_kernel raises."""


class ModelMismatchError(KernelError):
    """The model handed to the kernel does not match the traced one."""


class InputError(KernelError):
    """Test inputs or output selection are malformed."""


class EmptyTraceError(KernelError):
    """The trace holds no committed optimizer step."""


class ResultFileError(KernelError):
    """A result file cannot be read (wrong format, newer version, another trace)."""
