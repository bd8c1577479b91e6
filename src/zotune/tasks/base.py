"""Core types of :mod:`zotune.tasks`: :class:`Example`, :class:`Task`, :class:`TaskInfo`, :class:`Template`.

A task turns raw dataset rows into :class:`Example` objects through a :class:`Template`:

* ``classification``: one prompt, fixed label-word continuations (``candidates``), ``gold`` index.
* ``multiple_choice``: one prompt, per-example continuations (COPA choices, ReCoRD entities).
* ``generation``: one prompt, gold ``answers``; training targets come from :meth:`Task.format_target`.

>>> ex = Example(prompt="a fine film It was", candidates=[" terrible", " great"], gold=1)
>>> ex.prompt + ex.candidates[ex.gold]
'a fine film It was great'
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

TaskKind = Literal["classification", "multiple_choice", "generation"]
Row = dict[str, Any]

#: Placeholder for the mask token in :attr:`Example.masked_prompt`; the scorer replaces it with the
#: tokenizer's own mask token (``<mask>`` for RoBERTa, ``[MASK]`` for BERT).
MASK = "{mask}"


@dataclass
class Example:
    """One scored unit: a prompt and the continuations a language model is asked to score.

    Attributes:
        prompt: text given to a causal LM; the continuation follows it directly.
        candidates: the continuations to score, each with the separator the template needs
            (``" great"`` after ``"It was"``, ``"Yes"`` after a newline). Empty for generation.
        gold: index of the correct candidate (``-1`` for generation).
        answers: gold answer strings (generation tasks; F1/EM take the max over them).
        id: a stable identifier (the dataset's own id where it has one).
        also_correct: other candidate indices that also count as correct at evaluation (ReCoRD
            answers that appear under several entity surface forms). Training uses ``gold``.
        masked_prompt: the prompt for a masked LM, with :data:`MASK` where the label word goes.
        meta: free-form extras (source fields); not used for scoring.

    >>> Example(prompt="Q?\\n", candidates=["No", "Yes"], gold=1).correct_indices
    (1,)
    """

    prompt: str
    candidates: list[str] = field(default_factory=list)
    gold: int = -1
    answers: list[str] = field(default_factory=list)
    id: str = ""
    also_correct: tuple[int, ...] = ()
    masked_prompt: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def correct_indices(self) -> tuple[int, ...]:
        """All candidate indices counted as correct: ``gold`` first, then :attr:`also_correct`."""
        return (self.gold, *self.also_correct)


@dataclass(frozen=True)
class Template:
    """How a raw row becomes an :class:`Example`.

    Attributes:
        name: the name passed as ``get_task(..., template=name)``.
        description: one line shown by :func:`zotune.tasks.available_tasks`.
        prompt: row -> prompt text (ends right where the candidate starts).
        label_words: classification verbalizer, indexed by the row's integer ``label``.
        choices: multiple choice: row -> candidate continuations (``label`` indexes them).
        masked_prompt: row -> masked-LM prompt containing :data:`MASK` (classification only).
            When ``None`` a masked LM gets ``prompt + MASK``.
        target: generation training target, formatted with ``answer``.
    """

    name: str
    description: str
    prompt: Callable[[Row], str]
    label_words: tuple[str, ...] = ()
    choices: Callable[[Row], list[str]] | None = None
    masked_prompt: Callable[[Row], str] | None = None
    target: str = " {answer}\n"

    def render(self, row: Row, kind: TaskKind, example_id: str) -> Example:
        """Render one normalised row (fields + ``label`` or ``answers``) as an :class:`Example`."""
        prompt = self.prompt(row)
        if kind == "classification":
            masked = self.masked_prompt(row) if self.masked_prompt else prompt + MASK
            return Example(prompt=prompt, candidates=list(self.label_words), gold=int(row["label"]),
                           id=example_id, masked_prompt=masked)
        if kind == "multiple_choice":
            assert self.choices is not None, f"template {self.name!r} has no choices()"
            return Example(prompt=prompt, candidates=self.choices(row), gold=int(row["label"]),
                           id=example_id, also_correct=tuple(row.get("also_correct", ())))
        return Example(prompt=prompt, answers=list(row["answers"]), id=example_id)


@dataclass(frozen=True)
class TaskInfo:
    """What :func:`zotune.tasks.available_tasks` reports about one task.

    ``needs`` is ``None`` when the task runs from the data shipped with zotune, otherwise what
    the user must provide (e.g. DROP: ``"needs user-provided data: --data-dir"``).
    """

    name: str
    kind: TaskKind
    description: str
    source: str
    metric: str
    templates: tuple[str, ...] = ()
    default_template: str | None = None
    needs: str | None = None
    aliases: tuple[str, ...] = ()
    protocol: str = ""


Splits = tuple[list[Example], list[Example], list[Example]]


class Task:
    """A task with its template and its train / dev / test examples (loaded on first access).

    >>> from zotune.tasks import get_task
    >>> task = get_task("sst2", k=16, data_seed=42)
    >>> task.kind, len(task.train), task.train[0].candidates
    ('classification', 32, [' terrible', ' great'])
    """

    def __init__(
        self,
        name: str,
        kind: TaskKind,
        *,
        template: Template,
        load_splits: Callable[[], Splits],
        metric: str,
        max_length: int = 256,
        train_as_classification: bool = True,
        info: TaskInfo | None = None,
        settings: dict[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.kind: TaskKind = kind
        self.template = template
        self.metric = metric
        #: default token budget (prompt + candidate) used by the scorer when none is given.
        self.max_length = max_length
        #: ``True``: the "ce" objective is cross-entropy over the candidates (MeZO
        #: ``--train_as_classification``); ``False``: token CE on the gold continuation only
        #: (MeZO's rule for COPA, ReCoRD, SQuAD, DROP).
        self.train_as_classification = train_as_classification
        self.info = info
        #: the arguments the task was built with (k, data_seed, caps, template, data_dir).
        self.settings = dict(settings or {})
        self._load_splits = load_splits
        self._splits: Splits | None = None

    @property
    def template_name(self) -> str:
        return self.template.name

    @property
    def label_words(self) -> list[str] | None:
        """Classification verbalizer in label order, or ``None`` for other kinds."""
        return list(self.template.label_words) if self.kind == "classification" else None

    def _ensure_loaded(self) -> Splits:
        if self._splits is None:
            self._splits = self._load_splits()
        return self._splits

    @property
    def train(self) -> list[Example]:
        return self._ensure_loaded()[0]

    @property
    def dev(self) -> list[Example]:
        return self._ensure_loaded()[1]

    @property
    def test(self) -> list[Example]:
        return self._ensure_loaded()[2]

    def split(self, name: str) -> list[Example]:
        """``"train"``, ``"dev"`` (alias ``"validation"``) or ``"test"``."""
        from zotune.errors import UserError

        key = {"train": 0, "dev": 1, "validation": 1, "val": 1, "test": 2}.get(name.lower())
        if key is None:
            raise UserError(f"unknown split {name!r}; use one of: train, dev, test")
        return self._ensure_loaded()[key]

    def format_target(self, answer: str) -> str:
        """The teacher-forced training continuation of a generation task (``" {answer}\\n"``)."""
        return self.template.target.format(answer=answer)

    def probe_prompts(self, n: int = 4) -> list[str]:
        """Prompts of up to ``n`` examples (from train, else dev, else test), for tokenizer checks."""
        for examples in self._ensure_loaded():
            if examples:
                return [ex.prompt for ex in examples[:n]]
        return []

    def __repr__(self) -> str:
        loaded = "not loaded" if self._splits is None else "/".join(str(len(s)) for s in self._splits)
        return f"Task({self.name!r}, kind={self.kind!r}, template={self.template.name!r}, {loaded})"


def render_rows(template: Template, kind: TaskKind, rows: Sequence[Row], prefix: str) -> list[Example]:
    """Render rows with ``template``; ids are the row's ``id`` field, else ``prefix-index``."""
    return [template.render(row, kind, str(row.get("id", f"{prefix}-{i}"))) for i, row in enumerate(rows)]
