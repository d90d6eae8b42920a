"""Reports: self-contained HTML, markdown, CSVs and valid PNGs; completeness first."""

from __future__ import annotations

import re

import matplotlib
import matplotlib.image
import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from explaind_attr import ReportError, ViewError, build_report
from explaind_attr.report.samples import image_of, sample_array, text_of
from explaind_kernel.result import KeepOptions

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _samples(result):
    """Image rows (1×8×8 tensors, 3×6×6 arrays, 7×7), token rows and value rows."""
    rng = np.random.default_rng(0)
    out = {}
    for i, sid in enumerate(result.sample_ids):
        kind = i % 5
        if kind == 0:
            out[sid] = torch.rand(1, 8, 8)
        elif kind == 1:
            out[sid] = rng.random((3, 6, 6)).astype(np.float32)
        elif kind == 2:
            out[sid] = rng.random((7, 7))
        elif kind == 3:
            out[sid] = torch.randint(0, 100, (12,))
        else:
            out[sid] = rng.normal(size=5)
    return out


def _check_html(html: str) -> None:
    for bad in ("http://", "https://", 'src="//', "src='//", "@import", "<script", "<link"):
        assert bad not in html, bad
    srcs = re.findall(r"<img[^>]*\ssrc=\"([^\"]*)\"", html)
    assert srcs and len(srcs) == html.count("<img")
    assert all(s.startswith("data:image/png;base64,") for s in srcs)


def _check_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert matplotlib.image.imread(path).ndim == 3
    with PILImage.open(path) as img:
        img.verify()


def test_report_renders_with_image_and_token_samples(synth, tmp_path, labels):
    backend = matplotlib.get_backend()
    r = synth(S=10)
    paths = build_report(
        r, tmp_path / "rep", samples=_samples(r), title="Tiny run", top_k=10, groups=labels
    )
    assert matplotlib.get_backend() == backend
    html = paths.html.read_text(encoding="utf-8")
    _check_html(html)
    # the completeness line is the first thing after the title, a summary, the term table
    after_title = html.split("</h1>", 1)[1].lstrip()
    assert after_title.startswith('<p class="completeness">' + r.completeness_line() + "</p>")
    summary = after_title.split("</p>", 1)[1].lstrip()
    assert summary.startswith('<p class="text">Explained: the outputs (class0, class1, class2)')
    assert summary.split("</p>", 1)[1].lstrip().startswith("<table>")
    first_img = re.search(r"<img[^>]*alt=\"([^\"]*)\"", html).group(1)
    assert first_img == "reconstructed vs actual outputs"
    cards = {f"card{i}_{k}" for i in range(2) for k in ("curve", "samples")}
    assert set(paths.plots) == {
        "completeness",
        "steps",
        "component_window",
        "group_component",
        "top_samples",
        *cards,
    }
    # outputs of several classes: aggregates are mean |·| and say so
    assert "mean |·| over the 2×3 (input, output) rows" in html
    assert "mean over rows" not in html
    assert html.count("<img") == len(paths.plots)
    for png in paths.plots.values():
        _check_png(png)
    md = paths.markdown.read_text(encoding="utf-8").splitlines()
    assert md[0] == "# Tiny run"
    assert next(line for line in md[1:] if line.strip()) == r.completeness_line()
    assert "![reconstructed vs actual outputs](completeness.png)" in md
    for name in (
        "terms",
        "data_samples",
        "data_groups",
        "top_samples",
        "components",
        "modules",
        "slices",
        "steps",
        "curve",
        "phases",
        "component_window",
        "group_component",
        "group_window",
        "param_scores",
    ):
        assert paths.csvs[name].exists() and paths.csvs[name].stat().st_size > 0, name
    assert "tokens: " in html and "values: " in html and "(image, see figure)" in html


@pytest.mark.parametrize(
    "keep",
    [
        KeepOptions(component_window=False),
        KeepOptions(),
        KeepOptions(sample_component=True, component_window=False),
        KeepOptions(sample_component=True, sample_window=True, param_scores=True),
    ],
    ids=["none", "component_window", "sample_component", "all"],
)
def test_report_sections_exactly_when_the_result_holds_them(synth, tmp_path, keep):
    r = synth(keep=keep)
    paths = build_report(r, tmp_path, cards=0)
    html = paths.html.read_text(encoding="utf-8")
    _check_html(html)
    expected = {"completeness", "steps"}
    expected |= {"component_window"} if keep.component_window else set()
    expected |= {"group_component"} if keep.sample_component else set()
    assert set(paths.plots) == expected
    assert ("component_window" in paths.csvs) == keep.component_window
    assert ("param_scores" in paths.csvs) == keep.param_scores
    assert ("group_window" in paths.csvs) == keep.sample_window
    assert "KeepOptions" not in html and "recompute" not in html  # no placeholders


def test_comparable_targets_are_aggregated_signed_and_colour_bars_have_units(synth, tmp_path):
    r = synth(N=3, O=1)
    r.output_names = ["margin"]
    r.extra.update(target="margin", labels=np.array([0, 1, 0]), predicted=np.array([0, 1, 1]))
    paths = build_report(r, tmp_path, cards=2, inputs=torch.randint(0, 9, (3, 4)))
    html = paths.html.read_text(encoding="utf-8")
    assert "contribution to margin, mean over the 3 test inputs" in html
    assert "test input 0, label 0, predicted 0: margin went from" in html
    assert "input: tokens:" in html
    # every heatmap's colour bar is labelled with its unit (checked on the figure itself)
    from explaind_attr.report import plots

    fig = plots.heatmap_figure(
        np.ones((2, 2)), ["a", "b"], ["c", "d"], title="t", xlabel="x", ylabel="y",
        unit="contribution to margin",
    )  # fmt: skip
    bar = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"][0]
    assert bar.get_ylabel() == "contribution to margin"


def test_report_caps_large_views(synth, tmp_path):
    r = synth(N=1, O=1, S=50, C=40, T=6, W=2)
    paths = build_report(r, tmp_path, top_k=5)
    html = paths.html.read_text(encoding="utf-8")
    assert "weaker tensors not shown" in html
    for png in paths.plots.values():
        _check_png(png)


def test_report_errors(result, tmp_path):
    with pytest.raises(ViewError, match="top_k must be a positive integer"):
        build_report(result, tmp_path, top_k=0)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ReportError, match="cannot create the report directory"):
        build_report(result, blocker / "sub")


def test_sample_rendering_rules():
    assert image_of(np.zeros((1, 4, 4))).shape == (4, 4)
    assert image_of(np.zeros((3, 4, 5))).shape == (4, 5, 3)
    assert image_of(np.zeros((1, 1, 4, 4))).shape == (4, 4)
    assert image_of(np.arange(12.0).reshape(3, 4)).max() == 1.0
    assert image_of(np.zeros(10)) is None
    assert image_of(np.zeros((2, 4, 4))) is None
    assert sample_array((torch.ones(2), torch.zeros(3))).shape == (2,)
    assert sample_array("text") is None
    assert text_of(torch.arange(30)).endswith(" …")
    assert text_of(np.array([0.5, 1.25])) == "values: 0.5 1.25"
    assert text_of(np.array([[1, 2], [3, 4]])) == "shape (2, 2): tokens: 1 2 3 4"
    assert text_of("hello") == "'hello'"
