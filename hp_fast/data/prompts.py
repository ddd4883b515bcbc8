"""Prompt sets from the files researchers keep them in.

``read_prompts(path, field=None)`` accepts

* ``.txt``: one prompt per line (blank lines skipped);
* ``.jsonl``: one JSON string or object per line;
* ``.json``: a list of strings or objects, or an object holding one such list (``{"data": [...]}``);
* ``.csv`` (a header row), ``.parquet``, or a folder written by ``datasets``' ``save_to_disk``
  (a ``DatasetDict`` folder with one split, or the folder of one split).

For objects and tables ``field`` names the prompt column; by default the first of ``prompt``,
``question``, ``text`` that a record has. Names match exactly, else case-insensitively.
``.parquet`` needs ``pyarrow`` and dataset folders need ``datasets``: both come with
``pip install 'hp_fast[prompts]'``. Only these formats are read (never pickles).

``read_records`` is the shared table reader (also used for question files, ``data.questions``):
it returns the field names present and ``(where, record)`` pairs, ``where`` naming the line or row
for error messages.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Sequence

DEFAULT_FIELDS = ("prompt", "question", "text")
SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".parquet")
_EXTRA = "pip install 'hp_fast[prompts]'"


def read_prompts(path, field: str | None = None) -> list[str]:
    """The prompts of a file or dataset folder (module docstring), in order.

    Raises a ValueError naming the file and line/row for a missing field (listing the fields
    present), a value that is not a non-empty string, an empty set or an unknown format."""
    path = Path(path)
    if path.suffix.lower() == ".txt" and field:
        raise ValueError(f"{path} is plain text (one prompt per line): it has no fields, drop "
                         f"--prompt-field {field}")
    wanted = [field] if field else list(DEFAULT_FIELDS)
    fields, records = read_records(path, wanted)
    if fields and resolve_field(fields, wanted) is None:
        raise ValueError(f"{path} has no field {_wanted(field)}; fields present: "
                         f"{', '.join(map(str, fields))}. Pass --prompt-field NAME")
    out = []
    for where, rec in records:
        if isinstance(rec, dict):
            key = resolve_field(list(rec), wanted)  # per record: .jsonl lines may differ
            if key is None:
                raise ValueError(f"{where} has no field {_wanted(field)}; fields there: "
                                 f"{', '.join(map(str, rec)) or 'none'}")
            rec = rec[key]
        elif field:
            raise ValueError(f"{where} is a bare value, not an object with a {field!r} field")
        if not isinstance(rec, str) or not rec.strip():
            raise ValueError(f"{where}: the prompt must be a non-empty string, got {_show(rec)}")
        out.append(rec)
    if not out:
        raise ValueError(f"prompt file {path} is empty: put one prompt per line (or one per row)")
    return out


def resolve_field(fields: Sequence[str], wanted: Sequence[str]) -> str | None:
    """The first name of ``wanted`` among ``fields``: exact match first, then case-insensitive."""
    for name in wanted:
        if name in fields:
            return name
        hit = next((f for f in fields if isinstance(f, str) and f.lower() == name.lower()), None)
        if hit is not None:
            return hit
    return None


def read_records(path, columns: Sequence[str] | None = None) -> tuple[list[str], list[tuple[str, Any]]]:
    """(field names present, [(where, record)]) of a prompt or question file.

    Records are strings (``.txt`` lines, bare JSON strings) or dicts. ``columns``: for
    ``.parquet`` and dataset folders, read only these columns (matched like ``resolve_field``;
    the field list still names every column). Fields are ``[]`` for ``.txt``."""
    path = Path(path)
    if path.is_dir():
        return _read_dataset_folder(path, columns)
    if not path.is_file():
        raise ValueError(f"{path} does not exist (give a prompt or question file, or a dataset folder)")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"{path}: unknown prompt file type {path.suffix or '(no extension)'!r}; use "
                         f"{', '.join(SUFFIXES)} or a datasets folder (save_to_disk)")
    if suffix == ".txt":
        lines = path.read_text(encoding="utf-8").splitlines()
        return [], [(f"{path}:{i}", ln.strip()) for i, ln in enumerate(lines, 1) if ln.strip()]
    if suffix == ".jsonl":
        return _with_fields(_read_jsonl(path))
    if suffix == ".json":
        return _with_fields(_read_json(path))
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            rows = [(f"{path} row {i}", dict(r)) for i, r in enumerate(reader, 1)]
            return list(reader.fieldnames or []), rows
    return _read_parquet(path, columns)


def _read_jsonl(path: Path) -> list[tuple[str, Any]]:
    out = []
    for i, ln in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not ln.strip():
            continue
        try:
            out.append((f"{path}:{i}", json.loads(ln)))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{i} is not valid JSON ({err.msg})") from None
    return out


def _read_json(path: Path) -> list[tuple[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err.msg}, line {err.lineno})") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise ValueError(f"{path} holds an object; expected a list of records, or an object "
                             f"with exactly one list (it has keys {', '.join(data)})")
        data = lists[0]
    if not isinstance(data, list):
        raise ValueError(f"{path} must hold a JSON list of strings or objects")
    return [(f"{path} item {i}", rec) for i, rec in enumerate(data, 1)]


def _with_fields(records: list[tuple[str, Any]]) -> tuple[list[str], list[tuple[str, Any]]]:
    fields: dict[str, None] = {}
    for _, rec in records:
        if isinstance(rec, dict):
            fields.update(dict.fromkeys(rec))
    return list(fields), records


def _read_parquet(path: Path, columns) -> tuple[list[str], list[tuple[str, Any]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"reading {path} needs pyarrow: {_EXTRA}") from None
    names = list(pq.read_schema(path).names)
    keep = _keep(names, columns)
    rows = pq.read_table(path, columns=keep).to_pylist()
    return names, [(f"{path} row {i}", r) for i, r in enumerate(rows, 1)]


def _read_dataset_folder(path: Path, columns) -> tuple[list[str], list[tuple[str, Any]]]:
    markers = ("dataset_info.json", "state.json", "dataset_dict.json")
    if not any((path / m).is_file() for m in markers):
        raise ValueError(f"{path} is a folder but not a dataset saved with save_to_disk (no "
                         f"{' / '.join(markers)}); pass a file ({', '.join(SUFFIXES)})")
    try:
        import datasets
    except ImportError:
        raise ValueError(f"reading the dataset folder {path} needs the datasets library: {_EXTRA}") from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1:
            raise ValueError(f"{path} holds the splits {', '.join(ds)}; pass one split's folder, "
                             f"e.g. {path / next(iter(ds))}")
        ds = next(iter(ds.values()))
    names = list(ds.column_names)
    keep = _keep(names, columns)
    if keep is not None:
        ds = ds.select_columns(keep)
    return names, [(f"{path} row {i}", r) for i, r in enumerate(ds.to_list(), 1)]


def _keep(names: list[str], columns) -> list[str] | None:
    if columns is None:
        return None
    keep = [c for c in (resolve_field(names, [w]) for w in columns) if c is not None]
    return list(dict.fromkeys(keep))  # none found: read no column, the caller names the fields


def _wanted(field: str | None) -> str:
    return repr(field) if field else " or ".join(repr(f) for f in DEFAULT_FIELDS)


def _show(value) -> str:
    text = repr(value)
    return f"{text[:60]}{'...' if len(text) > 60 else ''} ({type(value).__name__})"
