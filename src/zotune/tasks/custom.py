"""Tasks from your own data: ``get_task("custom", path=..., template=..., ...)``.

The kind follows from the options:

* ``label_words`` -> classification (``label_field`` values map to label words),
* ``choices_field`` -> multiple choice (``label_field`` is the index, or the text, of the right choice),
* ``answer_field`` -> generation (a string or a list of acceptable answers).

``template`` is a Python format string over the row's fields, e.g. ``"Review: {text}\\nSentiment:"``;
the candidate continuation follows it directly, so label words usually start with a space.

``path`` may be one file (``.jsonl``, ``.json`` holding a list of objects, ``.csv``, ``.tsv``),
split deterministically into 80% train / 10% dev / 10% test (test drawn with seed 0, dev with
``data_seed``); a folder holding ``train`` / ``dev`` (or ``validation``) / ``test`` files in those
formats (a missing dev or test split is carved out of train the same way); or a local dataset
that the optional ``datasets`` package can open (``save_to_disk`` folder or data files folder).

>>> import json, tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "reviews.jsonl"
>>> rows = [{"text": f"review {i}", "label": i % 2} for i in range(20)]
>>> _ = path.write_text("\\n".join(json.dumps(r) for r in rows))
>>> task = custom_task(path=path, template="Review: {text}\\nSentiment:",
...                    label_words={"0": " negative", "1": " positive"})
>>> task.kind, len(task.train), len(task.dev), len(task.test)
('classification', 16, 2, 2)
"""

from __future__ import annotations

import csv
import json
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from zotune.errors import UserError
from zotune.tasks.base import MASK, Row, Splits, Task, TaskInfo, TaskKind, Template, render_rows
from zotune.tasks.data_files import seeded_permutation, seeded_subset

SPLIT_FILE_NAMES = {"train": ("train",), "dev": ("dev", "validation", "val", "valid"), "test": ("test",)}
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of one data file (each a JSON object / CSV record); any defect is a UserError."""
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise UserError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(FILE_SUFFIXES)}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
                        "save it as UTF-8 (e.g. iconv -f latin1 -t utf-8), or check it is the data file") from None
    if "\x00" in text:
        raise UserError(f"{path} holds binary data (NUL bytes), not {suffix} text; check it is the data file")
    if suffix in (".csv", ".tsv"):
        return list(csv.DictReader(text.splitlines(), delimiter="," if suffix == ".csv" else "\t"))
    if suffix == ".jsonl":
        rows = [_json(line, path, number) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    else:
        rows = _json(text, path, None)
        if isinstance(rows, dict):  # {"data": [...]} or {"<id>": {...}}
            rows = rows.get("data", list(rows.values()))
        if not isinstance(rows, list):
            raise UserError(f"{path}: expected a json list of objects")
    bad = next((i for i, row in enumerate(rows) if not isinstance(row, dict)), None)
    if bad is not None:
        raise UserError(f"{path}: row {bad + 1} is {type(rows[bad]).__name__}, not a JSON object of fields")
    return rows


def _json(text: str, path: Path, line: int | None) -> Any:
    """Parse JSON text, naming the file (and line) in the error."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        where = f"line {line}" if line is not None else f"line {err.lineno}"
        raise UserError(f"{path}, {where}: not valid json ({err.msg}); fix or remove that line") from None


def _split_file(folder: Path, split: str) -> Path | None:
    for stem in SPLIT_FILE_NAMES[split]:
        for suffix in FILE_SUFFIXES:
            if (folder / f"{stem}{suffix}").is_file():
                return folder / f"{stem}{suffix}"
    return None


