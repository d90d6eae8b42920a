"""Per-row parameter gradients by layer type, from hooks on the kernel's private model copy.

One file per layer family (linear.py, conv.py, embedding.py, norm.py, hf_conv1d.py) holds a closed-form rule
(output gradients × inputs, the way opacus computes per-sample gradients) and, for modules
whose output is affine in their parameters, a shift that evaluates each row at its own point.
local.py treats any other module through torch.func on that module alone; capture.py holds
the hooks. Register a rule for your own layer with `register_layer_rule(MyLayer)`.
"""

from . import conv, embedding, hf_conv1d, linear, norm  # noqa: F401  (registration side effect)
from .capture import RowCapture, Shift
from .registry import Call, layer_rule_for, register_layer_rule, registered_layers

__all__ = [
    "Call",
    "RowCapture",
    "Shift",
    "layer_rule_for",
    "register_layer_rule",
    "registered_layers",
]
