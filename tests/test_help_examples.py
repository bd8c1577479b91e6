"""Every example that ``zotune train --help`` and ``zotune eval --help`` show runs as written.

The examples run in-process, in order, in an empty folder holding the files they name
(``run.yaml``, ``my.jsonl``), on a tiny model and one step: flags appended after an example's own
override only model, size and speed settings (argparse keeps the last value), never what the
example is about.
"""

from __future__ import annotations

import json
import shlex

import pytest

from zotune.cli import main
from zotune.commands import evaluate as eval_command
from zotune.commands import train as train_command

SMALL = ["--steps", "1", "--batch-size", "2", "--max-train", "8", "--max-dev", "4", "--max-test", "4",
         "--max-length", "64", "--no-progress", "--no-eval-before"]


def examples(description: str, command: str) -> list[list[str]]:
    """The ``zotune COMMAND ...`` lines of a --help text (continuation lines joined, comments cut)."""
    text = description.replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        if not line.strip().startswith(f"zotune {command} "):
            continue
        words = shlex.split(line, comments=True)
        if words[:2] == ["zotune", command] and "..." not in words:
            found.append(words[1:])
    return found


def test_the_help_texts_have_examples():
    assert len(examples(train_command.DESCRIPTION, "train")) >= 4
    assert any("--task-arg" in e for e in examples(train_command.DESCRIPTION, "train"))
    assert len(examples(eval_command.DESCRIPTION, "eval")) >= 2


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """An empty working folder with the files the examples name, and a tiny saved model."""
    from zotune.models import apply_peft
    from zotune.testing import tiny_causal_lm, tiny_tokenizer

    tok = tiny_tokenizer()
    model = apply_peft(tiny_causal_lm("llama", vocab_size=len(tok), seed=0), None, seed=0)
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    rows = [{"text": f"this movie was {w}", "label": int(w == "great")} for w in ["great", "awful"] * 10]
    (tmp_path / "my.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "run.yaml").write_text("task: rte\noptimizer: zo-adam\nsteps: 20\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_every_help_example_runs(folder, capsys):
    model = ["--model", str(folder / "tiny")]
    for i, example in enumerate(examples(train_command.DESCRIPTION, "train")):
        extra = [] if "--output-dir" in example else ["--output-dir", f"runs/example-{i}"]
        code = main([*example, *model, *SMALL, *extra])
        assert code == 0, f"`zotune {shlex.join(example)}` failed: {capsys.readouterr().err[-1500:]}"
    for example in examples(eval_command.DESCRIPTION, "eval"):
        extra = [] if "--checkpoint" in example else model
        code = main([*example, *extra, "--max-test", "4"])
        assert code == 0, f"`zotune {shlex.join(example)}` failed: {capsys.readouterr().err[-1500:]}"
    # what the examples are about took effect
    hizoo = json.loads((folder / "runs" / "sst2-hizoo" / "results.json").read_text())
    assert (hizoo["optimizer"], hizoo["peft"]) == ("HiZOO", "lora")
    configs = [json.loads(p.read_text()) for p in sorted(folder.glob("runs/example-*/config.json"))]
    assert any(c["task"] == "rte" and c["lr"] == 1e-5 and c["optimizer"] == "ZOAdam" for c in configs)
    assert any(c["optimizer_args"] == {"alpha": 1e-8} and c["objective"] == "f1" for c in configs)
    custom = next(c for c in configs if c["task"] == "custom")
    assert custom["template"] == "Review: {text} Sentiment:"
    assert custom["task_args"]["label_words"] == {"0": " negative", "1": " positive"}  # JSON keys are strings
