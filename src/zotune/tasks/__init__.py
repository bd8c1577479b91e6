"""Tasks, prompts and objectives for zeroth-order fine-tuning.

* :func:`get_task` / :func:`available_tasks`: the benchmark tasks of MeZO and LM-BFF (SST-2,
  SST-5, TREC, SNLI, MNLI, RTE, BoolQ, CB, COPA, WiC, WSC, MultiRC, ReCoRD, SQuAD, DROP) with
  their templates and data splits, and ``"custom"`` tasks from your own files. The data ships
  with zotune (``zotune/data``, see ``SOURCES.md`` and ``LICENSES.md`` there); nothing is
  downloaded.
* :func:`make_objective`: a loss ``loss_fn(batch) -> scalar fp32 tensor`` for ZO optimizers
  (cross-entropy, ``-accuracy`` or ``-F1``).
* :func:`evaluate`: accuracy, or SQuAD F1 / EM for generation tasks.

>>> from zotune.tasks import get_task
>>> task = get_task("sst2", k=16, data_seed=42, template="sentiment")
>>> print(task.train[0].prompt + task.train[0].candidates[task.train[0].gold])
Review: ... overly melodramatic ...
Sentiment: negative
"""

from zotune.tasks.base import MASK, Example, Task, TaskInfo, TaskKind, Template
from zotune.tasks.custom import custom_task
from zotune.tasks.metrics import macro_f1, normalize_answer, squad_em, squad_f1, token_f1
from zotune.tasks.registry import LMBFF_SEEDS, available_tasks, canonical_task_name, get_task
from zotune.tasks.scoring import TaskScorer, evaluate, is_masked_lm, make_objective

__all__ = [
    "LMBFF_SEEDS",
    "MASK",
    "Example",
    "Task",
    "TaskInfo",
    "TaskKind",
    "TaskScorer",
    "Template",
    "available_tasks",
    "canonical_task_name",
    "custom_task",
    "evaluate",
    "get_task",
    "is_masked_lm",
    "macro_f1",
    "make_objective",
    "normalize_answer",
    "squad_em",
    "squad_f1",
    "token_f1",
]
