"""The zotune training loop: a prompt-based task, a causal LM, a zeroth-order optimizer.

    >>> from zotune.train import TrainConfig, train          # doctest: +SKIP
    >>> results = train(TrainConfig(task="sst2", optimizer="zosgd", steps=100, output_dir="runs/x"))  # doctest: +SKIP

What a run writes into ``output_dir``:

* ``config.json`` -- the full configuration (reloadable with ``--config``);
* ``metrics.jsonl`` -- one line per step (loss, lr, projected gradient, time) and per
  evaluation (dev metrics);
* ``checkpoint`` -- the latest state: trainable weights (safetensors), optimizer state
  (fp32, including the step counter that drives the direction seeds), scheduler and loop
  state; ``--resume`` continues the identical trajectory from it. It points at a version in
  ``checkpoints/`` and survives a kill at any moment (see :mod:`zotune.checkpoint`);
* ``trajectory.zot`` -- every step's seeds and scalars: ``zotune replay`` rebuilds the
  trained weights from it and the base model (see :mod:`zotune.trajectory`);
* ``best/`` -- trainable weights of the best dev evaluation;
* ``results.json`` -- dev/test metrics before and after, steps, wall-clock, peak memory;
* ``curves.png`` -- loss and dev metric over steps.

Batches are a pure function of (seed, step): every epoch is a seeded permutation of the
training set, so an interrupted and resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zotune import checkpoint
from zotune.checkpoint import MetricsLog, load_trainable, save_trainable, trainable_state  # noqa: F401 (public here too)
from zotune.config import PEFT_MODES, TrainConfig
from zotune.errors import UserError
from zotune.memory import peak_memory_mb, reset_peak_memory
from zotune.models.tuning import parse_peft_mode
from zotune.offload.checks import DATA_PARALLEL_REFUSAL, attach_offload
from zotune.preflight import (  # noqa: F401 (TRAJECTORY_FIELDS, check_optimizer_args: public here too)
    TRAJECTORY_FIELDS,
    _check_model_config,
    _check_output_dir,
    _check_tensorboard,
    _check_writable,
    _corrupt_weight_errors,
    _make_output_dir,
    check_optimizer_args,
    check_resume_config,
)

__all__ = [
    "PEFT_MODES",
    "TrainConfig",
    "batch_indices",
    "build_model",
    "build_task",
    "evaluate_and_checkpoint",
    "evaluate_before",
    "finish_run",
    "plan_run",
    "run_steps",
    "start_run",
    "train",
]

# eps by tuning mode, MeZO's settings (arXiv 2305.17333); lr is each optimizer's ``lr_by_mode``.
DEFAULT_EPS = {"full": 1e-3, "lora": 1e-2, "prefix": 1e-1, "final_norm": 1e-2, "norms": 1e-2, "top": 1e-3}
#: tuning modes without published settings: lr = LoRA's lr times this factor (a few hundred weights)
NORM_MODES_LR_FACTOR = {"final_norm": 100.0, "norms": 100.0}
#: top:K (whole blocks, a few percent of the weights): full fine-tuning's lr times this factor.
#: Measured (docs/race.md, SmolLM2-135M top:2, SST-2, 200 forwards): the best lr on dev was 100-1000x
#: each method's full lr and 3000x diverged; 300x sits within 3x of every method's best.
TOP_LR_FACTOR = 300.0


# ---------------------------------------------------------------------------- helpers


def batch_indices(n_examples: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of the batch of ``step``: consecutive slices of seeded per-epoch permutations."""
    if n_examples == 0:
        raise UserError("the task's training split is empty")
    out: list[int] = []
    pos = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n_examples)
        perm = np.random.default_rng([seed, epoch]).permutation(n_examples)
        take = min(batch_size - len(out), n_examples - offset)
        out.extend(int(i) for i in perm[offset : offset + take])
        pos += take
    return out


