"""`zotune race` on a tiny random model: grids, resume after SIGKILL, commands + collect, the report's rules.

Cells run in process (``--in-process``) so that a test pays the library start-up once; the
runner's subprocess path is the same command line (``zotune train ...``).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from zotune.cli import main
from zotune.optim.first_order import FirstOrderAdamW
from zotune.race.grid import UNBOUNDED_STEPS, build_spec
from zotune.race.report import VOLATILE, markdown, summarize, time_to_target
from zotune.testing import tiny_causal_lm, tiny_tokenizer

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-race-model")
    tok = tiny_tokenizer()
    tiny_causal_lm("llama", vocab_size=len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def race_yaml(path: Path, model: Path) -> Path:
    """Four ZO-SGD cells (2 lrs x 2 seeds) of 6 steps on SST-2, dev every 2 steps, checkpoints every 2."""
    path.write_text(f"model: {model}\ntasks: [sst2]\noptimizers: [zosgd]\npeft: [final_norm]\nseeds: [13, 42]\n"
                    "steps: 6\neval_every: 2\nlr: {zosgd: [0.001, 0.3]}\n"
                    "train: {batch_size: 4, max_dev: 8, max_test: 8, eps: 0.01}\n")
    return path


def stable(summary_path: Path) -> dict:
    """summary.json without what depends on the machine's speed (seconds) or memory."""
    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if not any(w in k for w in VOLATILE)}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj

    return strip(json.loads(summary_path.read_text()))


def test_grid_expands_from_yaml_and_flags(tmp_path, tiny_model_dir):
    from zotune.config import load_config_file

    yaml = tmp_path / "race.yaml"
    yaml.write_text("tasks: [sst2, rte]\noptimizers: [zosgd, adamw]\nseeds: [1, 2]\nsteps: 5\n"
                    "lr: {zosgd: [0.001, 0.01]}\nbaselines: [zeroshot]\ntrain: {batch_size: 4}\n")
    spec = build_spec(load_config_file(str(yaml)), {"seeds": "7", "train": {"batch_size": 4, "max_test": 8}})
    cells = spec.cells()
    names = [c.name for c in cells]
    # per task: zero-shot, 2 ZO-SGD lrs, AdamW's documented final_norm grid (2 lrs); seed 7 from the flag
    assert names[:5] == ["sst2__zeroshot__s7", "sst2__final_norm__zosgd__lr0.001__s7",
                         "sst2__final_norm__zosgd__lr0.01__s7", "sst2__final_norm__adamw__lr0.003__s7",
                         "sst2__final_norm__adamw__lr0.01__s7"]
    assert len(cells) == 10 and names[5] == "rte__zeroshot__s7"
    train_cell = cells[1]
    assert train_cell.options["batch_size"] == 4 and train_cell.options["max_test"] == 8
    assert train_cell.options["steps"] == 5 and train_cell.options["seed"] == train_cell.options["data_seed"] == 7
    assert cells[0].options["steps"] == 0
    # the zero-shot cell is the evaluation before training: the trained cells skip their own
    assert train_cell.options["eval_before"] is False and "eval_before" not in cells[0].options
    kept = build_spec({}, {"tasks": "sst2", "optimizers": "zosgd", "steps": 5, "baselines": "zeroshot",
                           "train": {"eval_before": True}}).cells()
    assert kept[1].options["eval_before"] is True  # unless the user asks for it
    assert "eval_before" not in build_spec({}, {"tasks": "sst2", "optimizers": "zosgd", "steps": 5}).cells()[0].options
    argv = train_cell.argv("out")
    assert argv[argv.index("--lr") + 1] == "0.001" and argv[-2:] == ["--output-dir", "out"]

    quick = build_spec({}, {"suite": "lmbff-k16", "optimizers": "zosgd,zoadam,hizoo", "forwards": 40})
    cells = quick.cells()
    assert {c.options["task"] for c in cells} == {"sst2", "sst5", "snli", "mnli", "rte", "trec"}
    assert len(cells) == 6 * 2 * (2 + 3 * 2)  # tasks x seeds x (zero-shot, ICL + 3 optimizers x 2 lrs)
    trained = [c for c in cells if c.kind == "train"]
    assert all(c.options["max_forwards"] == 40 and c.options["steps"] == UNBOUNDED_STEPS for c in trained)
    icl = next(c for c in cells if c.kind == "icl")
    assert icl.options["task_args"] == {"demonstrations": 4}


