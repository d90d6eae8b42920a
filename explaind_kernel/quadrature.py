"""Quadrature rules on [0, 1] for the path integral J̄_t = ∫₀¹ ∂f/∂θ(θ_t + s·Δθ_t) ds.

A rule is a name plus a node count; `get_rule("gauss:2")` returns (nodes, weights) as float64
numpy arrays. New rules register with `@register_quadrature("name")`. The engine never
branches on the rule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .errors import InputError

RuleFn = Callable[[int], tuple[np.ndarray, np.ndarray]]
_RULES: dict[str, RuleFn] = {}


def register_quadrature(name: str) -> Callable[[RuleFn], RuleFn]:
    """Register `fn(n) -> (nodes, weights)` on [0, 1] under `name`."""

    def deco(fn: RuleFn) -> RuleFn:
        _RULES[name] = fn
        return fn

    return deco


@register_quadrature("gauss")
def gauss_legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss–Legendre: exact for polynomials of degree 2n−1."""
    x, w = np.polynomial.legendre.leggauss(n)
    return (x + 1.0) / 2.0, w / 2.0


@register_quadrature("midpoint")
def midpoint(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Composite midpoint rule (what upstream uses, with n = 100)."""
    return (np.arange(n) + 0.5) / n, np.full(n, 1.0 / n)


@dataclass(frozen=True)
class Quadrature:
    """A named rule with a node count, e.g. Quadrature("gauss", 2)."""

    rule: str = "gauss"
    nodes: int = 2

    def __post_init__(self) -> None:
        if self.rule not in _RULES:
            raise InputError(
                f"unknown quadrature rule {self.rule!r}; registered rules: {sorted(_RULES)}. "
                "Register one with explaind_kernel.register_quadrature."
            )
        if not isinstance(self.nodes, int) or self.nodes < 1:
            raise InputError(f"quadrature nodes must be a positive integer, got {self.nodes!r}")

    @classmethod
    def parse(cls, spec: str | Quadrature) -> Quadrature:
        """Parse "gauss:2", "midpoint:100" or "gauss" (2 nodes)."""
        if isinstance(spec, Quadrature):
            return spec
        name, _, count = str(spec).partition(":")
        try:
            nodes = int(count) if count else 2
        except ValueError as e:
            raise InputError(
                f"cannot parse quadrature {spec!r}: expected RULE:NODES such as 'gauss:2'"
            ) from e
        return cls(name, nodes)

    def with_nodes(self, nodes: int) -> Quadrature:
        return Quadrature(self.rule, nodes)

    def points(self) -> tuple[np.ndarray, np.ndarray]:
        """(nodes, weights) on [0, 1], float64."""
        return _RULES[self.rule](self.nodes)

    def __str__(self) -> str:
        return f"{self.rule}:{self.nodes}"


def registered_rules() -> list[str]:
    """Names of the registered quadrature rules."""
    return sorted(_RULES)
