"""Prompt and question sets from .txt/.jsonl/.json/.csv/.parquet files and datasets folders."""
from __future__ import annotations

import csv
import json

import pytest

from hp_fast.cli import main, read_prompts as cli_read_prompts
from hp_fast.data.prompts import read_prompts
from hp_fast.data.qa import Question
from hp_fast.data.questions import country_question, load_questions, parse_answers, train_pool

pd = pytest.importorskip("pandas")
datasets = pytest.importorskip("datasets")

PROMPTS = ["What color is the sky?", "Name a country, in one word.", "two, three", 'say "hi"\nthen go']


def _csv(path, rows, fields):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return path


def _write(tmp_path, fmt, columns: dict):
    """One table in format fmt: csv | parquet | jsonl | json | dataset (a save_to_disk folder)."""
    rows = [dict(zip(columns, vals)) for vals in zip(*columns.values())]
    if fmt == "csv":
        return _csv(tmp_path / "p.csv", rows, list(columns))
    if fmt == "parquet":
        pd.DataFrame(columns).to_parquet(tmp_path / "p.parquet")
        return tmp_path / "p.parquet"
    if fmt == "jsonl":
        (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        return tmp_path / "p.jsonl"
    if fmt == "json":
        (tmp_path / "p.json").write_text(json.dumps(rows))
        return tmp_path / "p.json"
    datasets.Dataset.from_dict(columns).save_to_disk(str(tmp_path / "ds"))
    return tmp_path / "ds"


FORMATS = ["csv", "parquet", "jsonl", "json", "dataset"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_round_trips(tmp_path, fmt):
    path = _write(tmp_path, fmt, {"id": list(range(len(PROMPTS))), "prompt": PROMPTS})
    assert read_prompts(path) == PROMPTS
    assert cli_read_prompts(path) == PROMPTS  # the CLI's name is the same function


@pytest.mark.parametrize("fmt", FORMATS)
def test_default_field_order_and_explicit_field(tmp_path, fmt):
    qs, texts = ["q1", "q2"], ["t1", "t2"]
    path = _write(tmp_path, fmt, {"text": texts, "question": qs, "body": ["b1", "b2"]})
    assert read_prompts(path) == qs  # prompt, then question, then text
    assert read_prompts(path, field="body") == ["b1", "b2"]
    assert read_prompts(path, field="TEXT") == texts  # case-insensitive fallback
    with pytest.raises(ValueError, match=r"no field 'nope'; fields present: text, question, body"):
        read_prompts(path, field="nope")


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "dataset"])
def test_non_string_value_names_the_row(tmp_path, fmt):
    path = _write(tmp_path, fmt, {"prompt": [1, 2, 3]})
    with pytest.raises(ValueError, match=r"(row 1|:1): the prompt must be a non-empty string, got 1 \(int\)"):
        read_prompts(path)


def test_missing_default_field_lists_fields(tmp_path):
    path = _write(tmp_path, "csv", {"body": ["a"], "label": ["x"]})
    with pytest.raises(ValueError, match=r"no field 'prompt' or 'question' or 'text'; fields present: "
                                         r"body, label\. Pass --prompt-field"):
        read_prompts(path)


def test_empty_sets_and_cells(tmp_path):
    _csv(tmp_path / "e.csv", [], ["prompt"])
    with pytest.raises(ValueError, match="is empty"):
        read_prompts(tmp_path / "e.csv")
    (tmp_path / "e.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="is empty"):
        read_prompts(tmp_path / "e.txt")
    _csv(tmp_path / "c.csv", [{"prompt": "a"}, {"prompt": ""}], ["prompt"])
    with pytest.raises(ValueError, match=r"c\.csv row 2: the prompt must be a non-empty string"):
        read_prompts(tmp_path / "c.csv")
    pd.DataFrame({"prompt": ["a", None]}).to_parquet(tmp_path / "n.parquet")
    with pytest.raises(ValueError, match=r"row 2: .*None"):
        read_prompts(tmp_path / "n.parquet")


def test_unknown_type_and_bad_paths(tmp_path):
    (tmp_path / "p.xlsx").write_bytes(b"PK")
    with pytest.raises(ValueError, match=r"unknown prompt file type '\.xlsx'"):
        read_prompts(tmp_path / "p.xlsx")
    (tmp_path / "pk.pkl").write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match="unknown prompt file type"):  # never unpickled
        read_prompts(tmp_path / "pk.pkl")
    with pytest.raises(ValueError, match="does not exist"):
        read_prompts(tmp_path / "missing.csv")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="not a dataset saved with save_to_disk"):
        read_prompts(tmp_path / "folder")
    (tmp_path / "p.txt").write_text("a\n")
    with pytest.raises(ValueError, match="plain text"):
        read_prompts(tmp_path / "p.txt", field="prompt")
    (tmp_path / "o.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match="a list of records"):
        read_prompts(tmp_path / "o.json")


def test_txt_and_jsonl_behave_as_before(tmp_path):
    (tmp_path / "p.txt").write_text("  one \n\ntwo\n")
    assert read_prompts(tmp_path / "p.txt") == ["one", "two"]
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "a"}\n"b"\n\n{"text": "c"}\n')  # per-line field choice, as before
    assert read_prompts(jl) == ["a", "b", "c"]
    jl.write_text('{"prompt": "a"}\nnot json\n')
    with pytest.raises(ValueError, match=r"p\.jsonl:2 is not valid JSON"):
        read_prompts(jl)
    jl.write_text('{"body": "a"}\n')
    with pytest.raises(ValueError, match="fields present: body"):
        read_prompts(jl)


