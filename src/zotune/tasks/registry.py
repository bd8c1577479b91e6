"""The built-in tasks, their data splits, and :func:`get_task` / :func:`available_tasks`.

Split protocols (LM-BFF, Gao et al. 2021, arXiv 2012.15723; MeZO, Malladi et al. 2023,
arXiv 2305.17333; README "Tasks"):

* **LM-BFF** (SST-2, SST-5, TREC, SNLI, MNLI, RTE): ``k`` examples per class for train and
  the same for dev. ``k=16`` reads LM-BFF's published splits for ``data_seed`` in
  {13, 21, 42, 87, 100}; ``k<16`` subsamples them per class; ``k>16`` samples ``k`` per
  class for train and another ``k`` for dev from the labelled pool (any ``data_seed``).
  Test is the LM-BFF test set, the same for every seed, capped at ``max_test`` examples drawn
  with the fixed seed 0.
* **MeZO** (BoolQ, CB, COPA, WiC, WSC, MultiRC, RTE-SuperGLUE, SQuAD): ``max_train`` (default
  1000) train and ``max_dev`` (default 500; 100 for CB and COPA) dev examples drawn together
  from the training file with ``data_seed`` (dev = the last ``max_dev`` of the draw, as MeZO
  does, so CB gets 150/100 and COPA 300/100); test = the labelled validation split capped at
  ``max_test`` with seed 0. BoolQ trains on the first 1000 rows of the HF train split and takes
  dev and test from validation, disjoint. SQuAD tests on the official dev set (both halves).
* **ReCoRD**: FewGLUE train (32) and dev32 (32); test = dev32 (the official sets are not shipped).
* **DROP**: not shipped; pass ``data_dir`` holding ``DROP/drop_dataset_dev.json`` (official format,
  optionally ``DROP/drop_dataset_train.json``).

>>> from zotune.tasks import get_task
>>> task = get_task("SST-2", data_seed=13)
>>> task.name, len(task.train), len(task.dev), len(task.test)
('sst2', 32, 32, 872)
"""

from __future__ import annotations

import functools
import logging
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zotune.errors import UserError
from zotune.tasks.base import Row, Splits, Task, TaskInfo, TaskKind, Template, render_rows
from zotune.tasks.data_files import (
    DataFiles,
    check_count,
    read_csv_rows,
    read_json,
    read_jsonl,
    read_tsv_with_header,
    seeded_permutation,
    seeded_subset,
)
from zotune.tasks.templates import TEMPLATES

logger = logging.getLogger(__name__)

LMBFF_SEEDS: tuple[int, ...] = (13, 21, 42, 87, 100)
#: Seed of every test-set sample, fixed so that the test set does not change with ``data_seed``.
TEST_SAMPLE_SEED = 0

NLI3_LABELS = {"entailment": 0, "neutral": 1, "contradiction": 2}
RTE_LABELS = {"entailment": 0, "not_entailment": 1}
CB_LABELS = {"entailment": 0, "contradiction": 1, "neutral": 2}


@dataclass(frozen=True)
class SplitRequest:
    """The split arguments of :func:`get_task`, passed to every loader."""

    files: DataFiles
    k: int
    data_seed: int
    max_train: int | None
    max_dev: int | None
    max_test: int | None


RowSplits = tuple[list[Row], list[Row], list[Row]]


@dataclass(frozen=True)
class TaskSpec:
    info: TaskInfo
    load_rows: Callable[[SplitRequest], RowSplits]
    max_length: int = 256
    train_as_classification: bool = True


# --------------------------------------------------------------------------------------------
# LM-BFF tasks


def _kshot_path(files: DataFiles, folder: str, seed: int, name: str) -> Path:
    """``<folder>/k-shot/16-<seed>/<name>``; for test files (identical across seeds) any seed folder."""
    wanted = ("k-shot", f"16-{seed}", name)
    found = files.find(folder, *wanted)
    if found is None and name.startswith("test"):
        for other in LMBFF_SEEDS:
            found = found or files.find(folder, "k-shot", f"16-{other}", name)
    return found or files.path(folder, *wanted)


def _label_then_text(rows: list[list[str]], field: str) -> list[Row]:
    return [{field: text, "label": int(label)} for label, text in rows]


