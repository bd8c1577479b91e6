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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from zotune.errors import UserError
from zotune.tasks.base import MASK, Row, Splits, Task, TaskInfo, TaskKind, Template, render_rows
from zotune.tasks.data_files import seeded_permutation, seeded_subset

SPLIT_FILE_NAMES = {"train": ("train",), "dev": ("dev", "validation", "val", "valid"), "test": ("test",)}
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")


def _read_rows(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    try:
        if suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        if suffix == ".json":
            data = json.loads(text)
            if isinstance(data, dict):  # {"data": [...]} or {"<id>": {...}}
                data = data.get("data", list(data.values()))
            if not isinstance(data, list):
                raise UserError(f"{path}: expected a json list of objects")
            return data
        if suffix in (".csv", ".tsv"):
            return list(csv.DictReader(text.splitlines(), delimiter="," if suffix == ".csv" else "\t"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid json ({err})") from err
    raise UserError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(FILE_SUFFIXES)}")


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
    return [field.split(".")[0].split("[")[0] for _, field, _, _ in string.Formatter().parse(template) if field]


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
    if path is None:
        raise UserError("task 'custom' needs path= (or --data-dir): a .jsonl/.json/.csv/.tsv file, a folder with "
                        "train/dev/test files, or a local datasets folder")
    if template is None:
        raise UserError("task 'custom' needs template=, a format string over your fields, e.g. "
                        "'Review: {text}\\nSentiment:'")
    kinds = [kind for kind, given in (("classification", label_words is not None),
                                      ("multiple_choice", choices_field is not None),
                                      ("generation", answer_field is not None)) if given]
    if len(kinds) != 1:
        raise UserError("task 'custom' needs exactly one of label_words= (classification), choices_field= (multiple "
                        "choice) or answer_field= (generation)")
    kind: TaskKind = kinds[0]  # type: ignore[assignment]
    raw = _load_raw(Path(path).expanduser())

    if "all" in raw:
        rest, test = _carve(raw["all"], 0.1, seed=0)
        train, dev = _carve(rest, 0.1 / 0.9, seed=data_seed)
    else:
        train = raw["train"]
        if "test" not in raw:
            train, test = _carve(train, 0.1, seed=0)
        else:
            test = raw["test"]
        if "dev" not in raw:
            train, dev = _carve(train, 0.1, seed=data_seed)
        else:
            dev = raw["dev"]

    fields = _format_fields(template)
    words: list[str] = []
    label_index: dict[str, int] = {}
    if kind == "classification":
        assert label_words is not None
        if isinstance(label_words, Mapping):
            words = list(label_words.values())
            label_index = {_label_key(key): i for i, key in enumerate(label_words)}
        else:
            words = list(label_words)
            label_index = {str(i): i for i in range(len(words))}
        if len(words) < 2:
            raise UserError("label_words needs at least two label words")

    def normalise(row: dict[str, Any], position: int) -> Row:
        missing = [f for f in fields if f not in row]
        if missing:
            raise UserError(f"template field(s) {', '.join(missing)} not in the data; available fields: "
                            f"{', '.join(map(str, row))}")
        out: Row = dict(row)
        out.setdefault("id", str(position))
        if kind == "classification":
            value = row.get(label_field)
            key = _label_key(value)
            if key not in label_index and isinstance(value, bool):
                key = str(int(value))
            if key not in label_index:
                raise UserError(f"label {value!r} (field {label_field!r}) is not among the label_words keys "
                                f"{list(label_index)}")
            out["label"] = label_index[key]
        elif kind == "multiple_choice":
            choices = row.get(choices_field)  # type: ignore[arg-type]
            if not isinstance(choices, list) or len(choices) < 2:
                raise UserError(f"field {choices_field!r} must hold a list of at least two choices, got {choices!r}")
            out["choices"] = [str(c) for c in choices]
            answer = row.get(label_field)
            if isinstance(answer, str) and answer in out["choices"]:
                out["label"] = out["choices"].index(answer)
            else:
                try:
                    out["label"] = int(answer)  # type: ignore[arg-type]
                except (TypeError, ValueError):
                    raise UserError(f"field {label_field!r} must be the index or the text of the right choice, "
                                    f"got {answer!r}") from None
                if not 0 <= out["label"] < len(choices):
                    raise UserError(f"choice index {out['label']} out of range for {len(choices)} choices")
        else:
            answers = row.get(answer_field)  # type: ignore[arg-type]
            answers = [answers] if isinstance(answers, str) else list(answers or [])
            if not answers:
                raise UserError(f"field {answer_field!r} is empty in row {position}")
            out["answers"] = [str(a) for a in answers]
        return out

    def make_prompt(template_text: str) -> Callable[[Row], str]:
        return lambda r: template_text.format_map(r)

    masked = masked_template.replace("{mask}", "{{mask}}") if masked_template else None
    chosen = Template(
        name="custom", description=template, prompt=make_prompt(template), label_words=tuple(words),
        choices=(lambda r: [choice_prefix + c for c in r["choices"]]) if kind == "multiple_choice" else None,
        masked_prompt=(lambda r: masked.format_map(r).replace("{mask}", MASK)) if masked else None,
        target=target)
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
