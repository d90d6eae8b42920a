"""`run_demo`: record a small modular-addition run, rewrite it as a kernel machine, report.

Three phases, each timed:

1. record — a one-layer Transformer learns ``(a + b) mod p`` with AdamW (weight decay 1.0,
   betas (0.9, 0.98)) on minibatches, inside ``explaind_trace.record``; training and test
   accuracy are measured every few steps (under ``torch.no_grad``, so not recorded). Each
   training pair gets the sample id ``"a+b"``.
2. kernel — ``explaind_kernel.compute_kernel`` explains the margin of the correct class
   (its logit minus the logsumexp of the others) on held-out pairs, with one parameter
   slice per attention head and projection, keeping every joint slice the report shows;
   the step windows include the phase boundaries found on the accuracy curves
   (`demo_phases`: memorisation, plateau, generalisation — the run groks).
3. report — ``explaind_attr.build_report`` with the token rows read back from the trace,
   explanation cards for the first test pairs, the accuracy curves with the phases shaded
   and a table of which components and which training pairs drove each phase; plus
   ``training.png`` (accuracy and each component's contribution per window) and
   ``history.csv``.

The defaults take about a minute on two CPU cores; ``quick=True`` takes seconds.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from explaind_kernel import KeepOptions, KernelResult, compute_kernel
from explaind_kernel.runtime import torch_runtime
from explaind_trace import open_trace, record

from ...errors import UsageError
from ...report import build_report, samples_from_trace
from .model import ModularAdditionTransformer, component_groups, head_slices, make_dataset

__all__ = ["DemoConfig", "DemoSummary", "run_demo"]

log = logging.getLogger(__name__)

_MARKER = "demo.json"
_FORMAT = "explaind.demo"


@dataclass(frozen=True)
class DemoConfig:
    """What the demo trains and explains (defaults: about a minute on two CPU cores)."""

    p: int = 23
    d_model: int = 64
    n_heads: int = 4
    d_mlp: int = 256
    train_fraction: float = 0.5
    lr: float = 1e-2
    weight_decay: float = 1.0
    betas: tuple[float, float] = (0.9, 0.98)
    warmup: int = 10
    batch_size: int = 64
    steps: int = 600
    eval_every: int = 10
    n_test: int = 16
    checkpoint_every: int = 100
    step_windows: int = 10
    seed: int = 0
    threads: int | None = 1

    def __post_init__(self) -> None:
        for name in (
            "p",
            "d_model",
            "n_heads",
            "d_mlp",
            "batch_size",
            "steps",
            "eval_every",
            "n_test",
            "checkpoint_every",
            "step_windows",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"DemoConfig.{name} must be a positive integer, got {value!r}")
        if not 0.0 < self.train_fraction < 1.0:
            raise UsageError(
                f"DemoConfig.train_fraction must be in (0, 1), got {self.train_fraction!r}"
            )
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise UsageError(
                f"DemoConfig.warmup must be a non-negative integer, got {self.warmup!r}"
            )
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"DemoConfig.threads must be ≥ 1 or None, got {self.threads!r}")

    @classmethod
    def quick(cls) -> DemoConfig:
        """A few seconds: the same pipeline on a tiny run (used by the tests)."""
        return cls(
            p=11,
            d_model=16,
            d_mlp=32,
            batch_size=16,
            steps=24,
            eval_every=4,
            n_test=6,
            checkpoint_every=10,
            step_windows=4,
        )


@dataclass(frozen=True)
class DemoSummary:
    """Where the demo wrote things, how exact the rewrite was and how long each phase took."""

    out_dir: Path
    trace: Path
    result: Path
    report: Path
    figure: Path
    completeness_line: str
    completeness_max_abs: float
    completeness_rel: float
    steps: int
    train_accuracy: float
    test_accuracy: float
    seconds: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("out_dir", "trace", "result", "report", "figure"):
            d[k] = str(d[k])
        return d


def _prepare(out: Path) -> None:
    """Create `out`; clear a previous demo's outputs there, never anything else."""
    trace = out / "trace.lmdb"
    if trace.exists():
        marker = out / _MARKER
        try:
            owned = json.loads(marker.read_text()).get("format") == _FORMAT
        except (OSError, ValueError, AttributeError):
            owned = False
        if not owned:
            raise UsageError(
                f"{trace} exists and was not written by the demo; choose another output "
                "directory (--out) or delete it."
            )
        log.info("replacing the previous demo run in %s", out)
        shutil.rmtree(trace)
        shutil.rmtree(out / "report", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / _MARKER).write_text(json.dumps({"format": _FORMAT}))


