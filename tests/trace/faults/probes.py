"""Fault probes, run in a child process by ``harness.run_probe`` (``python -m`` this module).

Each probe prints one JSON line per case. Memory is bounded with ``resource.setrlimit``
after the imports, so a decoder that believes a hostile size fails here instead of taking
the machine.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

import explaind_trace as et
from explaind_trace.errors import ExplaindError
from explaind_trace.info import describe, verify_trace
from explaind_trace.stores.lmdb_store import check_lmdb_file
from tests.trace import trace_helpers as th

from .harness import MEMORY_BUDGET

PROBES: dict[str, Callable[..., Iterator[dict[str, Any]]]] = {}


def probe(fn: Callable[..., Iterator[dict[str, Any]]]) -> Callable[..., Iterator[dict[str, Any]]]:
    PROBES[fn.__name__] = fn
    return fn


def make_trace(spec: str, *, steps: int = 7, width: int = 16) -> None:
    """A small trace holding every record kind: meta, progress, steps, checkpoints (every
    3 steps), samples, a skipped iteration and the final state."""
    torch.manual_seed(0)
    model = th.MLP(d_hidden=width)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = th.data()
    with et.record(model, opt, store=spec, checkpoint_every=3):
        nn.functional.cross_entropy(model(x[:8]), y[:8]).backward()
        opt.zero_grad()  # discarded gradients: a skip record
        th.train(model, opt, None, x, y, steps=steps)


def read_all(spec: str) -> dict[str, Any]:
    """Read everything back: every record (verify), then info with a full replay."""
    try:
        report = verify_trace(spec)
        if report.ok:
            describe(spec, check_drift=True)
    except ExplaindError as e:
        return {"outcome": "error", "cls": type(e).__name__, "msg": str(e)}
    return {
        "outcome": "ok",
        "damaged": report.damaged,
        "intact": report.intact_steps,
        "steps": report.steps,
    }


def guarded(case: Any, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``fn()``'s outcome; an escaping non-ExPLAIND exception becomes outcome ``raw``."""
    try:
        out = fn()
    except ExplaindError as e:
        out = {"outcome": "error", "cls": type(e).__name__, "msg": str(e)}
    except Exception as e:  # what the suite exists to catch
        out = {"outcome": "raw", "cls": type(e).__name__, "msg": traceback.format_exc()[-800:]}
    return {"case": case, **out}


