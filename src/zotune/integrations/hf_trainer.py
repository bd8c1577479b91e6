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

The closure is ``compute_loss(model, inputs, num_items_in_batch=...)`` -- the loss exactly as
``Trainer`` computes it for a first-order step, normalised by the number of predicted tokens
of the (global) batch -- evaluated in eval mode without gradients. Pass
``zo_loss_fn(model, inputs) -> loss`` for another objective (e.g. a negative accuracy).

**Activation cache.** When every trainable parameter lies at or above decoder block ``j``
(``top:K``, LoRA on the top blocks, the final norm; see :mod:`zotune.models.activation_cache`),
the trainer attaches the frozen-bottom activation cache: the embeddings and blocks below ``j``
run once per example and every later forward of that example (both forwards of a ZO step, later
epochs, repeated evaluations) runs only the upper blocks. It follows the rules of ``zotune
train``: on where it is exact, off with a one-line reason otherwise (prefix tuning, trainable
embeddings, block 0 trainable, ...), ``zo_cache_mb`` bounds its memory (0 switches it off).
During ZO steps and evaluation the model runs with ``config.use_cache = False`` (no KV cache
is needed there; the activation cache only serves such forwards). The reason is logged at INFO
level and kept in ``trainer.zo_cache_message``; ``trainer.zo_cache`` is the cache (its
``stats``), or None. The hooks stay on the model for the trainer's life, so an ``evaluate()``
after ``train()`` reuses the stored rows; ``trainer.zo_cache.close()`` removes them.

Log lines carry ``projected_grad`` (the mean ``|c|``, ``c = (L+ - L-) / 2 eps``, over the
steps since the last log line) instead of ``grad_norm``, which would always read 0.0.

**Several processes** (``torchrun`` or ``accelerate launch --multi_gpu``, so that the Trainer
runs in ``ParallelMode.DISTRIBUTED``): the optimizer gets a
:class:`~zotune.distributed.ProcessGroupComm`, so every rank draws the same directions,
evaluates its own batch, and only the loss scalars are all-reduced; the ranks' weights stay
bit-identical (checked every ``zo_check_every`` steps and at the end of ``train()``). The model
is *not* wrapped in ``DistributedDataParallel`` (there are no gradients to reduce). Other
parallel modes (``nn.DataParallel`` over several GPUs in one process, DeepSpeed, the Trainer's
FSDP, TPU, SageMaker) are refused with a message.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import Trainer
from transformers.training_args import ParallelMode
from transformers.utils import logging

import zotune.optim as zo
from zotune.errors import UserError

logger = logging.get_logger(__name__)


