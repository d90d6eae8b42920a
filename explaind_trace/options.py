"""``RecordOptions``: how a run is recorded, validated once and saved in the trace header."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = ["RecordOptions", "GRAD_CODECS", "COTANGENT_CODECS", "GRADIENT_MODES"]

GRAD_CODECS = ("lossless", "bf16")
COTANGENT_CODECS = ("generic", "auto")
GRADIENT_MODES = ("stored", "recompute", "auto")


def _positive_int(name: str, value: Any, *, low: int = 1, high: int | None = None) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        span = f"an int in {low}..{high}" if high is not None else f"an int >= {low}"
        raise ValueError(f"{name} must be {span}, got {value!r}")


@dataclass(frozen=True)
class RecordOptions:
    """The recording options of ``record()``, ``Recorder`` and the training integrations.

    - ``checkpoint_every``: a full checkpoint (θ, buffers, optimizer state) every K steps.
    - ``output``: name of the submodule whose output is the model output (for models that
      compute the loss inside ``forward``); ``None``: the model's own output.
    - ``progress``: show a tqdm bar of the recorded steps.
    - ``grad_codec``: ``"lossless"`` or ``"bf16"`` (lossy gradients, recorded in the header).
    - ``cotangent_codec``: ``"generic"`` (every cotangent by the tensor codec) or ``"auto"``:
      a cotangent that is a softmax cross-entropy's is stored per row as its target and scale
      (``cotangent_codec.py``; lossless, rebuilt from the replayed logits when read), the
      others by the tensor codec row by row. The recorder then keeps each output until its
      step. ``"generic"`` is the default until the codec is proven on the suite.
    - ``compression_level``: zstandard level 1..22 of the stored tensors.
    - ``queue_size``: steps the writer thread may hold before training waits for it.
    - ``max_pending_forwards``: grad-enabled forwards without a backward kept at most.
    - ``checksums``: seal every record with an xxh3-64 checksum of its bytes, verified on
      every read (the header says so). Its cost was within the noise of a shared machine,
      +250-350 bytes per step (bench/results/checksum.json); off only to measure that.
    - ``gradients``: ``"stored"`` (every step's gradient is stored), ``"recompute"`` (only a
      small fingerprint per step: replay recomputes each gradient from the recorded forwards
      and checks it, which needs the model; see ``fingerprint.py``) or ``"auto"`` (recompute,
      checked at every checkpoint while recording; gradients are stored from the first
      checkpoint step where the optimizer's gradient is not the recomputed one).

    Saved in the trace header (``TraceMeta.options``). Every field is checked here, once;
    a bad value raises ``ValueError``/``TypeError`` naming the field.
    """

    checkpoint_every: int = 100
    output: str | None = None
    progress: bool = False
    grad_codec: str = "lossless"
    cotangent_codec: str = "generic"
    compression_level: int = 1
    queue_size: int = 8
    max_pending_forwards: int = 256
    checksums: bool = True
    gradients: str = "stored"

    def __post_init__(self) -> None:
        _positive_int("checkpoint_every", self.checkpoint_every)
        if self.output is not None and (not isinstance(self.output, str) or not self.output):
            raise ValueError(
                "output must be None or a submodule name from model.named_modules(), got "
                f"{self.output!r}"
            )
        if not isinstance(self.progress, bool):
            raise TypeError(f"progress must be True or False, got {self.progress!r}")
        if self.grad_codec not in GRAD_CODECS:
            raise ValueError(f"grad_codec must be one of {GRAD_CODECS}, got {self.grad_codec!r}")
        if self.cotangent_codec not in COTANGENT_CODECS:
            raise ValueError(
                f"cotangent_codec must be one of {COTANGENT_CODECS}, got {self.cotangent_codec!r}"
            )
        _positive_int("compression_level", self.compression_level, high=22)
        _positive_int("queue_size", self.queue_size)
        _positive_int("max_pending_forwards", self.max_pending_forwards)
        if not isinstance(self.checksums, bool):
            raise TypeError(f"checksums must be True or False, got {self.checksums!r}")
        if self.gradients not in GRADIENT_MODES:
            raise ValueError(f"gradients must be one of {GRADIENT_MODES}, got {self.gradients!r}")

    @property
    def lossy(self) -> bool:
        """Whether gradients are stored lossily."""
        return self.grad_codec != "lossless"

    def to_record(self) -> dict[str, Any]:
        """The plain map saved in the trace header."""
        return asdict(self)

    @classmethod
    def from_record(cls, raw: dict[str, Any]) -> RecordOptions:
        """Options from a header map; keys this version does not know are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    @classmethod
    def build(cls, options: RecordOptions | None, keywords: dict[str, Any]) -> RecordOptions:
        """``options`` or ``RecordOptions(**keywords)``; giving both is an error."""
        if options is None:
            unknown = sorted(set(keywords) - {f.name for f in fields(cls)})
            if unknown:
                raise TypeError(
                    f"unknown recording option(s) {', '.join(unknown)}; the options are "
                    f"{', '.join(f.name for f in fields(cls))}"
                )
            return cls(**keywords)
        if not isinstance(options, RecordOptions):
            raise TypeError(f"options must be a RecordOptions, got {type(options).__name__}")
        if keywords:
            raise TypeError(
                f"options= was given together with the keyword option(s) "
                f"{', '.join(sorted(keywords))}; give either options=RecordOptions(...) or "
                "the keywords, not both (RecordOptions is frozen: use dataclasses.replace)."
            )
        return options
