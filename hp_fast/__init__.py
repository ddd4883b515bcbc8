"""hp_fast: fast Head Pursuit (find, describe and edit concept-specialized attention heads)."""
from .somp import SOMPResult
from .pursuit import somp, somp_heads

__version__ = "0.1.0"
