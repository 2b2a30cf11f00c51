"""optserve's pure-NumPy core: optimizers, gradient transforms, flat layouts, state.

Imports nothing from the web or store layers; usable on its own.
"""

from service.core.errors import CoreError, HyperparameterError, LayoutError, StateError
from service.core.layout import FlatLayout, TensorSpec
from service.core.optim import OPTIMIZERS, Hyper, Optimizer, get_optimizer, parse_hyper
from service.core.state import OptState
from service.core.transforms import (
    GradientTransforms,
    TransformResult,
    apply_transforms,
    clip_by_global_norm,
    clip_by_tensor_norm,
    clip_by_value,
    find_nonfinite,
    global_norm,
    tensor_norms,
)

__all__ = [
    "OPTIMIZERS",
    "CoreError",
    "FlatLayout",
    "GradientTransforms",
    "Hyper",
    "HyperparameterError",
    "LayoutError",
    "OptState",
    "Optimizer",
    "StateError",
    "TensorSpec",
    "TransformResult",
    "apply_transforms",
    "clip_by_global_norm",
    "clip_by_tensor_norm",
    "clip_by_value",
    "find_nonfinite",
    "get_optimizer",
    "global_norm",
    "parse_hyper",
    "tensor_norms",
]