def _accuracy(model: torch.nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(dim=-1) == y).float().mean())


def _train(cfg: DemoConfig, trace: Path, data: tuple[Tensor, ...], progress: bool):
    train_x, train_y, test_x, test_y = data
    torch.manual_seed(cfg.seed)
    model = ModularAdditionTransformer(cfg.p, cfg.d_model, cfg.n_heads, cfg.d_mlp)
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas
    )
    warmup = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: min(1.0, (t + 1) / max(1, cfg.warmup))
    )
    order = torch.Generator().manual_seed(cfg.seed)
    names = [f"{int(a)}+{int(b)}" for a, b in train_x[:, :2].tolist()]
    batch = min(cfg.batch_size, len(train_x))
    history: list[tuple[int, float, float]] = [
        (0, _accuracy(model, train_x, train_y), _accuracy(model, test_x, test_y))
    ]
    loss_fn = torch.nn.CrossEntropyLoss()
    with record(
        model, opt, store=str(trace), checkpoint_every=cfg.checkpoint_every, progress=progress
    ) as rec:
        for step in range(1, cfg.steps + 1):
            idx = torch.randperm(len(train_x), generator=order)[:batch]
            rec.set_sample_ids([names[i] for i in idx.tolist()])
            opt.zero_grad()
            loss_fn(model(train_x[idx]), train_y[idx]).backward()
            opt.step()
            warmup.step()
            if step % cfg.eval_every == 0 or step == cfg.steps:
                history.append(
                    (step, _accuracy(model, train_x, train_y), _accuracy(model, test_x, test_y))
                )
    return model, history


def _samples_from_trace(trace: Path, wanted: set[str]) -> dict[str, Tensor]:
    """Token rows of the wanted sample ids, read back from the trace."""
    with open_trace(str(trace)) as reader:
        return samples_from_trace(reader, sorted(wanted))


def _group_windows(result: KernelResult, groups: dict[str, list[str]]) -> np.ndarray:
    """[G, W] mean over rows of each component group's contribution per step window."""
    cw = result.component_window.mean(axis=(0, 1))  # [C, W]
    index = {name: c for c, name in enumerate(result.component_names)}
    return np.stack([cw[[index[n] for n in names]].sum(axis=0) for names in groups.values()])


