"""Framework integrations: record a Lightning or Hugging Face training run with one callback.

    from integrations.lightning import ExplaindCallback
    lightning.Trainer(callbacks=[ExplaindCallback("runs/a.lmdb")]).fit(model, loader)

    from integrations.huggingface import ExplaindTrainerCallback
    transformers.Trainer(..., callbacks=[ExplaindTrainerCallback("runs/b.lmdb", output="classifier")])

Both frameworks are optional extras (``pip install explaind[lightning]``,
``pip install explaind[huggingface]``). Importing this package imports neither of them,
nor torch: the callbacks are imported on first use (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    CallbackStateError,
    ExplaindError,
    IntegrationError,
    MissingExtraError,
    UnsupportedSetupError,
)

_LAZY = {
    "ExplaindCallback": "lightning",
    "check_trainer": "lightning",
    "ExplaindTrainerCallback": "huggingface",
    "check_training_args": "huggingface",
}

__all__ = [
    "ExplaindCallback",
    "check_trainer",
    "ExplaindTrainerCallback",
    "check_training_args",
    "ExplaindError",
    "IntegrationError",
    "MissingExtraError",
    "UnsupportedSetupError",
    "CallbackStateError",
]

if TYPE_CHECKING:  # pragma: no cover
    from .huggingface import ExplaindTrainerCallback, check_training_args
    from .lightning import ExplaindCallback, check_trainer


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