def default_lr(config: TrainConfig, optimizer_cls: type) -> float:
    """The optimizer's starting lr for the tuning mode: its ``lr_by_mode`` entry (the norm-only
    modes scale its LoRA entry), else its constructor's default."""
    table = getattr(optimizer_cls, "lr_by_mode", {})
    mode = parse_peft_mode(config.peft)[0]
    if mode in table:
        return float(table[mode])
    if mode in NORM_MODES_LR_FACTOR and "lora" in table:
        return float(table["lora"]) * NORM_MODES_LR_FACTOR[mode]
    if mode == "top" and "full" in table:
        return float(table["full"]) * TOP_LR_FACTOR
    import inspect

    return float(inspect.signature(optimizer_cls.__init__).parameters["lr"].default)


def resolve_optimizer(name: str) -> type:
    """The optimizer class for ``name``: a ZO optimizer, or a first-order baseline (``adamw``)."""
    import zotune.optim as zo
    from zotune.optim.first_order import get_first_order

    first_order = get_first_order(name)
    if first_order is not None:
        return first_order
    try:
        return zo.get(name)
    except UserError as e:  # name the first-order baseline too, so the list is complete
        raise UserError(f"{e}; or adamw (first-order baseline with backprop)") from None


def budget_spent(config: TrainConfig, forwards: int, seconds: float) -> bool:
    """Whether the forwards or seconds budget (``--max-forwards``, ``--max-seconds``) is used up."""
    return bool((config.max_forwards and forwards >= config.max_forwards)
                or (config.max_seconds and seconds >= config.max_seconds))


def _primary(metrics: dict[str, float]) -> float:
    """The dev score that decides the best checkpoint: F1 where reported, else accuracy."""
    return float(metrics["f1"] if "f1" in metrics else metrics["accuracy"])


def _lr_lambda(config: TrainConfig) -> Callable[[int], float]:
    """The learning-rate factor per step: linear warm-up, then constant or linear decay to 0."""
    def factor(step: int) -> float:
        if config.warmup_steps and step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.schedule == "linear":
            span = max(1, config.steps - config.warmup_steps)
            return max(0.0, 1.0 - (step - config.warmup_steps) / span)
        return 1.0

    return factor




# ---------------------------------------------------------------------------- the run


def build_model(config: TrainConfig, device: torch.device | None = None):
    """Load the model and tokenizer and apply the tuning mode."""
    from zotune.models import apply_peft, load_model

    _check_model_config(config.model)
    try:
        if config.offload != "none":
            device = torch.device("cpu")  # the blocks stay there; StreamingOffload moves the rest
        model, tokenizer = load_model(config.model, dtype=config.dtype,
                                      device=str(device) if device is not None else config.device)
    except _corrupt_weight_errors() as e:
        reason = " ".join(str(e).split())[:200]
        raise UserError(f"the weights of model {config.model!r} cannot be read ({type(e).__name__}: {reason}); "
                        "the files are truncated or corrupt: copy or save the model again") from None
    mode = None if config.peft == "full" else config.peft
    model = apply_peft(model, mode, lora_r=config.lora_r, lora_alpha=config.lora_alpha,
                       target_modules=config.lora_targets, lora_layers=config.lora_layers,
                       num_virtual_tokens=config.prefix_tokens,
                       seed=config.seed)
    model.eval()
    return model, tokenizer


def build_task(config: TrainConfig):
    """The task of the config, with its data split and size settings."""
    from zotune.tasks import get_task

    return get_task(config.task, k=config.k, data_seed=config.data_seed, max_train=config.max_train,
                    max_dev=config.max_dev, max_test=config.max_test, data_dir=config.data_dir,
                    template=config.template, **config.task_args)


def train(config: TrainConfig, *, model=None, tokenizer=None) -> dict[str, Any]:
    """Run a zeroth-order fine-tuning job; returns (and writes) ``results.json``'s content.

    The stages, each its own function: :func:`plan_run` (resolve and check every setting,
    reading only), :func:`start_run` (load task and model, prepare the output directory, build
    optimizer and scheduler, resume), :func:`evaluate_before`, :func:`run_steps` (the step loop,
    with :func:`evaluate_and_checkpoint` after each step) and :func:`finish_run` (final
    checkpoint, final evaluation, results.json, curves.png). Pass ``model`` and ``tokenizer`` to
    train a model already in memory instead of loading ``config.model``.
    """
    plan = plan_run(config)
    run = start_run(plan, model=model, tokenizer=tokenizer)
    try:
        evaluate_before(run)
        warm_cache(run)
        run_steps(run)
        return finish_run(run)
    finally:
        run.close()


