"""The training loop and the CLI on tiny random models (no downloads, seconds per test)."""

from __future__ import annotations

import json

import pytest
import torch

from zotune.cli import main
from zotune.models import apply_peft
from zotune.tasks import available_tasks, get_task
from zotune.testing import tiny_causal_lm, tiny_tokenizer
from zotune.train import TrainConfig, batch_indices, train

FAST = dict(steps=3, batch_size=4, max_dev=8, max_test=8, eval_batch_size=8, progress=False, lr=1e-3, eps=1e-2)


def tiny_setup(peft: str = "full", seed: int = 0, arch: str = "llama"):
    tok = tiny_tokenizer()
    model = tiny_causal_lm(arch, vocab_size=len(tok), seed=seed)
    model = apply_peft(model, None if peft == "full" else peft, seed=seed)
    return model, tok


def run(tmp_path, name="run", peft="full", **overrides):
    model, tok = tiny_setup(peft)
    config = TrainConfig(**{**FAST, "output_dir": str(tmp_path / name), "peft": peft, **overrides})
    results = train(config, model=model, tokenizer=tok)
    return model, results


def trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_batches_are_a_pure_function_of_seed_and_step():
    a = [batch_indices(10, 4, s, seed=1) for s in range(6)]
    b = [batch_indices(10, 4, s, seed=1) for s in range(6)]
    assert a == b
    assert a != [batch_indices(10, 4, s, seed=2) for s in range(6)]
    # every epoch visits every example once
    flat = [i for batch in a for i in batch][:20]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))


TASKS = [t.name for t in available_tasks() if "user-provided" not in (t.needs or "") and t.name != "custom"]


@pytest.mark.parametrize("task", TASKS)
def test_train_runs_every_task_on_a_tiny_model(tmp_path, task):
    _, results = run(tmp_path, task=task, steps=2, max_train=16, max_dev=4, max_test=4)
    assert results["steps"] == 2
    assert results["forwards"] >= 4
    metric = "f1" if "f1" in results["after"]["dev"] else "accuracy"
    assert 0.0 <= results["after"]["dev"][metric] <= 1.0
    out = tmp_path / "run"
    for name in ("config.json", "metrics.jsonl", "results.json", "checkpoint/trainable.safetensors"):
        assert (out / name).exists(), name


@pytest.mark.parametrize("peft", ["full", "lora", "prefix", "final_norm"])
def test_only_trainable_weights_move(tmp_path, peft):
    model, tok = tiny_setup(peft)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = TrainConfig(**{**FAST, "output_dir": str(tmp_path / peft), "peft": peft, "task": "sst2",
                            "eval_before": False, "lr": 1e-2, "eps": 1e-2})
    train(config, model=model, tokenizer=tok)
    moving = trainable_names(model)
    assert moving, "nothing trainable"
    for n, p in model.named_parameters():
        if n in moving:
            assert not torch.equal(before[n], p), f"{n} should move"
        else:
            assert torch.equal(before[n], p), f"{n} should stay frozen"


def test_accuracy_objective_trains(tmp_path):
    run(tmp_path, task="sst2", objective="accuracy", steps=3, eval_before=False)
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["kind"] == "train"]
    assert len(losses) == 3
    assert all(-1.0 <= v <= 0.0 for v in losses)  # -accuracy of a batch


