"""In-context learning: put ``n`` solved training examples in front of every dev/test prompt.

This is the papers' ICL baseline (LM-BFF / MeZO: the model is not trained; it reads solved
examples of the task before each question). ``get_task(name, demonstrations=n)`` (CLI:
``--task-arg demonstrations=N`` with ``--steps 0``) uses it.

Demonstrations are drawn from the training split, balanced over the gold labels (round robin
over the classes, each class in a seeded order) and then shuffled with the same seed, so the
context is a pure function of (training split, n, seed). Each one is its prompt followed by
its gold continuation; they are separated by a blank line. Training examples are left as they
are (ICL is an evaluation baseline); prompts longer than the model's budget lose the oldest
tokens first (the scorer truncates from the left), so the question itself is always kept.

>>> from zotune.tasks import get_task
>>> task = get_task("sst2", data_seed=42, max_test=4, demonstrations=2)
>>> context, question = task.test[0].prompt.rsplit("\\n\\n", 1)
>>> context.count("\\n\\n") + 1, question == get_task("sst2", data_seed=42, max_test=4).test[0].prompt
(2, True)
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import numpy as np

from zotune.tasks.base import Example, Splits, Task

SEPARATOR = "\n\n"


def pick_demonstrations(task: Task, n: int, seed: int) -> list[Example]:
    """``n`` training examples, balanced over gold labels, in a seeded order."""
    train = task.train
    rng = np.random.default_rng([seed, n])
    if task.kind == "generation":
        order = rng.permutation(len(train))
        return [train[int(i)] for i in order[:n]]
    by_label: dict[int, list[Example]] = defaultdict(list)
    for i in rng.permutation(len(train)):
        by_label[train[int(i)].gold].append(train[int(i)])
    queues = [by_label[label] for label in sorted(by_label)]
    picked: list[Example] = []
    while len(picked) < n and any(queues):
        for queue in queues:
            if queue and len(picked) < n:
                picked.append(queue.pop(0))
    return [picked[int(i)] for i in rng.permutation(len(picked))]


def solved(task: Task, ex: Example) -> str:
    """The example's prompt with its gold continuation, as a demonstration."""
    if task.kind == "generation":
        return ex.prompt + task.format_target(ex.answers[0]).rstrip("\n")
    return ex.prompt + ex.candidates[ex.gold]


def with_demonstrations(task: Task, n: int, seed: int) -> Task:
    """Make ``task``'s dev and test prompts start with ``n`` solved training examples."""
    if n <= 0:
        return task
    load = task._load_splits

    def load_splits() -> Splits:
        train, dev, test = load()
        task._splits = (train, dev, test)  # pick_demonstrations reads task.train
        context = SEPARATOR.join(solved(task, ex) for ex in pick_demonstrations(task, n, seed)) + SEPARATOR

        def prepend(examples: list[Example]) -> list[Example]:
            return [dataclasses.replace(
                ex, prompt=context + ex.prompt,
                masked_prompt=None if ex.masked_prompt is None else context + ex.masked_prompt)
                for ex in examples]

        return train, prepend(dev), prepend(test)

    task._load_splits = load_splits
    task._splits = None
    task.settings["demonstrations"] = n
    return task