@dataclass
class RunPlan:
    """The resolved settings of a run, checked before anything is loaded or written."""

    config: TrainConfig
    optimizer_cls: type
    optimizer_kwargs: dict[str, Any]
    resolved: dict[str, Any]  #: what config.json holds: the config with lr, eps, optimizer resolved
    out: Path
    dist: Any  #: the :class:`zotune.distributed.DistContext`, or None in a single process
    wall_start: float

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and prints (rank 0, or the only process)."""
        return self.dist is None or self.dist.is_main


def data_parallel_info(dist, batch_size: int, *, announce: bool = True) -> dict[str, Any]:
    """World size and backend of this job (printed to stderr); refuses a batch the ranks cannot share.

    Runs before the model loads and before anything is written, so a bad ``--batch-size`` costs nothing.
    """
    world, backend = (dist.world_size, dist.backend) if dist is not None else (1, None)
    if batch_size % world:
        raise UserError(f"--batch-size {batch_size} is not divisible by the {world} data-parallel processes; "
                        f"use a multiple of {world} (each process evaluates batch-size / {world} examples)")
    if announce:
        where = f"{world} processes, backend {backend}, {batch_size // world} examples per process" if dist else \
            "one process; not launched by torchrun / accelerate launch --multi_gpu"
        print(f"zotune: data parallel: world size {world} ({where})", file=sys.stderr, flush=True)
    return {"world_size": world, "backend": backend}


def plan_run(config: TrainConfig) -> RunPlan:
    """Resolve the defaults (lr, eps by optimizer and mode) and run every check that reads only."""
    from zotune.distributed import init_distributed

    config.validate()
    optimizer_cls = resolve_optimizer(config.optimizer)
    lr = config.lr if config.lr is not None else default_lr(config, optimizer_cls)
    eps = config.eps if config.eps is not None else DEFAULT_EPS[parse_peft_mode(config.peft)[0]]
    optimizer_kwargs = dict(lr=lr, eps=eps, weight_decay=config.weight_decay, seed=config.seed,
                            distribution=config.distribution, **config.optimizer_args)
    check_optimizer_args(optimizer_cls, optimizer_kwargs)  # before anything is loaded or written
    if config.tensorboard:
        _check_tensorboard()
    resolved = {**dataclasses.asdict(config), "lr": lr, "eps": eps, "optimizer": optimizer_cls.__name__}
    if config.threads:
        torch.set_num_threads(config.threads)
    dist = init_distributed()
    if config.offload != "none" and dist is not None:
        raise UserError(f"--offload {config.offload}: {DATA_PARALLEL_REFUSAL}")
    # checked here, announced by start_run: a mistake found later must print one line only
    resolved["data_parallel"] = data_parallel_info(dist, config.batch_size, announce=False)
    out = _check_output_dir(config)
    if config.cache_dir:
        from zotune.models.activation_store import check_store_dir

        check_store_dir(config.cache_dir)
    if config.resume:
        check_resume_config(out, resolved)
    return RunPlan(config, optimizer_cls, optimizer_kwargs, resolved, out, dist, time.time())


@dataclass
class Run:
    """A run in progress: what the stages after :func:`plan_run` share."""

    plan: RunPlan
    task: Any
    model: torch.nn.Module
    tokenizer: Any
    objective: Callable[[list], torch.Tensor]
    optimizer: Any
    scheduler: Any
    log: MetricsLog
    #: loop state, saved in checkpoints: step, best dev score and its step, evaluations without
    #: gain, the evaluation before training
    loop: dict[str, Any]
    trainable: int
    step_times: list[float] = field(default_factory=list)
    stopped_early: bool = False
    bar: Any = None
    #: the trajectory.zot writer (main process), see :mod:`zotune.trajectory`
    trajectory: Any = None
    cache: Any = None  #: the :class:`~zotune.models.ActivationCache`, or None when it is off
    offload: Any = None  #: the :class:`~zotune.offload.StreamingOffload` of --offload cpu, or None

    def flush(self) -> None:
        """Apply a pending (lazy) update before the weights are read directly (checkpoints): the
        offload's block update and the engine's ``lazy_update``."""
        if self.offload is not None:
            self.offload.flush()
        flush = getattr(self.optimizer, "flush", None)
        if flush is not None:
            flush()

    @property
    def config(self) -> TrainConfig:
        """The run's configuration."""
        return self.plan.config

    def say(self, *message: Any) -> None:
        """Print a status line on stderr (main process only)."""
        if self.plan.is_main:
            print(*message, file=sys.stderr, flush=True)

    def evaluate(self, examples: list, split: str) -> dict[str, float]:
        """Metrics of the current weights on ``examples`` (a split of the task)."""
        from zotune.optim.lazy import flush_pending
        from zotune.tasks import evaluate

        flush_pending(self.model)  # the forward hook would too; explicit, as for every observation point
        metrics = evaluate(self.model, self.tokenizer, self.task, examples, batch_size=self.config.eval_batch_size,
                           max_length=self.config.max_length)
        return {k: float(v) for k, v in metrics.items()}

    def close(self) -> None:
        """Close the progress bar and the metrics log; take the activation cache and the offload hooks off;
        apply a pending lazy update (also after an exception: a caller's model must hold every update)."""
        if self.offload is not None:
            self.offload.close()  # flushes the pending update; the blocks stay in CPU memory
            self.offload = None
        self.flush()
        if self.cache is not None:
            self.cache.close()  # a caller's model gets its plain forward back
            self.cache = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.log.close()
        if self.trajectory is not None:
            self.trajectory.close()
            self.trajectory = None