class Interrupted(Exception):
    pass


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, monkeypatch):
    common = dict(task="sst2", steps=6, save_every=2, eval_every=3, eval_before=False, optimizer="zo-adam",
                  schedule="linear")
    run(tmp_path, name="full", **common)

    import zotune.train as loop

    real = loop.batch_indices

    def crash_at_step_5(n, b, step, seed):
        if step == 4:
            raise Interrupted
        return real(n, b, step, seed)

    monkeypatch.setattr(loop, "batch_indices", crash_at_step_5)
    with pytest.raises(Interrupted):
        run(tmp_path, name="resumed", **common)
    monkeypatch.setattr(loop, "batch_indices", real)
    model, tok = tiny_setup(seed=5)  # different init: everything must come from the checkpoint
    config = TrainConfig(**{**FAST, **common, "output_dir": str(tmp_path / "resumed"), "resume": True})
    resumed = train(config, model=model, tokenizer=tok)
    assert resumed["steps"] == 6
    final = json.loads((tmp_path / "full" / "checkpoint" / "loop.json").read_text())
    again = json.loads((tmp_path / "resumed" / "checkpoint" / "loop.json").read_text())
    assert final.pop("train_seconds") > 0 and again.pop("train_seconds") > 0  # wall-clock, not trajectory
    assert final == again
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "full" / "checkpoint" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "checkpoint" / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_output_dir_is_never_overwritten_by_accident(tmp_path):
    run(tmp_path, task="sst2", steps=1)
    before = (tmp_path / "run" / "results.json").read_text()
    from zotune.errors import UserError

    with pytest.raises(UserError, match="not empty"):
        run(tmp_path, task="sst2", steps=1)
    assert (tmp_path / "run" / "results.json").read_text() == before


