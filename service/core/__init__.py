"""optserve's pure-NumPy core: optimizers, gradient transforms, flat layouts, state.

Imports nothing from the web or store layers; usable on its own.
"""

from service.core.errors import CoreError, HyperparameterError, LayoutError, StateError
from service.core.layout import FlatLayout, TensorSpec
from service.core.optim import OPTIMIZERS, Hyper, Optimizer, get_optimizer, parse_hyper
from service.core.state import OptState

__all__ = [
    "OPTIMIZERS",
    "CoreError",
    "FlatLayout",
    "Hyper",
    "HyperparameterError",
    "LayoutError",
    "OptState",
    "Optimizer",
    "StateError",
    "TensorSpec",
    "get_optimizer",
    "parse_hyper",
]