def test_a_top_k_race_evaluates_zero_shot_through_the_same_cache(tmp_path):
    from zotune.train import TOP_LR_FACTOR

    grid = {"tasks": "sst2", "optimizers": "zosgd", "seeds": "1", "baselines": "zeroshot", "steps": 3}
    cells = build_spec({}, {**grid, "peft": "lora,top:2+head"}).cells()
    assert cells[0].kind == "zeroshot" and cells[0].options["peft"] == "top:2+head"
    top = [c for c in cells if c.kind == "train" and c.options["peft"] == "top:2+head"]
    assert len(top) == 1 and top[0].name.startswith("sst2__top2head__zosgd__lr") and ":" not in top[0].name
    # top:K has no lr grid of its own: the optimizer's default for the mode (full's x TOP_LR_FACTOR)
    assert top[0].options["lr"] == pytest.approx(1e-6 * TOP_LR_FACTOR)
    assert build_spec({}, {**grid, "peft": "lora"}).zeroshot_peft() == "full"


def test_eval_every_forwards_samples_every_curve_at_the_same_forwards():
    spec = build_spec({}, {"tasks": "sst2", "optimizers": "zosgd,fzoo,fzoo:n_queries=3,zo-muon", "forwards": 72,
                           "eval_every_forwards": 36})
    every = {c.name.split("__")[2]: c.options["eval_every"] for c in spec.cells()}
    # 2, 9, 4 and 5 forwards a step
    assert every == {"zosgd": 18, "fzoo": 4, "fzoo-n_queries3": 9, "zomuon": 7}
    assert all(c.options["save_every"] == c.options["eval_every"] for c in spec.cells())
    # a suite's step cadence gives way to a cadence in forwards given by the user
    quick = build_spec({}, {"suite": "lmbff-k16", "optimizers": "zosgd", "eval_every_forwards": 8})
    assert {c.options["eval_every"] for c in quick.cells() if c.kind == "train"} == {4}


def test_mean_curve_aligns_seeds_with_and_without_the_evaluation_before_training():
    from zotune.race.plots import mean_curve

    with_before = [{"forwards": f, "seconds": f / 10, "dev": d} for f, d in ((0, 0.5), (40, 0.6), (80, 0.7))]
    without = [{"forwards": f, "seconds": f / 10, "dev": d} for f, d in ((40, 0.8), (80, 0.9))]
    x, mean, _ = mean_curve([with_before, without], "forwards")
    assert list(x) == [40, 80] and list(mean) == pytest.approx([0.7, 0.8])
    x, mean, _ = mean_curve([with_before, with_before], "forwards")  # every seed has it: kept
    assert list(x) == [0, 40, 80] and list(mean) == pytest.approx([0.5, 0.6, 0.7])