@probe
def lmdb_truncation(tmp: str) -> Iterator[dict[str, Any]]:
    """data.mdb cut at every page boundary (and one byte short of each), lock.mdb gone too."""
    src = Path(tmp) / "src.lmdb"
    make_trace(str(src))
    psize = check_lmdb_file(src)
    size = (src / "data.mdb").stat().st_size
    yield {"case": "sizes", "outcome": "ok", "psize": psize, "size": size}
    cuts = sorted({k * psize for k in range(size // psize + 1)} | {size - 1, 1, 100})
    for i, n in enumerate(cuts):
        for keep_lock in (True, False) if i % 4 == 0 else (True,):
            dst = Path(tmp) / f"cut-{n}-{keep_lock}.lmdb"
            shutil.copytree(src, dst)
            os.truncate(dst / "data.mdb", n)
            if not keep_lock:
                (dst / "lock.mdb").unlink()
            yield guarded([n, keep_lock], lambda d=dst: read_all(str(d)))
            shutil.rmtree(dst)


@probe
def dir_truncation(tmp: str, per_record: int = 1, seed: int = 0) -> Iterator[dict[str, Any]]:
    """Every record file of a directory store cut at random offsets, one at a time."""
    src = Path(tmp) / "src"
    make_trace(f"dir://{src}")
    rng = random.Random(seed)
    files = sorted(p for p in src.rglob("*") if p.is_file() and not p.name.startswith("."))
    for f in files:
        rel = f.relative_to(src)
        n = f.stat().st_size
        for cut in sorted({0, *(rng.randrange(1, n) for _ in range(per_record))}):
            dst = Path(tmp) / "cut"
            shutil.copytree(src, dst)
            os.truncate(dst / rel, cut)
            yield guarded([str(rel), cut, n], lambda d=dst: read_all(f"dir://{d}"))
            shutil.rmtree(dst)


@probe
def full_disk(mount: str) -> Iterator[dict[str, Any]]:
    """Record into a small filesystem until it is full; read back; record into it full."""
    for scheme in ("lmdb", "dir"):
        spec = f"{scheme}://{mount}/{scheme}-a"

        def record_until_full(spec: str = spec) -> dict[str, Any]:
            torch.manual_seed(0)
            model = th.MLP(d_in=64, d_hidden=256)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            x, y = th.data(d_in=64)
            steps = 0
            try:
                with et.record(model, opt, store=spec, checkpoint_every=5) as rec:
                    for steps in range(10_000):  # noqa: B007 - the count is reported
                        th.train(model, opt, None, x, y, steps=1)
                        rec.flush()
            except et.TraceWriteError as e:
                return {"outcome": "error", "cls": type(e).__name__, "msg": str(e), "at": steps}
            return {"outcome": "ok", "at": steps}

        yield guarded([scheme, "record"], record_until_full)
        yield guarded([scheme, "read"], lambda spec=spec: read_all(spec))
        yield guarded([scheme, "info"], lambda spec=spec: {"outcome": "ok", **_info(spec)})
        if scheme == "lmdb":
            lock = Path(mount) / "lmdb-a" / "lock.mdb"
            lock.unlink()
            yield guarded([scheme, "read-no-lock"], lambda spec=spec: read_all(spec))
        yield guarded([scheme, "record-full"], lambda s=scheme: _record_once(f"{s}://{mount}/b"))
        for entry in Path(mount).iterdir():  # room again for the next backend
            shutil.rmtree(entry)


@probe
def special_files(tmp: str) -> Iterator[dict[str, Any]]:
    """A FIFO, a device and a directory in place of a directory store's records."""
    src = Path(tmp) / "src"
    make_trace(f"dir://{src}")
    for key in ("step/00000002", "sample", "ckpt/00000003", "progress", "meta"):
        for kind in ("fifo", "device", "dir"):
            dst = Path(tmp) / "special"
            shutil.copytree(src, dst)
            target = dst / key
            if target.is_dir():
                target = next(p for p in sorted(target.iterdir()))
            shutil.rmtree(target) if target.is_dir() else target.unlink()
            if kind == "fifo":
                os.mkfifo(target)
            elif kind == "device":
                os.symlink("/dev/zero", target)
            else:
                target.mkdir()
            rel = str(target.relative_to(dst))
            yield guarded([rel, kind], lambda d=dst: read_all(f"dir://{d}"))
            shutil.rmtree(dst)


KINDS = ("meta", "progress", "step/", "ckpt/", "final", "sample/", "skip/")


@probe
def byte_flips(tmp: str, per_kind: int = 4, seed: int = 0) -> Iterator[dict[str, Any]]:
    """Random bit flips inside the stored values of every record kind, on disk: in an LMDB
    data file (each value found by its bytes) and in a directory store's files."""
    rng = random.Random(seed)
    for scheme in ("lmdb", "dir"):
        src = Path(tmp) / f"src-{scheme}"
        make_trace(f"{scheme}://{src}")
        store = et.open_store(f"{scheme}://{src}", readonly=True)
        values = {k: store.get(k) for k in store.keys()}
        store.close()
        data = (src / "data.mdb").read_bytes() if scheme == "lmdb" else b""
        for kind in KINDS:
            keys = [k for k in values if k == kind or (kind.endswith("/") and k.startswith(kind))]
            for _ in range(per_kind):
                key = rng.choice(keys)
                value = values[key]
                pos, bit = rng.randrange(len(value)), rng.randrange(8)
                dst = Path(tmp) / "flip"
                shutil.copytree(src, dst)
                if scheme == "lmdb":  # every copy (LMDB keeps old pages until reused)
                    target, offsets = dst / "data.mdb", _occurrences(data, value, pos)
                    assert offsets, key
                else:
                    target, offsets = dst / key, [pos]
                raw = bytearray(target.read_bytes())
                for offset in offsets:
                    raw[offset] ^= 1 << bit
                target.write_bytes(bytes(raw))
                yield guarded(
                    [scheme, kind, key, pos, bit], lambda u=f"{scheme}://{dst}": read_all(u)
                )
                shutil.rmtree(dst)


@probe
def lmdb_node_sizes(tmp: str) -> Iterator[dict[str, Any]]:
    """The size fields LMDB trusts, damaged on disk: a value's size in its leaf node (a
    checkpoint larger than a page, so stored in overflow pages, and small inline values)
    and the page count in the header of the checkpoint's first overflow page."""
    from .lmdb_nodes import leaf_nodes, overflow_pages, set_overflow_pages, set_size

    src = Path(tmp) / "src.lmdb"
    make_trace(str(src), width=64)  # checkpoints of ~11 KB: 3 overflow pages each
    psize = check_lmdb_file(src)
    data = (src / "data.mdb").read_bytes()
    pages_in_file = len(data) // psize
    nodes = leaf_nodes(data, psize)
    big = nodes["ckpt/00000003"]
    assert big.overflow is not None and big.size > psize, big
    need = overflow_pages(data, big, psize)
    sample = next(n for k, n in nodes.items() if k.startswith("sample/"))
    yield {"case": "layout", "outcome": "ok", "psize": psize, "pages": pages_in_file,
           "size": big.size, "overflow": big.overflow, "need": need}  # fmt: skip
    past_end = (pages_in_file - big.overflow) * psize  # 16 + this runs past the file
    edits: list[tuple[str, str, int, Callable[[bytearray], None]]] = [
        (big.key, "size", v, lambda raw, v=v: set_size(raw, big, v))
        for v in (0xFFFFFFFF, 1 << 24, past_end, big.size + 1, big.size - 1, 0)
    ]
    edits += [
        (big.key, "pages", v, lambda raw, v=v: set_overflow_pages(raw, big, psize, v))
        for v in (0, need - 1, need + 1, pages_in_file - big.overflow + 1, 0xFFFFFFFF)
    ]
    edits += [
        (n.key, "size", v, lambda raw, n=n, v=v: set_size(raw, n, v))
        for n in (sample, nodes["progress"])
        for v in (0xFFFFFFFF, psize, n.size + 1)
    ]
    for key, field, value, edit in edits:
        dst = Path(tmp) / "node.lmdb"
        shutil.copytree(src, dst)
        raw = bytearray(data)
        edit(raw)
        (dst / "data.mdb").write_bytes(bytes(raw))
        yield guarded([key, field, value], lambda d=dst: read_all(str(d)))
        shutil.rmtree(dst)


class _Touch:
    """Unpickling this creates ``path``: proof that a record ran code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def _paths(node: Any, prefix: tuple = (), depth: int = 0) -> Iterator[tuple]:
    """Every path (map keys, list indices) into a decoded record, to replace one field."""
    yield prefix
    if depth > 8:
        return
    items = (
        node.items()
        if isinstance(node, dict)
        else enumerate(node)
        if isinstance(node, list)
        else ()
    )
    for k, v in items:
        yield from _paths(v, (*prefix, k), depth + 1)


def _replace(node: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    node[path[0]] = _replace(node[path[0]], path[1:], value)
    return node


@probe
def hostile_records(tmp: str, examples: int = 120, seed: int = 0) -> Iterator[dict[str, Any]]:
    """Hypothesis replaces one field of a real record (any kind) by a hostile value --
    shapes, dtypes, sizes, nesting, ext types, pickle blobs -- sealed with a valid checksum
    (the decoder's own bounds must hold) or raw; every read ends in the project's errors."""
    import pickle

    import msgpack
    import zstandard
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hypothesis_seed
    from hypothesis import strategies as st

    from explaind_trace import codec
    from explaind_trace.stores import MemoryStore

    src = "memory://hostile-src"
    make_trace(src)
    base = {k: MemoryStore("hostile-src").get(k) for k in MemoryStore("hostile-src").keys()}
    decoded = {k: codec.unpack(v) for k, v in base.items()}
    marker = Path(tmp) / "code-ran"
    blob = pickle.dumps(_Touch(str(marker)))
    squeeze = zstandard.ZstdCompressor(level=3).compressobj(size=1 << 30)
    zeros = bytes(1 << 20)
    bomb = b"".join([*(squeeze.compress(zeros) for _ in range(1024)), squeeze.flush()])
    leaf = (
        st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
        | st.text(max_size=8) | st.binary(max_size=32)
        | st.just(blob) | st.just(bomb)
        | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8))
        | st.builds(msgpack.Timestamp, st.integers(0, 2**32 - 1))
    )  # fmt: skip
    tensor = st.fixed_dictionaries(
        {
            "dtype": st.sampled_from([*codec.DTYPES, "object", "complex64", 7]),
            "shape": st.lists(st.integers(-2, 1 << 41), max_size=5) | leaf,
            "codec": st.sampled_from([*codec.CODECS, "pickle"]),
            "data": st.sampled_from([blob, bomb, b"", b"\x00" * 24]) | leaf,
        }
    )
    deep = st.integers(40, 700).map(lambda n: _nest(n))
    value = st.recursive(
        leaf | tensor | deep,
        lambda c: (
            st.lists(c, max_size=4)
            | st.dictionaries(st.text(max_size=6) | st.integers(), c, max_size=4)
        ),
        max_leaves=12,
    )
    counts = {"examples": 0, "errors": 0}
    raw_escapes: list[str] = []

    @hypothesis_seed(seed)
    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(data=st.data())
    def run(data) -> None:
        key = data.draw(st.sampled_from(sorted(decoded)))
        path = data.draw(st.sampled_from(list(_paths(decoded[key]))))
        hostile = _replace(_copy(decoded[key]), path, data.draw(value))
        sealed = data.draw(st.booleans())
        try:
            raw = codec.pack(hostile, checksum=sealed)
        except (TypeError, ValueError, OverflowError):
            return  # not encodable as msgpack: cannot be stored
        if data.draw(st.integers(0, 9)) == 0:
            raw = blob  # a bare pickle as the whole record
        name = f"hostile-{counts['examples']}"
        store = MemoryStore(name)
        for k, v in base.items():
            store.put(k, raw if k == key else v)
        store.commit()
        counts["examples"] += 1
        out = guarded(None, lambda: read_all(f"memory://{name}"))
        MemoryStore.drop(name)
        if out["outcome"] == "raw":
            raw_escapes.append(f"{key} {path}: {out['msg'][-300:]}")
        counts["errors"] += out["outcome"] == "error" or bool(out.get("damaged"))

    run()
    yield {"case": "hostile", "outcome": "raw" if raw_escapes else "ok", "msg": sorted(set(raw_escapes))[:6],
           "ran_code": marker.exists(), **counts}  # fmt: skip


def _nest(n: int) -> Any:
    out: Any = 0
    for _ in range(n):
        out = [out]
    return out


def _copy(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _copy(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_copy(v) for v in node]
    return node


def _occurrences(data: bytes, value: bytes, pos: int) -> list[int]:
    out, at = [], data.find(value)
    while at >= 0:
        out.append(at + pos)
        at = data.find(value, at + 1)
    return out


def _info(spec: str) -> dict[str, Any]:
    d = describe(spec, check_drift=False)
    return {"error": d["error"], "steps": d["steps"]}


def _record_once(spec: str) -> dict[str, Any]:
    model = th.MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = th.data()
    with et.record(model, opt, store=spec):
        th.train(model, opt, None, x, y, steps=2)
    return {"outcome": "ok"}


def _limit_memory(budget: int) -> None:
    with open("/proc/self/statm") as fh:
        vsize = int(fh.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (vsize + budget, vsize + budget))


def main() -> None:
    name, kwargs = sys.argv[1], json.loads(sys.argv[2])
    _limit_memory(MEMORY_BUDGET)
    with tempfile.TemporaryDirectory() as tmp:
        kwargs.setdefault("tmp", tmp) if "tmp" in PROBES[name].__code__.co_varnames else None
        for line in PROBES[name](**kwargs):
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