def _sst2_tsv(path: Path) -> list[Row]:
    return [{"sentence": r["sentence"], "label": int(r["label"])} for r in read_tsv_with_header(path)]


def _nli_glue_tsv(path: Path, labels: dict[str, int], label_column: str) -> list[Row]:
    return [{"premise": r["sentence1"], "hypothesis": r["sentence2"], "label": labels[r[label_column]]}
            for r in read_tsv_with_header(path) if r.get(label_column) in labels]


def _nli_pairs_json(path: Path, labels: dict[str, int]) -> list[Row]:
    """PPF ``glue_pretrain`` pools: ``{"<i>": {text_a, text_b, label}}``."""
    return [{"premise": v["text_a"], "hypothesis": v["text_b"], "label": labels[v["label"]]}
            for v in read_json(path).values() if v["label"] in labels]


def _nli_jsonl(path: Path, labels: dict[str, int]) -> list[Row]:
    return [{"premise": r["premise"], "hypothesis": r["hypothesis"], "label": labels[r["label"]]}
            for r in read_jsonl(path) if r["label"] in labels]


@dataclass(frozen=True)
class LmbffData:
    """Where one LM-BFF task's files are and how to read them."""

    read_kshot: Callable[[DataFiles, int, str], list[Row]]  # (files, seed, "train"|"dev")
    read_test: Callable[[DataFiles, int], list[Row]]
    read_pool: Callable[[DataFiles], list[Row]]


def _sst2_data() -> LmbffData:
    return LmbffData(
        read_kshot=lambda f, s, split: _sst2_tsv(_kshot_path(f, "SST-2", s, f"{split}.tsv")),
        read_test=lambda f, s: _sst2_tsv(_kshot_path(f, "SST-2", s, "test.tsv")),
        read_pool=lambda f: _sst2_tsv(f.path("SST-2", "original", "train.tsv")),
    )


def _csv_task_data(folder: str) -> LmbffData:
    def kshot(f: DataFiles, s: int, split: str) -> list[Row]:
        return _label_then_text(read_csv_rows(_kshot_path(f, folder, s, f"{split}.csv")), "sentence")

    def pool(f: DataFiles) -> list[Row]:
        if folder == "sst-5":  # DPT's original SST-5 is a headerless tsv "label<TAB>sentence"
            return _label_then_text(read_csv_rows(f.path(folder, "original", "train.tsv"), "\t"), "sentence")
        return _label_then_text(read_csv_rows(f.path(folder, "original", "train.csv")), "sentence")

    return LmbffData(read_kshot=kshot, read_test=lambda f, s: kshot(f, s, "test"), read_pool=pool)


def _snli_data() -> LmbffData:
    def test(f: DataFiles, s: int) -> list[Row]:
        rows = read_tsv_with_header(f.path("SNLI", "original", "test.tsv"))
        return [{"premise": r["premise"], "hypothesis": r["hypothesis"], "label": int(r["label"])}
                for r in rows if r["label"] in ("0", "1", "2")]

    def pool(f: DataFiles) -> list[Row]:
        return (_nli_pairs_json(f.path("SNLI", "pcp-subset", "train.json"), NLI3_LABELS)
                + _nli_pairs_json(f.path("SNLI", "pcp-subset", "dev.json"), NLI3_LABELS))

    return LmbffData(
        read_kshot=lambda f, s, split: _nli_glue_tsv(_kshot_path(f, "SNLI", s, f"{split}.tsv"), NLI3_LABELS,
                                                     "gold_label"),
        read_test=test, read_pool=pool)


def _mnli_data() -> LmbffData:
    def kshot(f: DataFiles, s: int, split: str) -> list[Row]:
        name = "train.tsv" if split == "train" else "dev_matched.tsv"
        return _nli_glue_tsv(_kshot_path(f, "MNLI", s, name), NLI3_LABELS, "gold_label")

    def pool(f: DataFiles) -> list[Row]:
        return (_nli_pairs_json(f.path("MNLI", "pcp-subset", "train.json"), NLI3_LABELS)
                + _nli_pairs_json(f.path("MNLI", "pcp-subset", "dev.json"), NLI3_LABELS))

    return LmbffData(read_kshot=kshot,
                     read_test=lambda f, s: _nli_jsonl(f.path("MNLI", "original", "dev.jsonl"), NLI3_LABELS),
                     read_pool=pool)