def start_run(plan: RunPlan, *, model=None, tokenizer=None) -> Run:
    """Load task and model, build objective, optimizer and scheduler, then (only then) create or
    replace the output directory; restore the checkpoint with --resume or write config.json."""
    from zotune.tasks import make_objective

    config, dist, out = plan.config, plan.dist, plan.out
    # task and model first: a typo in either must not cost the user an existing run (--overwrite)
    task = build_task(config)
    model_given = model is not None and tokenizer is not None
    if not model_given:
        model, tokenizer = build_model(config, dist.device if dist is not None else None)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    objective = make_objective(model, tokenizer, task, objective=config.objective, max_length=config.max_length)
    from zotune.optim.engine import ZOOptimizer

    # lazy fused update (2 passes per step): this loop flushes it before every evaluation, the
    # checkpoints and the end of training (see zotune.optim.lazy); --opt lazy_update=false turns it off
    # --offload streams blocks with a lazy update of its own (zotune.offload): the engine's stays off there
    lazy_default = (issubclass(plan.optimizer_cls, ZOOptimizer) and "lazy_update" not in plan.optimizer_kwargs
                    and config.offload == "none")
    lazy = {"lazy_update": True} if lazy_default else {}
    optimizer = plan.optimizer_cls(model, **plan.optimizer_kwargs, **lazy,
                                   comm=dist.comm(check_every=100) if dist is not None else None)
    offload = attach_offload(model, optimizer, config.offload, config.device,
                             generates=config.objective == "f1" and task.kind == "generation")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config))
    # everything that can fail has run: only now may the output directory be replaced
    if dist is not None:
        dist.barrier()  # every rank checked the directory before the main rank replaces it
    if plan.is_main:
        _make_output_dir(out, config)
    if dist is not None:
        dist.barrier()

    # train_seconds: time inside optimizer steps only (not evaluation), carried across --resume;
    # every eval record logs it with the forwards so far (time-to-target in `zotune race`)
    loop = {"step": 0, "best": None, "best_step": None, "evals_without_gain": 0, "before": None,
            "train_seconds": 0.0, "warm_seconds": 0.0}
    if config.resume:
        loop.update(checkpoint.load_checkpoint(out, model, optimizer, scheduler, repair=plan.is_main))
        # the checkpoint was read through memory maps (safetensors) and a temporary copy (torch.load):
        # their pages would stay in this run's peak as another copy of the weights and the state
        reset_peak_memory(dist.device if dist is not None else None)
        if plan.is_main:
            checkpoint.cut_jsonl(out / "metrics.jsonl", loop["step"])  # steps after it run (and log) again
    elif plan.is_main:
        (out / "config.json").write_text(json.dumps(plan.resolved, indent=2))
    trajectory = None

    # every step's seeds and scalars, for `zotune replay` (a first-order baseline has no seeds to record)
    if plan.is_main and isinstance(optimizer, ZOOptimizer):
        from zotune import trajectory as zotraj

        trajectory = zotraj.open_for_run(out, loop["step"] if config.resume else None, model, optimizer,
                                         plan.optimizer_kwargs, plan.resolved)

    log = MetricsLog(out / "metrics.jsonl", plan.is_main, out / "tensorboard" if config.tensorboard else None)
    run = Run(plan, task, model, tokenizer, objective, optimizer, scheduler, log, loop, trainable,
              trajectory=trajectory, offload=offload)
    if plan.is_main:
        data_parallel_info(dist, config.batch_size)  # every check has passed: say how the job runs
    model_name = type(model).__name__ if model_given else config.model
    run.say(f"zotune: {plan.optimizer_cls.__name__} on {task.name} ({len(task.train)} train / {len(task.dev)} dev / "
            f"{len(task.test)} test), model {model_name}, {config.peft} tuning: {trainable:,} trainable "
            f"parameters, lr {plan.resolved['lr']:g}, eps {plan.resolved['eps']:g}, batch {config.batch_size}")
    if offload is not None:
        run.say(f"zotune: offload: {offload.describe()}; activation cache off (every block is streamed)")
    else:
        run.cache = attach_cache(model, config, run.say)
    return run