def test_dataset_dict_folders(tmp_path):
    one = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"prompt": ["x", "y"]})})
    one.save_to_disk(str(tmp_path / "one"))
    assert read_prompts(tmp_path / "one") == ["x", "y"]
    two = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"prompt": ["x"]}),
                                "test": datasets.Dataset.from_dict({"prompt": ["z"]})})
    two.save_to_disk(str(tmp_path / "two"))
    with pytest.raises(ValueError, match="holds the splits train, test; pass one split's folder"):
        read_prompts(tmp_path / "two")
    assert read_prompts(tmp_path / "two" / "test") == ["z"]


# --------------------------------------------------------------------------- questions

TRIVIA = [
    {"question": "Which country has Canberra as its capital?", "question_id": "tc_1",
     "answer": {"value": "Australia", "aliases": ["Australia", "Commonwealth of Australia"],
                "normalized_aliases": ["australia", "commonwealth of australia"], "type": "WikipediaEntity"}},
    {"question": "What is the capital of France?", "question_id": "tc_2",
     "answer": {"value": "Paris", "aliases": ["Paris", "City of Light"],
                "normalized_aliases": ["paris", "city of light"], "type": "WikipediaEntity"}},
    {"question": "In which country is Kyoto?", "question_id": "tc_3",
     "answer": {"value": "Japan", "aliases": ["Nippon"], "normalized_aliases": ["nippon"], "type": "W"}},
    {"question": "How many legs has a spider?", "question_id": "tc_4",
     "answer": {"value": "Eight", "aliases": ["8", "eight"], "normalized_aliases": ["8", "eight"],
                "type": "Numerical"}},
]


def _trivia(tmp_path, fmt):
    if fmt == "jsonl":
        (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(r) for r in TRIVIA))
        return tmp_path / "q.jsonl"
    if fmt == "parquet":
        pd.DataFrame(TRIVIA).to_parquet(tmp_path / "q.parquet")  # answer: a nested struct column
        return tmp_path / "q.parquet"
    datasets.Dataset.from_list(TRIVIA).save_to_disk(str(tmp_path / "qds"))
    return tmp_path / "qds"


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "dataset"])
def test_triviaqa_nested_answers_and_country_split(tmp_path, fmt):
    qs = load_questions(_trivia(tmp_path, fmt))
    assert all(isinstance(q, Question) for q in qs) and len(qs) == 4
    assert qs[0].question == TRIVIA[0]["question"]
    assert qs[0].answers == ("australia", "commonwealth of australia")  # value + aliases, lowercase, once
    assert qs[1].answers == ("paris", "city of light")
    assert qs[3].answers == ("eight", "8")
    assert [q.kind for q in qs] == ["country", "other", "country", "other"]
    assert "Answer" in qs[0].prompt and qs[0].question in qs[0].prompt


def test_raw_triviaqa_json_capitalized_keys(tmp_path):
    raw = {"Data": [{"Question": "Where is Lima?", "Answer": {"Value": "Peru", "Aliases": ["Peru"],
                                                              "NormalizedAliases": ["peru", "republic of peru"]}}],
           "Version": 1.0}
    (tmp_path / "raw.json").write_text(json.dumps(raw))
    qs = load_questions(tmp_path / "raw.json")
    assert qs == [Question("Where is Lima?", ("peru", "republic of peru"), "country")]
    (tmp_path / "two.json").write_text(json.dumps({"Data": [], "Other": []}))
    with pytest.raises(ValueError, match="exactly one list"):  # which list would be ambiguous
        load_questions(tmp_path / "two.json")