def _figure(path: Path, history, result: KernelResult, groups: dict[str, list[str]]) -> None:
    from matplotlib.figure import Figure  # no pyplot: the user's backend is left alone

    steps, train_acc, test_acc = (np.asarray(c) for c in zip(*history))
    fig = Figure(figsize=(9.0, 3.4), dpi=90, layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(steps, train_acc, label="train")
    ax1.plot(steps, test_acc, label="test")
    ax1.set(xlabel="step", ylabel="accuracy", ylim=(-0.02, 1.02), title="accuracy")
    ax1.legend(loc="lower right")
    edges = np.asarray(result.window_edges)
    mids = (edges[:-1] + edges[1:]) / 2
    for name, row in zip(groups, _group_windows(result, groups)):
        ax2.plot(mids, row, marker="o", ms=3, label=name)
    ax2.axhline(0.0, color="0.6", lw=0.8)
    ax2.set(
        xlabel="step (window centre)",
        ylabel="Δ margin (mean over test inputs)",
        title="contribution per component and step window",
    )
    ax2.legend(fontsize="small", ncol=2)
    fig.savefig(path)


def demo_phases(history: list[tuple[int, float, float]], steps: int) -> list[tuple[str, int, int]]:
    """Memorisation, plateau and generalisation from the accuracy curves.

    Memorisation ends at the first evaluation with train accuracy ≥ 0.99; the plateau lasts
    while test accuracy stays within 0.05 of its value there; generalisation is the rest
    (only when test accuracy then rises by 0.1 or more). Steps are evaluation steps."""
    done = next((t for t, tr, _ in history if tr >= 0.99 and t > 0), None)
    if done is None or done >= steps:
        return [("training", 0, steps)]
    base = next(te for t, _, te in history if t == done)
    final = history[-1][2]
    flat = [t for t, _, te in history if t >= done and te <= base + 0.05]
    rise = max(flat) if flat else done
    if final - base < 0.1 or rise >= steps:
        return [("memorisation", 0, done), ("after", done, steps)]
    phases = [("memorisation", 0, done)]
    if rise > done:
        phases.append(("plateau", done, rise))
    return phases + [("generalisation", rise, steps)]


def run_demo(
    out_dir: str | Path,
    *,
    quick: bool = False,
    progress: bool = True,
    config: DemoConfig | None = None,
    threads: int | None = None,
) -> DemoSummary:
    """Record, explain and report a small modular-addition run into `out_dir`.

    quick: a tiny configuration (seconds). config: any other DemoConfig (wins over quick).
    threads: torch's intra-op threads for the run (wins over the config's `threads`).
    Writes trace.lmdb, result.explaind, report/report.html, training.png, history.csv and
    demo.json; a previous demo run in the same directory is replaced.
    """
    cfg = config if config is not None else (DemoConfig.quick() if quick else DemoConfig())
    if threads is not None:
        cfg = dataclasses.replace(cfg, threads=threads)
    out = Path(out_dir)
    _prepare(out)
    trace, result_path = out / "trace.lmdb", out / "result.explaind"
    seconds: dict[str, float] = {}
    begin = time.perf_counter()
    with torch_runtime("cpu", cpu_threads=cfg.threads):
        train_x, train_y, test_x, test_y = make_dataset(cfg.p, cfg.train_fraction, cfg.seed)
        log.info(
            "recording %d steps of a p=%d modular-addition Transformer into %s",
            cfg.steps,
            cfg.p,
            trace,
        )
        t0 = time.perf_counter()
        model, history = _train(cfg, trace, (train_x, train_y, test_x, test_y), progress)
        seconds["record"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        n = min(cfg.n_test, len(test_x))
        phases = demo_phases(history, cfg.steps)
        equal = np.linspace(0, cfg.steps, min(cfg.step_windows, cfg.steps) + 1).round()
        edges = sorted({int(e) for e in equal} | {e for _, a, b in phases for e in (a, b)})
        result = compute_kernel(
            str(trace),
            ModularAdditionTransformer(cfg.p, cfg.d_model, cfg.n_heads, cfg.d_mlp),
            test_x[:n],
            outputs="margin",
            labels=test_y[:n],
            slices=head_slices(model),
            step_windows=tuple(edges),
            keep=KeepOptions(sample_component=True, sample_window=True, component_window=True),
            progress=progress,
        )
        result.save(result_path)
        seconds["kernel"] = time.perf_counter() - t0
        log.info("%s", result.completeness_line())

        t0 = time.perf_counter()
        samples = _samples_from_trace(trace, set(result.sample_ids))
        names = {f"{int(a)}+{int(b)}": int(y) for (a, b, _), y in zip(train_x.tolist(), train_y)}
        frame = pd.DataFrame(history, columns=["step", "train accuracy", "test accuracy"])
        paths = build_report(
            result,
            out / "report",
            samples=samples,
            title=f"ExPLAIND demo: a one-layer Transformer learning (a + b) mod {cfg.p}",
            inputs=test_x[:n],
            train_labels=names,
            history=frame,
            phases=phases,
            component_groups=component_groups(model),
        )
        figure = out / "training.png"
        _figure(figure, history, result, component_groups(model))
        with open(out / "history.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["step", "train_accuracy", "test_accuracy"])
            writer.writerows(history)
        seconds["report"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - begin

    max_abs, rel = result.completeness()
    summary = DemoSummary(
        out_dir=out,
        trace=trace,
        result=result_path,
        report=paths.html,
        figure=figure,
        completeness_line=result.completeness_line(),
        completeness_max_abs=max_abs,
        completeness_rel=rel,
        steps=result.num_steps,
        train_accuracy=history[-1][1],
        test_accuracy=history[-1][2],
        seconds=seconds,
        config=asdict(cfg),
    )
    (out / _MARKER).write_text(json.dumps({"format": _FORMAT, **summary.to_dict()}, indent=2))
    log.info("demo report written to %s", paths.html)
    return summary
