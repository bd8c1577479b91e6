"""Adding a method means its class and its oracle, nothing else.

:class:`ClippedZO` and its oracle are defined here only. Registered (by a fixture, or by
``pytest_configure`` when this module is loaded as a plugin with ``-p``), they show up in the
registry, ``zotune optimizers``, ``zotune train --optimizer``, ``zotune bench step`` (with the
class's ``bench_variants``) and the common parametrized tests of ``test_optim_common.py``,
without an edit anywhere else.
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import zotune.optim as zo
from zotune.cli import main
from zotune.models import apply_peft
from zotune.optim import registry
from zotune.optim.engine import Block, Closure, Noises, ZOOptimizer, check_range
from zotune.optim.reference import Closure as RefClosure
from zotune.optim.reference import ReferenceZO, oracle_for
from zotune.testing import tiny_causal_lm, tiny_tokenizer
from zotune.train import TrainConfig, train

TESTS = Path(__file__).parent


class RefClippedZO(ReferenceZO):
    """Oracle: theta -= lr * clip(c, -clip, clip) * z, z materialised."""

    def _step(self, closure: RefClosure) -> None:
        z = self.noise()
        c = self.spsa(closure, z)
        bound = self.hp.get("clip", 1.0)
        self.decay()
        for p, zk in zip(self.params, z):
            p.sub_(self.hp["lr"] * max(-bound, min(bound, c)) * zk)


class ClippedZO(ZOOptimizer):
    """ZO-SGD with the projected gradient clipped to [-clip, clip] (a toy method for this test)."""

    aliases = ("clipped-zo", "zo-clip")
    summary = "theta -= lr clip(c) z"
    lr_by_mode = {"full": 2e-6, "lora": 3e-5, "prefix": 4e-3}
    reference = RefClippedZO
    test_kwargs = {"lr": 5e-3, "clip": 0.5}
    bench_variants = ({"clip": 0.25},)

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, clip: float = 1.0,
                 weight_decay: float = 0.0, **engine):
        check_range("clip", clip, 0.0, low_open=True)
        super().__init__(params, dict(lr=lr, clip=clip, weight_decay=weight_decay), eps=eps, **engine)

    def _zo_step(self, closure: Closure) -> float:
        seed = self._seed()
        plus, minus, c = self._spsa(closure, seed)

        def kernel(block: Block, noises: Noises) -> None:
            bound = block.group["clip"]
            block.decay_weights()
            block.param.add_(noises[0][0], alpha=-block.group["lr"] * max(-bound, min(bound, c)))

        self._update([seed], kernel)
        return 0.5 * (plus + minus)


def pytest_configure(config) -> None:
    """When loaded as a plugin (``-p test_new_method``): register before collection."""
    zo.register(ClippedZO)


@pytest.fixture
def registered(monkeypatch):
    """ClippedZO in the registry for one test; the registry is put back afterwards."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_NAMES", dict(registry._NAMES))
    zo.register(ClippedZO)
    return ClippedZO


def test_registry_finds_the_class_by_name_and_alias(registered):
    assert "ClippedZO" in zo.available()
    assert zo.get("clipped_zo") is ClippedZO and zo.get("ZO-CLIP") is ClippedZO
    assert oracle_for("zo-clip") is RefClippedZO
    zo.register(ClippedZO)  # registering the same class twice is harmless
    assert zo.available().count("ClippedZO") == 1


def test_registry_refuses_name_collisions(registered):
    class Impostor(ClippedZO):
        aliases = ("fresh-name", "MeZO")  # ZOSGD's alias, spelt differently

    before = (dict(registry._REGISTRY), dict(registry._NAMES))
    with pytest.raises(ValueError, match="'mezo' \\(ZOSGD\\)"):
        zo.register(Impostor)
    assert before == (registry._REGISTRY, registry._NAMES)  # nothing half-registered
    assert zo.get("mezo") is zo.ZOSGD

    class ClippedZOAgain(ClippedZO):
        aliases = ("zo_clip",)

    with pytest.raises(ValueError, match="already taken"):
        zo.register(ClippedZOAgain)
    with pytest.raises(TypeError):
        zo.register(torch.optim.SGD)


def tiny_setup(peft: str = "full"):
    tok = tiny_tokenizer()
    model = apply_peft(tiny_causal_lm("llama", vocab_size=len(tok), seed=0), None if peft == "full" else peft, seed=0)
    return model, tok


