"""Data attribution: per sample, per group, term rows, top proponents and opponents."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from explaind_attr import GroupingError, ViewError, data_attribution, resolve_groups, top_samples
from explaind_kernel.result import TERM_FIELDS


def _expected_groups(result, assign):
    """Brute-force group sums: {group name: [N, O]}."""
    out = {}
    for s, sid in enumerate(result.sample_ids):
        g = str(assign(sid))
        out[g] = out.get(g, 0.0) + result.data[..., s]
    return out


def test_per_sample_rows_and_terms_add_up_to_total_change(result, assert_close):
    view = data_attribution(result)
    assert view.axis == "sample"
    assert view.labels == tuple(result.sample_ids) + TERM_FIELDS
    assert view.kinds == ("sample",) * len(result.sample_ids) + ("term",) * len(TERM_FIELDS)
    assert_close(view.values.sum(-1), result.fT - result.f0)
    assert_close(view.residual, 0.0)
    assert view.max_residual() < 1e-10
    for k, name in enumerate(TERM_FIELDS):
        np.testing.assert_array_equal(
            view.values[..., len(result.sample_ids) + k], getattr(result, name)
        )


def test_frame_is_tidy_and_sums_per_row(result, assert_close):
    frame = data_attribution(result).to_frame()
    assert list(frame.columns) == ["test", "output", "sample", "kind", "value"]
    n, o, s = result.data.shape
    assert len(frame) == n * o * (s + len(TERM_FIELDS))
    sums = frame.groupby(["test", "output"], sort=False)["value"].sum().to_numpy()
    assert_close(sums.reshape(n, o), result.fT - result.f0)
    terms = frame[frame["kind"] == "term"]
    assert set(terms["sample"]) == set(TERM_FIELDS)
    assert frame.loc[frame["kind"] == "sample", "sample"].nunique() == s


@pytest.mark.parametrize("how", ["mapping", "callable", "series", "single", "own", "default"])
def test_groupings_add_up(result, labels, assert_close, how):
    ids = result.sample_ids
    if how == "mapping":
        groups, assign, kw = labels, labels.__getitem__, {}
    elif how == "callable":
        groups, assign, kw = (lambda sid: "odd" if int(sid[1:]) % 2 else "even"), None, {}
        assign = groups
    elif how == "series":
        groups = pd.Series({sid: f"src{i % 2}" for i, sid in enumerate(ids)})
        assign, kw = groups.__getitem__, {}
    elif how == "single":
        groups, assign, kw = (lambda sid: "all"), (lambda sid: "all"), {}
    elif how == "own":
        groups = {sid: sid for sid in ids}
        assign, kw = groups.__getitem__, {}
    else:  # only some samples listed, the rest in a default group
        groups = {sid: "first" for sid in ids[:4]}
        assign, kw = (lambda sid: groups.get(sid, "rest")), {"default_group": "rest"}
    view = data_attribution(result, groups=groups, **kw)
    assert view.axis == "group"
    assert_close(view.residual, 0.0)
    expected = _expected_groups(result, assign)
    group_labels = [lab for lab, k in zip(view.labels, view.kinds) if k == "group"]
    assert sorted(group_labels) == sorted(expected)
    for g, total in expected.items():
        assert_close(view.values[..., view.labels.index(g)], total)
    frame = view.to_frame()
    assert list(frame.columns) == ["test", "output", "group", "kind", "value"]


def test_group_names_sort_numerically(result, labels):
    grouping = resolve_groups(result.sample_ids, labels)
    assert grouping.names == ("0", "1", "2")
    assert grouping.sizes.tolist() == [4, 3, 3]


def test_uncovered_samples_raise_with_count_ids_and_fix(result):
    partial = {sid: 0 for sid in result.sample_ids[:7]}
    with pytest.raises(
        GroupingError, match=r"covers 7 of 10 .*3 missing: 's007', 's008', 's009'.*default_group="
    ):
        data_attribution(result, groups=partial)


def test_many_uncovered_samples_are_summarised(result):
    with pytest.raises(GroupingError, match=r"10 missing: 's000'.*and 5 more"):
        data_attribution(result, groups={})


def test_callable_returning_none_and_nan_in_series_count_as_missing(result):
    with pytest.raises(GroupingError, match="1 missing: 's003'"):
        data_attribution(result, groups=lambda sid: None if sid == "s003" else "a")
    series = pd.Series({sid: ("x" if sid != "s001" else np.nan) for sid in result.sample_ids})
    with pytest.raises(GroupingError, match="1 missing: 's001'"):
        data_attribution(result, groups=series)


def test_broken_groupings_are_reported(result):
    def broken(sid):
        raise KeyError(sid)

    with pytest.raises(GroupingError, match="callable raised KeyError for sample 's000'"):
        data_attribution(result, groups=broken)
    with pytest.raises(GroupingError, match="must be a mapping .* got int"):
        data_attribution(result, groups=3)
    dup = pd.Series(["a", "b"], index=["s000", "s000"])
    with pytest.raises(GroupingError, match="lists sample 's000' 2 times"):
        data_attribution(result, groups=dup)
    with pytest.raises(GroupingError, match="share a name"):
        data_attribution(result, groups=lambda sid: 1 if sid < "s005" else "1")


def test_top_samples_match_brute_force(result):
    k = 3
    table = top_samples(result, k)
    assert list(table.columns) == ["test", "output", "role", "rank", "sample", "value"]
    for i in range(result.num_inputs):
        for j, out in enumerate(result.output_names):
            row = result.data[i, j]
            pos = sorted((v, -s) for s, v in enumerate(row) if v > 0)[::-1][:k]
            neg = sorted((v, s) for s, v in enumerate(row) if v < 0)[:k]
            sel = table[(table.test == i) & (table.output == out)]
            prop = sel[sel.role == "proponent"].sort_values("rank")
            opp = sel[sel.role == "opponent"].sort_values("rank")
            assert prop["sample"].tolist() == [result.sample_ids[-s] for _, s in pos]
            assert opp["sample"].tolist() == [result.sample_ids[s] for _, s in neg]
            assert (prop["value"] > 0).all() and (opp["value"] < 0).all()
            assert prop["rank"].tolist() == list(range(1, len(pos) + 1))


def test_top_samples_ties_keep_sample_order(synth):
    r = synth(N=1, O=1, S=6)
    r.data[...] = np.array([1.0, 2.0, 2.0, -1.0, 2.0, -1.0])
    table = top_samples(r, 2)
    assert table[table.role == "proponent"]["sample"].tolist() == ["s001", "s002"]
    assert table[table.role == "opponent"]["sample"].tolist() == ["s003", "s005"]


def test_top_groups_and_bad_k(result, labels):
    table = top_samples(result, 1, groups=labels)
    assert "group" in table.columns and set(table["group"]) <= {"0", "1", "2"}
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ViewError, match="k must be a positive integer"):
            top_samples(result, bad)
