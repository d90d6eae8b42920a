"""`explaind demo` in its quick configuration: trace, exact kernel, report."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from explaind_attr.app.demo import DemoConfig, DemoSummary, run_demo
from explaind_attr.errors import UsageError

from .conftest import FP32_REL, parse_completeness


def test_quick_demo_writes_an_exact_report(tmp_path) -> None:
    summary = run_demo(tmp_path / "demo", quick=True, progress=False)
    assert isinstance(summary, DemoSummary)
    assert summary.report.is_file() and summary.report.name == "report.html"
    html = summary.report.read_text(encoding="utf-8")
    assert summary.completeness_line in html  # the report opens with it
    max_abs, rel = parse_completeness(summary.completeness_line)
    assert rel <= FP32_REL
    assert max_abs == pytest.approx(summary.completeness_max_abs, rel=1e-3)
    assert summary.trace.is_dir() and summary.result.is_file() and summary.figure.is_file()
    assert summary.steps == DemoConfig.quick().steps
    assert set(summary.seconds) == {"record", "kernel", "report", "total"}
    assert "tokens:" in (summary.report.parent / "report.md").read_text(encoding="utf-8")
    # the story: cards, the training curves with their phases, and what drove each phase
    assert "One prediction at a time" in html and 'alt="training curves"' in html
    assert "What drove each phase" in html and "margin" in html
    assert "recompute with keep" not in html  # the demo keeps what its report shows
    marker = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert marker["completeness_line"] == summary.completeness_line


def test_demo_never_replaces_a_trace_it_did_not_write(tmp_path) -> None:
    (tmp_path / "trace.lmdb").mkdir()
    with pytest.raises(UsageError, match="was not written by the demo"):
        run_demo(tmp_path, quick=True, progress=False)


def test_demo_config_names_the_bad_field() -> None:
    with pytest.raises(UsageError, match="DemoConfig.steps must be a positive integer"):
        DemoConfig(steps=0)
    with pytest.raises(UsageError, match="train_fraction"):
        DemoConfig(train_fraction=1.5)


# ---------------------------------------------------------------- the story and the browser

_BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")

#: Injected into a copy of the report (the report itself runs no script): after load, write
#: how many images there are and how many decoded to a non-empty picture.
_CHECK = """<script>
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0 && i.naturalHeight > 0);
  const text = document.body.innerText.trim().length;
  const out = document.createElement('pre');
  out.id = 'explaind-check';
  out.textContent = `images=${imgs.length} loaded=${ok.length} text=${text}`;
  document.body.appendChild(out);
});
</script>"""


def _browser() -> str:
    for name in _BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip(
        "no Chromium here to render the report; install it with "
        "`apt-get update && apt-get install -y chromium` (.ci/run does when it is missing)"
    )


def _chromium(browser: str, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    return subprocess.run(
        [browser, *flags, *args], capture_output=True, text=True, timeout=120, check=False
    )


def rendered(browser: str, report) -> tuple[int, int, int]:
    """(images, images that loaded, characters of text) of `report` in headless Chromium."""
    html = report.read_text(encoding="utf-8")
    checked = report.with_name("checked.html")
    checked.write_text(html.replace("</body>", _CHECK + "</body>"), encoding="utf-8")
    proc = _chromium(browser, "--virtual-time-budget=10000", "--dump-dom", checked.as_uri())
    found = re.search(r"images=(\d+) loaded=(\d+) text=(\d+)", proc.stdout)
    assert found, proc.stderr[-2000:]
    images, loaded, text = (int(g) for g in found.groups())
    return images, loaded, text


def test_demo_report_renders_in_a_real_browser(tmp_path) -> None:
    browser = _browser()
    summary = run_demo(tmp_path / "demo", quick=True, progress=False)
    html = summary.report.read_text(encoding="utf-8")
    images, loaded, text = rendered(browser, summary.report)
    assert images == html.count("<img") and images >= 5
    assert loaded == images, f"{images - loaded} of {images} images did not load"
    assert text > 1000  # the page has its text
    shot = tmp_path / "report.png"
    proc = _chromium(
        browser, f"--screenshot={shot}", "--window-size=1100,2400", summary.report.as_uri()
    )
    assert shot.is_file(), proc.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as img:
        pixels = np.asarray(img.convert("L"), dtype=np.float64)
    assert pixels.std() > 5.0  # not a blank page: text, tables and plots
    keep = tmp_path.parent / "explaind-demo-screenshot.png"  # for a person to look at
    shutil.copy(shot, keep)


def test_demo_phases_follow_the_accuracy_curves() -> None:
    from explaind_attr.app.demo.run import demo_phases

    history = [(0, 0.0, 0.0), (10, 0.6, 0.1), (20, 1.0, 0.3), (30, 1.0, 0.32), (40, 1.0, 0.9)]
    assert demo_phases(history, 40) == [
        ("memorisation", 0, 20),
        ("plateau", 20, 30),
        ("generalisation", 30, 40),
    ]
    assert demo_phases([(0, 0.0, 0.0), (10, 0.5, 0.2)], 10) == [("training", 0, 10)]
    assert demo_phases([(0, 0.0, 0.0), (10, 1.0, 0.2), (20, 1.0, 0.22)], 20) == [
        ("memorisation", 0, 10),
        ("after", 10, 20),
    ]