def test_a_race_figure_of_many_methods_puts_its_legend_beside_the_panels(tmp_path):
    import matplotlib.image

    from zotune.race.plots import plot_race

    curve = [[{"forwards": f, "seconds": f / 10, "dev": 0.5 + f / 1000} for f in (40, 80)]]
    for n, wide in ((3, False), (7, True)):
        summary = {"rows": [], "curves": {f"sst2|full|M{i}": curve for i in range(n)}}
        width = matplotlib.image.imread(plot_race(summary, tmp_path / f"race{n}.png")).shape[1]
        assert (width > 600) is wide  # 4.2 inches at 100 dpi, + 3.2 for the legend


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "nosuchtask", "--optimizers", "zosgd", "--steps", "2"], "unknown task"),
    (["--tasks", "sst2", "--optimizers", "nosuchopt", "--steps", "2"], "unknown optimizer"),
    (["--optimizers", "zosgd", "--steps", "2"], "the race grid is empty"),
    (["--tasks", "sst2", "--optimizers", "zosgd", "--steps", "0"], "must be > 0"),
    (["--tasks", "sst2", "--optimizers", "zosgd", "--seconds", "-1"], "must be > 0"),
    (["--tasks", "sst2", "--optimizers", "zosgd"], "exactly one of --steps"),
    (["--tasks", "sst2", "--optimizers", "zosgd", "--steps", "2", "--lr", "zosgd="], "at least one learning rate"),
    (["--tasks", "sst2", "--optimizers", "zosgd", "--steps", "2", "--lr", "zosgd=0,1e-3"], "> 0"),
    (["--tasks", "sst2", "--peft", "nosuchmode", "--optimizers", "zosgd", "--steps", "2"], "unknown tuning mode"),
    (["--tasks", "sst2", "--peft", "top:0", "--optimizers", "zosgd", "--steps", "2"], "unknown tuning mode"),
    (["--suite", "nosuchsuite", "--optimizers", "zosgd"], "unknown suite"),
    (["--tasks", "sst2", "--optimizers", "zosgd", "--steps", "2", "--eval-every", "1", "--eval-every-forwards", "2"],
     "one of --eval-every"),
])
def test_a_bad_grid_is_one_line_and_exit_2_before_anything_runs(tmp_path, capsys, argv, message):
    out = tmp_path / "race"
    assert main(["race", *argv, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
    assert not out.exists()


def test_an_unwritable_race_directory_is_refused_before_anything_runs(tmp_path, capsys, tiny_model_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["race", "--model", str(tiny_model_dir), "--tasks", "sst2", "--optimizers", "zosgd", "--steps", "2",
                 "--output-dir", str(blocker / "race")]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot write to race directory" in err and "\n" not in err
    assert main(["race", "--model", str(tiny_model_dir), "--tasks", "sst2", "--optimizers", "zosgd", "--steps", "2",
                 "--output-dir", str(blocker)]) == 2
    assert "is a file" in capsys.readouterr().err


def test_killed_race_resumes_without_rerunning_finished_cells_and_gives_the_same_report(tmp_path, tiny_model_dir):
    config = race_yaml(tmp_path / "race.yaml", tiny_model_dir)
    common = ["race", "--config", str(config), "--in-process", "--threads", "1"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert main([*common, "--output-dir", str(whole)]) == 0
    curve = json.loads((whole / "summary.json").read_text())["curves"]["sst2|final_norm|ZOSGD"][0]
    assert curve[0]["forwards"] == 0 and curve[0]["seconds"] == 0.0  # no zero-shot cell: evaluated before

    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "zotune", *common, "--output-dir", str(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    try:
        # kill once one cell has finished and the next has started writing its directory
        while time.time() < deadline and proc.poll() is None:
            finished = list(killed.glob("cells/*/results.json"))
            started = list(killed.glob("cells/*/metrics.jsonl"))
            if finished and len(started) > len(finished):
                break
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finished = {p.parent.name: p.stat().st_mtime_ns for p in killed.glob("cells/*/results.json")}
    assert 1 <= len(finished) < 4, "the race must be killed mid-run"

    assert main([*common, "--output-dir", str(killed)]) == 0
    for name, mtime in finished.items():  # finished cells were not run again
        assert (killed / "cells" / name / "results.json").stat().st_mtime_ns == mtime
        assert (killed / "logs" / f"{name}.log").read_text().count("$ ") == 1
    assert len(list(killed.glob("cells/*/results.json"))) == 4
    assert stable(killed / "summary.json") == stable(whole / "summary.json")


def test_print_commands_then_collect_and_the_first_order_memory_figure(tmp_path, tiny_model_dir, capsys):
    race = tmp_path / "race"
    grid = ["race", "--model", str(tiny_model_dir), "--tasks", "sst2", "--optimizers", "zosgd,adamw",
            "--baselines", "zeroshot", "--seeds", "13", "--steps", "2", "--eval-every", "1", "--lr", "zosgd=0.01",
            "--lr", "adamw=0.01", "--set", "batch_size=4", "--set", "max_dev=8", "--set", "max_test=8",
            "--output-dir", str(race), "--threads", "1"]
    assert main([*grid, "--print-commands"]) == 0
    commands = capsys.readouterr().out.strip().splitlines()
    assert len(commands) == 3 and not race.exists()  # printing runs and writes nothing
    for line in commands:  # "wherever they ran": here, one after another in this process
        argv = shlex.split(line)
        assert argv[:2] == ["zotune", "train"]
        assert main(argv[1:]) == 0
    assert main(["race", "--collect", str(race)]) == 0
    for name in ("report.md", "summary.json", "cells.csv", "race.png"):
        assert (race / name).exists()
    summary = json.loads((race / "summary.json").read_text())
    rows = {r["method"]: r for r in summary["rows"]}
    assert set(rows) == {"zeroshot", "ZOSGD", "FirstOrderAdamW"}
    peak = {name: json.loads((race / "cells" / name / "results.json").read_text())["peak_memory_mb"]
            for name in ("sst2__zeroshot__s13", "sst2__final_norm__adamw__lr0.01__s13")}
    adamw = rows["FirstOrderAdamW"]
    assert adamw["forwards_mean"] == 2 and rows["ZOSGD"]["forwards_mean"] == 4
    assert adamw["memory_vs_inference"] == pytest.approx(
        peak["sst2__final_norm__adamw__lr0.01__s13"] / peak["sst2__zeroshot__s13"])
    assert f"({adamw['memory_vs_inference']:.2f}x)" in (race / "report.md").read_text()
    # every dev evaluation logged seconds and forwards so far (what time-to-target reads); the zero-shot
    # cell is the evaluation before training, so the trained cells start at their first step
    evals = summary["curves"]["sst2|final_norm|ZOSGD"][0]
    assert [e["forwards"] for e in evals] == [2, 4] and 0 < evals[0]["seconds"] <= evals[1]["seconds"]


def test_lr_grid_as_factors_of_each_mode_default_and_for_every_optimizer(capsys):
    # "*=x1,x10": every optimizer without a grid of its own, at 1x and 10x its default lr of the mode
    from zotune.optim import ZOSGD

    grid = {"tasks": "sst2", "optimizers": "zosgd,zoadam", "seeds": "1", "steps": 3, "peft": "lora,full",
            "lr": {"*": ["x1", "x10"], "zoadam": [1e-3]}}
    cells = build_spec({}, grid).cells()
    lrs = {(c.options["peft"], c.options["optimizer"], round(c.options["lr"], 12)) for c in cells}
    lora, full = ZOSGD.lr_by_mode["lora"], ZOSGD.lr_by_mode["full"]
    assert lrs == {("lora", "zosgd", lora), ("lora", "zosgd", round(10 * lora, 12)), ("full", "zosgd", full),
                   ("full", "zosgd", round(10 * full, 12)), ("lora", "zoadam", 1e-3), ("full", "zoadam", 1e-3)}
    # the same grid from the command line
    assert main(["race", "--tasks", "sst2", "--optimizers", "zosgd", "--peft", "full", "--steps", "2",
                 "--seeds", "1", "--lr", "*=x3", "--output-dir", "unused", "--print-commands"]) == 0
    assert f"--lr {3 * full:g}" in capsys.readouterr().out
    for bad in ("*=x", "*=x0", "*=xfast", "*=x-2"):
        assert main(["race", "--tasks", "sst2", "--optimizers", "zosgd", "--steps", "2", "--lr", bad,
                     "--output-dir", "unused", "--print-commands"]) == 2
        err = capsys.readouterr().err.strip()
        assert "--lr" in err and "\n" not in err and "Traceback" not in err


def test_lr_from_a_probe_per_optimizer_and_mode(tmp_path, capsys):
    # the probe chose per method and mode on SST-2; the race takes those lrs on every task, an
    # explicit --lr still wins, and a probe missing a row or disagreeing across tasks is refused
    def row(method, peft, lr, task="sst2"):
        return {"task": task, "peft": peft, "method": method, "kind": "train", "lr": lr}

    probe = tmp_path / "probe"
    probe.mkdir()
    rows = [row("ZOSGD", "lora", 1e-3), row("ZOSGD", "full", 1e-5), row("ZOAdam", "lora", 3e-3),
            row("ZOAdam", "full", 3e-4), row("ZOSGD(layer_fraction=0.5)", "lora", 2e-3),
            {"task": "sst2", "peft": "-", "method": "zeroshot", "kind": "zeroshot", "lr": None}]
    (probe / "summary.json").write_text(json.dumps({"rows": rows}))
    race = ["race", "--tasks", "sst2,rte", "--seeds", "1", "--steps", "2", "--output-dir", str(tmp_path / "r"),
            "--print-commands", "--lr-from", str(probe)]
    assert main([*race, "--optimizers", "zosgd,zoadam", "--peft", "lora,full", "--lr", "zoadam=7e-3"]) == 0
    got = sorted(re.search(r"--task (\S+) .*--peft (\S+) .*--optimizer (\S+) .*--lr (\S+)", line).groups()
                 for line in capsys.readouterr().out.strip().splitlines())
    assert got == sorted([(t, m, o, lr) for t in ("sst2", "rte") for m, o, lr in
                          [("lora", "zosgd", "0.001"), ("full", "zosgd", "1e-05"),
                           ("lora", "zoadam", "0.007"), ("full", "zoadam", "0.007")]])
    assert main([*race, "--optimizers", "zosgd:layer_fraction=0.5", "--peft", "lora"]) == 0
    assert "--lr 0.002" in capsys.readouterr().out
    # a method the probe never raced is fine when it has an lr of its own
    assert main([*race, "--optimizers", "zosgd,fzoo", "--peft", "lora", "--lr", "fzoo=5e-2"]) == 0
    assert sorted(re.findall(r"--optimizer (\S+) .*--lr (\S+)", capsys.readouterr().out)) == \
        sorted([("zosgd", "0.001"), ("fzoo", "0.05")] * 2)
    # the probe's evidence travels with the spec (race.json) for the rows it chose, not for --lr's
    from zotune.cli import build_parser
    from zotune.commands.race import spec_from_args

    args = build_parser().parse_args([*race, "--optimizers", "zosgd,zoadam", "--peft", "lora", "--lr", "zoadam=7e-3"])
    assert set(spec_from_args(args).lr_probe) == {"ZOSGD|lora"}
    (probe / "summary.json").write_text(json.dumps({"rows": [*rows, row("ZOSGD", "lora", 1e-2, task="rte")]}))
    for extra, message in [(["--optimizers", "zosgd", "--peft", "lora"], "different lrs for ZOSGD (lora)"),
                           (["--optimizers", "fzoo", "--peft", "lora"], "no FZOO row in mode lora")]:
        assert main([*race, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err and "Traceback" not in err
    assert main([*race[:-1], str(tmp_path), "--optimizers", "zosgd", "--peft", "lora"]) == 2
    assert "no summary.json there" in capsys.readouterr().err


def test_an_optimizer_variant_is_a_row_of_its_own(tmp_path, tiny_model_dir):
    # LeZO as ZO-SGD with layer sampling, raced beside plain ZO-SGD: its own cells, lr grid and row
    race = tmp_path / "race"
    grid = ["race", "--model", str(tiny_model_dir), "--tasks", "sst2", "--peft", "full", "--optimizers",
            "zosgd,zosgd:layer_fraction=0.5:layer_schedule=cyclic", "--seeds", "13", "--steps", "2",
            "--lr", "zosgd=0.01", "--lr", "zosgd:layer_fraction=0.5:layer_schedule=cyclic=0.02,0.03",
            "--set", "batch_size=4", "--set", "max_dev=8", "--set", "max_test=8", "--output-dir", str(race),
            "--threads", "1", "--in-process"]
    assert main(grid) == 0
    names = sorted(p.name for p in (race / "cells").iterdir())
    assert names == ["sst2__full__zosgd-layer_fraction0.5-layer_schedulecyclic__lr0.02__s13",
                     "sst2__full__zosgd-layer_fraction0.5-layer_schedulecyclic__lr0.03__s13",
                     "sst2__full__zosgd__lr0.01__s13"]
    config = json.loads((race / "cells" / names[0] / "results.json").read_text())["config"]
    assert config["optimizer_args"] == {"layer_fraction": 0.5, "layer_schedule": "cyclic"}
    rows = {r["method"]: r for r in json.loads((race / "summary.json").read_text())["rows"]}
    assert set(rows) == {"ZOSGD", "ZOSGD(layer_fraction=0.5, layer_schedule=cyclic)"}
    assert rows["ZOSGD(layer_fraction=0.5, layer_schedule=cyclic)"]["dev_by_lr"].keys() == {"0.02", "0.03"}


@pytest.mark.parametrize("spec, message", [("zosgd:layer_fraction", "NAME:KEY=VALUE"),
                                           ("zosgd:no_such_option=1", "no_such_option"),
                                           ("zosgd:layer_fraction=2", "layer_fraction")])
def test_a_bad_optimizer_variant_fails_before_anything_runs(tmp_path, capsys, spec, message):
    out = tmp_path / "race"
    assert main(["race", "--tasks", "sst2", "--optimizers", spec, "--steps", "2", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
    assert not out.exists()


def fake_cell(lr, seed, dev, test, evals=(), optimizer="ZOSGD", kind="train"):
    return {"name": f"{optimizer}-{lr}-{seed}", "task": "sst2", "kind": kind, "optimizer": optimizer,
            "peft": "final_norm", "lr": lr, "seed": seed, "dev": dev, "test": test, "steps": 10, "forwards": 20,
            "train_seconds": 1.0, "peak_memory_mb": 100.0,
            "evals": [{"step": i, "seconds": float(i), "forwards": 2 * i, "dev": d} for i, d in enumerate(evals)]}


def test_lr_is_chosen_by_dev_never_by_test():
    # lr 0.1 wins on dev (0.8 vs 0.6) and loses on test (0.5 vs 0.9): the report picks 0.1 and shows 0.5
    cells = [fake_cell(0.1, s, 0.8, 0.5) for s in (1, 2)] + [fake_cell(0.01, s, 0.6, 0.9) for s in (1, 2)]
    row = summarize(cells)["rows"][0]
    assert row["lr"] == 0.1 and row["test_mean"] == 0.5 and row["dev_mean"] == 0.8
    assert row["lr_edge"] is True  # the largest lr of the grid won
    middle = cells + [fake_cell(1.0, s, 0.7, 0.95) for s in (1, 2)]
    row = summarize(middle)["rows"][0]
    assert row["lr"] == 0.1 and row["lr_edge"] is False


def test_a_race_at_the_probes_lr_takes_the_grid_edge_from_the_probe():
    # raced at one lr (--lr-from), the race alone cannot tell an edge: the probe's grid decides
    cells = [fake_cell(0.1, s, 0.8, 0.5) for s in (1, 2)]
    assert summarize(cells)["rows"][0]["lr_edge"] is False  # a grid of one is no edge by itself
    for edge in (True, False):
        probe = {"ZOSGD|final_norm": {"source": "probe", "task": "sst2", "seeds": 1, "lr_edge": edge,
                                      "dev_by_lr": {"0.01": 0.6, "0.1": 0.7} if edge else {"0.01": 0.6, "0.1": 0.7,
                                                                                           "1": 0.65}}}
        summary = summarize(cells, lr_probe=probe)
        row = summary["rows"][0]
        assert row["lr_edge"] is edge and row["lr_probe"] == probe["ZOSGD|final_norm"]
        table = markdown(summary, cells)
        assert "probe on sst2, 1 seed: 0.01: 0.600, 0.1: 0.700" in table
        assert "chosen by `--lr-from` on: `probe`." in table  # where the probe's cells are
        assert ("**(grid edge)**" in table) is edge
    # another method's or mode's probe, or a race with its own grid of several lrs, is not used
    other = {"HiZOO|final_norm": {"source": "p", "task": "sst2", "seeds": 1, "lr_edge": True, "dev_by_lr": {}},
             "ZOSGD|lora": {"source": "p", "task": "sst2", "seeds": 1, "lr_edge": True, "dev_by_lr": {}}}
    assert summarize(cells, lr_probe=other)["rows"][0]["lr_edge"] is False
    grid = cells + [fake_cell(lr, s, 0.7, 0.9) for lr in (0.01, 1.0) for s in (1, 2)]
    row = summarize(grid, lr_probe={"ZOSGD|final_norm": {**other["ZOSGD|lora"]}})["rows"][0]
    assert row["lr_edge"] is False and row["lr_probe"] is None


def test_collect_of_a_races_parent_reads_each_races_probe(tmp_path):
    # --collect of the folder above a race still knows the lrs it raced came from a probe
    from zotune.race.report import write_report

    race = tmp_path / "runs" / "race"
    probe = {"ZOSGD|final_norm": {"source": "probe", "task": "sst2", "seeds": 1, "lr_edge": True,
                                  "dev_by_lr": {"0.01": 0.6, "0.1": 0.7}}}
    (race / "cells").mkdir(parents=True)
    (race / "race.json").write_text(json.dumps({"spec": {"lr_probe": probe}, "cells": ["c1"]}))
    (race / "cells" / "c1").mkdir()
    (race / "cells" / "c1" / "results.json").write_text(json.dumps({
        "task": "sst2", "optimizer": "ZOSGD", "peft": "final_norm", "steps": 10, "forwards": 20,
        "config": {"steps": 10, "lr": 0.1, "seed": 1}, "after": {"dev": {"accuracy": 0.8}, "test": {"accuracy": 0.5}}}))
    for root in (race, tmp_path / "runs"):
        row = write_report(root, tmp_path / "report")["rows"][0]
        assert row["lr_edge"] is True and row["lr_probe"]["dev_by_lr"] == {"0.01": 0.6, "0.1": 0.7}
        assert "on: `probe`." in (tmp_path / "report" / "report.md").read_text()
    # the race's own target (race.json) is read as well
    (race / "race.json").write_text(json.dumps({"spec": {"lr_probe": probe, "target": 0.75}, "cells": ["c1"]}))
    assert write_report(race, tmp_path / "report")["target"] == 0.75


def test_collect_counts_a_copied_run_once_and_refuses_the_same_cell_with_other_results(tmp_path, capsys):
    # a probe's seed-13 cell copied into the race that reuses it must not become a second seed
    from zotune.race.report import write_report

    def cell(directory: Path, seed: int, dev: float, forwards: int = 20) -> None:
        directory.mkdir(parents=True)
        (directory / "results.json").write_text(json.dumps({
            "task": "sst2", "optimizer": "ZOSGD", "peft": "full", "steps": forwards // 2, "forwards": forwards,
            "config": {"steps": 10, "lr": 0.1, "seed": seed},
            "after": {"dev": {"accuracy": dev}, "test": {"accuracy": 0.5}}}))

    name = "sst2__full__zosgd__lr0.1__s13"
    cell(tmp_path / "runs" / "probe" / "cells" / name, 13, 0.7)
    cell(tmp_path / "runs" / "race" / "cells" / name, 13, 0.7)  # the copy
    cell(tmp_path / "runs" / "race" / "cells" / "sst2__full__zosgd__lr0.1__s21", 21, 0.8)
    row = write_report(tmp_path / "runs", tmp_path / "report")["rows"][0]
    assert row["seeds"] == 2 and row["dev_mean"] == pytest.approx(0.75)
    cell(tmp_path / "runs" / "longer" / "cells" / name, 13, 0.9, forwards=40)  # same cell, another budget
    assert main(["race", "--collect", str(tmp_path / "runs"), "--report-dir", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err.strip()
    assert "same cell" in err and "collect them separately" in err and "\n" not in err


def test_collect_of_several_directories_is_one_report(tmp_path, capsys):
    # a probe and the race that used its lrs, kept in separate folders: one report, without copying
    def cell(directory: Path, seed: int, dev: float) -> None:
        directory.mkdir(parents=True)
        (directory / "results.json").write_text(json.dumps({
            "task": "sst2", "optimizer": "ZOSGD", "peft": "full", "steps": 10, "forwards": 20,
            "config": {"steps": 10, "lr": 0.1, "seed": seed},
            "after": {"dev": {"accuracy": dev}, "test": {"accuracy": 0.5}}}))

    probe, race = tmp_path / "probe", tmp_path / "race"
    cell(probe / "cells" / "sst2__full__zosgd__lr0.1__s13", 13, 0.7)
    cell(race / "cells" / "sst2__full__zosgd__lr0.1__s21", 21, 0.8)
    (probe / "timing.jsonl").write_text(json.dumps({"cell": "sst2__full__zosgd__lr0.1__s13", "cpu_s": 60.0}) + "\n")
    out = tmp_path / "report"
    # the race folder given twice (once through its parent) still counts each run and its CPU once
    assert main(["race", "--collect", str(probe), str(race), str(tmp_path), "--report-dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"][0]["seeds"] == 2 and summary["rows"][0]["dev_mean"] == pytest.approx(0.75)
    assert summary["cpu_seconds_total"] == pytest.approx(60.0)
    assert not (probe / "report.md").exists() and not (race / "report.md").exists()
    # several directories and no --report-dir: one line naming the fix, nothing written
    assert main(["race", "--collect", str(probe), str(race)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--report-dir" in err
    assert not (probe / "report.md").exists()
    assert main(["race", "--collect", str(probe), str(tmp_path / "missing"), "--report-dir", str(out)]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_time_to_target_including_not_reached():
    assert time_to_target([{"seconds": 0.0, "forwards": 0, "dev": 0.5},
                           {"seconds": 3.0, "forwards": 6, "dev": 0.75}], 0.7) == (3.0, 6)
    assert time_to_target([{"seconds": 0.0, "forwards": 0, "dev": 0.5}], 0.7) is None
    # the evaluation before the first step never counts, even where it meets the target
    assert time_to_target([{"seconds": 0.0, "forwards": 0, "dev": 0.8},
                           {"seconds": 3.0, "forwards": 6, "dev": 0.6},
                           {"seconds": 5.0, "forwards": 10, "dev": 0.7}], 0.7) == (5.0, 10)
    # ZO-SGD sets the target (mean dev 0.7); HiZOO reaches it in one seed of two, ZO-Adam never
    cells = ([fake_cell(0.01, s, 0.7, 0.7, evals=(0.5, 0.7)) for s in (1, 2)]
             + [fake_cell(0.01, 1, 0.8, 0.7, evals=(0.5, 0.8), optimizer="HiZOO"),
                fake_cell(0.01, 2, 0.6, 0.7, evals=(0.5, 0.6), optimizer="HiZOO")]
             + [fake_cell(0.01, s, 0.6, 0.6, evals=(0.5, 0.6), optimizer="ZOAdam") for s in (1, 2)])
    for c in cells[:2]:
        c["train_seconds"] = 4.0  # ZO-SGD's whole runs
    summary = summarize(cells, target="zosgd")
    rows = {r["method"]: r for r in summary["rows"]}
    assert summary["targets"] == {"sst2/final_norm": 0.7}
    assert (rows["ZOSGD"]["target_reached"], rows["ZOSGD"]["target_forwards_mean"]) == (2, 2.0)
    assert (rows["HiZOO"]["target_reached"], rows["HiZOO"]["target_runs"]) == (1, 2)
    # HiZOO reached the target 1.0 s into its run, a quarter of ZO-SGD's 4.0 s
    assert rows["HiZOO"]["target_seconds_vs_target_run"] == pytest.approx(0.25)
    assert rows["ZOAdam"]["target_seconds_vs_target_run"] is None
    assert rows["ZOAdam"]["target_reached"] == 0 and rows["ZOAdam"]["target_seconds_mean"] is None
    text = markdown(summary, cells)
    assert "| ZOAdam | final_norm |" in text and "not reached" in text and "1/2" in text and "1.0 (0.25x)" in text
    fixed = summarize(cells, target=0.75)["rows"]
    assert {r["method"]: r["target_reached"] for r in fixed} == {"HiZOO": 1, "ZOAdam": 0, "ZOSGD": 0}
    assert not any(r["target_at_zeroshot"] for r in summary["rows"] if r["kind"] == "train")
    assert "say nothing about speed" not in text
    # a zero-shot dev at the target: the report says the target columns mean nothing there
    vacuous = summarize([*cells, fake_cell(None, 1, 0.7, 0.6, kind="zeroshot", optimizer="zeroshot")], "zosgd")
    assert all(r["target_at_zeroshot"] for r in vacuous["rows"] if r["kind"] == "train")
    assert "The target is not above zero-shot dev here (final_norm)" in markdown(vacuous, cells)


def test_first_order_adamw_backpropagates_and_keeps_weights_on_nan():
    model = torch.nn.Linear(3, 1)
    x, y = torch.randn(8, 3, generator=torch.Generator().manual_seed(0)), torch.zeros(8, 1)
    opt = FirstOrderAdamW(model, lr=0.05)
    reference = torch.nn.Linear(3, 1)
    reference.load_state_dict(model.state_dict())
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=0.05, weight_decay=0.0)
    for _ in range(3):
        opt.step(lambda: ((model(x) - y) ** 2).mean())
        ref_opt.zero_grad()
        ((reference(x) - y) ** 2).mean().backward()
        ref_opt.step()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q) and p.grad is None  # same as torch's AdamW; gradients freed
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(lambda: model(x).sum() * float("nan"))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert opt.zo_state["forwards"] == 4 and opt.zo_state["skipped_steps"] == 1
    again = FirstOrderAdamW(model, lr=0.05)
    again.load_state_dict(opt.state_dict())
    assert again.zo_state["forwards"] == 4


def test_forwards_and_seconds_budgets_stop_the_loop_and_evaluate_there(tmp_path):
    from zotune.train import TrainConfig, train

    tok = tiny_tokenizer()
    for budget, expected_steps in (({"max_forwards": 5}, 3), ({"max_seconds": 1e-9}, 1)):
        out = tmp_path / str(len(list(tmp_path.iterdir())))
        model = tiny_causal_lm("llama", vocab_size=len(tok))
        config = TrainConfig(task="sst2", optimizer="zosgd", peft="final_norm", steps=UNBOUNDED_STEPS,
                             eval_every=100, batch_size=4, max_dev=4, max_test=4, output_dir=str(out),
                             progress=False, eval_before=False, **budget)
        results = train(config, model=model, tokenizer=tok)
        assert results["steps"] == expected_steps and results["forwards"] == 2 * expected_steps
        evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                 if '"eval"' in line]
        assert [(e["step"], e["forwards"]) for e in evals] == [(expected_steps, 2 * expected_steps)]
        assert evals[0]["seconds"] == pytest.approx(results["train_seconds"])


def test_icl_demonstrations_are_solved_training_examples_before_dev_and_test_prompts():
    from zotune.errors import UserError
    from zotune.tasks import get_task

    plain = get_task("sst2", data_seed=13, max_test=4)
    icl = get_task("sst2", data_seed=13, max_test=4, demonstrations=4)
    context = icl.dev[0].prompt[: -len(plain.dev[0].prompt)]
    demos = context.split("\n\n")[:-1]
    assert len(demos) == 4 and all(ex.prompt == context + p.prompt for ex, p in zip(icl.test, plain.test, strict=True))
    solved = {ex.prompt + ex.candidates[ex.gold] for ex in plain.train}
    assert set(demos) <= solved and sum(d.endswith(" great") for d in demos) == 2  # balanced over the labels
    assert [ex.prompt for ex in icl.train] == [ex.prompt for ex in plain.train]
    assert get_task("sst2", data_seed=13, demonstrations=4).dev[0].prompt == icl.dev[0].prompt  # seeded
    with pytest.raises(UserError, match="demonstrations"):
        get_task("sst2", demonstrations=-1)


def test_a_cell_directory_from_other_settings_is_refused_before_anything_runs(tmp_path, capsys, tiny_model_dir):
    race = tmp_path / "race"
    stale = race / "cells" / "sst2__final_norm__zosgd__lr0.01__s13"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text(json.dumps({"task": "sst2", "lr": 0.5, "optimizer": "ZOSGD", "seed": 13}))
    assert main(["race", "--model", str(tiny_model_dir), "--tasks", "sst2", "--optimizers", "zosgd", "--seeds", "13",
                 "--steps", "2", "--lr", "zosgd=0.01", "--output-dir", str(race), "--in-process"]) == 2
    err = capsys.readouterr().err.strip()
    assert "other settings (lr)" in err and "\n" not in err
    assert sorted(p.name for p in race.iterdir()) == ["cells"] and not (race / "logs").exists()


def test_a_run_without_dev_evaluations_times_its_final_one_and_one_seed_has_no_std(tmp_path):
    from zotune.race.report import read_cell

    run = tmp_path / "cell"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({
        "task": "sst2", "optimizer": "ZOSGD", "peft": "full", "steps": 2, "forwards": 4, "train_seconds": 3.5,
        "peak_memory_mb": 10.0, "after": {"dev": {"accuracy": 0.75}, "test": {"accuracy": 0.5}},
        "config": {"steps": 2, "lr": 1e-6, "seed": 1}}))
    cell = read_cell(run)
    assert cell["evals"] == [{"step": 2, "seconds": 3.5, "forwards": 4, "dev": 0.75}]
    row = summarize([cell])["rows"][0]
    assert row["target_reached"] == 1 and row["test_mean"] == 0.5 and row["test_std"] is None
