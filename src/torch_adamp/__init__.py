"""torch-adamp: exact, sync-free and fast AdamP and SGDP for PyTorch.

Heo et al., "AdamP: Slowing Down the Slowdown for Momentum Optimizers on
Scale-invariant Weights", ICLR 2021 (arXiv 2006.08217).
"""

from . import functional
from .diagnostics import find_scale_invariant, param_groups
from .distributed import FlatParameterError
from .interop import to_reference_state_dict
from .optimizer import ProjectedOptimizer
from .optimizers.adamp import AdamP, adamp
from .optimizers.lionp import LionP, lionp
from .optimizers.sgdp import SGDP, sgdp
from .projected import Projected
from .projected.orthograd import OrthoGrad
from .projection import project_single, projection_coefficients

__version__ = "0.1.0"

__all__ = [
    "SGDP",
    "AdamP",
    "FlatParameterError",
    "LionP",
    "OrthoGrad",
    "Projected",
    "ProjectedOptimizer",
    "__version__",
    "adamp",
    "find_scale_invariant",
    "functional",
    "lionp",
    "param_groups",
    "project_single",
    "projection_coefficients",
    "sgdp",
    "to_reference_state_dict",
]