def _load_with_datasets(path: Path) -> dict[str, list[dict[str, Any]]]:
    try:
        import datasets
    except ImportError as err:
        raise UserError(f"{path}: no train/dev/test files found, and opening it as a dataset needs the optional "
                        "'datasets' package (pip install 'zotune[data]')") from err
    try:
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            loaded = datasets.load_from_disk(str(path))
        else:
            loaded = datasets.load_dataset(str(path))
    except Exception as err:  # datasets raises many types; report them as the user's to fix
        raise UserError(f"{path}: could not open it with datasets ({type(err).__name__}: {err})") from err
    if isinstance(loaded, datasets.Dataset):
        return {"all": [dict(r) for r in loaded]}
    splits: dict[str, list[dict[str, Any]]] = {}
    for split_name, ds in loaded.items():
        for canonical, names in SPLIT_FILE_NAMES.items():
            if split_name.lower() in names:
                splits[canonical] = [dict(r) for r in ds]
    if "train" not in splits:
        raise UserError(f"{path}: the dataset has no 'train' split (splits: {', '.join(loaded)})")
    return splits


def _load_raw(path: Path) -> dict[str, list[dict[str, Any]]]:
    if path.is_file():
        return {"all": _read_rows(path)}
    if path.is_dir():
        found = {split: _split_file(path, split) for split in SPLIT_FILE_NAMES}
        if found["train"] is not None:
            return {split: _read_rows(p) for split, p in found.items() if p is not None}
        return _load_with_datasets(path)
    raise UserError(f"custom task path {str(path)!r} does not exist; pass a .jsonl/.json/.csv/.tsv file or a folder "
                    "with train/dev/test files")