def attach_cache(model: torch.nn.Module, config: TrainConfig, say: Callable[..., None]) -> Any:
    """Attach the frozen-bottom activation cache (``--cache-mb``), saying where the trainable weights
    start and why the cache is on or off; returns the :class:`~zotune.models.ActivationCache` or None."""
    from zotune.models import attach_activation_cache

    return attach_activation_cache(model, config.cache_mb, config.cache_dir, say=say)[0]


def evaluate_before(run: Run) -> None:
    """Evaluate dev (and test) before the first step, unless disabled or already done (resume)."""
    config, loop = run.config, run.loop
    if not config.eval_before or loop["before"] is not None or config.steps <= 0:
        return
    before = run.evaluate(run.task.dev, "dev")
    loop["before"] = {"dev": before}
    if run.task.test:
        loop["before"]["test"] = run.evaluate(run.task.test, "test")
    run.log.write({"kind": "eval", "step": 0, "seconds": 0.0, "forwards": 0,
                   **{f"dev_{k}": v for k, v in before.items()}})
    run.say(f"zotune: before training: dev {_fmt(before)}"
            + (f", test {_fmt(loop['before']['test'])}" if run.task.test else ""))


def warm_cache(run: Run) -> None:
    """Run the frozen bottom over the training rows the remaining steps will read, before the clock
    starts (activation cache on, ``--cache-warm``): the first steps would otherwise pay each new row's
    bottom inside their step time, so ``train_seconds`` (and a race's time to target) would depend on
    whether another run had filled the shared store first. The seconds go to ``warm_seconds``."""
    config, loop, dist = run.config, run.loop, run.plan.dist
    if run.cache is None or not config.cache_warm or loop["step"] >= config.steps:
        return
    if config.max_seconds and not config.max_forwards:  # which rows a time budget reaches is unknown
        return
    last = config.steps
    if config.max_forwards:  # a forwards budget ends the run before config.steps: warm only what it reads
        per_step = float(getattr(run.optimizer, "forwards_per_step", 2) or 2)
        last = min(last, loop["step"] + math.ceil(max(config.max_forwards - run.optimizer.zo_state["forwards"], 0)
                                                  / per_step))
    n_train, seen = len(run.task.train), set()
    overflow = run.cache.stats["overflow_rows"]
    t0 = time.perf_counter()
    with torch.no_grad():
        for step in range(loop["step"], last):
            batch = batch_indices(n_train, config.batch_size, step, config.seed)
            if seen.issuperset(batch):
                continue
            seen.update(batch)
            examples = [run.task.train[i] for i in batch]
            run.objective(dist.shard(examples) if dist is not None else examples)
            if run.cache.stats["overflow_rows"] > overflow and run.cache.store is None:
                break  # beyond --cache-mb and no store: the steps will recompute these rows anyway
            if len(seen) == n_train:
                break
    seconds = time.perf_counter() - t0
    loop["warm_seconds"] += seconds
    run.say(f"zotune: activation cache: {len(seen):,} training rows through the frozen bottom before the first "
            f"step ({seconds:.1f} s, not counted in the step times)")


