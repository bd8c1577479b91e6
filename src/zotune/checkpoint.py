"""Checkpoints that survive a kill at any moment, run logs cut back to them on resume, and the metrics log.

Layout inside a run directory::

    checkpoints/v000007-step00000350/   one complete checkpoint (a *version*)
        trainable.safetensors           trainable weights
        optimizer.pt                    optimizer state (fp32; its step counter drives the seeds)
        scheduler.pt                    lr scheduler state
        loop.json                       loop state (step, best dev score, ...)
        COMPLETE                        written last: the version is whole
    checkpoint -> checkpoints/v000007-step00000350   the pointer (a relative symlink)

A save writes a new version directory, marks it complete, and then replaces the pointer with
one ``rename`` (atomic on POSIX); only then are older versions deleted. A kill at any moment
therefore leaves either the old pointer (to a complete older version) or the new one, plus
perhaps leftovers that :func:`recover` removes at the next start-up. If the pointer itself is
missing or dangling, the newest complete version is used. A ``checkpoint/`` *directory* (runs
written before versioned checkpoints) is still read, and converted at the next save.

Readers of ``metrics.jsonl`` use :func:`read_jsonl`, which tolerates the torn last line a kill
leaves; :func:`cut_jsonl` cuts the log back to the checkpoint on resume, so every step is
logged exactly once.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from zotune.errors import UserError

POINTER = "checkpoint"
VERSIONS = "checkpoints"
COMPLETE = "COMPLETE"
_VERSION_RE = re.compile(r"^v(\d{6})-step(\d+)$")
#: test-only: seconds to pause inside the checkpoint swap (announced on stderr), so a test can
#: SIGKILL a run exactly there
PAUSE_ENV = "ZOTUNE_TEST_CHECKPOINT_PAUSE"


# ---------------------------------------------------------------------------- trainable weights


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable (``requires_grad``) parameters, on the CPU, by name (a lazy update is applied first)."""
    from zotune.optim.lazy import flush_pending

    flush_pending(model)
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_trainable(model: torch.nn.Module, directory: Path) -> None:
    """Write the trainable weights to ``directory/trainable.safetensors``."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file(trainable_state(model), str(directory / "trainable.safetensors"))


def load_trainable(model: torch.nn.Module, directory: Path) -> None:
    """Load ``directory/trainable.safetensors`` into the model (a corrupt file is a UserError)."""
    from safetensors.torch import load_file

    path = directory / "trainable.safetensors"
    if not path.exists():
        raise UserError(f"no trainable weights at {path}; is {directory} a zotune checkpoint?")
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated/garbled files
        raise _corrupt(path, e) from None
    params = dict(model.named_parameters())
    missing = [n for n in tensors if n not in params]
    if missing:
        raise UserError(f"checkpoint {directory} does not match the model: unknown tensors {missing[:3]}...")
    wrong = [n for n, v in tensors.items() if v.shape != params[n].shape]
    if wrong:
        raise UserError(f"checkpoint {path} does not match the model: tensor {wrong[0]} has shape "
                        f"{tuple(tensors[wrong[0]].shape)}, the model's {tuple(params[wrong[0]].shape)}")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].dtype))


def _corrupt(path: Path, error: BaseException) -> UserError:
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    reason = first if 0 < len(first) <= 80 else type(error).__name__  # torch's messages run to pages
    return UserError(f"{path} is corrupt or truncated ({reason}); restore it from a backup, or start the run "
                     "again without --resume (with --overwrite)")


# ---------------------------------------------------------------------------- versions and pointer


def _versions(out: Path) -> list[tuple[int, Path]]:
    """(sequence number, path) of every version directory, oldest first (complete or not)."""
    root = out / VERSIONS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _VERSION_RE.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest(out: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None. Reads only (safe before any check)."""
    pointer = out / POINTER
    if pointer.is_symlink():
        target = pointer.resolve()
        if (target / COMPLETE).exists():
            return pointer
    elif pointer.is_dir() and (pointer / "loop.json").exists():
        return pointer  # a checkpoint written before versioned checkpoints
    complete = [p for _, p in _versions(out) if (p / COMPLETE).exists()]
    return complete[-1] if complete else None


