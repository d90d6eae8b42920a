"""explaind_kernel: a recorded training run rewritten exactly as a kernel machine.

>>> result = explaind_kernel.compute_kernel("runs/a.lmdb", model, test_x, outputs="all")
>>> result.completeness_line()
'completeness: max_abs=… rel=…'
"""

from .compare import QuadratureErrors, compare_quadrature
from .config import KeepOptions, KernelConfig
from .engine import compute_kernel
from .errors import (
    EmptyTraceError,
    ExplaindError,
    InputError,
    KernelError,
    ModelMismatchError,
    ResultFileError,
    UnsupportedOptimizerError,
)
from .kinks import register_kink_op
from .persample import register_layer_rule
from .problem import KernelProblem, RunPlan, State, trace_fingerprint
from .quadrature import Quadrature, register_quadrature
from .result import KernelResult
from .rules import OptimizerRule, ParamStep, RuleOutput, register_rule
from .runtime import torch_runtime
from .targets import Target, register_target, registered_targets

__all__ = [
    "ExplaindError",
    "compute_kernel",
    "trace_fingerprint",
    "compare_quadrature",
    "QuadratureErrors",
    "KernelConfig",
    "KernelResult",
    "Target",
    "register_target",
    "registered_targets",
    "KeepOptions",
    "KernelProblem",
    "RunPlan",
    "State",
    "torch_runtime",
    "Quadrature",
    "register_quadrature",
    "register_kink_op",
    "register_layer_rule",
    "OptimizerRule",
    "ParamStep",
    "RuleOutput",
    "register_rule",
    "KernelError",
    "InputError",
    "ModelMismatchError",
    "EmptyTraceError",
    "UnsupportedOptimizerError",
    "ResultFileError",
]