def run_steps(run: Run) -> None:
    """The step loop: one optimizer step per batch, logging, then evaluation and checkpoints."""
    config, loop, dist = run.config, run.loop, run.plan.dist
    if run.plan.is_main and config.progress:
        from tqdm.auto import tqdm

        run.bar = tqdm(total=config.steps, initial=loop["step"], desc="zo-train", unit="step", dynamic_ncols=True,
                       mininterval=1.0, file=sys.stderr)
    while loop["step"] < config.steps and not _out_of_budget(run):
        step = loop["step"]
        batch = [run.task.train[i] for i in batch_indices(len(run.task.train), config.batch_size, step, config.seed)]
        local = dist.shard(batch) if dist is not None else batch

        def closure(local=local):
            return run.objective(local)

        t0 = time.perf_counter()
        loss = float(run.optimizer.step(closure))
        if run.trajectory is not None:
            run.trajectory.append(run.optimizer.last_step_record)
        run.scheduler.step()
        run.step_times.append(time.perf_counter() - t0)
        loop["train_seconds"] += run.step_times[-1]
        loop["step"] = step + 1
        if loop["step"] % config.log_every == 0 or loop["step"] == config.steps or _out_of_budget(run):
            zo_state = run.optimizer.zo_state
            run.log.write({"kind": "train", "step": loop["step"], "loss": loss,
                           "lr": run.optimizer.param_groups[0]["lr"],
                           "projected_grad": (zo_state["last_projected_grads"] or [float("nan")])[0],
                           "step_time": run.step_times[-1], "skipped_steps": zo_state["skipped_steps"]})
        if run.bar is not None:
            run.bar.update(1)
            run.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        evaluate_and_checkpoint(run)
        if run.stopped_early:
            break
    run.flush()  # end of training: the weights hold every update
    if run.bar is not None:
        run.bar.close()
        run.bar = None


def _out_of_budget(run: Run) -> bool:
    return budget_spent(run.config, run.optimizer.zo_state["forwards"], run.loop["train_seconds"])


def evaluate_and_checkpoint(run: Run) -> None:
    """After a step: evaluate dev when due (keeping the best weights in best/, counting
    evaluations without gain for --early-stop), then write the checkpoint when due."""
    config, loop, out = run.config, run.loop, run.plan.out
    due = config.eval_every and (loop["step"] % config.eval_every == 0 or loop["step"] == config.steps
                                 or _out_of_budget(run))
    if due:
        dev = run.evaluate(run.task.dev, "dev")
        run.log.write({"kind": "eval", "step": loop["step"], "seconds": loop["train_seconds"],
                       "forwards": run.optimizer.zo_state["forwards"], **{f"dev_{k}": v for k, v in dev.items()}})
        score = _primary(dev)
        if loop["best"] is None or score > loop["best"]:
            loop.update(best=score, best_step=loop["step"], evals_without_gain=0)
            if run.plan.is_main:
                save_trainable(run.model, out / "best")
        else:
            loop["evals_without_gain"] += 1
        if run.bar is not None:
            run.bar.write(f"step {loop['step']}: dev {_fmt(dev)} (best {loop['best']:.4f} at {loop['best_step']})")
        if config.early_stop and loop["evals_without_gain"] >= config.early_stop:
            run.say(f"zotune: early stop: no dev gain in {config.early_stop} evaluations")
            run.stopped_early = True
    if run.plan.is_main and ((config.save_every and loop["step"] % config.save_every == 0) or run.stopped_early):
        run.flush()
        checkpoint.save_checkpoint(out, run.model, run.optimizer, run.scheduler, loop)