def test_a_bad_model_costs_nothing_even_with_overwrite(tmp_path, capsys):
    run(tmp_path, task="sst2", steps=1)
    before = (tmp_path / "run" / "results.json").read_text()
    missing = str(tmp_path / "no-such-model")
    # --overwrite with a model that cannot load: the old run stays, one clear message, exit 2
    code = main(["train", "--task", "sst2", "--model", missing, "--output-dir", str(tmp_path / "run"),
                 "--overwrite", "--steps", "1", "--no-progress"])
    assert code == 2
    assert (tmp_path / "run" / "results.json").read_text() == before
    # a new directory is not even created
    assert main(["train", "--task", "sst2", "--model", missing, "--output-dir", str(tmp_path / "new"),
                 "--steps", "1", "--no-progress"]) == 2
    assert not (tmp_path / "new").exists()
    assert "Traceback" not in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random model saved in Hugging Face format, loadable by name/path like a real one."""
    path = tmp_path_factory.mktemp("tiny-model")
    model, tok = tiny_setup()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_cli_train_eval_plot_end_to_end(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "cli"
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_model_dir}\ntask: rte\nsteps: 2\nbatch_size: 4\nmax_dev: 4\nmax_test: 4\n"
                      "lr: 0.001\nprogress: false\n")
    code = main(["train", "--config", str(config), "--steps", "3", "--output-dir", str(out),
                 "--optimizer", "zo-sgd-mmt", "--opt", "momentum=0.5"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 3  # the CLI flag overrides the YAML
    assert results["optimizer"] == "ZOSGDMomentum"
    saved = json.loads((out / "config.json").read_text())
    assert saved["optimizer_args"] == {"momentum": 0.5}
    assert main(["eval", "--checkpoint", str(out), "--split", "dev", "--json", str(tmp_path / "e.json")]) == 0
    assert "accuracy" in json.loads((tmp_path / "e.json").read_text())["dev"]
    assert main(["plot", str(out), "--output", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_cli_resume_takes_the_saved_settings_and_refuses_changed_ones(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "run"
    base = ["train", "--model", str(tiny_model_dir), "--task", "rte", "--batch-size", "4", "--max-dev", "4",
            "--max-test", "4", "--no-progress", "--output-dir", str(out)]
    assert main([*base, "--optimizer", "zo-adam", "--lr", "0.002", "--seed", "7", "--steps", "2"]) == 0
    # only the output directory, --resume and a longer run: the rest comes from config.json
    assert main(["train", "--output-dir", str(out), "--resume", "--steps", "4", "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 4 and results["optimizer"] == "ZOAdam" and results["config"]["lr"] == 0.002
    capsys.readouterr()
    assert main(["train", "--output-dir", str(out), "--resume", "--steps", "6", "--seed", "8"]) == 2
    err = capsys.readouterr().err
    assert "seed 7 -> 8" in err and "Traceback" not in err
    assert json.loads((out / "results.json").read_text())["steps"] == 4  # nothing was touched


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--task", "no-such-task"], "unknown task"),
        (["train", "--optimizer", "adamx"], "unknown optimizer"),
        (["train", "--peft", "qlora"], "unknown --peft"),
        (["train", "--model", "/no/such/model/dir"], "not found"),
        (["train", "--config", "/no/such.yaml"], "does not exist"),
        (["train", "--task", "drop"], "DROP"),
        (["train", "--opt", "alpah=1e-6"], "has no option 'alpah'"),
        (["train", "--optimizer", "hizoo", "--opt", "alpha=2"], "alpha must be in [0, 1)"),
        (["train", "--optimizer", "hizoo-l", "--opt", "n_samples=4"], "no option 'n_samples'"),
    ],
)
def test_cli_user_errors_are_one_line_without_traceback(tmp_path, capsys, argv, message):
    code = main([*argv, "--output-dir", str(tmp_path / "x"), "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert message.lower() in err.lower()
    assert "Traceback" not in err
    assert not (tmp_path / "x" / "results.json").exists()


def test_every_documented_optimizer_option_passes_the_early_check():
    import inspect

    import zotune.optim as zo
    from zotune.train import check_optimizer_args

    for name in zo.available():
        cls = zo.get(name)
        own = {n: p.default for n, p in inspect.signature(cls.__init__).parameters.items()
               if p.default is not inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD}
        check_optimizer_args(cls, {**own, "seed": 3, "distribution": "rademacher"})  # must not raise


def test_listing_commands(capsys):
    assert main(["optimizers"]) == 0
    assert "ZOSGD" in capsys.readouterr().out
    assert main(["tasks"]) == 0
    listed = capsys.readouterr().out
    for name in ("sst2", "squad", "copa", "drop"):
        assert name in listed
    assert main(["models"]) == 0
    assert "smollm2-135m" in capsys.readouterr().out


def test_get_task_is_used_with_k_and_seed():
    a = get_task("sst2", k=16, data_seed=13)
    b = get_task("sst2", k=16, data_seed=42)
    assert [e.prompt for e in a.train] != [e.prompt for e in b.train]


def test_torchrun_data_parallel_matches_single_process(tmp_path, tiny_model_dir):
    """`torchrun --nproc_per_node 2 -m zotune train` (gloo on CPU): each rank takes half of every
    batch and only loss scalars are all-reduced; the result equals one process on whole batches
    up to fp32 rounding of the loss (amplified by lr/eps), and ranks end bit-identical (the
    trainer's final replica check raises otherwise)."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    common = ["-m", "zotune", "train", "--model", str(tiny_model_dir), "--task", "sst2", "--steps", "3",
              "--batch-size", "8", "--max-dev", "4", "--max-test", "4", "--no-eval-before", "--no-progress",
              "--threads", "1", "--lr", "1e-3", "--eps", "1e-2"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, *common, "--output-dir", str(tmp_path / "single")],
                            capture_output=True, text=True, timeout=300, env=env)
    assert single.returncode == 0, single.stderr[-2000:]
    dp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                         "--standalone", *common, "--output-dir", str(tmp_path / "dp")],
                        capture_output=True, text=True, timeout=300, env=env)
    assert dp.returncode == 0, dp.stderr[-3000:]
    assert "world size 2 (2 processes, backend gloo, 4 examples per process)" in dp.stderr
    assert "world size 1 (one process;" in single.stderr
    for run_dir, world, backend in (("single", 1, None), ("dp", 2, "gloo")):
        for name in ("config.json", "results.json"):
            recorded = json.loads((tmp_path / run_dir / name).read_text())["data_parallel"]
            assert recorded == {"world_size": world, "backend": backend}, (run_dir, name)
    a = load_file(str(tmp_path / "single" / "checkpoint" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "dp" / "checkpoint" / "trainable.safetensors"))
    init = dict(tiny_setup()[0].named_parameters())
    moved = max((a[k] - init[k].detach()).abs().max().item() for k in a)
    assert moved > 1e-5
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-3 * moved)


