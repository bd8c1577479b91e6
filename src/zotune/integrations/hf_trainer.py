"""``ZOTrainer``: a ``transformers.Trainer`` that takes zeroth-order steps.

Only ``training_step`` (and ``create_optimizer``) are overridden, so every other Trainer
feature -- the inner loop, lr schedulers, logging, evaluation, callbacks, checkpointing and
resuming (the ZO state, including the step counter that drives the direction seeds, is in
``optimizer.state_dict()``) -- keeps working.

    >>> import tempfile, torch
    >>> from transformers import TrainingArguments
    >>> from zotune.integrations import ZOTrainer
    >>> from zotune.testing import tiny_causal_lm
    >>> model = tiny_causal_lm()                                 # any causal LM
    >>> train_ds = [{"input_ids": x, "labels": x} for x in torch.randint(0, 256, (32, 16))]
    >>> args = TrainingArguments(tempfile.mkdtemp(), learning_rate=1e-4, max_steps=5, per_device_train_batch_size=8,
    ...                          lr_scheduler_type="constant", report_to=[], save_strategy="no",
    ...                          disable_tqdm=True, logging_strategy="no", use_cpu=True)
    >>> trainer = ZOTrainer(model=model, args=args, train_dataset=train_ds,
    ...                     zo_optimizer="hizoo", zo_kwargs={"eps": 1e-3, "alpha": 1e-6})
    >>> result = trainer.train()  # doctest: +ELLIPSIS
    {'train_runtime': ...}
    >>> result.global_step, trainer.zo_optimizer.zo_state["forwards"]     # 3 forwards per HiZOO step
    (5, 15)

The closure is ``compute_loss(model, inputs)`` (the model's own loss on the batch) evaluated in
eval mode without gradients. Pass ``zo_loss_fn(model, inputs) -> loss`` for another objective
(e.g. a negative accuracy).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import Trainer

import zotune.optim as zo
from zotune.errors import UserError


class ZOTrainer(Trainer):
    """A Trainer whose optimizer is a zotune zeroth-order optimizer.

    Args:
        zo_optimizer: a name from ``zotune.optim.available()`` or a ready ``ZOOptimizer``.
        zo_kwargs: extra constructor arguments (``eps``, ``alpha``, ...); ``lr`` and
            ``weight_decay`` come from ``TrainingArguments``.
        zo_loss_fn: optional ``(model, inputs) -> scalar`` objective to minimise.
        All other arguments are ``transformers.Trainer``'s.
    """

    def __init__(self, *args: Any, zo_optimizer: str | zo.ZOOptimizer = "zosgd",
                 zo_kwargs: dict[str, Any] | None = None,
                 zo_loss_fn: Callable[[torch.nn.Module, dict], torch.Tensor] | None = None, **kwargs: Any):
        self.zo_optimizer_spec = zo_optimizer
        self.zo_kwargs = dict(zo_kwargs or {})
        self.zo_loss_fn = zo_loss_fn
        super().__init__(*args, **kwargs)
        if getattr(self.args, "fp16", False) or getattr(self.args, "bf16", False):
            raise UserError(
                "ZOTrainer does not use mixed-precision autocast/GradScaler (there are no gradients): "
                "set fp16=False and bf16=False and load the model in the dtype you want instead"
            )
        if self.args.gradient_accumulation_steps != 1:
            raise UserError("ZOTrainer needs gradient_accumulation_steps=1; raise the batch size instead")

    def create_optimizer(self):  # type: ignore[override]
        if self.optimizer is None:
            spec = self.zo_optimizer_spec
            if isinstance(spec, zo.ZOOptimizer):
                self.optimizer = spec
            else:
                kwargs = {"lr": self.args.learning_rate, "weight_decay": self.args.weight_decay,
                          "seed": self.args.seed, **self.zo_kwargs}
                self.optimizer = zo.create(spec, self.model, **kwargs)
        return self.optimizer

    @property
    def zo_optimizer(self) -> zo.ZOOptimizer:
        """The zotune optimizer itself (unwrapped from accelerate's ``AcceleratedOptimizer``)."""
        opt = self.optimizer
        if opt is None:
            raise RuntimeError("the optimizer is created by train() (or create_optimizer())")
        while not isinstance(opt, zo.ZOOptimizer):  # unwrap accelerate's AcceleratedOptimizer
            inner = getattr(opt, "optimizer", None)
            if inner is None:
                raise TypeError(f"ZOTrainer needs a zotune optimizer, got {type(self.optimizer).__name__}")
            opt = inner
        return opt

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: Any = None) -> torch.Tensor:  # type: ignore[override]
        inputs = self._prepare_inputs(inputs)
        optimizer = self.zo_optimizer

        def closure() -> torch.Tensor:
            if self.zo_loss_fn is not None:
                return self.zo_loss_fn(model, inputs)
            with self.compute_loss_context_manager():
                return self.compute_loss(model, inputs)

        was_training = model.training
        model.eval()
        try:
            loss = optimizer.step(closure)
        finally:
            model.train(was_training)
        # the Trainer's inner loop calls optimizer.step() next: it must not step again
        optimizer._closureless_step_is_noop = True
        return loss.detach().to(self.args.device)
