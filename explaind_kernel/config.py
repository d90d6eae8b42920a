"""Kernel configuration: a small frozen dataclass saved with every result."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from .errors import InputError
from .quadrature import Quadrature

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: the values of KernelConfig.training_mode (training_side.py routes them)
TRAINING_MODES = ("auto", "rules", "forward_ad", "per_sample", "jvp", "vmap")


@dataclass(frozen=True)
class KeepOptions:
    """Which finer-grained joint slices the engine keeps (memory is chosen up front).

    sample_component: data contributions per (training sample, parameter tensor) [N,O,S,C].
    sample_window:    data contributions per (training sample, step window)      [N,O,S,W].
    component_window: path contributions per (component, step window)            [N,O,C,W].
    param_scores:     per-parameter-element influence scores (sum over rows of |J̄ ⊙ Δθ|).
    """

    sample_component: bool = False
    sample_window: bool = False
    component_window: bool = True
    param_scores: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):
            if not isinstance(getattr(self, f.name), bool):
                raise InputError(
                    f"KeepOptions.{f.name} must be True or False, got {getattr(self, f.name)!r}"
                )


@dataclass(frozen=True)
class KernelConfig:
    """How the path kernel is computed.

    quadrature:    rule and node count for J̄_t, e.g. "gauss:2" or "midpoint:100".
    adaptive_tol:  when set, each test input's step is bisected where the measured quadrature
                   error exceeds tol × (sub-segment length), so the step's |error| ≤ tol, within
                   `max_nodes` Jacobian evaluations per input and step, kink pieces counted
                   (localises ReLU kinks, which a higher-order rule alone cannot). Decided per
                   input: the result does not depend on `memory_budget`.
    kink_splits:   split each step, per test input, at up to this many kinks of ReLU-type ops
                   (largest estimated jumps first; see kinks.py) and apply the rule on every
                   piece — Gauss's order back on piecewise-smooth models. 0: off. Costs about
                   (kinks + 1) × nodes Jacobian evaluations per input and step.
    kink_probes:   kinks are located by the secant inside this many equal intervals of the
                   step (kink_probes + 1 forward passes; more place them more exactly).
    dtype:         "float32" (default) or "float64" (verification). On a run trained in fp32,
                   float64 completes to ~1e-8 relative, not 1e-15: the replayed optimizer
                   state (Adam's moments, SGD's buffer) carries the training's fp32 rounding.
    device:        "cuda", "cpu", ... (None: CUDA when available, else CPU).
    memory_budget: bytes the per-chunk adjoint state may take; test inputs are chunked to fit.
    block_rows:    at most this many rows at once on the training side (batch rows, or adjoint
                   rows for forward_ad and jvp); fewer where the batch's activations are large
                   (train_blocks.py).
    training_mode: "auto" | "rules" | "forward_ad" | "per_sample" | "jvp" — how K(x; i, τ) is
                   contracted (see training_side.py; "vmap" is an older name of "rules"); auto
                   times the routes on the first forward and keeps the fastest.
    step_windows:  number of equal step windows for windowed views (or explicit edges).
    keep:          which joint slices to keep (see KeepOptions).
    allow_tf32:    permit TF32 matmuls and cuDNN convolutions on CUDA (off by default: fp32
                   means fp32; set for the run by runtime.torch_runtime, then restored).
    progress:      show a tqdm progress bar.
    prefetch:      read and replay the trace in a background thread while computing.
    cpu_threads:   torch intra-op threads while computing on CPU: "auto" (default) is one
                   thread on a busy machine (load average above the cores) and otherwise
                   calibrates once per shape — one thread unless all threads are clearly
                   faster on the run's [rows, parameters] work (runtime.auto_cpu_threads;
                   small models on few cores run much faster on one) —, an int, or None to leave torch's
                   setting as is. Restored afterwards; the count used is in result.extra.
    """

    quadrature: str = "gauss:2"
    adaptive_tol: float | None = None
    max_nodes: int = 32
    kink_splits: int = 0
    kink_probes: int = 8
    dtype: str = "float32"
    device: str | None = None
    memory_budget: int = 2 * 1024**3
    block_rows: int = 64
    training_mode: str = "auto"
    step_windows: int | tuple[int, ...] = 10
    keep: KeepOptions = field(default_factory=KeepOptions)
    allow_tf32: bool = False
    progress: bool = True
    prefetch: bool = True
    cpu_threads: int | str | None = "auto"

    def __post_init__(self) -> None:
        Quadrature.parse(self.quadrature)
        if self.dtype not in _DTYPES:
            raise InputError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.adaptive_tol is not None and not self.adaptive_tol > 0:
            raise InputError(f"adaptive_tol must be positive, got {self.adaptive_tol!r}")
        if (
            self.adaptive_tol is not None
            and self.max_nodes < Quadrature.parse(self.quadrature).nodes
        ):
            raise InputError(
                f"max_nodes ({self.max_nodes}) is below the quadrature's node count "
                f"({self.quadrature}); raise max_nodes."
            )
        if not isinstance(self.kink_splits, int) or self.kink_splits < 0:
            raise InputError(f"kink_splits must be an integer ≥ 0, got {self.kink_splits!r}")
        if not isinstance(self.kink_probes, int) or self.kink_probes < 1:
            raise InputError(f"kink_probes must be an integer ≥ 1, got {self.kink_probes!r}")
        if self.memory_budget <= 0:
            raise InputError(f"memory_budget must be positive bytes, got {self.memory_budget!r}")
        if self.training_mode not in TRAINING_MODES:
            raise InputError(
                "training_mode must be 'auto', 'rules', 'forward_ad', 'per_sample', 'jvp' or "
                f"'vmap', got {self.training_mode!r}"
            )
        if self.block_rows < 1:
            raise InputError(f"block_rows must be ≥ 1, got {self.block_rows!r}")
        if isinstance(self.step_windows, int) and self.step_windows < 1:
            raise InputError(f"step_windows must be ≥ 1, got {self.step_windows!r}")
        ct = self.cpu_threads
        if (
            ct is not None
            and ct != "auto"
            and (isinstance(ct, bool) or not isinstance(ct, int) or ct < 1)
        ):
            raise InputError(f"cpu_threads must be 'auto', None or an integer ≥ 1, got {ct!r}")
        if not isinstance(self.keep, KeepOptions):
            raise InputError("keep must be an explaind_kernel.KeepOptions instance")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    def resolved_device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if isinstance(d["step_windows"], tuple):
            d["step_windows"] = list(d["step_windows"])
        return d


def resolve_config(
    config: KernelConfig | None, options: dict[str, Any], caller: str
) -> KernelConfig:
    """The KernelConfig a call runs with: `config`, or one built from keyword `options`.

    Both together are refused (an option next to `config=` would otherwise be ignored
    silently); so are option names that are not KernelConfig fields."""
    if config is not None:
        if options:
            raise InputError(
                f"{caller}: pass either config= or keyword options, not both; got config= and "
                f"{sorted(options)}. Put them in the config: "
                f"dataclasses.replace(config, {', '.join(f'{k}=...' for k in sorted(options))})."
            )
        if not isinstance(config, KernelConfig):
            raise InputError(
                f"{caller}: config= must be an explaind_kernel.KernelConfig, "
                f"got {type(config).__name__}"
            )
        return config
    known = {f.name for f in fields(KernelConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise InputError(
            f"{caller}: unknown option(s) {unknown}; KernelConfig fields are {sorted(known)}."
        )
    return KernelConfig(**options)
