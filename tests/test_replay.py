"""Replayable fine-tunes: a run's trajectory.zot rebuilds its weights bit-identically."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file
from tests.test_optim_common import kw
from tests.test_train import FAST, tiny_setup

import zotune.optim as zo
from zotune import trajectory as zotraj
from zotune.cli import main
from zotune.errors import UserError
from zotune.train import TrainConfig, train


def _train(tmp_path, optimizer: str, peft: str = "full", **extra):
    model, tok = tiny_setup(peft)
    test_kw = {k: v for k, v in kw(zo.get(optimizer).__name__).items() if k != "lr"}
    own = {k: v for k, v in test_kw.items() if k in TrainConfig.field_names()}  # e.g. distribution
    args = {k: v for k, v in test_kw.items() if k not in own}
    config = TrainConfig(**{**FAST, "task": "sst2", "steps": 5, "eval_before": False, "optimizer": optimizer,
                            "peft": peft, "schedule": "linear", "output_dir": str(tmp_path / optimizer),
                            "optimizer_args": args, **own, **extra})
    train(config, model=model, tokenizer=tok)
    return tmp_path / optimizer


def _replayed(run_dir, peft: str = "full", steps: int | None = None) -> dict[str, torch.Tensor]:
    header, records = zotraj.read(run_dir / zotraj.FILENAME)
    model, _ = tiny_setup(peft)  # the same base model, nothing trained
    zotraj.replay(run_dir, header, records[:steps] if steps is not None else records, model)
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", zo.available())
def test_replay_rebuilds_the_trained_weights_bit_identically(tmp_path, name):
    run_dir = _train(tmp_path, name)
    trained = load_file(str(run_dir / "checkpoint" / "trainable.safetensors"))
    replayed = _replayed(run_dir)
    base = dict(tiny_setup()[0].named_parameters())
    assert any(not torch.equal(trained[k], base[k]) for k in trained)  # the run did move the weights
    assert trained.keys() == replayed.keys()
    assert all(torch.equal(trained[k], replayed[k]) for k in trained)


def test_replay_of_a_lora_run_and_of_a_prefix_of_steps(tmp_path):
    run_dir = _train(tmp_path, "zosgd", peft="lora", lr=1e-2)
    trained = load_file(str(run_dir / "checkpoint" / "trainable.safetensors"))
    assert all(torch.equal(trained[k], v) for k, v in _replayed(run_dir, "lora").items())
    partial = _replayed(run_dir, "lora", steps=2)
    assert any(not torch.equal(trained[k], v) for k, v in partial.items())


def _zosgd_record_sizes(steps: int) -> list[int]:
    w = torch.nn.Parameter(torch.ones(3))
    opt = zo.ZOSGD([w], lr=1e-3)
    sizes, lrs = [], None
    for _ in range(steps):
        opt.step(lambda: (w**2).sum())
        sizes.append(len(zotraj.encode(opt.last_step_record, lrs)))
        lrs = opt.last_step_record.lrs
    return sizes


def test_trajectory_records_are_compact():
    """ZO-SGD records have a fixed size after the first: 20,000 of them stay under 1 MB."""
    sizes = _zosgd_record_sizes(50)
    assert len(set(sizes[1:])) == 1
    assert sizes[0] + 19_999 * sizes[1] < 1_000_000, sizes[:2]


@pytest.mark.slow
def test_a_20000_step_zosgd_trajectory_is_under_1_mb():
    assert sum(_zosgd_record_sizes(20_000)) < 1_000_000


def test_replay_refuses_another_base_model_and_other_noise(tmp_path):
    run_dir = _train(tmp_path, "zosgd")
    header, records = zotraj.read(run_dir / zotraj.FILENAME)
    other, _ = tiny_setup(seed=3)
    with pytest.raises(UserError, match="another base model"):
        zotraj.replay(run_dir, header, records, other)
    with pytest.raises(UserError, match="noise differs"):
        zotraj.check_noise({**header, "noise": "0" * 16, "zotune": "0.0.1"}, run_dir)
    zotraj.check_noise(header, run_dir)  # this version's own file passes
    # the header carries the block size the run resolved (CUDA's default differs from the CPU's)
    from zotune.optim.noise import DEFAULT_BLOCK_SIZE

    assert header["block_size"] == DEFAULT_BLOCK_SIZE
    with pytest.raises(UserError, match="noise differs"):
        zotraj.check_noise({**header, "block_size": 1 << 22}, run_dir)
    # files older than the field were made with the run's option or the CPU default, on any device
    old = {k: v for k, v in header.items() if k != "block_size"}
    assert zotraj.recorded_block_size(old) == DEFAULT_BLOCK_SIZE
    assert zotraj.recorded_block_size({**old, "optimizer_kwargs": {"block_size": 1 << 10}}) == 1 << 10
    assert zotraj.recorded_block_size({**header, "block_size": 1 << 12}) == 1 << 12
    model, _ = tiny_setup()
    assert zotraj.replay(run_dir, {**header, "block_size": 1 << 12}, records, model).block_size == 1 << 12


def test_torn_trajectory_record_is_ignored_and_cut_keeps_earlier_steps(tmp_path):
    run_dir = _train(tmp_path, "zosgd")
    path = run_dir / zotraj.FILENAME
    data = path.read_bytes()
    path.write_bytes(data[:-3])  # a kill in the middle of the last record
    assert [r.step for r in zotraj.read(path)[1]] == [0, 1, 2, 3]
    assert zotraj.cut(path, 2) and [r.step for r in zotraj.read(path)[1]] == [0, 1]
    assert not zotraj.cut(path, 4)  # steps 2, 3 are gone: cannot continue from step 4


def test_cli_replay_end_to_end(tmp_path, capsys):
    model, tok = tiny_setup()
    base = tmp_path / "base"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    common = ["--model", str(base), "--task", "sst2", "--batch-size", "4", "--max-dev", "4", "--max-test", "4",
              "--steps", "3", "--lr", "1e-3", "--eps", "1e-2", "--no-progress", "--no-eval-before"]
    assert main(["train", *common, "--output-dir", str(tmp_path / "run")]) == 0
    assert main(["replay", str(tmp_path / "run"), "--output", str(tmp_path / "rep")]) == 0
    a = load_file(str(tmp_path / "run" / "checkpoint" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "rep" / "checkpoint" / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert main(["eval", "--checkpoint", str(tmp_path / "rep"), "--split", "dev"]) == 0
    # a file that is not a trajectory, and an occupied --output: one line each, exit 2
    (tmp_path / "junk.zot").write_bytes(b"garbage" + struct.pack("<I", 3))
    capsys.readouterr()
    assert main(["replay", str(tmp_path / "junk.zot"), "--output", str(tmp_path / "x")]) == 2
    assert main(["replay", str(tmp_path / "run"), "--output", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 2
    assert json.loads((tmp_path / "rep" / "config.json").read_text())["replayed_steps"] == 3