def finish_run(run: Run) -> dict[str, Any]:
    """Write the final checkpoint, reload the best weights, evaluate dev and test, and write
    results.json and curves.png; returns the results."""
    plan, config, loop, out, dist = run.plan, run.config, run.loop, run.plan.out, run.plan.dist
    run.flush()
    if plan.is_main and config.steps > 0:
        checkpoint.save_checkpoint(out, run.model, run.optimizer, run.scheduler, loop)
    if dist is not None:
        from zotune.distributed import check_replicas

        check_replicas(run.optimizer)  # ranks must end bit-identical (raises a clear error if not)
        dist.barrier()  # the main process has written best/ and checkpoint/
    # the peak of training and its evaluations, taken before the best weights are reloaded: safetensors
    # memory-maps the file, and its pages (page cache, dropped under pressure) would count in VmHWM as
    # one more copy of the trainable weights (+540 MB for SmolLM2-135M in full fine-tuning)
    peak_mb = peak_memory_mb(dist.device if dist is not None else None)
    if loop["best_step"] is not None and (out / "best").exists():
        load_trainable(run.model, out / "best")
    final = {"dev": run.evaluate(run.task.dev, "dev")}
    if run.task.test:
        final["test"] = run.evaluate(run.task.test, "test")
    results = {
        "task": run.task.name,
        "model": config.model,
        "optimizer": plan.optimizer_cls.__name__,
        "peft": config.peft,
        "trainable_params": run.trainable,
        "steps": loop["step"],
        "forwards": run.optimizer.zo_state["forwards"],
        "skipped_steps": run.optimizer.zo_state["skipped_steps"],
        "best_step": loop["best_step"],
        "stopped_early": run.stopped_early,
        "before": loop["before"],
        "after": final,
        "seconds_per_step": float(np.median(run.step_times)) if run.step_times else None,
        "train_seconds": loop["train_seconds"],
        "warm_seconds": loop["warm_seconds"],
        "wall_clock_s": time.time() - plan.wall_start,
        "peak_memory_mb": peak_mb,
        "data_parallel": plan.resolved["data_parallel"],
        "activation_cache": dict(run.cache.stats) if run.cache is not None else None,
        "config": plan.resolved,
    }
    if run.cache is not None:
        run.say(f"zotune: activation cache: {run.cache.summary()}")
    if plan.is_main:
        _write_results(run, results)
    if dist is not None:
        dist.barrier()
    return results


def _write_results(run: Run, results: dict[str, Any]) -> None:
    """results.json, curves.png and the closing line (main process)."""
    out, before = run.plan.out, run.loop["before"]
    (out / "results.json").write_text(json.dumps(results, indent=2))
    try:
        if run.config.plot:  # off in race cells: matplotlib costs seconds per run there
            from zotune.plotting import plot_runs

            plot_runs([out], out / "curves.png")
    except Exception as e:  # a plot must never fail a finished run
        run.say(f"zotune: could not draw curves.png: {e}")
    before_txt = ""
    if before:
        split = "test" if "test" in before else "dev"
        before_txt = f"{split} {_fmt(before[split])} -> "
    final = results["after"]
    split = "test" if "test" in final else "dev"
    run.say(f"zotune: done in {results['wall_clock_s']:.0f} s: {before_txt}{split} {_fmt(final[split])} "
            f"(results in {out / 'results.json'})")


def _fmt(metrics: dict[str, float]) -> str:
    """``accuracy 0.5000, f1 0.4000`` (the example count left out)."""
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "n")
