"""The zotune training loop: a prompt-based task, a causal LM, a zeroth-order optimizer.

    >>> from zotune.train import TrainConfig, train          # doctest: +SKIP
    >>> results = train(TrainConfig(task="sst2", optimizer="zosgd", steps=100, output_dir="runs/x"))  # doctest: +SKIP

What a run writes into ``output_dir``:

* ``config.json`` -- the full configuration (reloadable with ``--config``);
* ``metrics.jsonl`` -- one line per step (loss, lr, projected gradient, time) and per
  evaluation (dev metrics);
* ``checkpoint/`` -- the latest state: trainable weights (safetensors), optimizer state
  (fp32, including the step counter that drives the direction seeds), scheduler and loop
  state; ``--resume`` continues the identical trajectory from it;
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
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zotune.errors import UserError

PEFT_MODES = ("full", "lora", "prefix", "final_norm", "norms")

# eps by tuning mode, MeZO's settings (arXiv 2305.17333); lr is each optimizer's ``lr_by_mode``.
DEFAULT_EPS = {"full": 1e-3, "lora": 1e-2, "prefix": 1e-1, "final_norm": 1e-2, "norms": 1e-2}
#: tuning modes without published settings: lr = LoRA's lr times this factor (a few hundred weights)
NORM_MODES_LR_FACTOR = {"final_norm": 100.0, "norms": 100.0}


@dataclass
class TrainConfig:
    """Everything a run needs. Field names are the CLI flags (``--lr``, ``--eval-every``, ...)."""

    model: str = "smollm2-135m"
    task: str = "sst2"
    optimizer: str = "zosgd"
    steps: int = 100
    output_dir: str = "runs/zotune"
    lr: float | None = None
    eps: float | None = None
    batch_size: int = 16
    weight_decay: float = 0.0
    schedule: str = "constant"  # constant | linear
    warmup_steps: int = 0
    distribution: str = "gaussian"
    optimizer_args: dict[str, Any] = field(default_factory=dict)
    peft: str = "full"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: list[str] | None = None
    prefix_tokens: int = 5
    objective: str = "ce"
    template: str | None = None
    task_args: dict[str, Any] = field(default_factory=dict)
    k: int = 16
    data_seed: int = 42
    max_train: int | None = None
    max_dev: int | None = None
    max_test: int | None = 1000
    data_dir: str | None = None
    max_length: int = 256
    seed: int = 0
    dtype: str = "float32"
    device: str | None = None
    eval_every: int = 0
    eval_before: bool = True
    eval_batch_size: int = 32
    early_stop: int = 0
    save_every: int = 0
    resume: bool = False
    overwrite: bool = False
    log_every: int = 1
    tensorboard: bool = False
    progress: bool = True
    threads: int | None = None

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = set(cls.field_names())
        clean = {k.replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(clean) - known)
        if unknown:
            raise UserError(f"unknown config keys {unknown}; valid keys: {', '.join(sorted(known))}")
        return cls(**clean)

    def validate(self) -> None:
        if self.steps < 0:
            raise UserError("--steps must be >= 0")
        if self.batch_size < 1:
            raise UserError("--batch-size must be >= 1")
        if self.peft not in PEFT_MODES:
            raise UserError(f"unknown --peft {self.peft!r}; choose one of {', '.join(PEFT_MODES)}")
        if self.schedule not in ("constant", "linear"):
            raise UserError(f"unknown --schedule {self.schedule!r}; choose constant or linear")
        if self.objective not in ("ce", "accuracy", "f1"):
            raise UserError(f"unknown --objective {self.objective!r}; choose ce, accuracy or f1")
        if self.lr is not None and not self.lr >= 0:
            raise UserError("--lr must be >= 0")
        if self.eps is not None and not self.eps > 0:
            raise UserError("--eps must be > 0")


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


def peak_memory_mb(device: torch.device | None = None) -> float:
    """Peak resident memory of this process (VmHWM), or CUDA peak allocation on a GPU."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_trainable(model: torch.nn.Module, directory: Path) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file(trainable_state(model), str(directory / "trainable.safetensors"))


def load_trainable(model: torch.nn.Module, directory: Path) -> None:
    from safetensors.torch import load_file

    path = directory / "trainable.safetensors"
    if not path.exists():
        raise UserError(f"no trainable weights at {path}; is {directory} a zotune checkpoint?")
    tensors = load_file(str(path))
    params = dict(model.named_parameters())
    missing = [n for n in tensors if n not in params]
    if missing:
        raise UserError(f"checkpoint {directory} does not match the model: unknown tensors {missing[:3]}...")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].dtype))


