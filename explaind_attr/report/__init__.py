"""Reports: self-contained HTML, markdown, CSVs and PNG plots of a kernel result."""

from __future__ import annotations

from .build import ReportPaths, build_report
from .samples import samples_from_trace

__all__ = ["ReportPaths", "build_report", "samples_from_trace"]