def _rte_data() -> LmbffData:
    return LmbffData(
        read_kshot=lambda f, s, split: _nli_glue_tsv(_kshot_path(f, "RTE", s, f"{split}.tsv"), RTE_LABELS, "label"),
        read_test=lambda f, s: _nli_glue_tsv(_kshot_path(f, "RTE", s, "test.tsv"), RTE_LABELS, "label"),
        read_pool=lambda f: _nli_jsonl(f.path("RTE", "superglue", "train.jsonl"), RTE_LABELS),
    )


def _per_class(rows: Sequence[Row], k: int, seed: int, need: int) -> tuple[list[Row], list[Row]]:
    """LM-BFF ``generate_k_shot_data``: shuffle with ``seed``, then per class the first ``k`` rows
    go to the first list and the next ``need - k`` rows to the second. A class with fewer rows
    gives what it has, as LM-BFF does (TREC's "Expression" class has 86 rows, so at k=512 it
    gets 86 train and no dev examples); a warning says so."""
    by_label: dict[int, list[Row]] = defaultdict(list)
    for i in seeded_permutation(len(rows), seed):
        by_label[rows[i]["label"]].append(rows[i])
    first: list[Row] = []
    second: list[Row] = []
    for label in sorted(by_label):
        members = by_label[label]
        if len(members) < need:
            logger.warning("k=%d: label %d has only %d examples in the pool (wanted %d); using all of them",
                           k, label, len(members), need)
        first += members[:k]
        second += members[k:need]
    return first, second


def _lmbff_loader(data: LmbffData) -> Callable[[SplitRequest], RowSplits]:
    def load(req: SplitRequest) -> RowSplits:
        if req.k <= 16:
            if req.data_seed not in LMBFF_SEEDS:
                raise UserError(f"data_seed={req.data_seed} has no LM-BFF k-shot split; use one of "
                                f"{', '.join(map(str, LMBFF_SEEDS))} (or k>16 to sample from the pool with any seed)")
            train = data.read_kshot(req.files, req.data_seed, "train")
            dev = data.read_kshot(req.files, req.data_seed, "dev")
            if req.k < 16:
                train = _per_class(train, req.k, req.data_seed, req.k)[0]
                dev = _per_class(dev, req.k, req.data_seed, req.k)[0]
        else:
            train, dev = _per_class(data.read_pool(req.files), req.k, req.data_seed, 2 * req.k)
        test = data.read_test(req.files, req.data_seed)
        return (seeded_subset(train, req.max_train, req.data_seed), seeded_subset(dev, req.max_dev, req.data_seed),
                seeded_subset(test, req.max_test, TEST_SAMPLE_SEED))

    return load


# --------------------------------------------------------------------------------------------
# MeZO protocol (SuperGLUE, SQuAD)


def _mezo_train_dev(pool: Sequence[Row], n_train: int, n_dev: int, seed: int) -> tuple[list[Row], list[Row]]:
    """MeZO: draw ``n_train + n_dev`` rows with ``seed``; dev is the last ``n_dev`` of the draw."""
    drawn = [pool[i] for i in seeded_permutation(len(pool), seed)[: n_train + n_dev]]
    if n_dev == 0:
        return drawn, []
    if len(drawn) <= n_dev:
        raise UserError(f"max_dev={n_dev} leaves no training examples (the pool has {len(pool)}); lower max_dev")
    return drawn[:-n_dev][:n_train], drawn[-n_dev:]


def _mezo_loader(read_train: Callable[[DataFiles], list[Row]], read_test: Callable[[DataFiles], list[Row]],
                 default_dev: int = 500) -> Callable[[SplitRequest], RowSplits]:
    def load(req: SplitRequest) -> RowSplits:
        n_train = 1000 if req.max_train is None else req.max_train
        n_dev = default_dev if req.max_dev is None else req.max_dev
        train, dev = _mezo_train_dev(read_train(req.files), n_train, n_dev, req.data_seed)
        test = seeded_subset(read_test(req.files), req.max_test, TEST_SAMPLE_SEED)
        return train, dev, test

    return load