def default_lr(config: TrainConfig, optimizer_cls: type) -> float:
    """The optimizer's starting lr for the tuning mode: its ``lr_by_mode`` entry (the norm-only
    modes scale its LoRA entry), else its constructor's default."""
    table = getattr(optimizer_cls, "lr_by_mode", {})
    if config.peft in table:
        return float(table[config.peft])
    if config.peft in NORM_MODES_LR_FACTOR and "lora" in table:
        return float(table["lora"]) * NORM_MODES_LR_FACTOR[config.peft]
    import inspect

    return float(inspect.signature(optimizer_cls.__init__).parameters["lr"].default)


def check_optimizer_args(optimizer_cls: type, kwargs: dict[str, Any]) -> None:
    """Refuse unknown or invalid optimizer arguments (``--opt``) with one clear message.

    The optimizer is built once on a one-element dummy parameter, which runs every argument
    check of its constructor without touching the model.
    """
    import inspect

    from zotune.optim.engine import ZOOptimizer

    accepted = set()
    for cls in (optimizer_cls, ZOOptimizer):
        accepted |= {n for n, p in inspect.signature(cls.__init__).parameters.items()
                     if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in ("self", "params", "defaults")}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise UserError(f"{optimizer_cls.__name__} has no option {', '.join(map(repr, unknown))} (from --opt or "
                        f"optimizer_args); its options: {', '.join(sorted(accepted))}")
    try:
        optimizer_cls([torch.nn.Parameter(torch.zeros(1))], **kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"invalid {optimizer_cls.__name__} arguments: {e}") from None


class MetricsLog:
    """JSONL metrics (and TensorBoard if asked), written by the main process only."""

    def __init__(self, path: Path, enabled: bool, tensorboard_dir: Path | None):
        self.enabled = enabled
        self.file = open(path, "a") if enabled else None  # noqa: SIM115
        self.tb = None
        if enabled and tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from e
            self.tb = SummaryWriter(str(tensorboard_dir))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled or self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def _primary(metrics: dict[str, float]) -> float:
    return float(metrics["f1"] if "f1" in metrics else metrics["accuracy"])