def recover(out: Path) -> Path | None:
    """Repair what a kill may have left: point at the newest complete version, delete the rest."""
    found = latest(out)
    if found is None:
        return None
    pointer = out / POINTER
    if found != pointer:  # pointer missing or dangling: re-point it at the newest complete version
        _point(out, found)
        found = pointer
    keep = pointer.resolve() if pointer.is_symlink() else None
    for _, version in _versions(out):
        if keep is None or version.resolve() != keep:
            shutil.rmtree(version, ignore_errors=True)
    for leftover in out.glob(f".{POINTER}.*"):
        leftover.unlink(missing_ok=True)
    return found


def _point(out: Path, version: Path) -> None:
    """Atomically make ``out/checkpoint`` a symlink to ``version``."""
    tmp = out / f".{POINTER}.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(version, out), tmp)
    os.replace(tmp, out / POINTER)
    _fsync_dir(out)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _pause(where: str) -> None:
    seconds = os.environ.get(PAUSE_ENV)
    if seconds:
        print(f"zotune-test: checkpoint swap: {where}", file=sys.stderr, flush=True)
        time.sleep(float(seconds))


def save_checkpoint(out: Path, model, optimizer, scheduler, loop: dict[str, Any]) -> Path:
    """Write a new checkpoint version, then atomically point ``out/checkpoint`` at it."""
    pointer = out / POINTER
    if pointer.is_dir() and not pointer.is_symlink():  # old layout: move it aside as a version first
        legacy = out / VERSIONS / "v000000-step0"
        legacy.parent.mkdir(exist_ok=True)
        (pointer / COMPLETE).touch()
        os.replace(pointer, legacy)
        _point(out, legacy)
    versions = _versions(out)
    seq = versions[-1][0] + 1 if versions else 1
    version = out / VERSIONS / f"v{seq:06d}-step{int(loop['step']):08d}"
    version.mkdir(parents=True)
    save_trainable(model, version)
    torch.save(optimizer.state_dict(), version / "optimizer.pt")
    torch.save(scheduler.state_dict(), version / "scheduler.pt")
    (version / "loop.json").write_text(json.dumps(loop))
    for f in version.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    (version / COMPLETE).write_text("")
    _fsync_dir(version)
    _pause("new version written, pointer not yet replaced")
    _point(out, version)
    _pause("pointer replaced, old versions not yet deleted")
    for _, old in versions:
        shutil.rmtree(old, ignore_errors=True)
    return version


def load_checkpoint(out: Path, model, optimizer, scheduler, *, repair: bool = True) -> dict[str, Any]:
    """Load the newest complete checkpoint into model, optimizer and scheduler; returns the loop state.

    With ``repair`` (the process that writes: one per run) the leftovers of a killed save are
    cleaned up first (:func:`recover`); other ranks only read. Every corrupt file is one
    :class:`UserError` naming it.
    """
    ckpt = recover(out) if repair else latest(out)
    if ckpt is None:
        raise UserError(f"--resume: no complete checkpoint in {out} (run without --resume to start)")
    load_trainable(model, ckpt)
    for name, target in (("optimizer.pt", optimizer), ("scheduler.pt", scheduler)):
        path = ckpt / name
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise UserError(f"{path} is missing; start the run again without --resume (with --overwrite)") from None
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, ValueError) as e:
            raise _corrupt(path, e) from None
        try:
            target.load_state_dict(state)
        except (KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
            raise _corrupt(path, e) from None
    path = ckpt / "loop.json"
    try:
        loop = json.loads(path.read_text())
        if not isinstance(loop, dict) or not isinstance(loop.get("step"), int):
            raise ValueError("no integer 'step'")
    except FileNotFoundError:
        raise UserError(f"{path} is missing; start the run again without --resume (with --overwrite)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise _corrupt(path, e) from None
    return loop


# ---------------------------------------------------------------------------- run logs


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL log; a torn last line (what a kill leaves) is ignored.

    A line that is not JSON anywhere else is a :class:`UserError` naming the file.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    records, lines = [], data.split(b"\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not an object")
        except (ValueError, UnicodeDecodeError):
            if i == len(lines) - 1:  # the last line had no newline yet: a write cut by a kill
                break
            raise UserError(f"{path} line {i + 1} is not a JSON record; the file is corrupt: delete that line "
                            "or the file") from None
        records.append(rec)
    return records


def cut_jsonl(path: Path, step: int) -> None:
    """Keep only the records of steps ``<= step`` (and drop a torn last line), atomically."""
    if not path.exists():
        return
    kept = [r for r in read_jsonl(path) if int(r.get("step", 0)) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)


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
        """Append one record (a JSON line; its numbers to TensorBoard too)."""
        if not self.enabled or self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, record["step"])

    def close(self) -> None:
        """Close the files (idempotent)."""
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