def _superglue(folder: str, split: str, convert: Callable[[dict[str, Any]], Row]) -> Callable[[DataFiles], list[Row]]:
    return lambda files: [convert(r) for r in read_jsonl(files.path(folder, "superglue", f"{split}.jsonl"))]


def _boolq_row(r: dict[str, Any]) -> Row:
    answer = r["label"] if "label" in r else r["answer"]
    return {"passage": r["passage"], "question": r["question"], "label": 0 if answer else 1}  # 0 = Yes


def _boolq_loader(req: SplitRequest) -> RowSplits:
    n_train = 1000 if req.max_train is None else req.max_train
    n_dev = 500 if req.max_dev is None else req.max_dev
    train_pool = [_boolq_row(r) for r in read_jsonl(req.files.path("BoolQ", "hf-train-first1000", "boolq_train.jsonl"))]
    val = _superglue("BoolQ", "val", _boolq_row)(req.files)
    order = seeded_permutation(len(val), TEST_SAMPLE_SEED)
    n_test = len(val) - n_dev if req.max_test is None else min(req.max_test, len(val) - n_dev)
    if n_test <= 0:
        raise UserError(f"max_dev={n_dev} uses all {len(val)} BoolQ validation examples; lower max_dev")
    test = [val[i] for i in order[:n_test]]
    dev_pool = [val[i] for i in sorted(order[n_test:])]
    return (seeded_subset(train_pool, n_train, req.data_seed), seeded_subset(dev_pool, n_dev, req.data_seed), test)


@functools.lru_cache(maxsize=8)
def _multirc_file_rows(path: Path) -> list[Row]:
    """One row per answer option (cached; rows are shared, never modify them)."""
    rows = []
    for item in read_jsonl(path):
        paragraph = item["passage"]["text"]
        for question in item["passage"]["questions"]:
            for answer in question["answers"]:
                rows.append({"paragraph": paragraph, "question": question["question"], "answer": answer["text"],
                             "label": int(answer["label"]), "id": f"{item['idx']}-{question['idx']}-{answer['idx']}"})
    return rows


def _multirc_rows(split: str) -> Callable[[DataFiles], list[Row]]:
    return lambda files: _multirc_file_rows(files.path("MultiRC", "superglue", f"{split}.jsonl"))


def _record_rows(split: str) -> Callable[[DataFiles], list[Row]]:
    """FewGLUE ReCoRD: one row per query; entities deduplicated and sorted as in HF ``super_glue``."""

    def read(files: DataFiles) -> list[Row]:
        rows = []
        for item in read_jsonl(files.path("ReCoRD", "fewglue32", f"{split}.jsonl")):
            text = item["passage"]["text"]
            entities = sorted({text[e["start"]: e["end"] + 1] for e in item["passage"]["entities"]})
            for qa in item["qas"]:
                answers = list(dict.fromkeys(a["text"] for a in qa["answers"]))
                correct = [entities.index(a) for a in answers if a in entities]
                if not correct:
                    continue
                rows.append({"passage": text, "query": qa["query"], "entities": entities, "answers": answers,
                             "label": correct[0], "also_correct": tuple(correct[1:]), "id": str(qa["idx"])})
        return rows

    return read


def _record_loader(req: SplitRequest) -> RowSplits:
    train = _record_rows("train")(req.files)
    dev32 = _record_rows("dev32")(req.files)
    return (seeded_subset(train, req.max_train, req.data_seed), seeded_subset(dev32, req.max_dev, req.data_seed),
            seeded_subset(dev32, req.max_test, TEST_SAMPLE_SEED))


@functools.lru_cache(maxsize=8)
def _squad_file_rows(path: Path) -> list[Row]:
    """Flattened SQuAD json (cached; rows are shared, never modify them)."""
    return _squad_rows(read_json(path))


