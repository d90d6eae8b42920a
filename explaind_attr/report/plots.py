"""Report figures, drawn on `matplotlib.figure.Figure` with the Agg canvas directly.

Nothing here calls pyplot or `matplotlib.use`, so the caller's backend and global figure
state are untouched. Every function returns a Figure; `figure_png` turns one into bytes.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from explaind_kernel.result import KernelResult

__all__ = [
    "completeness_figure",
    "curve_figure",
    "figure_png",
    "heatmap_figure",
    "image_figure",
    "sample_images_figure",
    "steps_figure",
]


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_png(fig: Figure, *, dpi: int = 100) -> bytes:
    """The figure as PNG bytes (no metadata, so nothing points outside the file)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return buf.getvalue()


def completeness_figure(result: KernelResult) -> Figure:
    """Reconstructed outputs (f_0 + every term) against the actual f_T, one dot per row."""
    fig = _figure(4.8, 4.4)
    ax = fig.add_subplot()
    actual = result.fT.reshape(-1)
    recon = result.reconstructed.reshape(-1)
    ax.scatter(actual, recon, s=14, alpha=0.8, color="#1f77b4", label="(test, output) rows")
    if actual.size:
        lo = float(min(actual.min(), recon.min()))
        hi = float(max(actual.max(), recon.max()))
        pad = 0.05 * (hi - lo) if hi > lo else 1.0
        ax.plot(
            [lo - pad, hi + pad],
            [lo - pad, hi + pad],
            color="#555555",
            lw=1,
            ls="--",
            label="reconstructed = actual",
        )
    ax.set_xlabel("actual output f(x; θ_T)")
    ax.set_ylabel("reconstructed f_0 + Σ terms")
    ax.set_title(result.completeness_line(), fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    return fig


def steps_figure(
    steps: np.ndarray,
    cumulative: np.ndarray,
    terms: Sequence[str],
    *,
    ylabel: str = "cumulative contribution (mean over rows)",
) -> Figure:
    """Cumulative contribution of each term over training (aggregated over rows as `ylabel`
    says).

    steps: [T+1] step indices; cumulative: [T+1, F] per term, 0 at step 0.
    """
    fig = _figure(6.4, 3.8)
    ax = fig.add_subplot()
    for f, term in enumerate(terms):
        if np.any(cumulative[:, f] != 0):
            ax.plot(steps, cumulative[:, f], lw=1.2, label=term)
    ax.plot(steps, cumulative.sum(axis=1), color="black", lw=2, label="total change")
    ax.axhline(0.0, color="#999999", lw=0.8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title("Contributions over training", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    return fig


def heatmap_figure(
    matrix: np.ndarray,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    unit: str,
    signed: bool = True,
) -> Figure:
    """A heatmap with its colour bar labelled `unit`: diverging and centred at zero (red
    positive, blue negative) when `signed`, else sequential from zero (magnitudes)."""
    r, c = matrix.shape
    fig = _figure(min(2.5 + 0.45 * c, 14.0), min(1.8 + 0.3 * r, 14.0))
    ax = fig.add_subplot()
    scale = float(np.max(np.abs(matrix))) if matrix.size else 0.0
    scale = scale if scale > 0 else 1.0
    cmap, lo = ("RdBu_r", -scale) if signed else ("Reds", 0.0)
    im = ax.imshow(matrix, cmap=cmap, vmin=lo, vmax=scale, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(c), labels=list(col_labels), rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(r), labels=list(row_labels), fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    bar = fig.colorbar(im, ax=ax, shrink=0.8)
    bar.set_label(unit, fontsize=8)
    return fig


def curve_figure(
    steps: np.ndarray,
    curves: dict[str, np.ndarray],
    *,
    ylabel: str,
    title: str,
    spans: Sequence[tuple[float, float, str]] = (),
    size: tuple[float, float] = (6.4, 3.2),
) -> Figure:
    """Lines over steps (one per named curve), with shaded, labelled step spans."""
    fig = _figure(*size)
    ax = fig.add_subplot()
    colours = ("#fde0c5", "#d5e8d4", "#dae8fc", "#e1d5e7")
    for k, (a, b, label) in enumerate(spans):
        ax.axvspan(a, b, color=colours[k % len(colours)], alpha=0.7, lw=0)
        ax.text((a + b) / 2, 1.0, label, transform=ax.get_xaxis_transform(), ha="center",
                va="bottom", fontsize=7)  # fmt: skip
    for name, values in curves.items():
        ax.plot(steps, values, lw=1.4, label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=10, pad=14 if spans else 6)
    if len(curves) > 1:
        ax.legend(fontsize=7)
    return fig


def image_figure(img: np.ndarray, *, size: float = 1.6) -> Figure:
    """One (H, W) or (H, W, 3) image in [0, 1], without axes."""
    fig = _figure(size, size)
    ax = fig.add_subplot()
    ax.imshow(
        img, cmap="gray" if img.ndim == 2 else None, vmin=0.0, vmax=1.0, interpolation="nearest"
    )
    ax.set_axis_off()
    return fig


def sample_images_figure(images: Sequence[tuple[str, np.ndarray]], *, ncols: int = 5) -> Figure:
    """A grid of images (H, W) or (H, W, 3) in [0, 1], each titled with its caption."""
    n = max(len(images), 1)
    cols = min(ncols, n)
    rows = (n + cols - 1) // cols
    fig = _figure(1.9 * cols, 2.1 * rows)
    for i, (caption, img) in enumerate(images):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(
            img, cmap="gray" if img.ndim == 2 else None, vmin=0.0, vmax=1.0, interpolation="nearest"
        )
        ax.set_title(caption, fontsize=7)
        ax.set_axis_off()
    return fig