def _carve(rows: list[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Split off ``fraction`` of ``rows`` (at least 1) drawn with ``seed``: (rest, carved)."""
    if len(rows) < 2:
        raise UserError(f"need at least 2 examples to split off a dev/test set, got {len(rows)}")
    order = seeded_permutation(len(rows), seed)
    n = max(1, round(fraction * len(rows)))
    carved = set(order[:n])
    return [r for i, r in enumerate(rows) if i not in carved], [rows[i] for i in order[:n]]


def _label_key(value: Any) -> str:
    return str(value).strip().lower()


def _format_fields(template: str) -> list[str]:
    """The data fields a format string uses: ``"{text} {meta.x}"`` -> ``["text", "meta"]``."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise UserError(f"template {template!r} is not a valid format string ({err}); write fields as {{name}} "
                        "and a literal brace as {{ or }}") from None
    return [field.split(".")[0].split("[")[0] for _, field, _, _ in parsed if field]


def _kind_of(path: Any, template: str | None, label_words: Any, choices_field: str | None,
             answer_field: str | None) -> TaskKind:
    """Check the options of :func:`custom_task` and return the task kind they select."""
    if path is None:
        raise UserError("task 'custom' needs path= (or --data-dir): a .jsonl/.json/.csv/.tsv file, a folder with "
                        "train/dev/test files, or a local datasets folder")
    if template is None:
        raise UserError("task 'custom' needs template=, a format string over your fields, e.g. "
                        "'Review: {text}\\nSentiment:'")
    if not _format_fields(template):
        raise UserError(f"template {template!r} has no {{field}}: every prompt would be the same text; name the "
                        "data fields in braces, e.g. 'Review: {text}\\nSentiment:'")
    kinds = [kind for kind, given in (("classification", label_words is not None),
                                      ("multiple_choice", choices_field is not None),
                                      ("generation", answer_field is not None)) if given]
    if len(kinds) != 1:
        raise UserError("task 'custom' needs exactly one of label_words= (classification), choices_field= (multiple "
                        "choice) or answer_field= (generation)")
    return kinds[0]  # type: ignore[return-value]


def _three_splits(raw: dict[str, list[Row]], data_seed: int) -> tuple[list[Row], list[Row], list[Row]]:
    """(train, dev, test): the splits given, the missing ones carved out of train (test with seed
    0, dev with ``data_seed``); a single file is cut 80/10/10."""
    if "all" in raw:
        rest, test = _carve(raw["all"], 0.1, seed=0)
        train, dev = _carve(rest, 0.1 / 0.9, seed=data_seed)
        return train, dev, test
    train = raw["train"]
    if "test" not in raw:
        train, test = _carve(train, 0.1, seed=0)
    else:
        test = raw["test"]
    if "dev" not in raw:
        train, dev = _carve(train, 0.1, seed=data_seed)
    else:
        dev = raw["dev"]
    return train, dev, test


def _verbalizer(label_words: Mapping[Any, str] | Sequence[str] | None) -> tuple[list[str], dict[str, int]]:
    """(label words, label key -> class index) of a classification task."""
    if isinstance(label_words, Mapping):
        words = list(label_words.values())
        label_index = {_label_key(key): i for i, key in enumerate(label_words)}
    elif isinstance(label_words, str) or label_words is None:
        raise UserError(f"label_words {label_words!r} is not a mapping {{label: word}} or a list of words; e.g. "
                        "label_words={0: ' bad', 1: ' good'}")
    else:
        words = list(label_words)
        label_index = {str(i): i for i in range(len(words))}
    if len(words) < 2:
        raise UserError("label_words needs at least two label words")
    return words, label_index


def _normalise(row: dict[str, Any], position: int, *, kind: TaskKind, fields: list[str],
               label_index: dict[str, int], label_field: str, choices_field: str | None,
               answer_field: str | None) -> Row:
    """A data row as a task row: an ``id``, and ``label`` / ``choices`` / ``answers`` by kind."""
    missing = [f for f in fields if f not in row]
    if missing:
        raise UserError(f"template field(s) {', '.join(missing)} not in the data; available fields: "
                        f"{', '.join(map(str, row))}")
    out: Row = dict(row)
    out.setdefault("id", str(position))
    if kind == "classification":
        out["label"] = _class_label(row.get(label_field), label_field, label_index)
    elif kind == "multiple_choice":
        out["choices"], out["label"] = _choices_and_label(row, str(choices_field), label_field)
    else:
        answers = row.get(str(answer_field))
        answers = [answers] if isinstance(answers, str) else list(answers or [])
        if not answers:
            raise UserError(f"field {answer_field!r} is empty in row {position}")
        out["answers"] = [str(a) for a in answers]
    return out


def _class_label(value: Any, label_field: str, label_index: dict[str, int]) -> int:
    """The class index of a label value (compared as lower-cased strings; booleans also as 0/1)."""
    key = _label_key(value)
    if key not in label_index and isinstance(value, bool):
        key = str(int(value))
    if key not in label_index:
        raise UserError(f"label {value!r} (field {label_field!r}) is not among the label_words keys "
                        f"{list(label_index)}")
    return label_index[key]


def _choices_and_label(row: dict[str, Any], choices_field: str, label_field: str) -> tuple[list[str], int]:
    """The choices of a multiple-choice row and the index of the right one (given as index or text)."""
    choices = row.get(choices_field)
    if not isinstance(choices, list) or len(choices) < 2:
        raise UserError(f"field {choices_field!r} must hold a list of at least two choices, got {choices!r}")
    texts = [str(c) for c in choices]
    answer = row.get(label_field)
    if isinstance(answer, str) and answer in texts:
        return texts, texts.index(answer)
    try:
        index = int(answer)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise UserError(f"field {label_field!r} must be the index or the text of the right choice, "
                        f"got {answer!r}") from None
    if not 0 <= index < len(texts):
        raise UserError(f"choice index {index} out of range for {len(texts)} choices")
    return texts, index


def _custom_template(template: str, kind: TaskKind, words: list[str], choice_prefix: str,
                     masked_template: str | None, target: str) -> Template:
    """The prompt template of a custom task: format strings over the row's fields."""
    masked = masked_template.replace("{mask}", "{{mask}}") if masked_template else None
    return Template(
        name="custom", description=template, prompt=lambda r: template.format_map(r), label_words=tuple(words),
        choices=(lambda r: [choice_prefix + c for c in r["choices"]]) if kind == "multiple_choice" else None,
        masked_prompt=(lambda r: masked.format_map(r).replace("{mask}", MASK)) if masked else None,
        target=target)


def custom_task(
    *,
    path: str | Path | None = None,
    template: str | None = None,
    label_words: Mapping[Any, str] | Sequence[str] | None = None,
    label_field: str = "label",
    choices_field: str | None = None,
    answer_field: str | None = None,
    choice_prefix: str = " ",
    target: str = " {answer}\n",
    masked_template: str | None = None,
    train_as_classification: bool | None = None,
    max_length: int = 256,
    name: str = "custom",
    data_seed: int = 42,
    max_train: int | None = None,
    max_dev: int | None = None,
    max_test: int | None = 1000,
) -> Task:
    """A :class:`Task` over your own data (see the module docstring for formats).

    Args:
        path: file, folder of split files, or local ``datasets`` dataset.
        template: format string over the row fields; the prompt, ending where the candidate starts.
        label_words: classification verbalizer: ``{label value: word}`` (values compared as
            lower-cased strings, so ``{"0": " no"}`` matches ``0`` and ``"0"``, ``{"true": ...}``
            matches ``True``), or a list indexed by integer labels.
        label_field: the field holding the label (classification) or right choice (multiple choice).
        choices_field: field holding the list of choices (multiple choice); each candidate is
            ``choice_prefix + choice``.
        answer_field: field holding the answer text or list of answers (generation).
        target: generation training target format (MeZO: ``" {answer}\\n"``).
        masked_template: masked-LM prompt with ``{mask}`` where the label word goes (optional;
            default: the prompt followed by the mask).
        train_as_classification: "ce" objective as CE over candidates (default for
            classification) or as token CE on the gold continuation only (default otherwise).
        max_length: default token budget for the scorer.
        name: the task's name in logs.
        data_seed, max_train, max_dev, max_test: as in :func:`zotune.tasks.get_task`.
    """
    kind = _kind_of(path, template, label_words, choices_field, answer_field)
    assert path is not None and template is not None
    train, dev, test = _three_splits(_load_raw(Path(path).expanduser()), data_seed)
    words, label_index = _verbalizer(label_words) if kind == "classification" else ([], {})
    fields = _format_fields(template)
    columns = {"label_field": label_field, "choices_field": choices_field, "answer_field": answer_field}

    def normalise(row: dict[str, Any], position: int) -> Row:
        return _normalise(row, position, kind=kind, fields=fields, label_index=label_index, **columns)

    chosen = _custom_template(template, kind, words, choice_prefix, masked_template, target)
    splits = [[normalise(r, i) for i, r in enumerate(rows)] for rows in (train, dev, test)]
    train_rows = seeded_subset(splits[0], max_train, data_seed)
    dev_rows = seeded_subset(splits[1], max_dev, data_seed)
    test_rows = seeded_subset(splits[2], max_test, 0)

    def load_splits() -> Splits:
        return (render_rows(chosen, kind, train_rows, "train"), render_rows(chosen, kind, dev_rows, "dev"),
                render_rows(chosen, kind, test_rows, "test"))

    if train_as_classification is None:
        train_as_classification = kind == "classification"
    info = TaskInfo(name=name, kind=kind, description=f"custom task from {path}", source=str(path),
                    metric="f1" if kind == "generation" else "accuracy", templates=("custom",),
                    default_template="custom")
    task = Task(name, kind, template=chosen, load_splits=load_splits, metric=info.metric, max_length=max_length,
                train_as_classification=train_as_classification, info=info,
                settings={"path": str(path), "data_seed": data_seed, "max_train": max_train, "max_dev": max_dev,
                          "max_test": max_test, "template": template})
    task.train  # noqa: B018  (render now so template errors surface here)
    return task
