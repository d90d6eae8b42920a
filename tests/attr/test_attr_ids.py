"""The user's own sample ids are first-class: int ids stay ints (and str ids strings) through
recording, the kernel result and its file, every view, the CSVs and the report; the stored
rows are found by them."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import explaind_trace
from explaind_attr import build_report, data_attribution, samples_from_trace, top_samples
from explaind_attr.joint import group_component_view
from explaind_kernel import InputError, KeepOptions, KernelResult, compute_kernel


def _record(store: str, ids_of, *, steps: int = 6, skip_ids_at: int | None = None):
    """A tiny run whose batch rows get ids_of(dataset indices); returns (data x, model)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 3, generator=g), torch.randint(0, 3, (12,), generator=g)
    with explaind_trace.record(model, opt, store=store) as rec:
        for t in range(steps):
            idx = torch.randperm(12, generator=g)[:4]
            if t != skip_ids_at:
                rec.set_sample_ids(ids_of(idx))
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return x, model


def _fresh():
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))


CASES = {
    "int": (lambda idx: idx, lambda i: int(i), int),  # a tensor of dataset indices
    "str": (lambda idx: [f"row-{i}" for i in idx.tolist()], lambda i: f"row-{i}", str),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_ids_keep_their_type_end_to_end(kind, tmp_path) -> None:
    ids_of, one, typ = CASES[kind]
    store = f"memory://ids-{kind}"
    x, _ = _record(store, ids_of)
    with explaind_trace.open_trace(store) as reader:
        fwd_ids = [i for t in range(reader.num_steps) for i in reader.step(t).forwards[0].ids]
        assert all(type(i) is typ for i in fwd_ids)
        res = compute_kernel(
            reader, _fresh(), torch.randn(2, 3), outputs="predicted", progress=False,
            keep=KeepOptions(sample_component=True),
        )  # fmt: skip
        rows = samples_from_trace(reader, res.sample_ids)
    assert all(type(i) is typ for i in res.sample_ids) and set(res.sample_ids) == set(fwd_ids)
    # the stored rows come back under the user's ids
    for sid, row in rows.items():
        index = sid if typ is int else int(sid.split("-")[1])
        assert torch.equal(row, x[index])
    # the result file
    loaded = KernelResult.load(res.save(tmp_path / "r.explaind"))
    assert loaded.sample_ids == res.sample_ids
    assert all(type(i) is typ for i in loaded.sample_ids)
    # views: labels, frames, groups keyed by the ids themselves
    view = data_attribution(loaded)
    assert view.labels[: len(loaded.sample_ids)] == tuple(loaded.sample_ids)
    frame = view.of_kind("sample").to_frame()
    assert all(type(v) is typ or isinstance(v, np.integer) for v in frame["sample"])
    first = loaded.sample_ids[0]
    grouped = data_attribution(loaded, groups={first: "a"}, default_group="rest")
    a = grouped.labels.index("a")
    np.testing.assert_allclose(grouped.values[..., a], loaded.data[..., 0], rtol=0, atol=0)
    top = top_samples(loaded, 3)
    assert set(top["sample"]) <= set(loaded.sample_ids)
    gc = group_component_view(loaded)
    assert gc.row_labels == tuple(loaded.sample_ids)
    # CSVs and the report
    paths = build_report(loaded, tmp_path / "rep", samples=rows)
    back = pd.read_csv(paths.csvs["data_samples"])
    if typ is int:
        assert back["sample"].dtype.kind == "i"
    assert set(back["sample"]) == set(loaded.sample_ids)
    back = pd.read_csv(paths.csvs["top_samples"])
    assert set(back["sample"]) <= set(loaded.sample_ids)
    html = paths.html.read_text(encoding="utf-8")
    assert all(f">{sid}</td>" in html for sid in top["sample"])  # the ids as table cells


def test_mixed_id_types_are_refused() -> None:
    store = "memory://ids-mixed"
    _record(store, lambda idx: idx, skip_ids_at=3)  # step 3: default content ids
    with pytest.raises(InputError, match="mixes sample ids of types int and str"):
        compute_kernel(store, _fresh(), torch.randn(2, 3), progress=False)


def test_the_readme_quickstart_pattern(tmp_path) -> None:
    """A dataset that yields its index, set_sample_ids per batch, an (x, y) test tuple with
    outputs="margin", explain and the report — as the README quickstart shows it."""
    import explaind_attr

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(16, 3, generator=g), torch.randint(0, 3, (16,), generator=g)
    data = torch.utils.data.TensorDataset(x, y, torch.arange(16))
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True, generator=g)
    store = str(tmp_path / "a.lmdb")
    with explaind_trace.record(model, optimizer, store=store) as rec:
        for xb, yb, idx in loader:
            rec.set_sample_ids(idx)
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            optimizer.step()
    test_x, test_y = torch.randn(3, 3, generator=g), torch.tensor([0, 2, 1])
    result = compute_kernel(store, _fresh(), (test_x, test_y), outputs="margin", progress=False)
    max_abs, rel = result.completeness()
    assert rel <= 1e-5
    props = explaind_attr.explain(result, 0).proponents
    assert len(props) and all(type(s) is int for s in props["sample"])
    paths = explaind_attr.build_report(result, tmp_path / "report", inputs=test_x)
    assert "test input 0, label 0, predicted" in paths.html.read_text(encoding="utf-8")