def test_listed_by_zotune_optimizers(registered, capsys):
    assert main(["optimizers"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("ClippedZO"))
    assert "clipped-zo" in line and "theta -= lr clip(c) z" in line and "2 forwards" in line


@pytest.mark.parametrize(("peft", "expected"), [("full", 2e-6), ("lora", 3e-5), ("final_norm", 3e-3)])
def test_zotune_train_takes_it_with_its_default_lr(registered, tmp_path, peft, expected):
    model, tok = tiny_setup(peft)
    out = tmp_path / "run"
    config = TrainConfig(task="rte", optimizer="zo-clip", peft=peft, steps=2, batch_size=4, max_dev=4,
                         max_test=4, output_dir=str(out), progress=False)
    train(config, model=model, tokenizer=tok)
    results = json.loads((out / "results.json").read_text())
    assert results["optimizer"] == "ClippedZO"
    assert json.loads((out / "config.json").read_text())["lr"] == pytest.approx(expected)


def test_zotune_train_cli_accepts_the_alias(registered, tmp_path):
    model, tok = tiny_setup()
    path = tmp_path / "model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    out = tmp_path / "cli"
    code = main(["train", "--model", str(path), "--task", "rte", "--optimizer", "clipped-zo", "--opt", "clip=0.1",
                 "--steps", "2", "--batch-size", "4", "--max-dev", "4", "--max-test", "4", "--lr", "1e-3",
                 "--output-dir", str(out), "--no-progress"])
    assert code == 0
    assert json.loads((out / "results.json").read_text())["optimizer"] == "ClippedZO"


def test_zotune_bench_step_times_it_and_its_variants(registered, tmp_path, capsys):
    code = main(["bench", "step", "--model-shape", "tiny", "--batch", "2x16", "--rounds", "1", "--no-memory",
                 "--no-naive", "--no-passes", "--optimizers", "zo-clip", "--json", str(tmp_path / "s.json")])
    assert code == 0
    rows = {row["key"]: row for row in json.loads((tmp_path / "s.json").read_text())["rows"]}
    for key in ("ClippedZO/gaussian", "ClippedZO[clip=0.25]/gaussian"):
        assert rows[key]["error"] is None, rows[key]["error"]
        assert math.isfinite(rows[key]["timing"]["step_over_2F"]) and rows[key]["timing"]["step_over_2F"] > 0
    assert "ClippedZO[clip=0.25]" in capsys.readouterr().out


def _common_items_per_method() -> int:
    """How many items test_optim_common.py parametrizes per optimizer name (read from its source)."""
    tree = ast.parse((TESTS / "test_optim_common.py").read_text())
    total = 0
    for fn in tree.body:
        if not (isinstance(fn, ast.FunctionDef) and fn.name.startswith("test_")):
            continue
        sizes, per_name = [], False
        for dec in fn.decorator_list:
            if isinstance(dec, ast.Call) and getattr(dec.func, "attr", "") == "parametrize":
                if ast.literal_eval(dec.args[0]) == "name":
                    per_name = True
                else:
                    sizes.append(len(dec.args[1].elts))
        if per_name:
            total += math.prod(sizes)
    return total


def test_common_parametrized_suite_runs_on_it():
    """test_optim_common.py, collected with ClippedZO registered, runs every common test on it."""
    expected = _common_items_per_method()
    assert expected >= 15
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "test_new_method",
         str(TESTS / "test_optim_common.py"), "-k", "ClippedZO"],
        capture_output=True, text=True, env=env, cwd=TESTS.parent, timeout=600,
    )
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) == expected, summary


@pytest.mark.parametrize(("name", "peft", "expected"), [
    ("ZOSGD", "full", 1e-6), ("ZOSGD", "lora", 5e-5), ("ZOSGD", "prefix", 1e-2), ("ZOAdaMU", "lora", 1e-2),
    ("HiZOO", "final_norm", 1e-3), ("ZOSGDSign", "norms", 1e-3), ("ZOAdam", "prefix", 1e-3),
])
def test_default_lr_comes_from_the_class(name, peft, expected):
    from zotune.train import default_lr

    assert default_lr(TrainConfig(peft=peft), zo.get(name)) == pytest.approx(expected)


def test_argument_checks_name_the_argument_and_the_range():
    from zotune.optim.engine import check_choice, check_positive_int

    check_range("beta", 0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match=r"^beta must be in \[0, 1\), got 1$"):
        check_range("beta", 1, 0.0, 1.0)
    with pytest.raises(ValueError, match=r"^eps must be > 0, got 0"):
        check_range("eps", 0.0, 0.0, low_open=True)
    with pytest.raises(ValueError, match="got nan"):
        check_range("lr", float("nan"), 0.0)
    check_positive_int("n", 2.0)
    for bad in (0, 1.5, True, "2", float("inf")):
        with pytest.raises(ValueError, match="n must be a positive integer"):
            check_positive_int("n", bad)
    with pytest.raises(ValueError, match=r"clip must be one of \('floor', 'sophia'\), got 'x'"):
        check_choice("clip", "x", ("floor", "sophia"))
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        zo.ZOSGD([torch.nn.Parameter(torch.ones(2))], weight_decay=-0.1)
