"""Record a Hugging Face ``Trainer.train()`` into an ExPLAIND trace with one callback.

    cb = ExplaindTrainerCallback("runs/a.lmdb", output="classifier")
    trainer = transformers.Trainer(model, args, train_dataset=ds, callbacks=[cb])
    with cb:                # closes the trace with the error if train() raises
        trainer.train()

At ``on_train_begin`` the callback attaches an ``explaind_trace.Recorder`` to the model and
to the torch optimizer inside accelerate's ``AcceleratedOptimizer`` (its ``GradScaler``, if
any, is handed to the recorder); at ``on_train_end`` it finishes the trace. The Trainer calls
the model with keyword arguments only (``input_ids=..., attention_mask=..., labels=...``);
the recorder stores keyword tensors with a batch dimension per sample, like positional ones.

``output=``: a Transformers model given ``labels`` computes its loss inside ``forward`` and
returns a ``ModelOutput`` whose ``loss`` is a scalar. The recorder needs the per-sample model
output, so name the submodule that produces the logits: ``"classifier"`` (BERT-style
sequence classification), ``"score"`` (GPT-2 sequence classification), ``"lm_head"``
(causal LMs). Without it the first training forward raises ``CallbackStateError`` naming
the candidates in your model.

The Trainer has no exception event for callbacks: if ``train()`` raises, ``on_train_end``
never runs. Use the callback as a context manager around ``train()`` (or call
``close(error)`` yourself) so the hooks are removed and the trace records the error.

Supported: one process (CPU or one GPU: ``ParallelMode.NOT_PARALLEL``), fp32, ``bf16=True``
and ``fp16=True`` (the accelerator's ``GradScaler`` is used), gradient accumulation, gradient
clipping, any LR scheduler (the recorder reads the lr from the param groups at each step).
Refused before the first step: distributed or multi-GPU runs, DeepSpeed, FSDP,
``torch_compile=True`` and ``load_best_model_at_end=True`` (it overwrites the trained
parameters after the last step). Optimizers the recorder does not support (Adafactor,
8-bit optimizers, ...) raise ``explaind_trace.UnsupportedOptimizerError`` at train begin;
the Trainer's default ``adamw_torch``/``adamw_torch_fused`` are ``torch.optim.AdamW``.
"""

from __future__ import annotations

import logging
import os
from types import TracebackType
from typing import Any

import torch

try:
    from transformers import TrainerCallback
    from transformers.training_args import ParallelMode
except ImportError as e:  # pragma: no cover - exercised by a test that hides transformers
    from .errors import MissingExtraError

    raise MissingExtraError(
        f"integrations.huggingface needs transformers, which could not be imported ({e}). "
        "Install the optional extra with `pip install explaind[huggingface]`."
    ) from e

import explaind_trace

from ._common import RecordingSession, SessionOwner, TraceTarget
from .errors import CallbackStateError, UnsupportedSetupError

__all__ = ["ExplaindTrainerCallback", "check_training_args"]

logger = logging.getLogger(__name__)

# last path components of the modules that produce the logits in common Transformers heads
_HEAD_NAMES = ("classifier", "score", "lm_head", "qa_outputs", "cls", "head")


def check_training_args(args: Any) -> None:
    """Raise ``UnsupportedSetupError`` if a ``TrainingArguments`` setup cannot be recorded.

    ``ExplaindTrainerCallback`` calls this at ``on_train_begin``; call it yourself before
    ``Trainer.train()`` to fail before a distributed launcher starts processes.
    """
    mode = getattr(args, "parallel_mode", ParallelMode.NOT_PARALLEL)
    world = int(getattr(args, "world_size", 1) or 1)
    if mode != ParallelMode.NOT_PARALLEL or world > 1:
        raise UnsupportedSetupError(
            f"the Trainer runs in parallel mode {getattr(mode, 'value', mode)!r} with world size "
            f"{world}; recording a distributed or multi-GPU run (DDP, DataParallel, TPU, "
            "SageMaker) is a separate feature that this version of ExPLAIND does not have. "
            "Train in one process on one device (CPU or a single GPU) to record."
        )
    if getattr(args, "deepspeed", None):
        raise UnsupportedSetupError(
            "the Trainer uses DeepSpeed, which shards and updates parameters outside the torch "
            "optimizer the recorder hooks; recording it is not supported. Train without deepspeed=."
        )
    if getattr(args, "fsdp", None):
        raise UnsupportedSetupError(
            "the Trainer uses FSDP; recording a sharded (distributed) run is a separate feature "
            "that this version of ExPLAIND does not have. Train without fsdp=."
        )
    if getattr(args, "torch_compile", False):
        raise UnsupportedSetupError(
            "torch_compile=True compiles the model; the recorder's hooks must see every forward "
            "eagerly. Set torch_compile=False to record."
        )
    if getattr(args, "load_best_model_at_end", False):
        raise UnsupportedSetupError(
            "load_best_model_at_end=True replaces the trained parameters by a saved checkpoint "
            "after the last step, so the model would no longer be the end of the recorded "
            "training path. Set load_best_model_at_end=False to record; every step's parameters "
            "can be rebuilt from the trace afterwards."
        )


