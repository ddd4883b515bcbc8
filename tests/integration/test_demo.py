"""Demo pieces: question splits, scoring, quartiles, and the clear error on a model that knows nothing."""
from __future__ import annotations

import pytest

from hp_fast.evaluation import demo, qa
from hp_fast.evaluation.protocol import quartiles
from hp_fast.data.qa import Question, is_correct
from helpers.tiny_models import tiny_model, tiny_tokenizer


def test_split_is_disjoint_and_balanced():
    train, pool = qa.split_questions(0, n_train=40, n_pool=60)
    assert len(train) == 40 and len(pool) == 60
    assert not {q.question for q in train} & {q.question for q in pool}
    assert sum(q.kind == "country" for q in train) == 20 and sum(q.kind == "country" for q in pool) == 30


def test_is_correct_whole_words_and_aliases():
    q = Question("In which country is the city of Houston?", ("united states", "usa", "us"), "country")
    assert is_correct("It is in the USA.", q) and is_correct("United States", q)
    assert not is_correct("Russia", q) and not is_correct("business", q)


def test_score_and_quartiles():
    qs = [Question("a", ("x",), "country"), Question("b", ("y",), "country"), Question("c", ("z",), "other")]
    assert qa.accuracy_per_kind(["x", "no", "z!"], qs) == {"country": 0.5, "other": 1.0}
    assert quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == [2.0, 3.0, 4.0]
    assert quartiles([0.7]) == [0.7, 0.7, 0.7]


def test_demo_on_a_model_that_knows_nothing_fails_clearly(tmp_path):
    with pytest.raises(ValueError, match="too few pool questions"):
        demo.run_demo(tiny_model("llama"), tiny_tokenizer(), out=tmp_path, quick=True, log=lambda *a: None)
