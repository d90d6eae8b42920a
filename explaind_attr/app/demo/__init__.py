"""The two-minute demo behind ``explaind demo``, and the modular-addition model it trains.

from explaind_attr.app.demo import run_demo
summary = run_demo("explaind-demo")   # trace, kernel, report; see DemoSummary
"""

from __future__ import annotations

from .model import ModularAdditionTransformer, component_groups, head_slices, make_dataset
from .run import DemoConfig, DemoSummary, run_demo

__all__ = [
    "DemoConfig",
    "DemoSummary",
    "ModularAdditionTransformer",
    "component_groups",
    "head_slices",
    "make_dataset",
    "run_demo",
]
