"""Optimizer rules registry (see base.py); importing this package registers the built-ins."""

from . import adam, sgd  # noqa: F401  (registration side effect)
from .base import (
    OptimizerRule,
    ParamStep,
    RuleOutput,
    register_rule,
    registered_rules,
    rule_for,
    rule_for_trace,
)

__all__ = [
    "OptimizerRule",
    "ParamStep",
    "RuleOutput",
    "register_rule",
    "registered_rules",
    "rule_for",
    "rule_for_trace",
]
