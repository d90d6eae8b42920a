"""Train a tiny GPT-2 on the synthetic progression language with the Hugging Face Trainer,
recorded by ExPLAIND's Trainer callback.

    python -m examples.language_model.train --out runs/lm            # ~1 min on 2 CPU cores
    python -m examples.language_model.train --out runs/lm --small    # seconds (the tests' set-up)

The model computes its loss inside forward (the Trainer passes labels=), so the callback is
told which submodule produces the per-token logits: ``output="lm_head"``. The trace keeps no
per-step gradients (``gradients="recompute"``) and stores each cross-entropy cotangent as its
target and scale (``cotangent_codec="auto"``); both are rebuilt exactly at replay. Gradient clipping is
off (``max_grad_norm=0``): clipping rescales the gradient after the backward, so the gradient
the optimizer applies is no longer the one that came through the model output (see README.md).
The configuration goes to config.json, held-out losses before and after to train.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from explaind_trace.info import describe
from explaind_trace.options import COTANGENT_CODECS, GRADIENT_MODES

from .corpus import Language, Sentences, sequence_loss
from .model import build_model, gpt2_config

FULL = {
    "numbers": 97,
    "context": 32,
    "layers": 2,
    "d_model": 64,
    "heads": 4,
    "dropout": 0.1,
    "n_train": 512,
    "n_test": 64,
    "steps": 200,
    "batch_size": 16,
    "lr": 3e-3,
    # a checkpoint holds θ and both Adam moments (about 1 MB here, more than 100 steps of
    # per-step records); replaying 200 steps from θ_0 takes seconds, so θ_0 is the only one
    "checkpoint_every": 200,
}
SMALL = {
    "numbers": 12,
    "context": 12,
    "layers": 2,
    "d_model": 16,
    "heads": 2,
    "dropout": 0.1,
    "n_train": 48,
    "n_test": 8,
    "steps": 6,
    "batch_size": 4,
    "lr": 3e-3,
    "checkpoint_every": 3,
}


def add_size_args(p: argparse.ArgumentParser) -> None:
    """The model/data/training sizes (defaults from FULL, or SMALL with --small)."""
    p.add_argument("--small", action="store_true", help="the seconds-long configuration")
    for name, value in FULL.items():
        p.add_argument(
            "--" + name.replace("_", "-"),
            type=type(value),
            default=None,
            help=f"default {value} ({SMALL[name]} with --small)",
        )
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=int, default=10, help="warm-up steps of the linear schedule")
    p.add_argument("--seed", type=int, default=0)


def resolve_sizes(args: argparse.Namespace) -> None:
    base = SMALL if args.small else FULL
    for name, value in base.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/language_model", help="run directory")
    add_size_args(p)
    p.add_argument(
        "--gradients",
        default="recompute",
        choices=GRADIENT_MODES,
        help="recompute (default): no per-step gradients, rebuilt at replay from the recorded "
        "forwards and checked against a fingerprint; stored: every gradient kept",
    )
    p.add_argument(
        "--cotangent-codec",
        default="auto",
        choices=COTANGENT_CODECS,
        help="auto (default): cross-entropy cotangents stored as target + scale and rebuilt "
        "from the replayed logits, lossless; generic: every cotangent by the tensor codec",
    )
    p.add_argument(
        "--max-grad-norm",
        type=float,
        default=0.0,
        help="gradient clipping (default 0: off, see README.md); with --gradients recompute a "
        "clipped run is refused at replay, naming the step; auto stores gradients from there",
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--no-record", action="store_true", help="train without recording")
    p.add_argument("--overwrite", action="store_true", help="replace an existing trace in --out")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    resolve_sizes(args)
    return args


def language_of(cfg: dict[str, Any]) -> Language:
    return Language(numbers=cfg["numbers"], context=cfg["context"])


def datasets(cfg: dict[str, Any]) -> tuple[Sentences, Sentences]:
    """(training sentences, held-out sentences), drawn from disjoint seeds."""
    lang = language_of(cfg)
    return Sentences(lang, cfg["n_train"], cfg["seed"]), Sentences(
        lang, cfg["n_test"], cfg["seed"] + 1
    )


def model_of(cfg: dict[str, Any]) -> torch.nn.Module:
    """The model of a run's config.json, at its random initialisation."""
    config = gpt2_config(
        language_of(cfg),
        layers=cfg["layers"],
        d_model=cfg["d_model"],
        heads=cfg["heads"],
        dropout=cfg["dropout"],
    )
    return build_model(config, cfg["seed"])


