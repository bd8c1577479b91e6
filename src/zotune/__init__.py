"""zotune: memory-efficient zeroth-order fine-tuning of language models.

The optimizers live in :mod:`zotune.optim`; tasks, models and the training loop in
:mod:`zotune.tasks`, :mod:`zotune.models` and :mod:`zotune.train`.
"""

__version__ = "0.1.0"