def _squad_rows(data: dict[str, Any]) -> list[Row]:
    rows = []
    for article in data["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                answers = [a["text"] for a in qa["answers"]]
                if answers:
                    rows.append({"title": article["title"], "context": paragraph["context"],
                                 "question": qa["question"], "answers": answers, "id": qa["id"]})
    return rows


def _squad_loader(req: SplitRequest) -> RowSplits:
    return _mezo_loader(
        lambda f: _squad_file_rows(f.path("SQuAD", "train-subset", "test-v1.1.json")),
        lambda f: (_squad_file_rows(f.path("SQuAD", "dev-v1.1-split", "dev-v1.1.json"))
                   + _squad_file_rows(f.path("SQuAD", "dev-v1.1-split", "test-v1.1.json"))),
    )(req)


DROP_HELP = ("DROP is not shipped with zotune (its dev set is 13 MB and no smaller public copy was found). "
             "Download the official DROP data yourself and pass data_dir=<folder> (CLI: --data-dir <folder>) "
             "with <folder>/DROP/drop_dataset_dev.json (and optionally <folder>/DROP/drop_dataset_train.json)")


def _drop_answer_strings(answer: dict[str, Any]) -> list[str]:
    if answer.get("number"):
        return [str(answer["number"])]
    if answer.get("spans"):
        return [" ".join(answer["spans"])]
    date = answer.get("date") or {}
    text = " ".join(str(date[key]) for key in ("day", "month", "year") if date.get(key))
    return [text] if text else []


def _drop_rows(path: Path) -> list[Row]:
    """Official DROP json: ``{passage_id: {passage, qa_pairs: [{question, answer, validated_answers}]}}``.
    Multi-span answers are joined with spaces (SQuAD-style F1, as MeZO scores DROP)."""
    rows = []
    for passage_id, item in read_json(path).items():
        for qa in item["qa_pairs"]:
            answers: list[str] = []
            for answer in [qa["answer"], *qa.get("validated_answers", [])]:
                answers += _drop_answer_strings(answer)
            answers = list(dict.fromkeys(answers))
            if answers:
                rows.append({"context": item["passage"], "question": qa["question"], "answers": answers,
                             "id": qa.get("query_id", f"{passage_id}-{len(rows)}")})
    return rows


def _drop_loader(req: SplitRequest) -> RowSplits:
    dev_path = req.files.find("DROP", "drop_dataset_dev.json")
    if dev_path is None:
        raise UserError(DROP_HELP)
    train_path = req.files.find("DROP", "drop_dataset_train.json")
    n_train = 1000 if req.max_train is None else req.max_train
    n_dev = 500 if req.max_dev is None else req.max_dev
    evaluation = _drop_rows(dev_path)
    if train_path is not None:
        train, dev = _mezo_train_dev(_drop_rows(train_path), n_train, n_dev, req.data_seed)
        return train, dev, seeded_subset(evaluation, req.max_test, TEST_SAMPLE_SEED)
    # Only the dev file: test = a fixed sample of it, train/dev drawn from the rest.
    order = seeded_permutation(len(evaluation), TEST_SAMPLE_SEED)
    n_test = len(evaluation) // 2 if req.max_test is None else min(req.max_test, len(evaluation) // 2)
    rest = [evaluation[i] for i in sorted(order[n_test:])]
    train, dev = _mezo_train_dev(rest, n_train, n_dev, req.data_seed)
    return train, dev, [evaluation[i] for i in order[:n_test]]


# --------------------------------------------------------------------------------------------
# The registry

_LMBFF_PROTOCOL = ("LM-BFF: k per class (k=16: published splits, data_seed in 13/21/42/87/100; k>16: sampled "
                   "from the pool), test capped at max_test with seed 0")
_MEZO_PROTOCOL = "MeZO: 1000 train / {dev} dev drawn with data_seed from train; test = labelled val capped at max_test"
_LMBFF_SOURCE = "LM-BFF k-shot splits (PowerfulPromptFT)"


def _info(name: str, kind: TaskKind, description: str, source: str, metric: str, protocol: str,
          aliases: tuple[str, ...] = (), needs: str | None = None) -> TaskInfo:
    templates = TEMPLATES[name]
    return TaskInfo(name=name, kind=kind, description=description, source=source, metric=metric,
                    templates=tuple(templates), default_template=next(iter(templates)), needs=needs,
                    aliases=aliases, protocol=protocol)


def _sg(folder: str, split: str, convert: Callable[[dict[str, Any]], Row]) -> Callable[[DataFiles], list[Row]]:
    return _superglue(folder, split, convert)


def _nli_row(labels: dict[str, int]) -> Callable[[dict[str, Any]], Row]:
    return lambda r: {"premise": r["premise"], "hypothesis": r["hypothesis"], "label": labels[r["label"]]}


def _copa_row(r: dict[str, Any]) -> Row:
    fields = ("premise", "choice1", "choice2", "question", "label")
    return {key: r[key] for key in fields} | {"id": str(r["idx"])}


def _wic_row(r: dict[str, Any]) -> Row:
    return {"word": r["word"], "sentence1": r["sentence1"], "sentence2": r["sentence2"], "label": int(r["label"]),
            "id": str(r["idx"])}


def _wsc_row(r: dict[str, Any]) -> Row:
    return {"text": r["text"], "span1_text": r["target"]["span1_text"], "span2_text": r["target"]["span2_text"],
            "label": int(r["label"]), "id": str(r["idx"])}


SPECS: dict[str, TaskSpec] = {
    "sst2": TaskSpec(_info("sst2", "classification", "SST-2 binary sentiment (movie reviews)", _LMBFF_SOURCE,
                           "accuracy", _LMBFF_PROTOCOL, aliases=("sst-2",)), _lmbff_loader(_sst2_data())),
    "sst5": TaskSpec(_info("sst5", "classification", "SST-5 five-way sentiment", _LMBFF_SOURCE, "accuracy",
                           _LMBFF_PROTOCOL, aliases=("sst-5",)), _lmbff_loader(_csv_task_data("sst-5"))),
    "trec": TaskSpec(_info("trec", "classification", "TREC question type (6 coarse classes)", _LMBFF_SOURCE,
                           "accuracy", _LMBFF_PROTOCOL), _lmbff_loader(_csv_task_data("trec"))),
    "snli": TaskSpec(_info("snli", "classification", "SNLI 3-way entailment",
                           _LMBFF_SOURCE + "; test: official SNLI test", "accuracy", _LMBFF_PROTOCOL),
                     _lmbff_loader(_snli_data())),
    "mnli": TaskSpec(_info("mnli", "classification", "MultiNLI 3-way entailment (test: dev_matched)",
                           _LMBFF_SOURCE + "; test: official dev_matched", "accuracy", _LMBFF_PROTOCOL,
                           aliases=("multinli",)), _lmbff_loader(_mnli_data())),
    "rte": TaskSpec(_info("rte", "classification", "RTE 2-way entailment (LM-BFF splits; test = GLUE dev)",
                          _LMBFF_SOURCE, "accuracy", _LMBFF_PROTOCOL), _lmbff_loader(_rte_data())),
    "rte-superglue": TaskSpec(
        _info("rte-superglue", "classification", "RTE in the MeZO OPT setting (SuperGLUE jsonl)",
              "SuperGLUE v2", "accuracy", _MEZO_PROTOCOL.format(dev=500), aliases=("superglue-rte",)),
        _mezo_loader(_sg("RTE", "train", _nli_row(RTE_LABELS)), _sg("RTE", "val", _nli_row(RTE_LABELS)))),
    "boolq": TaskSpec(
        _info("boolq", "classification", "BoolQ yes/no questions about a passage",
              "SuperGLUE v2 val + first 1000 rows of HF boolq train", "accuracy",
              "MeZO: 1000 train (HF train first 1000) / 500 dev and max_test test from val, disjoint"),
        _boolq_loader, max_length=512),
    "cb": TaskSpec(_info("cb", "classification", "CommitmentBank 3-way entailment", "SuperGLUE v2", "accuracy",
                         _MEZO_PROTOCOL.format(dev=100)),
                   _mezo_loader(_sg("CB", "train", _nli_row(CB_LABELS)), _sg("CB", "val", _nli_row(CB_LABELS)), 100)),
    "copa": TaskSpec(_info("copa", "multiple_choice", "COPA cause/effect, 2 choices", "SuperGLUE v2", "accuracy",
                           _MEZO_PROTOCOL.format(dev=100)),
                     _mezo_loader(_sg("COPA", "train", _copa_row), _sg("COPA", "val", _copa_row), 100),
                     train_as_classification=False),
    "wic": TaskSpec(_info("wic", "classification", "Word-in-Context: same meaning?", "SuperGLUE v2", "accuracy",
                          _MEZO_PROTOCOL.format(dev=500)),
                    _mezo_loader(_sg("WiC", "train", _wic_row), _sg("WiC", "val", _wic_row))),
    "wsc": TaskSpec(_info("wsc", "classification", "Winograd schema: does the pronoun refer to the span?",
                          "SuperGLUE v2", "accuracy", _MEZO_PROTOCOL.format(dev=500)),
                    _mezo_loader(_sg("WSC", "train", _wsc_row), _sg("WSC", "val", _wsc_row))),
    "multirc": TaskSpec(_info("multirc", "classification", "MultiRC: is this answer correct? (per answer option)",
                              "SuperGLUE v2", "accuracy", _MEZO_PROTOCOL.format(dev=500)),
                        _mezo_loader(_multirc_rows("train"), _multirc_rows("val")), max_length=512),
    "record": TaskSpec(_info("record", "multiple_choice", "ReCoRD cloze over passage entities",
                             "FewGLUE 32 train + dev32", "accuracy", "FewGLUE: 32 train / dev32; test = dev32"),
                       _record_loader, max_length=512, train_as_classification=False),
    "squad": TaskSpec(_info("squad", "generation", "SQuAD v1.1 extractive QA, generated answers",
                            "SQuAD v1.1 official dev (test) + train subset (train/dev)", "f1",
                            "MeZO: 1000 train / 500 dev from the train subset; test = official dev capped at "
                            "max_test", aliases=("squad1", "squadv1", "squad11")),
                      _squad_loader, max_length=512, train_as_classification=False),
    "drop": TaskSpec(_info("drop", "generation", "DROP discrete reasoning QA, generated answers",
                           "user-provided official DROP json", "f1",
                           "MeZO: 1000 train / 500 dev; test from the dev file",
                           needs="needs user-provided data: --data-dir (DROP/drop_dataset_dev.json)"),
                     _drop_loader, max_length=512, train_as_classification=False),
}

CUSTOM_INFO = TaskInfo(
    name="custom", kind="classification",
    description="your own jsonl/json/csv/tsv file, folder of train/dev/test files, or local `datasets` "
                "dataset; kind chosen by label_words / choices_field / answer_field",
    source="user-provided", metric="accuracy or f1", needs="needs user-provided data: path=...",
    protocol="one file: 10% test (seed 0), 10% dev (data_seed), rest train")

_ALIASES: dict[str, str] = {}
for _name, _spec in SPECS.items():
    for _alias in (_name, *_spec.info.aliases):
        _ALIASES[re.sub(r"[\s_\-.]", "", _alias.lower())] = _name
_ALIASES["custom"] = "custom"


def canonical_task_name(name: str) -> str:
    """``"SST-2"`` -> ``"sst2"``; raises :class:`UserError` listing the valid names when unknown."""
    key = re.sub(r"[\s_\-.]", "", str(name).lower())
    if key not in _ALIASES:
        raise UserError(f"unknown task {name!r}; valid tasks: {', '.join([*SPECS, 'custom'])}")
    return _ALIASES[key]


def available_tasks() -> list[TaskInfo]:
    """Every built-in task plus ``custom``, with kind, data source, templates and requirements.

    >>> [t.name for t in available_tasks()][:3]
    ['sst2', 'sst5', 'trec']
    """
    return [spec.info for spec in SPECS.values()] + [CUSTOM_INFO]


def _resolve_template(task_name: str, template: str | None) -> Template:
    templates = TEMPLATES[task_name]
    if template is None:
        return next(iter(templates.values()))
    key = template.strip().lower()
    if key not in templates:
        raise UserError(f"unknown template {template!r} for task {task_name!r}; valid templates: "
                        f"{', '.join(templates)}")
    return templates[key]


def get_task(
    name: str,
    *,
    k: int = 16,
    data_seed: int = 42,
    max_train: int | None = None,
    max_dev: int | None = None,
    max_test: int | None = 1000,
    data_dir: str | Path | None = None,
    template: str | None = None,
    demonstrations: int = 0,
    **custom_options: Any,
) -> Task:
    """Build a task by name (case-insensitive; ``"SST-2"``, ``"sst-2"`` and ``"sst2"`` are the same).

    The data is read and the splits are drawn here (well under a second for every built-in
    task), so a bad seed or a missing file raises :class:`UserError` at this call.

    Args:
        name: a name from :func:`available_tasks`, or ``"custom"`` (see
            :func:`zotune.tasks.custom.custom_task` for its options, passed as keywords;
            ``data_dir`` serves as its ``path`` when no ``path`` is given).
        k: examples per class for the LM-BFF tasks (ignored by the others).
        data_seed: seed of the train/dev sample (for k=16 LM-BFF tasks: which published split).
        max_train, max_dev: caps; ``None`` = the protocol's default (all of the k-shot split;
            1000 / 500 for MeZO tasks, dev 100 for CB and COPA).
        max_test: cap on the test set (sampled with the fixed seed 0); ``None`` = all of it.
        data_dir: folder laid out like ``zotune/data`` whose files take precedence over the
            shipped ones (required for DROP).
        template: a template name (``available_tasks()`` lists them per task); default is the first.
        demonstrations: in-context learning: prefix every dev/test prompt with this many solved
            training examples (see :mod:`zotune.tasks.demonstrations`); 0 = none.

    Returns:
        a :class:`Task` with ``train`` / ``dev`` / ``test`` lists of :class:`Example`.

    >>> task = get_task("copa", data_seed=0)
    >>> len(task.train), len(task.dev), len(task.test)
    (300, 100, 100)
    """
    canonical = canonical_task_name(name)
    for value, what in ((max_train, "max_train"), (max_dev, "max_dev"), (max_test, "max_test")):
        check_count(value, what)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise UserError(f"k must be a positive integer, got {k!r}")
    if not isinstance(data_seed, int) or isinstance(data_seed, bool):
        raise UserError(f"data_seed must be an integer, got {data_seed!r}")
    if not isinstance(demonstrations, int) or isinstance(demonstrations, bool) or demonstrations < 0:
        raise UserError(f"demonstrations must be an integer >= 0, got {demonstrations!r}")
    if demonstrations:
        from zotune.tasks.demonstrations import with_demonstrations

        task = get_task(name, k=k, data_seed=data_seed, max_train=max_train, max_dev=max_dev, max_test=max_test,
                        data_dir=data_dir, template=template, **custom_options)
        with_demonstrations(task, demonstrations, data_seed)
        task.train  # noqa: B018  (load now, as below)
        return task
    if canonical == "custom":
        from zotune.tasks.custom import custom_task

        if "path" not in custom_options and data_dir is not None:
            custom_options["path"] = data_dir  # `--data-dir` names the custom data too
        return custom_task(data_seed=data_seed, max_train=max_train, max_dev=max_dev, max_test=max_test,
                           template=template, **custom_options)
    if custom_options:
        raise UserError(f"unexpected options for task {canonical!r}: {', '.join(sorted(custom_options))} "
                        "(path/label_words/... are for task 'custom')")
    spec = SPECS[canonical]
    chosen = _resolve_template(canonical, template)
    files = DataFiles(data_dir)
    request = SplitRequest(files, k, data_seed, max_train, max_dev, max_test)
    if canonical == "drop" and files.find("DROP", "drop_dataset_dev.json") is None:
        raise UserError(DROP_HELP)

    def load_splits() -> Splits:
        train, dev, test = spec.load_rows(request)
        kind = spec.info.kind
        return (render_rows(chosen, kind, train, "train"), render_rows(chosen, kind, dev, "dev"),
                render_rows(chosen, kind, test, "test"))

    settings = {"k": k, "data_seed": data_seed, "max_train": max_train, "max_dev": max_dev, "max_test": max_test,
                "data_dir": None if data_dir is None else str(data_dir), "template": chosen.name}
    task = Task(canonical, spec.info.kind, template=chosen, load_splits=load_splits, metric=spec.info.metric,
                max_length=spec.max_length, train_as_classification=spec.train_as_classification,
                info=spec.info, settings=settings)
    task.train  # noqa: B018  (load now, so that bad seeds and missing files fail here, not mid-run)
    return task