def test_answer_forms_and_errors(tmp_path):
    assert parse_answers("Red", "x") == ("red",)
    assert parse_answers(["Red", "red ", "Crimson"], "x") == ("red", "crimson")
    assert parse_answers('["Blue", "Navy"]', "x") == ("blue", "navy")  # a CSV cell holding a JSON list
    assert parse_answers({"text": ["Oslo"], "answer_start": [3]}, "x") == ("oslo",)  # SQuAD style
    with pytest.raises(ValueError, match="row 7: the answer must be"):
        parse_answers(3, "row 7")
    with pytest.raises(ValueError, match="row 7: the answer is empty"):
        parse_answers(["  "], "row 7")
    assert country_question(("france",)) and not country_question(("paris",))
    path = _csv(tmp_path / "q.csv", [{"question": "Q?", "answer": '["Spain", "España"]', "kind": ""},
                                     {"question": "Color?", "answer": "red", "kind": "other"},
                                     {"question": "Odd?", "answer": "Chad", "kind": "other"}],
                ["question", "answer", "kind"])
    qs = load_questions(path)
    assert [q.kind for q in qs] == ["country", "other", "other"]  # an explicit kind wins
    assert qs[0].answers == ("spain", "españa")
    _csv(tmp_path / "k.csv", [{"question": "Q?", "answer": "x", "kind": "city"}], ["question", "answer", "kind"])
    with pytest.raises(ValueError, match=r"k\.csv row 1: kind 'city' is unknown"):
        load_questions(tmp_path / "k.csv")
    _csv(tmp_path / "m.csv", [{"question": "Q?", "label": "x"}], ["question", "label"])
    with pytest.raises(ValueError, match=r"no answer field \('answer' or 'answers'\); fields present: question, label"):
        load_questions(tmp_path / "m.csv")


def _qs(kind, n):
    return [Question(f"{kind} {i}?", (f"a{i}",), kind) for i in range(n)]


def test_train_pool_split_per_kind():
    flat = _qs("country", 30) + _qs("other", 30)
    train, pool = train_pool(flat, n_train=20, n_pool=30, seed=0)
    assert len(train) == 20 and len(pool) == 30
    assert sum(q.kind == "country" for q in train) == 10 and sum(q.kind == "country" for q in pool) == 15
    assert not set(train) & set(pool)
    assert train_pool(flat, 20, 30, seed=1) != (train, pool)  # the seed shuffles
    small_train, small_pool = train_pool(_qs("country", 5) + _qs("other", 40), n_train=20, n_pool=30)
    assert sum(q.kind == "country" for q in small_train) == 2 and sum(q.kind == "country" for q in small_pool) == 3
    pair = (_qs("country", 2), _qs("other", 2))
    assert train_pool(pair, 20, 30) == pair  # a (train, pool) pair is used as given
    with pytest.raises(ValueError, match="0 'country' question"):
        train_pool(_qs("other", 10), 20, 30)


def test_run_qa_splits_a_loaded_file(tmp_path, monkeypatch):
    """run_qa(questions=flat list) splits it per kind; stopped right after the split."""
    import hp_fast.evaluation.qa as qa_mod

    class Stop(Exception):
        pass

    def known(model, tok, pool, *a, **k):
        raise Stop(pool)
    name = next(n for n in ("known_questions", "_known") if hasattr(qa_mod, n))
    monkeypatch.setattr(qa_mod, name, known)
    flat = _qs("country", 100) + _qs("other", 100)
    with pytest.raises(Stop) as stop:
        qa_mod.run_qa(None, None, tmp_path, quick=True, questions=flat, log=lambda *a: None)
    pool = stop.value.args[0]
    assert len(pool) == 60 and sum(q.kind == "country" for q in pool) == 30  # quick: n_pool=60


def test_cli_eval_reads_the_question_file_before_loading(tmp_path, monkeypatch, capsys):
    import hp_fast.models.loading as loading
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    bad = _csv(tmp_path / "q.csv", [{"question": "Q?", "label": "x"}], ["question", "label"])
    assert main(["eval", "qa", "--out", str(tmp_path / "o"), "--questions", str(bad)]) == 2
    assert "no answer field" in capsys.readouterr().err
    good = _trivia(tmp_path, "jsonl")
    assert main(["eval", "keywords", "--out", str(tmp_path / "o"), "--questions", str(good)]) == 2
    assert "--questions is for `hp-fast eval qa`" in capsys.readouterr().err
