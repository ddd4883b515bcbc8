"""Evaluation suite: the paper's experiments (docs/method.md section 4-6) on any model, with reports.

``run_qa`` (country questions, SQuAD F1/EM), ``run_keywords`` (colors / sentiments / numbers
in free generation, inhibition and enhancement), ``run_toxicity`` (heads from an incomplete
toxic word list); each writes results.json, PNG plots and report.md. ``run_eval`` is the
``hp-fast eval`` entry point. ``run_specificity`` (``hp-fast eval specificity``) compares the
selection rules on six concepts with a held-out protocol, bootstrap intervals and p-values
among random controls (``specificity.py``, ``stats.py``).
"""
from __future__ import annotations

from .keywords import run_keywords
from .protocol import Setting, set_threads
from .qa import run_qa
from .specificity import run_specificity
from .toxicity import run_toxicity

TASKS = ("qa", "keywords", "toxicity")

__all__ = ["run_qa", "run_keywords", "run_toxicity", "run_specificity", "run_eval", "Setting", "TASKS"]


def run_eval(task: str, model, tok, out, *, ks=None, n_random: int = 10, quick: bool = False,
             setting: Setting | None = None, concepts=None, n_test: int | None = None, alphas=None,
             questions=None, log=print) -> dict:
    """Run one task with the CLI's defaults (ks 3,8,16; quick: 3,8). questions: qa only, a list
    of ``Question`` (``data.questions.load_questions``) instead of the built-in set."""
    ks = ks or ([3, 8] if quick else [3, 8, 16])
    if task == "qa":
        sizes = {"n_test": n_test} if n_test else None
        return run_qa(model, tok, out, ks=ks, n_random=n_random, quick=quick, setting=setting,
                      sizes=sizes, alphas=tuple(alphas or (-1.0,)), questions=questions, log=log)
    if task == "keywords":
        kw = {"concepts": tuple(concepts)} if concepts else {}
        return run_keywords(model, tok, out, ks=ks, n_random=n_random, quick=quick, setting=setting,
                            n_test=n_test, log=log, **kw)
    if task == "toxicity":
        return run_toxicity(model, tok, out, ks=ks, n_random=n_random, quick=quick, setting=setting,
                            n_test=n_test, log=log)
    raise ValueError(f"unknown task {task!r}; use one of {TASKS}")
