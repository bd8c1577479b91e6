"""Pre-flight checks of a training run: everything that can fail runs before anything is written.

``zotune train`` calls these before it loads the model (cheap checks) and before it replaces an
output directory (all of them), so a mistake never costs an existing run (see
:func:`zotune.train.plan_run` and :func:`zotune.train.start_run`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from zotune import checkpoint
from zotune.config import TrainConfig
from zotune.errors import UserError

#: settings that define the trajectory: a resumed run must keep them (steps, evaluation and
#: logging settings may change)
TRAJECTORY_FIELDS = ("model", "task", "optimizer", "lr", "eps", "batch_size", "weight_decay", "schedule",
                     "warmup_steps", "distribution", "optimizer_args", "peft", "lora_r", "lora_alpha",
                     "lora_targets", "lora_layers", "prefix_tokens", "objective", "template", "task_args", "k",
                     "data_seed",
                     "max_train", "max_dev", "max_length", "seed", "dtype")


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


def check_resume_config(out: Path, resolved: dict[str, Any]) -> None:
    """Refuse to resume a run with settings that would change its trajectory."""
    from zotune.config import saved_run_config

    saved = saved_run_config(str(out))  # {} without config.json; a corrupt one is a UserError

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
    if config.resume and checkpoint.latest(out) is None:
        raise UserError(f"--resume: no complete checkpoint in {out} (run without --resume to start)")
    _check_writable(out)
    if out.exists() and config.overwrite and not config.resume:
        _check_writable(out.parent)  # --overwrite removes and recreates the directory
    return out


def _check_writable(path: Path) -> None:
    """Refuse a directory that cannot be created, or written in: create and remove a probe folder
    in its nearest existing ancestor (permission bits alone do not tell: root, read-only mounts)."""
    anchor = path
    while not anchor.exists() and anchor != anchor.parent:
        anchor = anchor.parent
    if not anchor.is_dir():
        raise UserError(f"--output-dir {path}: {anchor} is a file, not a directory; choose another --output-dir")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".zotune-probe-", dir=anchor))
    except OSError as e:
        raise UserError(f"--output-dir {path}: cannot write in {anchor} ({e.strerror}); choose a writable "
                        "--output-dir") from None


def _check_tensorboard() -> None:
    """--tensorboard needs the tensorboard package (checked before anything is written)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard (or drop "
                        "--tensorboard)") from None


def _make_output_dir(out: Path, config: TrainConfig) -> None:
    """Create (or, with --overwrite, replace) the output directory: only once the run can start."""
    if config.overwrite and not config.resume and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _corrupt_weight_errors() -> tuple[type[BaseException], ...]:
    """What reading truncated or corrupt weight files raises (safetensors, torch.load)."""
    import pickle

    from safetensors import SafetensorError

    return (SafetensorError, pickle.UnpicklingError, EOFError)


def _check_model_config(name: str) -> None:
    """A local model directory's config.json must be JSON (transformers reports "not found")."""
    path = Path(name).expanduser() / "config.json"
    if not path.is_file():
        return
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"the model's {path} is corrupt ({type(e).__name__}); restore the model directory "
                        "(save_pretrained again, or copy it anew)") from None
