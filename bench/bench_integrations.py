"""Recording overhead under Lightning (ExplaindCallback) against a plain loop (record()).

Same model (the modular-addition Transformer of examples/), same seeded batches, same number
of optimizer steps in four modes: plain loop, plain loop inside ``explaind_trace.record``,
Lightning ``Trainer.fit`` without and with ``ExplaindCallback``. Runs alternate; each mode is
timed end to end (Lightning's own set-up and the writer draining the trace included), in wall
time and process CPU time. Reported: the median over repeats of (with callback)/(without) for
Lightning and recorded/unrecorded for the plain loop, and whether recording left the final
parameters bit-identical.

    python bench/bench_integrations.py                    # 100 steps, 3 repeats
    python bench/bench_integrations.py --steps 30 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402

import explaind_trace as et  # noqa: E402
from examples.modular_addition.model import ModularAdditionTransformer, make_dataset  # noqa: E402
from integrations.lightning import ExplaindCallback  # noqa: E402

MODES = ("plain", "plain+record", "lightning", "lightning+callback")
P, D_MODEL, HEADS, D_MLP, BATCH = 97, 128, 4, 512, 512


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1.0, betas=(0.9, 0.98))


class LitTransformer(L.LightningModule):
    """The example Transformer as a LightningModule (training_step calls self(x))."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return _optimizer(self)


def _setup() -> tuple[torch.nn.Module, DataLoader]:
    x, y, _, _ = make_dataset(P, train_fraction=0.3, seed=0)
    torch.manual_seed(0)
    model = ModularAdditionTransformer(P, d_model=D_MODEL, n_heads=HEADS, d_mlp=D_MLP)
    sampler = RandomSampler(x, generator=torch.Generator().manual_seed(1))
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH, sampler=sampler, drop_last=True)
    return model, loader


def _plain(model: torch.nn.Module, loader: DataLoader, steps: int, store: str | None) -> None:
    opt = _optimizer(model)

    def loop() -> None:
        done = 0
        while done < steps:
            for x, y in loader:
                loss = torch.nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                done += 1
                if done == steps:
                    return

    if store is None:
        loop()
    else:
        with et.record(model, opt, store=store, checkpoint_every=100):
            loop()


def _lightning(model: torch.nn.Module, loader: DataLoader, steps: int, store: str | None) -> None:
    callbacks = [] if store is None else [ExplaindCallback(store, checkpoint_every=100)]
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    trainer.fit(LitTransformer(model), loader)
    if trainer.global_step != steps:
        raise RuntimeError(f"Lightning took {trainer.global_step} steps, expected {steps}")


def run(mode: str, steps: int, workdir: str, tag: str) -> tuple[float, float, dict]:
    """(wall seconds, process CPU seconds, final parameters) of one run."""
    model, loader = _setup()
    store = None if "+" not in mode else os.path.join(workdir, f"{mode}-{tag}.lmdb")
    fn = _plain if mode.startswith("plain") else _lightning
    w0, c0 = time.perf_counter(), time.process_time()
    fn(model, loader, steps, store)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    if store is not None:
        with et.open_trace(store) as trace:
            if trace.num_steps != steps or not trace.finished:
                raise RuntimeError(f"{mode}: trace holds {trace.num_steps} steps, expected {steps}")
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return wall, cpu, params


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a small shared CPU, OpenMP threads that "
        "wait for each other make timings swing by 10x)",
    )
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "integrations.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="lightning")

    wall: dict[str, list[float]] = {m: [] for m in MODES}
    cpu: dict[str, list[float]] = {m: [] for m in MODES}
    identical = {"plain": True, "lightning": True}
    with tempfile.TemporaryDirectory() as workdir:
        for m in MODES:  # warm-up: imports, allocator, first Trainer
            run(m, min(args.steps, 5), workdir, "warm")
        for r in range(args.repeats):
            order = MODES if r % 2 == 0 else tuple(reversed(MODES))
            finals = {}
            for m in order:
                w, c, finals[m] = run(m, args.steps, workdir, str(r))
                wall[m].append(w)
                cpu[m].append(c)
                print(f"repeat {r} {m:>20}: {w:6.2f}s wall  {c:6.2f}s cpu", flush=True)
            identical["plain"] &= _same(finals["plain"], finals["plain+record"])
            identical["lightning"] &= _same(finals["lightning"], finals["lightning+callback"])

    def ratios(a: str, b: str, d: dict[str, list[float]]) -> list[float]:
        return [x / y for x, y in zip(d[a], d[b])]

    summary = {
        "lightning_callback_over_lightning": statistics.median(
            ratios("lightning+callback", "lightning", wall)
        ),
        "plain_record_over_plain": statistics.median(ratios("plain+record", "plain", wall)),
        "lightning_over_plain": statistics.median(ratios("lightning", "plain", wall)),
        "lightning_callback_over_lightning_cpu": statistics.median(
            ratios("lightning+callback", "lightning", cpu)
        ),
        "plain_record_over_plain_cpu": statistics.median(ratios("plain+record", "plain", cpu)),
        "ms_per_step": {m: 1000 * statistics.median(wall[m]) / args.steps for m in MODES},
        "final_params_bit_identical_with_recording": identical,
    }
    results = {
        "benchmark": "recording overhead: Lightning callback vs plain loop",
        "model": f"ModularAdditionTransformer(p={P}, d_model={D_MODEL}, n_heads={HEADS}, "
        f"d_mlp={D_MLP}), AdamW, batch {BATCH}",
        "steps": args.steps,
        "repeats": args.repeats,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "summary": summary,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