def _unwrap_optimizer(optimizer: Any) -> tuple[torch.optim.Optimizer, Any]:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer``, and its GradScaler."""
    scaler = None
    opt = optimizer
    for _ in range(8):  # AcceleratedOptimizer (itself an Optimizer subclass), possibly nested
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is opt:
            break
        if scaler is None:
            scaler = getattr(opt, "scaler", None)
        opt = inner
    if not isinstance(opt, torch.optim.Optimizer):
        raise UnsupportedSetupError(
            f"the Trainer's optimizer is a {type(optimizer).__name__} that holds no "
            "torch.optim.Optimizer; the recorder hooks torch optimizers only."
        )
    if scaler is not None and not (hasattr(scaler, "is_enabled") and scaler.is_enabled()):
        scaler = None
    return opt, scaler


def _output_candidates(model: torch.nn.Module) -> list[str]:
    names = [n for n, _ in model.named_modules() if n and n.rsplit(".", 1)[-1] in _HEAD_NAMES]
    get_emb = getattr(model, "get_output_embeddings", None)
    if callable(get_emb):
        try:
            emb = get_emb()
        except (AttributeError, NotImplementedError):
            emb = None
        if emb is not None:
            names += [n for n, m in model.named_modules() if m is emb]
    # the outermost heads first, without duplicates
    out: list[str] = []
    for n in sorted(names, key=lambda s: (s.count("."), s)):
        if n not in out and not any(n.startswith(o + ".") for o in out):
            out.append(n)
    return out


def _scalar_leaves(output: Any) -> list[str]:
    """Names of top-level 0-dim tensors that require grad (e.g. ``loss``) in a model output."""
    if isinstance(output, dict):
        items = list(output.items())
    elif isinstance(output, tuple | list):
        items = [(str(i), v) for i, v in enumerate(output)]
    else:
        items = [("output", output)]
    return [k for k, v in items if isinstance(v, torch.Tensor) and v.dim() == 0 and v.requires_grad]


class ExplaindTrainerCallback(TrainerCallback, SessionOwner):
    """Record ``transformers.Trainer.train()`` into an ExPLAIND trace.

    store:            where the trace is written (path, ``scheme://`` URL or Store); must not
                      hold a trace already. One callback records one ``train()``.
    output:           submodule whose output is the per-sample model output (the logits),
                      needed when the model computes its loss inside forward.
    options / keywords: the other recording options (``explaind_trace.RecordOptions``),
                      e.g. ``checkpoint_every=10`` or ``grad_codec="bf16"``; or
                      ``options=RecordOptions(...)`` (which then holds ``output`` too), not both.

    Use it as a context manager around ``trainer.train()`` so a run that raises still closes
    the trace and removes the hooks (the Trainer has no exception event for callbacks).
    """

    def __init__(
        self,
        store: explaind_trace.Store | str | os.PathLike[str],
        *,
        output: str | None = None,
        options: explaind_trace.RecordOptions | None = None,
        **keywords: Any,
    ) -> None:
        if output is not None:
            keywords["output"] = output
        self.target = TraceTarget.build(store, options, keywords)
        self.options = self.target.options
        self.session: RecordingSession | None = None
        self._used = False

    def __enter__(self) -> ExplaindTrainerCallback:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(error=exc)

    # -- Trainer events -------------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Check the setup, build the recorder on the model and the unwrapped optimizer."""
        if self.recording:
            # the previous train() raised without on_train_end and without `with callback:`
            self.close(error=CallbackStateError("the previous train() ended without on_train_end"))
            logger.warning(
                "closed a recording left open by a train() that raised; use the callback as a "
                "context manager around train() to close it with the real error"
            )
        if self._used:
            raise CallbackStateError(
                f"this ExplaindTrainerCallback already recorded a run into "
                f"{self.target.describe_store()}; traces are never overwritten. Create a new "
                "callback with a new store for each train()."
            )
        check_training_args(args)
        self.target.warn_if_clipping(getattr(args, "max_grad_norm", None), "max_grad_norm")
        model, optimizer = kwargs.get("model"), kwargs.get("optimizer")
        if model is None or optimizer is None:
            raise CallbackStateError(
                "on_train_begin was called without the model and optimizer; the callback must "
                "be registered with a transformers.Trainer (callbacks=[...]), which passes them."
            )
        opt, scaler = _unwrap_optimizer(optimizer)
        recorder = self.target.recorder(model, opt, scaler=scaler)

        def own_hooks() -> list[Any]:
            # registered before the recorder's forward hook, so it can explain a loss output first
            return [model.register_forward_hook(self._check_output)]

        self.session = RecordingSession(recorder, own_hooks)
        self._used = True
        logger.info(
            "recording %s with %s into %s",
            type(model).__name__,
            type(opt).__name__,
            self.target.describe_store(),
        )

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Finish the trace (final parameters, finished=True) and remove every hook."""
        self.close()

    # -- helpers --------------------------------------------------------------------------

    def _check_output(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        if self.options.output is not None or not torch.is_grad_enabled():
            return None
        scalars = _scalar_leaves(output)
        if not scalars:
            return None
        candidates = _output_candidates(module)
        hint = (
            f" Candidates in {type(module).__name__}: {', '.join(repr(c) for c in candidates)}."
            if candidates
            else " Use a name from model.named_modules()."
        )
        example = candidates[0] if candidates else "classifier"
        err = CallbackStateError(
            f"the model returned a {type(output).__name__} whose {scalars[0]!r} is a scalar: it "
            "computes the loss inside forward (the Trainer passes labels=...). The trace needs "
            "the per-sample model output, so pass output='<submodule>' naming the module that "
            f"produces the logits, e.g. ExplaindTrainerCallback(store, output={example!r}).{hint} "
            f"The trace at {self.target.describe_store()} was closed without steps; delete it or "
            "record to a new store."
        )
        self.close(error=err)
        raise err