class ZOTrainer(Trainer):
    """A Trainer whose optimizer is a zotune zeroth-order optimizer.

    Args:
        zo_optimizer: a name from ``zotune.optim.available()`` or a ready ``ZOOptimizer``
            (on several processes, built with ``comm=zotune.distributed.ProcessGroupComm()``).
        zo_kwargs: extra constructor arguments (``eps``, ``alpha``, ...); ``lr`` and
            ``weight_decay`` come from ``TrainingArguments``.
        zo_loss_fn: optional ``(model, inputs) -> scalar`` objective to minimise.
        zo_check_every: on several processes, check every this many steps that the ranks
            hold bit-identical weights (0: only at the end of ``train()``).
        zo_cache_mb: memory bound (MiB) of the frozen-bottom activation cache, attached when the
            trainer is built if it can be exact (see the module docs); 0 switches it off.
        All other arguments are ``transformers.Trainer``'s.
    """

    def __init__(self, *args: Any, zo_optimizer: str | zo.ZOOptimizer = "zosgd",
                 zo_kwargs: dict[str, Any] | None = None,
                 zo_loss_fn: Callable[[torch.nn.Module, dict], torch.Tensor] | None = None,
                 zo_check_every: int = 100, zo_cache_mb: float = 1024.0, **kwargs: Any):
        self.zo_optimizer_spec = zo_optimizer
        self.zo_kwargs = dict(zo_kwargs or {})
        self.zo_loss_fn = zo_loss_fn
        self.zo_check_every = int(zo_check_every)
        self._zo_projected: list[float] = []  # |c| of the steps since the last log line
        super().__init__(*args, **kwargs)
        if getattr(self.args, "fp16", False) or getattr(self.args, "bf16", False):
            raise UserError(
                "ZOTrainer does not use mixed-precision autocast/GradScaler (there are no gradients): "
                "set fp16=False and bf16=False and load the model in the dtype you want instead"
            )
        if self.args.gradient_accumulation_steps != 1:
            raise UserError("ZOTrainer needs gradient_accumulation_steps=1; raise the batch size instead")
        self._check_parallel_mode()
        from zotune.models import attach_activation_cache

        # the activation cache on the model where it is exact, and the one-line message
        self.zo_cache, self.zo_cache_message = attach_activation_cache(self.model, float(zo_cache_mb),
                                                                       say=logger.info)

    @contextmanager
    def _without_kv_cache(self) -> Iterator[None]:
        """``config.use_cache = False`` while the activation cache is attached (it serves only such forwards)."""
        config = getattr(self.zo_cache.stack.base, "config", None) if self.zo_cache is not None else None
        if config is None or not getattr(config, "use_cache", False):
            yield
            return
        config.use_cache = False
        try:
            yield
        finally:
            config.use_cache = True

    @property
    def zo_distributed(self) -> bool:
        """True when the Trainer runs one process per device (``ParallelMode.DISTRIBUTED``)."""
        return self.args.parallel_mode == ParallelMode.DISTRIBUTED

    def _check_parallel_mode(self) -> None:
        mode = self.args.parallel_mode
        if mode not in (ParallelMode.NOT_PARALLEL, ParallelMode.DISTRIBUTED):
            fix = "use torchrun or accelerate launch"
            if mode == ParallelMode.NOT_DISTRIBUTED:
                fix = "launch one process per GPU (torchrun --nproc_per_node N, or accelerate launch --multi_gpu ...)"
            raise UserError(f"ZOTrainer supports one process or one process per device, not {mode.value}: {fix}")
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or self.is_fsdp_xla_enabled:
            raise UserError(
                "ZOTrainer does not support DeepSpeed or the Trainer's FSDP: use plain data parallelism "
                "(torchrun / accelerate launch --multi_gpu), or zotune.distributed.fully_shard_for_zo with the "
                "optimizers directly"
            )

    def create_accelerator_and_postprocess(self) -> None:  # type: ignore[override]
        super().create_accelerator_and_postprocess()
        prepare_model = self.accelerator.prepare_model

        def prepare_without_ddp(model: torch.nn.Module, device_placement: bool | None = None,
                                evaluation_mode: bool = False) -> torch.nn.Module:
            # ZO has no gradients to all-reduce: accelerate's evaluation mode places the model on
            # its device without wrapping it in DistributedDataParallel (which would broadcast
            # rank 0's weights and hook the forward); the ZO optimizer keeps the ranks identical
            return prepare_model(model, device_placement=device_placement, evaluation_mode=True)

        self.accelerator.prepare_model = prepare_without_ddp  # type: ignore[method-assign]

    def create_optimizer(self, model: torch.nn.Module | None = None):  # type: ignore[override]
        if self.optimizer is None:
            spec = self.zo_optimizer_spec
            if isinstance(spec, zo.ZOOptimizer):
                self.optimizer = spec
            else:
                # lazy fused update: flushed by evaluate/save_model/train below and by the model's hooks
                kwargs = {"lr": self.args.learning_rate, "weight_decay": self.args.weight_decay,
                          "seed": self.args.seed, "lazy_update": True, **self.zo_kwargs}
                if self.zo_distributed and "comm" not in kwargs:
                    from zotune.distributed import ProcessGroupComm

                    kwargs["comm"] = ProcessGroupComm(check_every=self.zo_check_every)
                self.optimizer = zo.create(spec, model if model is not None else self.model, **kwargs)
            if self.zo_distributed and self.optimizer.comm.world_size != self.args.world_size:
                raise UserError(
                    f"ZOTrainer runs on {self.args.world_size} processes but the optimizer's comm reduces over "
                    f"{self.optimizer.comm.world_size}: build it with comm=zotune.distributed.ProcessGroupComm() "
                    "or pass the optimizer's name"
                )
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

    def _flush(self) -> None:
        """Apply a pending lazy update (before anything reads the weights)."""
        if self.optimizer is not None:
            self.zo_optimizer.flush()

    def evaluate(self, *args: Any, **kwargs: Any):  # type: ignore[override]
        self._flush()
        return super().evaluate(*args, **kwargs)

    def predict(self, *args: Any, **kwargs: Any):  # type: ignore[override]
        self._flush()
        return super().predict(*args, **kwargs)

    def save_model(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        self._flush()
        super().save_model(*args, **kwargs)

    def train(self, *args: Any, **kwargs: Any):  # type: ignore[override]
        try:
            result = super().train(*args, **kwargs)
        finally:
            self._flush()  # end of training (or an exception): the weights hold every update
        if self.zo_distributed:
            from zotune.distributed import check_replicas

            check_replicas(self.zo_optimizer)  # the ranks must end bit-identical (raises a clear error if not)
        return result

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: Any = None) -> torch.Tensor:  # type: ignore[override]
        inputs = self._prepare_inputs(inputs)
        optimizer = self.zo_optimizer

        def closure() -> torch.Tensor:
            if self.zo_loss_fn is not None:
                return self.zo_loss_fn(model, inputs)
            with self.compute_loss_context_manager():
                return self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)

        was_training = model.training
        model.eval()
        try:
            with self._without_kv_cache():
                loss = optimizer.step(closure)
        finally:
            model.train(was_training)
        if torch.isfinite(loss):
            self._zo_projected.extend(abs(c) for c in optimizer.zo_state["last_projected_grads"])
        # the Trainer's inner loop calls optimizer.step() next: it must not step again
        optimizer.skip_next_closureless_step()
        return loss.detach().to(self.args.device)

    def prediction_step(self, *args: Any, **kwargs: Any):  # type: ignore[override]
        """Evaluation forwards go through the activation cache too (no KV cache is returned)."""
        with self._without_kv_cache():
            return super().prediction_step(*args, **kwargs)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Training log lines get ``projected_grad`` (mean |c| since the last line) instead of ``grad_norm``."""
        if "loss" in logs:
            logs.pop("grad_norm", None)
            if self._zo_projected:
                logs["projected_grad"] = sum(self._zo_projected) / len(self._zo_projected)
            self._zo_projected = []
        super().log(logs, *args, **kwargs)
