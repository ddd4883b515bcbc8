"""hp_fast: fast Head Pursuit (find, describe and edit concept-specialized attention heads).

Quick start::

    import hp_fast
    model, tok = hp_fast.load_model()                      # embedded SmolLM2-135M-Instruct
    acts = hp_fast.capture(model, tok, prompts)            # (n, layers, heads, dh)
    ranking = hp_fast.rank_heads(acts, model, tok, "countries")
    heads = ranking.top(8)
    with hp_fast.edit_heads(model, {h: -1.0 for h in heads}):
        ...                                                # concept suppressed
"""
from .models.adapters import get_adapter, supported_architectures
from .generation.configs import generate_configs
from .capture import HeadActivations, capture
from .concepts import builtin_concepts, concept_tokens, load_words
from .edits import edit_heads, fold_head_gains, uniform_gains
from .models.loading import load_model
from .pursuit import somp, somp_heads
from .ranking import HeadRanking, describe_heads, logit_lens_tokens, random_control, rank_heads
from .pursuit.result import SOMPResult
from .backend import backend_info
from .atlas import atlas
from .token_display import readable_token
from .export import export_edited

__version__ = "0.1.0"

__all__ = [
    "load_model", "capture", "HeadActivations", "somp", "somp_heads", "SOMPResult",
    "concept_tokens", "builtin_concepts", "load_words", "rank_heads", "HeadRanking",
    "describe_heads", "logit_lens_tokens", "random_control", "edit_heads", "fold_head_gains",
    "uniform_gains", "get_adapter", "supported_architectures", "backend_info", "generate_configs",
    "atlas", "readable_token", "export_edited",
]