def test_cli_custom_jsonl_task_without_code(tmp_path, tiny_model_dir):
    rows = [{"text": f"this movie was {w}", "label": int(w == "great")} for w in ["great", "bad"] * 12]
    data = tmp_path / "mine.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "custom"
    code = main(["train", "--model", str(tiny_model_dir), "--task", "custom", "--task-arg", f"path={data}",
                 "--template", "Review: {text}\nSentiment:", "--task-arg", "label_words={0: ' bad', 1: ' great'}",
                 "--steps", "2", "--batch-size", "4", "--no-progress", "--output-dir", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "custom" and "accuracy" in results["after"]["dev"]


def test_cli_refuses_a_batch_the_processes_cannot_share_before_loading_anything(tmp_path, monkeypatch, capsys):
    """Under a launcher with 3 processes, --batch-size 4 is refused (exit 2, one line) before the
    model loads and before the output directory is created."""
    import zotune.distributed
    import zotune.train
    from zotune.distributed import DistContext

    fake = DistContext(rank=0, world_size=3, local_rank=0, group=None, device=torch.device("cpu"), backend="gloo",
                       timeout_s=1.0, owns_group=False)
    monkeypatch.setattr(zotune.distributed, "init_distributed", lambda *a, **k: fake)

    def no_loading(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(zotune.train, "build_model", no_loading)
    monkeypatch.setattr(zotune.train, "build_task", no_loading)
    out = tmp_path / "run"
    code = main(["train", "--task", "sst2", "--batch-size", "4", "--steps", "1", "--no-progress",
                 "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert "--batch-size 4 is not divisible by the 3 data-parallel processes; use a multiple of 3" in err
    assert "Traceback" not in err and not out.exists()


def test_saved_config_with_its_data_parallel_record_is_a_valid_config(tmp_path):
    _, results = run(tmp_path, task="rte", steps=1, eval_before=False)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["data_parallel"] == results["data_parallel"] == {"world_size": 1, "backend": None}
    assert TrainConfig.from_dict(saved).task == "rte"


def test_reset_peak_memory_starts_the_peak_from_the_memory_in_use_now():
    from zotune.memory import peak_memory_mb, reset_peak_memory

    if not reset_peak_memory():
        pytest.skip("this OS cannot reset the peak resident memory (/proc/self/clear_refs)")
    big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    with_big = peak_memory_mb()
    del big
    assert reset_peak_memory()
    assert peak_memory_mb() < with_big - 48  # the freed 64 MiB left the peak (16 MiB of slack)


def test_a_resumed_run_takes_its_peak_after_the_checkpoint_is_loaded(tmp_path, monkeypatch):
    # the checkpoint is read through memory maps and a temporary copy: not part of the run's peak
    import zotune.train as train_module

    common = dict(task="sst2", steps=2, save_every=1, eval_before=False)
    run(tmp_path, name="resumed", **{**common, "steps": 1})
    events: list[str] = []
    real_load = train_module.checkpoint.load_checkpoint
    monkeypatch.setattr(train_module.checkpoint, "load_checkpoint",
                        lambda *a, **k: events.append("load") or real_load(*a, **k))
    monkeypatch.setattr(train_module, "reset_peak_memory", lambda device=None: events.append("reset") or True)
    model, tok = tiny_setup(seed=5)
    train(TrainConfig(**{**FAST, **common, "output_dir": str(tmp_path / "resumed"), "resume": True}),
          model=model, tokenizer=tok)
    assert events == ["load", "reset"]


def test_peak_memory_is_taken_before_the_best_weights_are_reloaded(tmp_path, monkeypatch):
    # the reload memory-maps best/trainable.safetensors, whose pages count in VmHWM as a second copy
    # of the trainable weights: the reported peak is the run's before that reload
    import zotune.train as train_module

    events: list[str] = []
    monkeypatch.setattr(train_module, "peak_memory_mb", lambda device=None: events.append("peak") or 123.0)
    real_load = train_module.load_trainable
    monkeypatch.setattr(train_module, "load_trainable", lambda *a: events.append("reload") or real_load(*a))
    _, results = run(tmp_path, task="sst2", steps=2, eval_every=1)
    assert results["best_step"] is not None and "reload" in events
    assert results["peak_memory_mb"] == 123.0
    assert events.index("peak") < events.index("reload")
