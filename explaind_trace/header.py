"""The trace header (the ``meta`` record): encoded and decoded side by side.

{"format": "explaind-trace", "schema_version": 2,
 "library_version", "torch_version", "created",   # who wrote it, when
 "model_class": "pkg.Module",
 "params": [{"name", "shape", "dtype"}],          # trainable, named_parameters() order
 "buffers": [{"name", "shape", "dtype"}],
 "optimizer": {"class", "rule",                   # class used, registered class replayed
               "groups": [{"params": [names], "hyperparams", "tensor_hyperparams"}]},
 "output_module", "checkpoint_every",
 "codec": {"grad_codec", "level", "lossy"},
 "device", "grad_scaler": bool,
 "options": RecordOptions as a map,               # absent in traces written before it
 "checksum": "xxh3-64" | None,                    # every record sealed (codec.pack); absent
                                                  # in traces written before checksums
 "ddp": {"rank", "world_size", "cotangent_scale"}}  # DDP runs only
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import torch

from . import codec
from .errors import SchemaVersionError, TraceCorruptError
from .optimizers import capture_hyperparams, qualified_name, resolve_optimizer
from .options import RecordOptions
from .records import GroupInfo, OptimizerInfo, TensorInfo, TraceMeta
from .schema import FORMAT, SCHEMA_VERSION, library_version

__all__ = ["encode_header", "decode_header"]


def _describe(name: str, t: torch.Tensor) -> dict[str, Any]:
    return {"name": name, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}


def encode_header(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    params: dict[str, torch.nn.Parameter],
    group_names: list[list[str]],
    options: RecordOptions,
    *,
    grad_scaler: bool,
    ddp: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``meta`` map of a run about to be recorded (``params``: the trainable ones)."""
    groups = []
    for names, group in zip(group_names, optimizer.param_groups):
        hp, tkeys = capture_hyperparams(group)
        groups.append({"params": names, "hyperparams": hp, "tensor_hyperparams": tkeys})
    first = next(iter(params.values()))
    meta = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "library_version": library_version(),
        "torch_version": torch.__version__,
        "created": datetime.now(timezone.utc).isoformat(),
        "model_class": qualified_name(type(model)),
        "params": [_describe(n, p) for n, p in params.items()],
        "buffers": [_describe(n, b) for n, b in model.named_buffers() if b is not None],
        "optimizer": {
            "class": qualified_name(type(optimizer)),
            "rule": qualified_name(resolve_optimizer(type(optimizer))),
            "groups": groups,
        },
        "output_module": options.output,
        "checkpoint_every": options.checkpoint_every,
        "codec": {
            "grad_codec": options.grad_codec,
            "level": options.compression_level,
            "lossy": options.lossy,
        },
        "device": str(first.device),
        "grad_scaler": grad_scaler,
        "options": options.to_record(),
        "checksum": codec.CHECKSUM if options.checksums else None,
    }
    if ddp is not None:
        meta["ddp"] = ddp
    return meta


def _options(raw: dict[str, Any], codec_opts: dict[str, Any]) -> RecordOptions:
    stored = raw.get("options")
    if isinstance(stored, dict):
        return RecordOptions.from_record(stored)
    # written before the header held the options: what the header said about them
    return RecordOptions(
        checkpoint_every=int(raw["checkpoint_every"]),
        output=raw.get("output_module"),
        grad_codec=str(codec_opts.get("grad_codec", "lossless")),
        compression_level=int(codec_opts.get("level", 1)),
    )


def _tensor_info(d: Any, where: str) -> TensorInfo:
    """One ``{"name", "shape", "dtype"}`` entry of the header, checked."""
    shape = d["shape"]
    if (
        not isinstance(d["name"], str)
        or not isinstance(shape, list)
        or not all(
            isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 1 << 40 for s in shape
        )
        or d["dtype"] not in codec.DTYPES
    ):
        raise TraceCorruptError(
            f"{where}: the header's tensor entry {d!r:.120} is malformed; the header is damaged."
        )
    return TensorInfo(d["name"], tuple(shape), d["dtype"])


def decode_header(raw: Any, where: str) -> TraceMeta:
    """The ``TraceMeta`` of a stored ``meta`` map; refuses newer schema versions."""
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise TraceCorruptError(f"{where}: the meta record is not an ExPLAIND trace header")
    version = raw.get("schema_version")
    if not isinstance(version, int):
        raise TraceCorruptError(f"{where}: the trace has no valid schema_version")
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{where} was written with trace schema version {version}, newer than the "
            f"version {SCHEMA_VERSION} this explaind reads. Upgrade explaind to read it."
        )
    checksum = raw.get("checksum")
    if checksum is not None and checksum not in codec.CHECKSUMS:
        raise TraceCorruptError(
            f"{where}: the header names checksum {checksum!r:.40}, which this explaind does "
            f"not know ({', '.join(codec.CHECKSUMS)}); the header is damaged or newer."
        )
    try:
        opt = raw["optimizer"]
        codec_opts = raw.get("codec", {})
        ddp = raw.get("ddp") or {}
        return TraceMeta(
            schema_version=version,
            library_version=str(raw.get("library_version", "")),
            torch_version=str(raw.get("torch_version", "")),
            created=str(raw.get("created", "")),
            model_class=str(raw.get("model_class", "")),
            params=tuple(_tensor_info(p, where) for p in raw["params"]),
            buffers=tuple(_tensor_info(b, where) for b in raw["buffers"]),
            optimizer=OptimizerInfo(
                class_name=opt["class"],
                rule=opt.get("rule", opt["class"]),
                groups=tuple(
                    GroupInfo(
                        tuple(g["params"]),
                        dict(g["hyperparams"]),
                        dict(g.get("tensor_hyperparams", {})),
                    )
                    for g in opt["groups"]
                ),
            ),
            output_module=raw.get("output_module"),
            checkpoint_every=int(raw["checkpoint_every"]),
            grad_codec=str(codec_opts.get("grad_codec", "lossless")),
            lossy=bool(codec_opts.get("lossy", False)),
            device=str(raw.get("device", "cpu")),
            raw=raw,
            rank=int(ddp.get("rank", 0)),
            world_size=int(ddp.get("world_size", 1)),
            cotangent_scale=float(ddp.get("cotangent_scale", 1.0)),
            options=_options(raw, codec_opts),
            checksum=checksum,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise TraceCorruptError(f"{where}: the meta record is malformed ({e!r})") from e
