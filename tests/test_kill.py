"""SIGKILL a training run at random moments (some inside the checkpoint swap), resume each time:
it must end bit-identical to an uninterrupted run, with every step logged exactly once."""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.test_train import tiny_setup

from zotune import checkpoint
from zotune.cli import main
from zotune.trajectory import FILENAME

STEPS = 24
pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or not hasattr(os, "symlink"), reason="needs fork (POSIX)")


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("kill-base")
    model, tok = tiny_setup()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _argv(base: Path, out: Path, extra: list[str]) -> list[str]:
    return ["train", "--model", str(base), "--task", "sst2", "--optimizer", "zo-adam", "--steps", str(STEPS),
            "--save-every", "3", "--eval-every", "8", "--batch-size", "4", "--max-dev", "4", "--max-test", "4",
            "--lr", "1e-3", "--eps", "1e-2", "--no-progress", "--no-eval-before", "--output-dir", str(out), *extra]


def _start(argv: list[str], pause: float | None) -> tuple[int, queue.Queue]:
    """Fork a process that runs ``zotune ARGV`` (torch and transformers are already imported here,
    which saves the seconds each fresh interpreter would spend); its stderr lines go to a queue."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a real process that a SIGKILL ends at any instruction
        code = 1
        try:
            os.close(read_fd)
            os.dup2(write_fd, 2)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            sys.stderr = os.fdopen(2, "w", buffering=1)
            _private_locks()
            os.environ.pop(checkpoint.PAUSE_ENV, None)
            if pause is not None:
                os.environ[checkpoint.PAUSE_ENV] = str(pause)
            code = main(argv)
        finally:
            os._exit(code)
    os.close(write_fd)
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        with os.fdopen(read_fd) as f:
            for line in f:
                lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return pid, lines


def _private_locks() -> None:
    """In a forked child: give tqdm a lock of its own. Its default lock holds a semaphore shared
    between processes; a child killed while holding it (transformers' "Loading weights" bar)
    would leave every later child, and this test process, waiting on it forever."""
    import tqdm
    from transformers.utils import logging as hf_logging

    tqdm.tqdm.set_lock(threading.RLock())
    hf_logging.disable_progress_bar()


def _exit_code(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _wait_for(lines: queue.Queue, text: str, limit: float = 300.0) -> bool:
    """True once a stderr line containing ``text`` arrives; False if the process ends first."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        line = lines.get(timeout=max(0.1, end - time.monotonic()))
        if line is None:
            return False
        if text in line:
            return True
    return False


def _kill_and_resume(base: Path, out: Path, kills: int, rng: random.Random) -> int:
    """Run until finished, SIGKILLing ``kills`` times; returns the kills that landed inside a swap."""
    in_swap = 0
    for i in range(kills + 1):
        resume = ["--resume"] if checkpoint.latest(out) is not None else (["--overwrite"] if out.exists() else [])
        swap_kill = i < kills and i % 3 == 1  # every third kill is timed inside the checkpoint swap
        pid, lines = _start(_argv(base, out, resume), 2.0 if swap_kill else None)
        if i == kills:
            assert _exit_code(pid) == 0, "the final resumed run failed"
            break
        if swap_kill:
            where = "pointer not yet replaced" if (i // 3) % 2 == 0 else "old versions not yet deleted"
            assert _wait_for(lines, where), "the run never paused inside the checkpoint swap"
            in_swap += 1
        elif rng.random() < 0.8 and _wait_for(lines, "zotune: "):  # mostly in training, sometimes at start-up
            time.sleep(rng.uniform(0.0, 1.0))
        os.kill(pid, signal.SIGKILL)
        assert _exit_code(pid) in (-signal.SIGKILL, 0)  # 0: it finished before the kill landed
    return in_swap


#: wall-clock fields: the only values a killed and resumed run may not share with the reference
TIMING = ("step_time", "seconds", "train_seconds")


def _untimed(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TIMING}


def _check_identical(reference: Path, out: Path) -> None:
    loops = [json.loads((run / "checkpoint" / "loop.json").read_text()) for run in (reference, out)]
    assert _untimed(loops[0]) == _untimed(loops[1])
    a = load_file(str(reference / "checkpoint" / "trainable.safetensors"))
    b = load_file(str(out / "checkpoint" / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (reference / FILENAME).read_bytes() == (out / FILENAME).read_bytes()  # every step recorded once
    ref = checkpoint.read_jsonl(reference / "metrics.jsonl")
    got = checkpoint.read_jsonl(out / "metrics.jsonl")
    train_steps = [r["step"] for r in got if r["kind"] == "train"]
    assert train_steps == list(range(1, STEPS + 1))  # each step logged exactly once, in order
    assert [_untimed(r) for r in got] == [_untimed(r) for r in ref]
    assert not [p for p in (out / checkpoint.VERSIONS).iterdir()][1:]  # leftovers cleaned up
    assert json.loads((out / "results.json").read_text())["steps"] == STEPS


@pytest.mark.parametrize("kills", [pytest.param(4, id="4-kills"),
                                   pytest.param(20, id="20-kills", marks=pytest.mark.slow)])
def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path, base_model, kills):
    reference = tmp_path / "reference"
    assert main(_argv(base_model, reference, [])) == 0
    out = tmp_path / "killed"
    in_swap = _kill_and_resume(base_model, out, kills, random.Random(kills))
    assert in_swap >= 1
    _check_identical(reference, out)
