"""Record an unmodified PyTorch training loop through hooks.

    with explaind_trace.record(model, optimizer, store="runs/a.lmdb") as rec:
        for x, y in loader:
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

Hooks used: a forward pre-hook and forward hook on the model (inputs, RNG state, modes,
buffers; the output), optionally a forward hook on the ``output=`` submodule, tensor hooks
on the output (cotangents dL/d(output)), post-accumulate-grad hooks on the parameters
(to notice gradients discarded without a step) and the optimizer's step pre/post hooks.
All are removed when recording ends, also when the loop raises.

DistributedDataParallel: pass the DDP-wrapped model with the same ``store=`` path on every
rank; every rank records its own forwards, rank 0 also the gradients, hyperparameters and
states (see ``ddp.py``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from .ddp import unwrap_ddp
from .errors import RecordingError, StoreError, TraceWriteError
from .header import encode_header
from .hooks import (
    GradTracker,
    OutputCapture,
    autocast_state,
    current_grad_scale,
    find_batch_size,
    in_backward,
    prune_pending,
)
from .layout import check_arguments, inspect_run, store_location
from .modules import BufferTracker, ModuleIndex
from .optimizers import capture_hyperparams, export_state
from .options import RecordOptions
from .packing import cpu_copy
from .recompute import StepGradients
from .records import CapturedForward, CapturedStep, Checkpoint
from .sampleids import check_sample_ids
from .stores import Store
from .trees import capture_inputs
from .writer import TraceWriter, open_new_trace

__all__ = ["Recorder", "record"]

logger = logging.getLogger(__name__)

_attached: weakref.WeakSet[Any] = weakref.WeakSet()


class Recorder:
    """Records a training run into a trace; ``record()`` wraps it as a context manager.

    Call ``start()`` before the first forward and ``close(error=...)`` after the last step
    (integrations use this form).

    - ``store``: where to write (path, ``scheme://`` URL or ``Store`` instance; the
      recorder closes it). Default: a new ``runs/explaind-<time>-<pid>.lmdb``.
    - ``scaler``: the ``torch.amp.GradScaler`` in use, so cotangents are unscaled.
    - the recording options (``checkpoint_every``, ``output``, ``grad_codec``, ...; see
      ``RecordOptions``): as keywords, or as ``options=RecordOptions(...)``, not both.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        store: Store | str | os.PathLike[str] | None = None,
        scaler: Any = None,
        options: RecordOptions | None = None,
        **keywords: Any,
    ) -> None:
        self.options = RecordOptions.build(options, keywords)
        check_arguments(model, optimizer, scaler)
        self.model, self.ddp = unwrap_ddp(model)
        # rank r > 0 of a DDP run records its forwards only
        self._forwards_only = self.ddp is not None and self.ddp.rank != 0
        self.optimizer = optimizer
        self.store_spec = store
        self.scaler = scaler
        self._started = False
        self._closed = False
        self._handles: list[Any] = []
        self._stack: list[OutputCapture | None] = []
        self._pending: list[OutputCapture] = []
        self._in_flight: CapturedStep | None = None
        self._next_ids: list[int | str] | None = None
        self._id_type: type | None = None  # int or str once ids were given
        self._step = 0
        self._skipped = 0
        self._warned_pending = False
        self._bar: Any = None
        self.writer: TraceWriter | None = None
        self.store: Store | None = None

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def steps(self) -> int:
        """Optimizer steps recorded so far (handed to the writer)."""
        return self._step

    def flush(self) -> None:
        """Block until every recorded step is committed to the store."""
        if self.writer is not None and not self._closed:
            self.writer.flush()

    def start(self) -> Recorder:
        """Validate the setup, open the store, write the metadata and attach the hooks."""
        if self._started:
            raise RecordingError("this Recorder was already started; create a new one per run.")
        for obj, what in ((self.model, "model"), (self.optimizer, "optimizer")):
            if obj in _attached:
                raise RecordingError(
                    f"this {what} is already being recorded; one recorder per model and "
                    "optimizer. Close the first recording before starting another."
                )
        self._layout = inspect_run(self.model, self.optimizer, self.options.output)
        self._gradients = StepGradients(self.options, ddp=self.ddp)
        self._params, self._names = self._layout.params, self._layout.names
        spec = store_location(self.store_spec, self.ddp)
        meta = encode_header(
            self.model,
            self.optimizer,
            self._params,
            self._layout.group_names,
            self.options,
            grad_scaler=self.scaler is not None,
            ddp=None if self.ddp is None else self.ddp.meta(),
        )
        store = open_new_trace(spec)
        try:
            self.store = store
            opts = self.options
            self.writer = TraceWriter(
                store,
                grad_codec=opts.grad_codec,
                cotangent_codec=opts.cotangent_codec,
                level=opts.compression_level,
                queue_size=opts.queue_size,
                checksums=opts.checksums,
            )
            self.writer.write_meta(meta)
            self._attach()
        except BaseException:
            self._detach()
            if self.writer is not None:
                with contextlib.suppress(TraceWriteError):
                    self.writer.close()
            store.close()
            raise
        self._started = True
        if self.options.progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(desc="recording", unit="step")
        return self

    def _attach(self) -> None:
        m, opt = self.model, self.optimizer
        self._modules = ModuleIndex(m)
        self._buffers = BufferTracker(self._modules)
        self._grads = GradTracker(self._params, allow_replaced=self.ddp is not None)
        self._handles.append(m.register_forward_pre_hook(self._pre_forward, with_kwargs=True))
        self._handles.append(m.register_forward_hook(self._post_forward, always_call=True))
        if self._layout.output_module is not None:
            self._handles.append(
                self._layout.output_module.register_forward_hook(self._output_hook)
            )
        self._handles.append(opt.register_step_pre_hook(self._pre_step))
        self._handles.append(opt.register_step_post_hook(self._post_step))
        _attached.add(m)
        _attached.add(opt)

    def _detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        grads = getattr(self, "_grads", None)
        if grads is not None:
            grads.remove()
        for cap in [*self._pending, *(c for c in self._stack if c is not None)]:
            cap.release()
        self._pending.clear()
        self._stack.clear()
        _attached.discard(self.model)
        _attached.discard(self.optimizer)

    def close(self, error: BaseException | None = None) -> None:
        """Remove the hooks, write the final state and progress, join the writer.

        ``error`` is the exception that ended the loop, if any (recorded as the trace's
        error, ``finished=False``). Raises ``TraceWriteError`` if writing failed and no
        other error is being propagated.
        """
        if self._closed or not self._started:
            self._closed = True
            return
        self._closed = True
        try:
            self._detach()
        finally:
            self._finish(error)

    def _finish(self, error: BaseException | None) -> None:
        assert self.writer is not None and self.store is not None  # set by start()
        try:
            if self._bar is not None:
                self._bar.close()
            if not self.writer.failed:
                text = None if error is None else f"{type(error).__name__}: {error}"
                state = None if self._forwards_only else self._state(self._step)
                self.writer.write_final(state, text)
        except TraceWriteError:
            pass  # reported by writer.close() below
        finally:
            try:
                self.writer.close()
            except TraceWriteError as failure:
                if error is None:
                    raise
                if failure.__cause__ is not getattr(error, "__cause__", None):
                    logger.error(
                        "the trace writer also failed while the training loop raised",
                        exc_info=True,
                    )
            finally:
                try:
                    self.store.close()
                except StoreError:
                    if error is None and not self.writer.failed:
                        raise
                    logger.error("closing the trace store failed too", exc_info=True)

    # -- helpers --------------------------------------------------------------------------

    def set_sample_ids(self, ids: Iterable[int | str]) -> None:
        """Ids (ints or strings, one type per trace, kept as given) for the rows of the next
        recorded forward (see explaind_trace.sampleids)."""
        self._next_ids, self._id_type = check_sample_ids(ids, self._id_type)

    def _state(self, step: int) -> Checkpoint:
        return Checkpoint(
            step=step,
            params={n: cpu_copy(p) for n, p in self._params.items()},
            buffers=self._buffers.snapshot(),
            optimizer_state=export_state(self.optimizer, self._names),
        )

    def _finish_forward(self, cap: OutputCapture) -> CapturedForward:
        """The captured forward, with cotangents scaled for DDP's gradient average."""
        cf = cap.finish()
        if self.ddp is not None and self.ddp.world_size > 1:
            w = self.ddp.world_size
            cf.cotangents = [None if c is None else c / w for c in cf.cotangents]
        return cf

    def _skip_stale_backwards(self) -> None:
        """Forwards whose cotangents came in a backward before the one that found the
        gradients discarded belong to a step that never happened (a GradScaler skip)."""
        task = self._grads.cleared_in_task
        if task is None:
            return
        self._grads.cleared_in_task = None
        stale = [c for c in self._pending if c.received and c.task != task]
        if stale:
            drop = {id(c) for c in stale}
            self._pending = [c for c in self._pending if id(c) not in drop]
            self._write_skip(stale, "grads_cleared")

    def _write_skip(self, caps: list[OutputCapture], reason: str) -> None:
        assert self.writer is not None
        forwards = [self._finish_forward(c) for c in caps]
        logger.info(
            "%d forward(s) before step %d got gradients that were discarded without a step (%s)",
            len(forwards),
            self._step,
            reason,
        )
        self.writer.write_skip(self._step, reason, forwards)
        self._skipped += 1
        self._grads.reset()

    # -- hooks ----------------------------------------------------------------------------

    def _pre_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if self._closed or self._gradients.checking:
            return None
        nested = bool(self._stack)
        self._stack.append(None)  # popped by _post_forward, which always runs
        assert self.writer is not None
        self.writer.check()
        if nested or not torch.is_grad_enabled() or in_backward():
            return None
        received = [c for c in self._pending if c.received]
        if received and self._grads.cleared():
            self._pending = [c for c in self._pending if not c.received]
            self._write_skip(received, "grads_cleared")
        self._skip_stale_backwards()
        self._pending, warned = prune_pending(self._pending, self.options.max_pending_forwards)
        if warned and not self._warned_pending:
            logger.warning(
                "more than %d grad-enabled forwards without a backward are pending; dropping the "
                "oldest (run evaluation under torch.no_grad() to avoid recording it)",
                self.options.max_pending_forwards,
            )
            self._warned_pending = True
        batch, device = find_batch_size(args, kwargs)
        ids = self._next_ids
        if ids is not None and len(ids) != batch:
            self._next_ids = None
            raise RecordingError(
                f"set_sample_ids() gave {len(ids)} ids but the next forward has batch size {batch}; "
                "give one id per row of the batch."
            )
        self._next_ids = None
        args_tree, kwargs_tree, slots, consts = capture_inputs(args, kwargs, batch)
        captured = CapturedForward(
            batch_size=batch,
            args=args_tree,
            kwargs=kwargs_tree,
            slots=slots,
            tensors=consts,
            rng_state=torch.get_rng_state(),
            cuda_rng_state=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            training=module.training,
            mode_overrides=self._modules.mode_overrides(),
            buffers=self._forward_buffers(),
            user_ids=ids,
            autocast=autocast_state(),
            buffers_in=self._buffers.snapshot() if self._gradients.auto else None,
        )
        self._stack[-1] = OutputCapture(
            captured,
            lambda: current_grad_scale(self.scaler),
            keep_outputs=self.options.cotangent_codec == "auto",
            on_backward=self.writer.gate.backward_started,
        )
        return None

    def _forward_buffers(self) -> Mapping[str, torch.Tensor] | None:
        if self._forwards_only:
            # a rank's forwards follow rank 0's in the merged step: each carries its buffers
            snap = self._buffers.snapshot()
            return snap or None
        return self._buffers.snapshot_if_changed("forward")

    def _post_forward(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        if self._closed or self._gradients.checking or not self._stack:
            return None
        cap = self._stack.pop()
        if cap is None:
            return None
        if output is None:  # the forward raised (or returned nothing): nothing to record
            cap.release()
            return None
        if self._layout.output_module is None:
            try:
                cap.attach(output, where="model")
            except BaseException:
                cap.release()
                raise
        if cap.attached:
            self._pending.append(cap)
        else:
            cap.release()
        return None

    def _output_hook(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        if self._closed or self._gradients.checking or not self._stack or self._stack[-1] is None:
            return None
        cap = self._stack[-1]
        if cap.output_seen:
            raise RecordingError(
                f"the output module {self.options.output!r} ran twice in one forward of the model; "
                "name a submodule that runs once per forward as output=."
            )
        cap.output_seen = True
        cap.attach(output, where=f"output module {self.options.output!r}")
        return None

    def _pre_step(
        self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict[str, Any]
    ) -> None:
        if self._closed:
            return None
        assert self.writer is not None
        self.writer.check()
        # args is (optimizer, *step_args)
        if (len(args) > 1 and args[1] is not None) or kwargs.get("closure") is not None:
            raise RecordingError(
                "optimizer.step(closure) is not supported: the closure recomputes gradients after "
                "the recorder has read them. Call backward() before step() instead."
            )
        self._stack.clear()
        self._layout.check_groups(optimizer)
        for p in self._layout.frozen_in_opt:
            if p.grad is not None:
                raise RecordingError(
                    "a parameter that was frozen (requires_grad=False) when recording started now "
                    "has a gradient; the trace cannot name it. Unfreeze parameters before recording."
                )
        self._skip_stale_backwards()
        received = [c for c in self._pending if c.received]
        for c in self._pending:
            if not c.received:
                c.release()
        self._pending = []
        if received and self._grads.cleared():
            self._write_skip(received, "grads_cleared")
            received = []
        t = self._step
        if self._forwards_only:
            self._in_flight = CapturedStep(
                index=t,
                grads={},
                groups=[],
                tensor_hyperparams=[],
                forwards=[self._finish_forward(c) for c in received],
                buffers=None,
            )
            return None
        forwards = [self._finish_forward(c) for c in received]
        kept = self._gradients.capture(self.model, t, self._params, forwards)
        groups, tkeys = [], []
        for group in optimizer.param_groups:
            hp, tk = capture_hyperparams(group)
            groups.append(hp)
            tkeys.append(tk)
        buffers = self._buffers.snapshot_if_changed("step")
        ckpt = self._state(t) if t % self.options.checkpoint_every == 0 else None
        self._in_flight = CapturedStep(
            index=t,
            groups=groups,
            tensor_hyperparams=tkeys,
            forwards=forwards,
            buffers=buffers,
            checkpoint=ckpt,
            **kept,
        )
        return None

    def _post_step(
        self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict[str, Any]
    ) -> None:
        if self._closed or self._in_flight is None:
            return None
        assert self.writer is not None
        step, self._in_flight = self._in_flight, None
        self._step += 1
        self._grads.reset()
        self.writer.write_step(step)
        if self._bar is not None:
            self._bar.update(1)
        return None


@contextlib.contextmanager
def record(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    store: Store | str | os.PathLike[str] | None = None,
    scaler: Any = None,
    options: RecordOptions | None = None,
    **keywords: Any,
) -> Iterator[Recorder]:
    """Record the training loop run inside the ``with`` block into a trace.

    See ``Recorder`` for ``store`` and ``scaler``, and ``RecordOptions`` for the options
    (keywords such as ``checkpoint_every=10``, or ``options=RecordOptions(...)``). On an
    exception the trace keeps every committed step, records the error with
    ``finished=False``, and the exception propagates.
    Sample ids are the content hash of each row's bytes by default (32 hex characters);
    ``rec.set_sample_ids(ids)`` gives your own, e.g. dataset indices (ints stay ints).
    """
    rec = Recorder(model, optimizer, store=store, scaler=scaler, options=options, **keywords)
    rec.start()
    try:
        yield rec
    except BaseException as e:
        rec.close(error=e)
        raise
    rec.close()