def _lr_lambda(config: TrainConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if config.warmup_steps and step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.schedule == "linear":
            span = max(1, config.steps - config.warmup_steps)
            return max(0.0, 1.0 - (step - config.warmup_steps) / span)
        return 1.0

    return factor


#: settings that define the trajectory: a resumed run must keep them (steps, evaluation and
#: logging settings may change)
TRAJECTORY_FIELDS = ("model", "task", "optimizer", "lr", "eps", "batch_size", "weight_decay", "schedule",
                     "warmup_steps", "distribution", "optimizer_args", "peft", "lora_r", "lora_alpha",
                     "lora_targets", "prefix_tokens", "objective", "template", "task_args", "k", "data_seed",
                     "max_train", "max_dev", "max_length", "seed", "dtype")


def check_resume_config(out: Path, resolved: dict[str, Any]) -> None:
    """Refuse to resume a run with settings that would change its trajectory."""
    path = out / "config.json"
    if not path.exists():
        return
    saved = json.loads(path.read_text())

    def same(v: Any) -> Any:  # compare as JSON sees it (tuples -> lists, int keys -> str)
        return json.loads(json.dumps(v))

    changed = [f"{k} {saved[k]!r} -> {resolved[k]!r}" for k in TRAJECTORY_FIELDS
               if k in saved and same(saved[k]) != same(resolved[k])]
    if changed:
        raise UserError(f"--resume: the run in {out} was started with other settings ({'; '.join(changed)}); "
                        "resume with the saved settings (omit these flags) or start a new run in another "
                        "--output-dir")


def _check_output_dir(config: TrainConfig) -> Path:
    """Refuse an output directory that the run may not use; reads only (nothing is written yet)."""
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output-dir {out} is a file; choose a directory")
    if out.exists() and any(out.iterdir()) and not config.resume and not config.overwrite:
        raise UserError(
            f"output directory {out} is not empty; pass --resume to continue that run, "
            "--overwrite to replace it, or choose another --output-dir"
        )
    if config.resume and not (out / "checkpoint").exists():
        raise UserError(f"--resume: no checkpoint in {out}/checkpoint (run without --resume to start)")
    return out


def _make_output_dir(out: Path, config: TrainConfig) -> None:
    """Create (or, with --overwrite, replace) the output directory: only once the run can start."""
    if config.overwrite and not config.resume and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


# ---------------------------------------------------------------------------- the run


def build_model(config: TrainConfig, device: torch.device | None = None):
    """Load the model and tokenizer and apply the tuning mode."""
    from zotune.models import apply_peft, load_model

    model, tokenizer = load_model(config.model, dtype=config.dtype,
                                  device=str(device) if device is not None else config.device)
    mode = None if config.peft == "full" else config.peft
    model = apply_peft(model, mode, lora_r=config.lora_r, lora_alpha=config.lora_alpha,
                       target_modules=config.lora_targets, num_virtual_tokens=config.prefix_tokens,
                       seed=config.seed)
    model.eval()
    return model, tokenizer


def build_task(config: TrainConfig):
    from zotune.tasks import get_task

    return get_task(config.task, k=config.k, data_seed=config.data_seed, max_train=config.max_train,
                    max_dev=config.max_dev, max_test=config.max_test, data_dir=config.data_dir,
                    template=config.template, **config.task_args)


def train(config: TrainConfig, *, model=None, tokenizer=None) -> dict[str, Any]:
    """Run a zeroth-order fine-tuning job; returns (and writes) ``results.json``'s content."""
    import zotune.optim as zo
    from zotune.distributed import init_distributed
    from zotune.tasks import evaluate, make_objective

    config.validate()
    optimizer_cls = zo.get(config.optimizer)
    lr = config.lr if config.lr is not None else default_lr(config, optimizer_cls)
    eps = config.eps if config.eps is not None else DEFAULT_EPS[config.peft]
    optimizer_kwargs = dict(lr=lr, eps=eps, weight_decay=config.weight_decay, seed=config.seed,
                            distribution=config.distribution, **config.optimizer_args)
    check_optimizer_args(optimizer_cls, optimizer_kwargs)  # before anything is loaded or written
    resolved = {**dataclasses.asdict(config), "lr": lr, "eps": eps, "optimizer": optimizer_cls.__name__}
    if config.threads:
        torch.set_num_threads(config.threads)
    dist = init_distributed()
    is_main = dist is None or dist.is_main
    out = _check_output_dir(config)
    if config.resume:
        check_resume_config(out, resolved)
    wall_start = time.time()

    # task and model first: a typo in either must not cost the user an existing run (--overwrite)
    task = build_task(config)
    model_given = model is not None and tokenizer is not None
    if not model_given:
        model, tokenizer = build_model(config, dist.device if dist is not None else None)
    if dist is not None:
        dist.barrier()  # every rank checked the directory before the main rank replaces it
    if is_main:
        _make_output_dir(out, config)
    if dist is not None:
        dist.barrier()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    objective = make_objective(model, tokenizer, task, objective=config.objective, max_length=config.max_length)

    optimizer = optimizer_cls(model, **optimizer_kwargs, process_group=dist.group if dist is not None else None,
                              check_every=100 if dist is not None else 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config))

    def run_eval(examples, split: str) -> dict[str, float]:
        metrics = evaluate(model, tokenizer, task, examples, batch_size=config.eval_batch_size,
                           max_length=config.max_length)
        return {k: float(v) for k, v in metrics.items()}

    loop = {"step": 0, "best": None, "best_step": None, "evals_without_gain": 0, "before": None}
    if config.resume:
        ckpt = out / "checkpoint"
        load_trainable(model, ckpt)
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True))
        scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", map_location="cpu", weights_only=True))
        loop.update(json.loads((ckpt / "loop.json").read_text()))
    elif is_main:
        (out / "config.json").write_text(json.dumps(resolved, indent=2))

    log = MetricsLog(out / "metrics.jsonl", is_main, out / "tensorboard" if config.tensorboard else None)
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if is_main else (lambda *a: None)
    model_name = type(model).__name__ if model_given else config.model
    say(f"zotune: {optimizer_cls.__name__} on {task.name} ({len(task.train)} train / {len(task.dev)} dev / "
        f"{len(task.test)} test), model {model_name}, {config.peft} tuning: {trainable:,} trainable "
        f"parameters, lr {lr:g}, eps {eps:g}, batch {config.batch_size}")

    if config.eval_before and loop["before"] is None and config.steps > 0:
        before = run_eval(task.dev, "dev")
        loop["before"] = {"dev": before}
        if task.test:
            loop["before"]["test"] = run_eval(task.test, "test")
        log.write({"kind": "eval", "step": 0, **{f"dev_{k}": v for k, v in before.items()}})
        say(f"zotune: before training: dev {_fmt(before)}"
            + (f", test {_fmt(loop['before']['test'])}" if task.test else ""))

    bar = None
    if is_main and config.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=loop["step"], desc="zo-train", unit="step", dynamic_ncols=True,
                   mininterval=1.0, file=sys.stderr)
    step_times: list[float] = []
    stopped_early = False
    while loop["step"] < config.steps:
        step = loop["step"]
        batch = [task.train[i] for i in batch_indices(len(task.train), config.batch_size, step, config.seed)]
        local = dist.shard(batch) if dist is not None else batch

        def closure(local=local):
            return objective(local)

        t0 = time.perf_counter()
        loss = float(optimizer.step(closure))
        scheduler.step()
        step_times.append(time.perf_counter() - t0)
        loop["step"] = step + 1
        if loop["step"] % config.log_every == 0 or loop["step"] == config.steps:
            log.write({"kind": "train", "step": loop["step"], "loss": loss, "lr": optimizer.param_groups[0]["lr"],
                       "projected_grad": (optimizer.zo_state["last_projected_grads"] or [float("nan")])[0],
                       "step_time": step_times[-1], "skipped_steps": optimizer.zo_state["skipped_steps"]})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

        evaluate_now = config.eval_every and (loop["step"] % config.eval_every == 0 or loop["step"] == config.steps)
        if evaluate_now:
            dev = run_eval(task.dev, "dev")
            log.write({"kind": "eval", "step": loop["step"], **{f"dev_{k}": v for k, v in dev.items()}})
            score = _primary(dev)
            if loop["best"] is None or score > loop["best"]:
                loop.update(best=score, best_step=loop["step"], evals_without_gain=0)
                if is_main:
                    save_trainable(model, out / "best")
            else:
                loop["evals_without_gain"] += 1
            if bar is not None:
                bar.write(f"step {loop['step']}: dev {_fmt(dev)} (best {loop['best']:.4f} at {loop['best_step']})")
            if config.early_stop and loop["evals_without_gain"] >= config.early_stop:
                say(f"zotune: early stop: no dev gain in {config.early_stop} evaluations")
                stopped_early = True
        if is_main and ((config.save_every and loop["step"] % config.save_every == 0) or stopped_early):
            save_checkpoint(out / "checkpoint", model, optimizer, scheduler, loop)
        if stopped_early:
            break
    if bar is not None:
        bar.close()
    if is_main and config.steps > 0:
        save_checkpoint(out / "checkpoint", model, optimizer, scheduler, loop)

    if dist is not None:
        from zotune.distributed import check_replicas

        check_replicas(optimizer)  # ranks must end bit-identical (raises a clear error if not)
        dist.barrier()  # the main process has written best/ and checkpoint/
    if loop["best_step"] is not None and (out / "best").exists():
        load_trainable(model, out / "best")
    final = {"dev": run_eval(task.dev, "dev")}
    if task.test:
        final["test"] = run_eval(task.test, "test")
    results = {
        "task": task.name,
        "model": config.model,
        "optimizer": optimizer_cls.__name__,
        "peft": config.peft,
        "trainable_params": trainable,
        "steps": loop["step"],
        "forwards": optimizer.zo_state["forwards"],
        "skipped_steps": optimizer.zo_state["skipped_steps"],
        "best_step": loop["best_step"],
        "stopped_early": stopped_early,
        "before": loop["before"],
        "after": final,
        "seconds_per_step": float(np.median(step_times)) if step_times else None,
        "wall_clock_s": time.time() - wall_start,
        "peak_memory_mb": peak_memory_mb(dist.device if dist is not None else None),
        "config": resolved,
    }
    if is_main:
        (out / "results.json").write_text(json.dumps(results, indent=2))
        try:
            from zotune.plotting import plot_runs

            plot_runs([out], out / "curves.png")
        except Exception as e:  # a plot must never fail a finished run
            say(f"zotune: could not draw curves.png: {e}")
        before_txt = ""
        if loop["before"]:
            split = "test" if "test" in loop["before"] else "dev"
            before_txt = f"{split} {_fmt(loop['before'][split])} -> "
        split = "test" if "test" in final else "dev"
        say(f"zotune: done in {results['wall_clock_s']:.0f} s: {before_txt}{split} {_fmt(final[split])} "
            f"(results in {out / 'results.json'})")
    log.close()
    if dist is not None:
        dist.barrier()
    return results


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "n")


def save_checkpoint(directory: Path, model, optimizer, scheduler, loop: dict[str, Any]) -> None:
    """Write the checkpoint atomically: into a temporary directory, then rename."""
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_trainable(model, tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    (tmp / "loop.json").write_text(json.dumps(loop))
    if directory.exists():
        old = directory.with_name(directory.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old)
    else:
        os.replace(tmp, directory)
