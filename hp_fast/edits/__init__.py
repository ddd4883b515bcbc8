"""Head edits: scale heads' writes at run time (``edit_heads``, ``heads``) or in the weights
(``fold_head_gains``, ``fold``); gains parsing (``gains``), position selection
(``positions``), the attention-registry path (``attention``). See docs/method.md section 5
and docs/architecture.md."""
from .fold import FoldHandle, fold_head_gains
from .gains import Gains, gains_tensor, uniform_gains
from .heads import edit_heads, edit_path

__all__ = ["Gains", "FoldHandle", "edit_heads", "edit_path", "fold_head_gains", "gains_tensor",
           "uniform_gains"]