def held_out_loss(model: torch.nn.Module, data: Sentences) -> float:
    """Mean sequence loss of the held-out sentences (eval mode, no grad: not recorded)."""
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(input_ids=data.ids, attention_mask=data.mask)
        loss = float(sequence_loss(out.logits, data.labels).mean())
    model.train(was)
    return loss


def training_args(cfg: dict[str, Any], out: Path, progress: bool):
    import transformers

    return transformers.TrainingArguments(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=cfg["batch_size"],
        max_steps=cfg["steps"],
        learning_rate=cfg["lr"],
        weight_decay=cfg["weight_decay"],
        warmup_steps=cfg["warmup"],
        lr_scheduler_type="linear",
        max_grad_norm=cfg["max_grad_norm"],  # 0: off, the optimizer sees the output-path gradient
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        seed=cfg["seed"],
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import transformers

    from integrations.huggingface import ExplaindTrainerCallback

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    out = Path(args.out)
    trace = out / "trace.lmdb"
    if trace.exists() and not args.no_record:
        if not args.overwrite:
            raise SystemExit(f"{trace} exists; pass --overwrite or choose another --out")
        shutil.rmtree(trace)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {
        k: v
        for k, v in vars(args).items()
        if k not in ("out", "overwrite", "no_progress", "small", "threads", "no_record")
    }
    train_set, test_set = datasets(cfg)
    model = model_of(cfg)
    loss_before = held_out_loss(model, test_set)

    callbacks = []
    if not args.no_record:
        record = {"gradients": args.gradients, "cotangent_codec": args.cotangent_codec}
        callbacks.append(
            ExplaindTrainerCallback(
                str(trace),
                output="lm_head",
                checkpoint_every=cfg["checkpoint_every"],
                progress=False,
                **record,
            )
        )
    trainer = transformers.Trainer(
        model=model,
        args=training_args(cfg, out, not args.no_progress),
        train_dataset=train_set,
        callbacks=callbacks,
    )
    start = time.perf_counter()
    if callbacks:
        with callbacks[0]:  # closes the trace with the error if train() raises
            trainer.train()
    else:
        trainer.train()
    train_s = time.perf_counter() - start
    loss_after = held_out_loss(model, test_set)

    cfg.update(vocab_size=language_of(cfg).vocab_size, language=asdict(language_of(cfg)))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    summary = {
        "steps": trainer.state.global_step,
        "parameters": sum(p.numel() for p in model.parameters()),
        "recorded": not args.no_record,
        "gradients": args.gradients,
        "cotangent_codec": args.cotangent_codec,
        "train_seconds": train_s,
        "seconds_per_step": train_s / max(1, trainer.state.global_step),
        "trace_bytes": describe(str(trace), check_drift=False)["bytes_on_disk"]
        if not args.no_record
        else 0,
        "held_out_loss_before": loss_before,
        "held_out_loss_after": loss_after,
    }
    name = "train.json" if not args.no_record else "train_norecord.json"
    (out / name).write_text(json.dumps(summary, indent=2))
    print(
        f"{summary['steps']} steps in {train_s:.1f} s; held-out sequence loss "
        f"{loss_before:.3f} → {loss_after:.3f} nats/token"
    )
    if not args.no_record:
        print(f"trace: {trace} ({summary['trace_bytes'] / 2**20:.2f} MiB)")
    return summary


if __name__ == "__main__":
    main()
