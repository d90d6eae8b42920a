"""Bytes per step of the output cotangents: the generic tensor codec vs the cross-entropy codec.

Two seeded runs of the same training, recorded with ``cotangent_codec="generic"`` and
``"auto"``; the trace's own count of cotangent payload bytes (``progress.kind_bytes``) per
step, against the raw size of the cotangents (B × ... × V × 4 bytes). Every codec cotangent is
then rebuilt from a replay of its forward (``explaind_trace.cotangents.resolve_forwards``, as
the kernel does) and compared bit for bit with the generic recording's; the time of that
rebuild per step is reported (it is one extra forward per training forward in the kernel).

- ``p97``: the modular-addition Transformer of bench_record.py (p = 97, logits [512, 97]);
- ``lm``: a per-token language-model head, logits [B, T, V] with padding rows.

    python bench/bench_cotangent_codec.py                    # both, 20 steps each
    python bench/bench_cotangent_codec.py --steps 5 --models lm --vocab 8192
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import explaind_trace as et  # noqa: E402
from examples.modular_addition.model import ModularAdditionTransformer, make_dataset  # noqa: E402
from explaind_trace import codec  # noqa: E402
from explaind_trace.cotangents import resolve_forwards  # noqa: E402
from tests.kernel.models import TokenLM  # noqa: E402


def p97(args):
    torch.manual_seed(0)
    x, y, _, _ = make_dataset(97, train_fraction=0.3, seed=0)
    model = ModularAdditionTransformer(97, d_model=128, n_heads=4, d_mlp=512)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1.0, betas=(0.9, 0.98))
    g = torch.Generator().manual_seed(1)

    def step() -> None:
        idx = torch.randint(0, x.shape[0], (512,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()

    return model, opt, step, 512 * 97 * 4


def lm(args):
    torch.manual_seed(0)
    v, b, t = args.vocab, args.batch, args.seq
    model = TokenLM(v, d=64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    corpus = torch.randint(0, v, (64, t + 1), generator=g)

    def step() -> None:
        seq = corpus[torch.randint(0, 64, (b,), generator=g)]
        labels = seq[:, 1:].clone()
        labels[:, -t // 8 :] = -100  # padding at the end of each sequence
        logits = model(seq[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, v), labels.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()

    return model, opt, step, b * t * v * 4


MODELS = {"p97": p97, "lm": lm}


def record(name: str, args, cot_codec: str, path: str):
    model, opt, step, raw = MODELS[name](args)
    t0 = time.perf_counter()
    with et.record(model, opt, store=path, cotangent_codec=cot_codec, checkpoint_every=100):
        for _ in range(args.steps):
            step()
    return model, raw, time.perf_counter() - t0


def bench(name: str, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = {}
        for cot_codec in ("generic", "auto"):
            path = os.path.join(tmp, f"{name}-{cot_codec}.lmdb")
            model, raw, seconds = record(name, args, cot_codec, path)
            with et.open_trace(path) as trace:
                kinds = trace.progress["kind_bytes"]
                out[cot_codec] = {
                    "cotangent_bytes_per_step": kinds["cotangents"] / trace.num_steps,
                    "stored_bytes_per_step": trace.progress["stored_bytes"] / trace.num_steps,
                    "record_seconds": seconds,
                }
            out[cot_codec]["path"] = path
        generic, auto = out["generic"].pop("path"), out["auto"].pop("path")
        equal, rebuild = True, []
        with et.open_trace(generic) as g, et.open_trace(auto) as a:
            prev = a.checkpoint(0).buffers
            for rs in a.replay():
                t0 = time.perf_counter()
                resolve_forwards(
                    rs.record.forwards,
                    model=model,
                    params=rs.params,
                    buffers=prev,
                    output_module=None,
                )
                rebuild.append(time.perf_counter() - t0)
                prev = a.buffers_at(rs.index)
                for fa, fg in zip(rs.record.forwards, g.step(rs.index).forwards):
                    same = codec.tensor_to_bytes(fa.cotangent) == codec.tensor_to_bytes(
                        fg.cotangent
                    )
                    equal = equal and same
    c_g, c_a = out["generic"]["cotangent_bytes_per_step"], out["auto"]["cotangent_bytes_per_step"]
    return {
        "steps": args.steps,
        "raw_cotangent_bytes_per_step": raw,
        "generic": out["generic"],
        "auto": out["auto"],
        "codec_over_generic": c_a / c_g,
        "codec_over_raw": c_a / raw,
        "rebuilt_bitwise_equal_to_generic": equal,
        "rebuild_ms_per_step": 1000 * sorted(rebuild)[len(rebuild) // 2],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cotangent_codec.json"))
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    results = {
        "benchmark": "cotangent bytes per step, generic vs cross-entropy codec",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "lm_shape": {"batch": args.batch, "seq": args.seq, "vocab": args.vocab},
        "note": "bytes are the trace's own counts of the stored cotangent payloads; times on "
        "a shared machine are indicative only",
        "models": {},
    }
    for name in args.models:
        results["models"][name] = bench(name, args)
        print(name, json.dumps(results["models"][name], indent=1), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
