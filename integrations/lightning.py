"""Record a Lightning ``Trainer.fit`` into an ExPLAIND trace with one callback.

    trainer = lightning.Trainer(callbacks=[ExplaindCallback("runs/a.lmdb")])
    trainer.fit(model, loader)

The callback attaches an ``explaind_trace.Recorder`` to the LightningModule (or to the
submodule named by ``module=``) and to the user's torch optimizer when fitting starts, and
closes it when fitting ends or raises. What is recorded is the forward of that module, so
``training_step`` must call it (``self(x)``; with ``module="net"``, ``self.net(x)``).

Supported (checked when fitting starts, anything else is refused with ``UnsupportedSetupError``):

- strategy: one process on one device (``SingleDeviceStrategy``, what ``strategy="auto"``
  picks for ``devices=1``). DDP, FSDP, DeepSpeed, model parallel and XLA are refused:
  recording a distributed run is a separate feature.
- precision plugins: ``"32-true"`` (``Precision``), ``"64-true"`` (``DoublePrecision``),
  ``"bf16-mixed"`` and ``"16-mixed"`` (``MixedPrecision``; its ``GradScaler`` is handed to
  the recorder so cotangents are unscaled). Lightning turns ``"16-mixed"`` on CPU into
  ``"bf16-mixed"``; an explicit ``MixedPrecision("16-mixed", "cpu")`` plugin keeps fp16.
  ``"16-true"``/``"bf16-true"`` (``HalfPrecision``) are recorded faithfully, but parameters
  and optimizer state live in half precision, so the kernel's completeness is at that
  precision's rounding level (about 2e-4 relative for bf16 on a small MLP), not fp32's.
  Bitsandbytes, Transformer Engine, XLA, DeepSpeed/FSDP and custom subclasses are refused.
- exactly one optimizer, of a class the recorder supports (its own
  ``UnsupportedOptimizerError`` surfaces at fit start), automatic or manual optimization,
  ``accumulate_grad_batches``, gradient clipping and any LR scheduler.
- not a ``torch.compile``'d LightningModule, and no ``StochasticWeightAveraging`` callback
  (it overwrites the trained parameters when training ends).

Lightning calls ``optimizer.step(closure=...)`` with a closure that runs ``training_step``
and ``backward``; the recorder must read the gradients after that closure. The callback
therefore registers an optimizer step pre-hook (before the recorder's) that runs the
closure and hands ``step()`` no closure. For torch's optimizers this is the same
computation (they call the closure first, under ``enable_grad``); only the return value of
``optimizer.step()`` becomes ``None`` instead of the loss, which Lightning does not use.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import StochasticWeightAveraging
    from lightning.pytorch.core.optimizer import LightningOptimizer
    from lightning.pytorch.plugins.precision import (
        DoublePrecision,
        HalfPrecision,
        MixedPrecision,
        Precision,
    )
    from lightning.pytorch.strategies import ParallelStrategy, SingleDeviceStrategy
except ImportError as e:  # pragma: no cover - exercised by a test that hides lightning
    from .errors import MissingExtraError

    raise MissingExtraError(
        f"integrations.lightning needs Lightning, which could not be imported ({e}). "
        "Install the optional extra with `pip install explaind[lightning]`."
    ) from e

import explaind_trace

from ._common import RecordingSession, SessionOwner, TraceTarget, normalize_ids
from .errors import CallbackStateError, UnsupportedSetupError

__all__ = ["ExplaindCallback", "check_trainer", "SUPPORTED_PRECISION"]

logger = logging.getLogger(__name__)

#: Lightning precision plugins (exact classes) whose runs can be recorded.
SUPPORTED_PRECISION: tuple[type, ...] = (Precision, MixedPrecision, DoublePrecision, HalfPrecision)

SampleIds = Callable[[Any, int], Iterable[int | str] | torch.Tensor]


def _names(classes: Iterable[type]) -> str:
    return ", ".join(c.__name__ for c in classes)


def check_trainer(trainer: pl.Trainer) -> None:
    """Raise ``UnsupportedSetupError`` if ``trainer``'s strategy, precision or callbacks
    cannot be recorded.

    ``ExplaindCallback`` calls this in ``setup`` and again when fitting starts. Lightning
    launches the processes of a distributed strategy before any callback hook runs, so
    call it yourself before ``fit`` to fail without launching them.
    """
    strategy = trainer.strategy
    name = type(strategy).__name__
    if isinstance(strategy, ParallelStrategy):
        raise UnsupportedSetupError(
            f"the Trainer uses the distributed strategy {name}; recording a distributed run "
            "(DDP, FSDP, DeepSpeed, model parallel) is a separate feature that this version of "
            "ExPLAIND does not have. Record on one device: Trainer(strategy='auto', devices=1)."
        )
    if not isinstance(strategy, SingleDeviceStrategy) or "XLA" in name:
        raise UnsupportedSetupError(
            f"the Trainer uses strategy {name}, which the recorder does not support; only "
            "SingleDeviceStrategy (one process, one CPU/CUDA/MPS device) can be recorded. "
            "Use Trainer(strategy='auto', devices=1)."
        )
    plugin = strategy.precision_plugin
    if type(plugin) not in SUPPORTED_PRECISION:
        raise UnsupportedSetupError(
            f"the Trainer uses the precision plugin {type(plugin).__name__}, which the recorder "
            f"does not support; supported plugins are {_names(SUPPORTED_PRECISION)} "
            "(precision '32-true', '64-true', '16-true', 'bf16-true', '16-mixed', 'bf16-mixed'). "
            "Custom or quantizing plugins may change gradients or call the optimizer in ways "
            "the recorder cannot see. Choose one of the supported precisions."
        )
    for cb in trainer.callbacks:
        if isinstance(cb, StochasticWeightAveraging):
            raise UnsupportedSetupError(
                "the Trainer uses StochasticWeightAveraging, which copies averaged weights into "
                "the model when training ends, so the model would no longer be the end of the "
                "recorded training path. Remove the SWA callback to record."
            )


def _the_optimizer(trainer: pl.Trainer) -> torch.optim.Optimizer:
    optimizers = list(trainer.optimizers)
    if len(optimizers) != 1:
        raise UnsupportedSetupError(
            f"configure_optimizers returned {len(optimizers)} optimizers; a trace records "
            "exactly one optimizer. Put all parameters into one optimizer (use param groups "
            "for different hyperparameters)."
        )
    opt = optimizers[0]
    if isinstance(opt, LightningOptimizer):
        opt = opt.optimizer
    if not isinstance(opt, torch.optim.Optimizer):
        raise UnsupportedSetupError(
            f"the Trainer's optimizer is a {type(opt).__name__}, not a torch.optim.Optimizer; "
            "the recorder hooks torch optimizers only."
        )
    return opt


class ExplaindCallback(pl.Callback, SessionOwner):
    """Record ``Trainer.fit`` into an ExPLAIND trace.

    store:            where the trace is written (path, ``scheme://`` URL or Store); must not
                      hold a trace already. One callback records one fit.
    sample_ids:       optional ``f(batch, batch_idx) -> ids`` (one int/str per batch row, or
                      a 1-D integer tensor) naming the rows of the batch's first forward;
                      default ids are content hashes.
    module:           name of the submodule of the LightningModule to record (default: the
                      LightningModule itself); ``training_step`` must call its forward, and
                      the optimizer may hold only its parameters.
    options / keywords: the recording options (``explaind_trace.RecordOptions``), e.g.
                      ``checkpoint_every=10``, ``output="head"`` (the submodule of the
                      recorded module whose output is the model output, for modules whose
                      forward returns a loss) or ``grad_codec="bf16"``; or
                      ``options=RecordOptions(...)``, not both.
    """

    def __init__(
        self,
        store: explaind_trace.Store | str | os.PathLike[str],
        *,
        sample_ids: SampleIds | None = None,
        module: str | None = None,
        options: explaind_trace.RecordOptions | None = None,
        **keywords: Any,
    ) -> None:
        super().__init__()
        self.target = TraceTarget.build(store, options, keywords)
        self.options = self.target.options
        if sample_ids is not None and not callable(sample_ids):
            raise TypeError(
                f"sample_ids must be a callable (batch, batch_idx) -> ids, got {type(sample_ids).__name__}"
            )
        if module is not None and (not isinstance(module, str) or not module):
            raise ValueError(f"module must be None or a submodule name, got {module!r}")
        self.sample_ids = sample_ids
        self.module = module
        self.session: RecordingSession | None = None
        self._used = False
        self._forwards = 0

    # -- Lightning hooks ------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse an unsupported strategy or precision as early as Lightning lets a callback."""
        if stage == "fit":
            check_trainer(trainer)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check the setup, build the recorder on the module and the optimizer, attach the hooks."""
        if self._used:
            raise CallbackStateError(
                f"this ExplaindCallback already recorded a fit into {self.target.describe_store()}; "
                "traces are never overwritten. Create a new ExplaindCallback with a new store "
                "for each fit."
            )
        check_trainer(trainer)
        self.target.warn_if_clipping(trainer.gradient_clip_val, "gradient_clip_val")
        if getattr(pl_module, "_compiler_ctx", None):
            raise UnsupportedSetupError(
                "the LightningModule was compiled with torch.compile; the recorder's hooks must "
                "see every forward and optimizer step eagerly. Fit the uncompiled module to record it."
            )
        optimizer = _the_optimizer(trainer)
        module = self._module(pl_module)
        plugin = trainer.strategy.precision_plugin
        scaler = getattr(plugin, "scaler", None) if isinstance(plugin, MixedPrecision) else None
        recorder = self.target.recorder(module, optimizer, scaler=scaler)
        self._forwards = 0

        def own_hooks() -> list[Any]:
            return [
                optimizer.register_step_pre_hook(_run_closure_first),
                module.register_forward_pre_hook(self._count_forward),
            ]

        self.session = RecordingSession(recorder, own_hooks)
        self._used = True
        logger.info(
            "recording %s with %s into %s",
            type(module).__name__,
            type(optimizer).__name__,
            self.target.describe_store(),
        )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Hand the batch's sample ids to the recorder (when ``sample_ids`` was given)."""
        if self.sample_ids is not None and self.recording:
            ids = normalize_ids(self.sample_ids(batch, batch_idx))
            self.session.recorder.set_sample_ids(ids)  # type: ignore[union-attr]

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Refuse a step whose gradients came from forwards the recorder never saw."""
        if not self.recording:
            return
        seen, self._forwards = self._forwards, 0
        if seen == 0:
            what = "the LightningModule" if self.module is None else f"submodule {self.module!r}"
            raise CallbackStateError(
                f"an optimizer step is about to run but {what} was never called (with gradients "
                "enabled) since the last step, so the trace cannot hold the inputs and output "
                "cotangents behind its gradients. Call the recorded module in training_step "
                "(self(x) for the LightningModule), or pass module='<name>' naming the submodule "
                "that training_step calls (e.g. module='net' for self.net(x))."
            )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Finish the trace (final parameters, finished=True) and remove every hook."""
        self.close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Close the trace with the error (finished=False, committed steps kept); hooks removed."""
        self.close(error=exception)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Safety net: never leave hooks attached once Lightning is done."""
        if stage == "fit":
            self.close()

    # -- helpers --------------------------------------------------------------------------

    def _module(self, pl_module: pl.LightningModule) -> torch.nn.Module:
        if self.module is None:
            return pl_module
        try:
            return pl_module.get_submodule(self.module)
        except AttributeError as e:
            raise UnsupportedSetupError(
                f"module={self.module!r} does not name a submodule of {type(pl_module).__name__} "
                f"({e}). Use a name from pl_module.named_modules()."
            ) from None

    def _count_forward(self, module: torch.nn.Module, args: tuple) -> None:
        if torch.is_grad_enabled():
            self._forwards += 1


def _run_closure_first(
    optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict[str, Any]
) -> tuple[tuple, dict[str, Any]] | None:
    """Optimizer step pre-hook: evaluate Lightning's closure now, step without it.

    Registered before the recorder's pre-hook, so the recorder reads the gradients the
    closure's backward produced. ``args`` is ``(optimizer, *step_args)``.
    """
    closure = kwargs.get("closure")
    if closure is None and len(args) > 1:
        closure = args[1]
    if closure is None:
        return None
    with torch.enable_grad():
        closure()
    rest = {k: v for k, v in kwargs.items() if k != "closure"}
    return (args[:1], rest)
