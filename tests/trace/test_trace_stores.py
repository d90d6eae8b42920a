"""Stores: the byte interface, the registry, LMDB growth, and refusing to clobber data."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

import explaind_trace as et
from explaind_trace import codec
from explaind_trace.errors import StoreError, TraceCorruptError, TraceExistsError
from explaind_trace.stores import LMDBStore, MemoryStore, open_store, registry
from tests.trace import trace_helpers as th


def _train(store, steps: int = 4, **kw):
    torch.manual_seed(0)
    model = th.MLP()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = th.data()
    thetas: list = []
    with et.record(model, opt, store=store, **kw):
        th.train(model, opt, None, x, y, steps=steps, thetas=thetas)
    return model, thetas


@pytest.fixture(params=["lmdb", "memory", "dir"])
def store_url(request, tmp_path) -> str:
    return {
        "lmdb": f"lmdb://{tmp_path / 's.lmdb'}",
        "memory": f"memory://{th.unique()}",
        "dir": f"dir://{tmp_path / 's'}",
    }[request.param]


def test_store_interface(store_url: str) -> None:
    w = et.open_store(store_url, readonly=False)
    w.put("b/2", b"two")
    w.put("a", b"one")
    w.put("b/1", b"")
    assert w.get("a") is None  # staged, not committed
    w.commit()
    w.put("c", b"three")  # never committed
    assert w.get("a") == b"one" and w.get("b/1") == b"" and w.get("zz") is None
    assert list(w.keys()) == ["a", "b/1", "b/2"] and list(w.keys("b/")) == ["b/1", "b/2"]
    w.close()
    r = et.open_store(store_url, readonly=True)
    assert list(r.keys()) == ["a", "b/1", "b/2"] and r.get("c") is None
    with pytest.raises(et.StoreError, match="read-only"):
        r.put("x", b"")
    r.close()


def test_directory_store_escapes_keys(tmp_path) -> None:
    s = et.open_store(f"dir://{tmp_path / 'd'}", readonly=False)
    keys = ["sample/ab:c d", "sample/..", "x/%2F", "sample/.hidden", "é/ü"]
    for k in keys:
        s.put(k, k.encode())
    s.commit()
    assert list(s.keys()) == sorted(keys)
    assert all(s.get(k) == k.encode() for k in keys)
    assert all(not p.name.startswith(".tmp") for p in (tmp_path / "d").rglob("*"))


def test_directory_store_ignores_an_interrupted_commit(tmp_path) -> None:
    url = f"dir://{tmp_path / 't'}"
    _train(url, steps=3)
    # a crash mid-commit of step 3: its files landed, the progress record did not
    s = et.open_store(url, readonly=True)
    raw = s.get("step/00000002")
    (tmp_path / "t" / "step" / "00000003").write_bytes(raw)
    with et.open_trace(url) as trace:
        assert trace.num_steps == 3 and len(list(trace.steps())) == 3


def test_plain_path_means_lmdb(tmp_path) -> None:
    path = tmp_path / "runs" / "a.lmdb"
    _train(path)
    assert (path / "data.mdb").is_file()
    with et.open_trace(str(path)) as trace:
        assert isinstance(trace.store, LMDBStore) and trace.num_steps == 4


def test_lmdb_map_grows(tmp_path) -> None:
    path = tmp_path / "small.lmdb"
    store = LMDBStore(path, map_size=1 << 20)
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    thetas = []
    with et.record(model, opt, store=store, checkpoint_every=2):
        for _ in range(12):
            thetas.append(th.snapshot(model))
            opt.zero_grad()
            model(torch.randn(16, 256)).pow(2).mean().backward()
            opt.step()
    with et.open_trace(path) as trace:
        assert trace.store.map_size > 1 << 20
        assert trace.num_steps == 12 and trace.check_drift().exact
        assert all(torch.equal(trace.params_at(5)[n], thetas[5][n]) for n in trace.param_names)


def test_unknown_scheme_lists_installed() -> None:
    with pytest.raises(et.StoreError, match=r"'nope'.*dir, lmdb, memory"):
        et.open_store("nope://x", readonly=True)


_KV: dict[str, dict[str, bytes]] = {}


@et.register_store("testkv")
class DictStore(et.Store):
    """A dict-backed store registered from test code."""

    def __init__(self, location: str, *, readonly: bool = False) -> None:
        self.readonly = readonly
        self.data = _KV.setdefault(location, {})
        self.staged: dict[str, bytes] = {}
        self.commits = 0

    def put(self, key: str, value: bytes) -> None:
        self._check_writable()
        self.staged[key] = value

    def get(self, key: str) -> bytes | None:
        return self.data.get(key)

    def keys(self, prefix: str = "") -> Iterator[str]:
        return iter(sorted(k for k in self.data if k.startswith(prefix)))

    def commit(self) -> None:
        self.data.update(self.staged)
        self.staged.clear()
        self.commits += 1

    def close(self) -> None:
        pass


def test_custom_store_end_to_end() -> None:
    _, thetas = _train("testkv://run1", steps=5, checkpoint_every=2)
    with et.open_trace("testkv://run1") as trace:
        assert trace.num_steps == 5 and trace.finished
        for rs in trace.replay():
            assert all(
                torch.equal(rs.next_params[n], thetas[rs.index + 1][n]) for n in trace.param_names
            )


def test_entry_point_stores_are_found(monkeypatch) -> None:
    class FakeEP:
        name, value = "fromplugin", "pkg:Store"

        def load(self):
            return DictStore

    monkeypatch.setattr(
        registry, "entry_points", lambda group: [FakeEP()] if group == "explaind.stores" else []
    )
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    monkeypatch.delitem(registry._SCHEMES, "fromplugin", raising=False)
    assert isinstance(et.open_store("fromplugin://x", readonly=False), DictStore)
    assert "fromplugin" in et.available_schemes()
    registry._SCHEMES.pop("fromplugin")


class FailingStore(DictStore):
    """Fails with OSError once ``fail_after`` commits have succeeded."""

    def __init__(self, location: str, *, fail_after: int) -> None:
        super().__init__(location)
        self.fail_after = fail_after

    def put(self, key: str, value: bytes) -> None:
        if self.commits >= self.fail_after:
            raise OSError(28, "No space left on device")
        super().put(key, value)


def test_writer_failure_surfaces_in_the_training_thread() -> None:
    name = th.unique("fail")
    store = FailingStore(name, fail_after=4)  # meta + steps 0, 1, 2
    with pytest.raises(et.TraceWriteError, match="No space left on device"):
        _train(store, steps=30)
    with et.open_trace(f"testkv://{name}") as trace:
        assert trace.num_steps == 3 and not trace.finished and trace.final() is None
        assert trace.check_drift().exact
        assert len(list(trace.replay())) == 3


@pytest.mark.parametrize("kind", ["lmdb", "dir"])
def test_existing_non_trace_paths_are_left_untouched(tmp_path, kind: str) -> None:
    f = tmp_path / "notes.txt"
    f.write_text("precious")
    d = tmp_path / "project"
    d.mkdir()
    (d / "main.py").write_text("print(1)")
    for target in (f, d):
        spec = str(target) if kind == "lmdb" else f"dir://{target}"
        with pytest.raises(et.NotATraceError, match="untouched"):
            _train(spec, steps=1)
        with pytest.raises(et.StoreError):
            et.open_trace(spec)
    assert f.read_text() == "precious" and sorted(p.name for p in d.iterdir()) == ["main.py"]


def test_existing_trace_is_never_overwritten(store_url: str) -> None:
    _train(store_url, steps=2)
    with pytest.raises(et.TraceExistsError, match="Choose a new path"):
        _train(store_url, steps=1)
    with et.open_trace(store_url) as trace:
        assert trace.num_steps == 2


def test_missing_trace_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(et.StoreError, match="does not exist"):
        et.open_trace(tmp_path / "nothing.lmdb")
    with pytest.raises(et.StoreError, match="no in-memory store"):
        et.open_trace(f"memory://{th.unique()}")


def test_newer_schema_is_refused() -> None:
    url = f"memory://{th.unique()}"
    _train(url, steps=1)
    s = MemoryStore(url.split("://")[1])
    meta = codec.unpack(s.get("meta"))
    s.put("meta", codec.pack({**meta, "schema_version": 99}))
    s.commit()
    with pytest.raises(et.SchemaVersionError, match="schema version 99.*Upgrade"):
        et.open_trace(url)


def test_check_model_names_what_differs() -> None:
    url = f"memory://{th.unique()}"
    _train(url, steps=1)
    with et.open_trace(url) as trace:
        trace.check_model(th.MLP())
        with pytest.raises(
            et.TraceMismatchError,
            match=r"'fc2.weight' has shape \(4, 16\), the trace has \(3, 16\)",
        ):
            trace.check_model(th.MLP(d_out=4))
        with pytest.raises(
            et.TraceMismatchError, match=r"'bn.running_mean' is in the trace but not"
        ):
            trace.check_model(th.MLP(bn=False))
        with pytest.raises(et.TraceMismatchError, match="dtype float64"):
            trace.check_model(th.MLP().double())


def test_lmdb_readers_share_one_environment_and_writers_are_exclusive(tmp_path) -> None:
    path = tmp_path / "shared.lmdb"
    _train(path, steps=2)
    a, b = et.open_trace(path), et.open_trace(path)
    a.close()
    assert b.step(1).index == 1  # still readable after the other reader closed
    with pytest.raises(et.StoreError, match="already open"):
        LMDBStore(path)
    b.close()
    model = th.MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with et.record(model, opt, store=tmp_path / "live.lmdb"):
        with pytest.raises(et.StoreError, match="Close the recorder"):
            et.open_trace(tmp_path / "live.lmdb")


def test_a_trace_this_process_records_is_refused_before_its_pages_are_read(
    tmp_path, monkeypatch
) -> None:
    """The recorder's writer may be mid-write: the in-process check comes before the file
    check, which could otherwise call the live file truncated (seen as a flaky failure)."""
    from explaind_trace.stores import lmdb_store

    def mid_write(path):
        raise TraceCorruptError(f"{path}/data.mdb is truncated (a write in progress)")

    model = th.MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with et.record(model, opt, store=tmp_path / "live.lmdb"):
        monkeypatch.setattr(lmdb_store, "check_lmdb_file", mid_write)
        with pytest.raises(et.StoreError, match="Close the recorder"):
            LMDBStore(tmp_path / "live.lmdb", readonly=True)
        with pytest.raises(et.StoreError, match="already open in this process"):
            LMDBStore(tmp_path / "live.lmdb")
        monkeypatch.undo()


@pytest.mark.parametrize("bad", [-1, 0, 1 << 60, 2.5, "64M", True])
def test_lmdb_map_size_is_validated_and_the_path_stays_usable(tmp_path, bad) -> None:
    path = tmp_path / "m.lmdb"
    with pytest.raises(StoreError, match=r"map_size=.* is not a valid LMDB map size"):
        LMDBStore(path, map_size=bad)
    with LMDBStore(path) as store:  # not left marked open in this process
        store.put("k", b"v")
        store.commit()


def test_lmdb_refuses_a_truncated_data_file_before_mapping_it(tmp_path) -> None:
    path = tmp_path / "t.lmdb"
    with LMDBStore(path) as store:
        for i in range(40):
            store.put(f"k{i}", bytes(3000))
        store.commit()
    size = (path / "data.mdb").stat().st_size
    os.truncate(path / "data.mdb", size // 2)
    with pytest.raises(TraceCorruptError, match=r"data.mdb is truncated: it has \d+ bytes"):
        LMDBStore(path, readonly=True)
    with pytest.raises(TraceCorruptError, match="truncated"):
        LMDBStore(path)  # nor is it reopened for writing


def test_second_writer_on_one_path_is_refused(tmp_path) -> None:
    from explaind_trace.stores.locking import WriterLock

    held = WriterLock(tmp_path)  # as another process's recorder would hold it
    try:
        for store in (f"dir://{tmp_path}", str(tmp_path)):
            with pytest.raises(TraceExistsError, match="another writer is recording into"):
                open_store(store, readonly=False)
    finally:
        held.release()
    with open_store(f"dir://{tmp_path / 'd'}", readonly=False) as store:
        store.put("a", b"1")
        store.commit()


def test_lmdb_page_errors_are_trace_corrupt_errors(tmp_path) -> None:
    import lmdb

    path = tmp_path / "p.lmdb"
    with LMDBStore(path) as store:
        store.put("step/00000001", b"x")
        store.commit()
    store = LMDBStore(path, readonly=True)
    env = store._env

    class Damaged:  # what LMDB raises when a branch page points at a wrong page
        def begin(self, **kw):
            raise lmdb.CorruptedError("mdb_cursor_get: MDB_CORRUPTED: Located page was wrong type")

    store._env = Damaged()
    try:
        with pytest.raises(TraceCorruptError, match=r"reading record 'step/00000001' failed"):
            store.get("step/00000001")
        with pytest.raises(TraceCorruptError, match="the LMDB file is damaged"):
            list(store.keys())
    finally:
        store._env = env
        store.close()
