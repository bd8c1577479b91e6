"""Checkpoints survive a kill at any moment; corrupt files are one line; resumed runs log each step once."""

from __future__ import annotations

import json

import pytest
import torch
from tests.test_train import FAST, Interrupted, tiny_setup

from zotune import checkpoint
from zotune.errors import UserError
from zotune.plotting import read_metrics
from zotune.train import TrainConfig, train

COMMON = dict(task="sst2", steps=6, save_every=4, eval_every=3, eval_before=False, optimizer="zo-sgd")


def _run(tmp_path, name="run", **extra):
    model, tok = tiny_setup()
    config = TrainConfig(**{**FAST, **COMMON, "output_dir": str(tmp_path / name), **extra})
    return train(config, model=model, tokenizer=tok)


def _crash_at(monkeypatch, step_index: int):
    import zotune.train as loop

    real = loop.batch_indices

    def crash(n, b, step, seed):
        if step == step_index:
            raise Interrupted
        return real(n, b, step, seed)

    monkeypatch.setattr(loop, "batch_indices", crash)
    return lambda: monkeypatch.setattr(loop, "batch_indices", real)


def test_resumed_run_logs_each_step_once(tmp_path, monkeypatch):
    undo = _crash_at(monkeypatch, 5)  # step 5 is logged after the checkpoint at 4, then the run dies
    with pytest.raises(Interrupted):
        _run(tmp_path)
    undo()
    _run(tmp_path, resume=True)
    records = checkpoint.read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [3, 6]


def _two_versions(tmp_path):
    model, _ = tiny_setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    out = tmp_path / "run"
    out.mkdir()
    first = checkpoint.save_checkpoint(out, model, opt, sched, {"step": 2})
    return out, model, opt, sched, first


def test_a_kill_before_the_pointer_swap_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    out, model, opt, sched, first = _two_versions(tmp_path)

    def killed(*args):
        raise Interrupted

    monkeypatch.setattr(checkpoint, "_point", killed)
    with pytest.raises(Interrupted):
        checkpoint.save_checkpoint(out, model, opt, sched, {"step": 4})
    monkeypatch.undo()
    assert len(list((out / checkpoint.VERSIONS).iterdir())) == 2  # the new, unpublished version is left over
    assert checkpoint.load_checkpoint(out, model, opt, sched)["step"] == 2
    assert [p.name for p in (out / checkpoint.VERSIONS).iterdir()] == [first.name]  # recovered


def test_a_lost_pointer_falls_back_to_the_newest_complete_version(tmp_path):
    out, model, opt, sched, _ = _two_versions(tmp_path)
    second = checkpoint.save_checkpoint(out, model, opt, sched, {"step": 4})
    (out / checkpoint.POINTER).unlink()
    incomplete = out / checkpoint.VERSIONS / "v000009-step00000006"
    incomplete.mkdir()  # a version killed while being written: no COMPLETE marker
    assert checkpoint.latest(out) == second
    assert checkpoint.load_checkpoint(out, model, opt, sched)["step"] == 4
    assert (out / checkpoint.POINTER).resolve() == second.resolve() and not incomplete.exists()


def test_a_checkpoint_directory_of_the_old_layout_is_read_and_converted(tmp_path):
    out, model, opt, sched, _ = _two_versions(tmp_path)
    legacy = out / checkpoint.POINTER
    target = legacy.resolve()
    legacy.unlink()
    target.rename(legacy)
    (legacy / checkpoint.COMPLETE).unlink()
    assert checkpoint.latest(out) == legacy
    checkpoint.save_checkpoint(out, model, opt, sched, {"step": 4})
    assert legacy.is_symlink() and checkpoint.load_checkpoint(out, model, opt, sched)["step"] == 4


@pytest.mark.parametrize("name, damage", [
    ("trainable.safetensors", lambda b: b[: len(b) // 2]),
    ("optimizer.pt", lambda b: b[: len(b) // 2]),
    ("scheduler.pt", lambda b: b"not a torch file"),
    ("loop.json", lambda b: b'{"step": 4'),
])
def test_corrupt_checkpoint_files_are_one_line_naming_the_file(tmp_path, name, damage):
    _run(tmp_path)
    path = tmp_path / "run" / "checkpoint" / name
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(UserError, match=rf"{name} is corrupt or truncated .*--overwrite") as info:
        _run(tmp_path, resume=True, steps=8)
    assert "\n" not in str(info.value)


def test_cli_resume_from_a_corrupt_checkpoint_exits_2_without_traceback(tmp_path, capsys):
    from zotune.cli import main

    model, tok = tiny_setup()
    base = tmp_path / "base"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    argv = ["train", "--model", str(base), "--task", "sst2", "--steps", "2", "--batch-size", "4", "--max-dev", "4",
            "--max-test", "4", "--no-progress", "--no-eval-before", "--output-dir", str(tmp_path / "run")]
    assert main(argv) == 0
    (tmp_path / "run" / "checkpoint" / "optimizer.pt").write_bytes(b"\x00" * 10)
    capsys.readouterr()
    assert main([*argv, "--resume", "--steps", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith("zotune train: error: ") and "optimizer.pt is corrupt" in err


def test_a_torn_last_metrics_line_is_tolerated_and_a_corrupt_middle_line_is_named(tmp_path):
    _run(tmp_path)
    path = tmp_path / "run" / "metrics.jsonl"
    text = path.read_text()
    path.write_text(text + '{"kind": "train", "step": 7, "lo')  # what a kill mid-write leaves
    losses, evals = read_metrics(tmp_path / "run")
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and sorted(evals) == [3, 6]
    checkpoint.cut_jsonl(path, 4)
    assert [r["step"] for r in checkpoint.read_jsonl(path)] == [1, 2, 3, 3, 4]
    path.write_text('{"step": 1}\nGARBAGE\n{"step": 2}\n')
    with pytest.raises(UserError, match=r"metrics\.jsonl line 2 is not a JSON record"):
        read_metrics(tmp_path / "run")


def test_corrupt_config_json_on_resume_is_one_line(tmp_path):
    _run(tmp_path)
    (tmp_path / "run" / "config.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(UserError, match=r"config\.json is corrupt"):
        _run(tmp_path, resume=True, steps=8)
    assert json.loads((tmp_path / "run" / "results.json").read_text())["steps"] == 6  # nothing overwritten
