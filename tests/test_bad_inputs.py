"""User mistakes: each is one line naming the fix, exit status 2, no traceback, nothing lost.

Every case runs ``zotune.cli.main(argv)`` in-process. A ``train`` case starts from settings that
would otherwise run (a tiny model, one step) and from ``--overwrite`` of an existing output
directory holding a sentinel file: the mistake must be caught before that directory is
touched. Placeholders in the arguments: ``{model}`` a tiny saved model, ``{run}`` the existing
output directory (with the sentinel), ``{done}`` a copy of a finished run (with a sentinel),
``{new}`` a directory that does not exist yet, ``{tmp}`` the test's folder, ``{files}`` a folder
of prepared (bad) input files.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from zotune.cli import main

SENTINEL = "sentinel.txt"
TRAIN = ["--model", "{model}", "--task", "rte", "--steps", "1", "--batch-size", "2", "--max-dev", "4",
         "--max-test", "4", "--no-progress", "--no-eval-before", "--output-dir", "{run}", "--overwrite"]
CUSTOM = ["--task", "custom", "--template", "Review: {{text}} Sentiment:",
          "--task-arg", "label_words={{0: ' bad', 1: ' good'}}"]


def _prepare_files(folder: Path, model_dir: Path) -> None:
    """Bad (and some good) inputs, written once for the module."""
    folder.mkdir()
    rows = [{"text": f"this movie was {w}", "label": int(w == "good")} for w in ["good", "bad"] * 10]
    (folder / "good.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (folder / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9", "label": 1}\n' * 20)
    (folder / "binary.jsonl").write_bytes(bytes(range(256)) * 8)
    (folder / "torn.jsonl").write_text(json.dumps(rows[0]) + "\n" + '{"text": "cut mid')
    (folder / "no_label.csv").write_text("text\n" + "fine\nbad\n" * 10)
    yaml_files = {
        "ten.yaml": "max_length: ten\n", "empty_value.yaml": "warmup_steps:\n", "lr_word.yaml": "eps: fast\n",
        "typo.yaml": "stpes: 3\n", "list.yaml": "- steps: 3\n", "broken.yaml": "steps: [1, 2\n",
        "bool.yaml": "tensorboard: maybe\n", "opt_args.yaml": "optimizer_args: 5\n",
        "peft.yaml": "peft: qlora\n", "task_args.yaml": "task_args: {template: 'x {text}'}\n",
        "neg_batch.yaml": "eval_batch_size: -4\n",
    }
    for name, text in yaml_files.items():
        (folder / name).write_text(text)
    (folder / "latin1.yaml").write_bytes("template: caf\u00e9\n".encode("latin-1"))
    (folder / "config_dir").mkdir()
    (folder / "a_file").write_text("not a directory")
    # models: weights cut in half, a config that is not JSON, a directory without weights
    for name in ("truncated", "bad_config", "no_weights"):
        shutil.copytree(model_dir, folder / name)
    weights = folder / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (folder / "bad_config" / "config.json").write_text("{not json")
    (folder / "no_weights" / "model.safetensors").unlink()
    # run directories with broken files
    (folder / "not_a_run").mkdir()
    (folder / "empty_metrics").mkdir()
    (folder / "empty_metrics" / "metrics.jsonl").write_bytes(b"\x00\xff\xfe garbage\n\x01\x02")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A tiny saved model, prepared files and one finished run, shared by every case."""
    import transformers

    from zotune.models import apply_peft
    from zotune.testing import tiny_causal_lm, tiny_tokenizer

    transformers.utils.logging.disable_progress_bar()  # as the CLI does in a fresh process (HF env vars)
    root = tmp_path_factory.mktemp("bad-inputs")
    tok = tiny_tokenizer()
    model = apply_peft(tiny_causal_lm("llama", vocab_size=len(tok), seed=0), None, seed=0)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    _prepare_files(root / "files", root / "model")
    done = root / "done"
    argv = [a.format(model=root / "model", run=done) for a in TRAIN]
    assert main(["train", *argv, "--steps", "2", "--seed", "7"]) == 0
    return {"model": root / "model", "files": root / "files", "done": done}


def _read_only_parent(tmp: Path) -> str:
    """A directory nobody may create folders in (root ignores permission bits: use /sys)."""
    if os.geteuid() == 0:
        return "/sys"
    locked = tmp / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    return str(locked)


# (case id, argv, words the one-line message must contain)
CASES: list[tuple[str, list[str], str]] = [
    # ---- CLI flags of train
    ("steps-word", ["train", *TRAIN, "--steps", "ten"], "--steps) must be an integer"),
    ("steps-negative", ["train", *TRAIN, "--steps", "-1"], "--steps must be >= 0"),
    ("batch-size-zero", ["train", *TRAIN, "--batch-size", "0"], "--batch-size must be >= 1"),
    ("lr-negative", ["train", *TRAIN, "--lr=-1e-3"], "--lr must be >= 0"),
    ("lr-word", ["train", *TRAIN, "--lr", "fast"], "--lr) must be a number"),
    ("lr-nan", ["train", *TRAIN, "--lr", "nan"], "--lr must be >= 0"),
    ("eps-zero", ["train", *TRAIN, "--eps", "0"], "--eps must be > 0"),
    ("log-every-zero", ["train", *TRAIN, "--log-every", "0"], "--log-every must be >= 1"),
    ("threads-negative", ["train", *TRAIN, "--threads", "-1"], "--threads must be >= 1"),
    ("eval-batch-zero", ["train", *TRAIN, "--eval-batch-size", "0"], "--eval-batch-size must be >= 1"),
    ("warmup-negative", ["train", *TRAIN, "--warmup-steps", "-3"], "--warmup-steps must be >= 0"),
    ("weight-decay-negative", ["train", *TRAIN, "--weight-decay", "-0.1"], "--weight-decay must be >= 0"),
    ("k-zero", ["train", *TRAIN, "--k", "0"], "--k must be >= 1"),
    ("max-dev-zero", ["train", *TRAIN, "--max-dev", "0"], "--max-dev must be >= 1"),
    ("lora-r-zero", ["train", *TRAIN, "--peft", "lora", "--lora-r", "0"], "--lora-r must be >= 1"),
    ("peft-unknown", ["train", *TRAIN, "--peft", "qlora"], "unknown --peft 'qlora'"),
    ("schedule-unknown", ["train", *TRAIN, "--schedule", "cosine"], "unknown --schedule 'cosine'"),
    ("objective-unknown", ["train", *TRAIN, "--objective", "mse"], "unknown --objective 'mse'"),
    ("optimizer-unknown", ["train", *TRAIN, "--optimizer", "adamx"], "unknown optimizer"),
    ("task-unknown", ["train", *TRAIN, "--task", "no-such-task"], "unknown task"),
    ("task-not-shipped", ["train", *TRAIN, "--task", "drop"], "DROP"),
    ("device-garbage", ["train", *TRAIN, "--device", "banana"], "not a torch device"),
    ("dtype-unknown", ["train", *TRAIN, "--dtype", "float8"], "dtype"),
    ("distribution-unknown", ["train", *TRAIN, "--distribution", "uniform"], "distribution"),
    ("opt-unknown-key", ["train", *TRAIN, "--opt", "alpah=1e-6"], "has no option 'alpah'"),
    ("opt-bad-value", ["train", *TRAIN, "--optimizer", "hizoo", "--opt", "alpha=2"], "alpha must be in [0, 1)"),
    ("opt-no-equals", ["train", *TRAIN, "--opt", "momentum"], "--opt expects KEY=VALUE"),
    ("opt-bad-yaml", ["train", *TRAIN, "--opt", "betas=[0.9, 0.99"], "not a valid YAML value"),
    ("opt-lr-twice", ["train", *TRAIN, "--lr", "1e-3", "--opt", "lr=1e-4"], "use --lr instead"),
    ("opt-given-twice", ["train", *TRAIN, "--optimizer", "zo-sgd-mmt", "--opt", "momentum=0.5", "--opt",
                         "momentum=0.9"], "given twice"),
    ("optimizer-args-not-mapping", ["train", *TRAIN, "--optimizer-args", "[1, 2]"], "must be a mapping"),
    ("template-twice", ["train", *TRAIN, "--template", "rte_default", "--task-arg", "template=x {{premise}}"],
     "use --template instead"),
    ("template-unknown", ["train", *TRAIN, "--template", "no-such-template"], "template"),
    ("unknown-flag", ["train", *TRAIN, "--learning-rate", "1e-3"], "unrecognized arguments: --learning-rate"),
    ("bool-flag-with-value", ["train", *TRAIN, "--resume=yes"], "ignored explicit argument"),
    ("lora-targets-missing", ["train", *TRAIN, "--peft", "lora", "--lora-targets", "no_such_proj"], "LoRA"),
    # ---- config files
    ("yaml-steps-word", ["train", *TRAIN, "--config", "{files}/ten.yaml"],
     "max_length (--max-length) must be an integer, got 'ten'"),
    ("yaml-no-value", ["train", *TRAIN, "--config", "{files}/empty_value.yaml"],
     "warmup_steps (--warmup-steps) needs a value"),
    ("yaml-lr-word", ["train", *TRAIN, "--config", "{files}/lr_word.yaml"], "eps (--eps) must be a number, got 'fast'"),
    ("yaml-unknown-key", ["train", *TRAIN, "--config", "{files}/typo.yaml"], "unknown config keys ['stpes']"),
    ("yaml-list", ["train", *TRAIN, "--config", "{files}/list.yaml"], "must hold a mapping"),
    ("yaml-broken", ["train", *TRAIN, "--config", "{files}/broken.yaml"], "is not valid YAML"),
    ("yaml-bool", ["train", *TRAIN, "--config", "{files}/bool.yaml"], "must be true or false"),
    ("yaml-optimizer-args", ["train", *TRAIN, "--config", "{files}/opt_args.yaml"], "must be a mapping"),
    ("yaml-peft", ["train", *TRAIN, "--config", "{files}/peft.yaml"], "unknown --peft"),
    ("yaml-task-args-template", ["train", *TRAIN, "--config", "{files}/task_args.yaml"], "use --template"),
    ("yaml-negative", ["train", *TRAIN, "--config", "{files}/neg_batch.yaml"], "--eval-batch-size must be >= 1"),
    ("yaml-not-utf8", ["train", *TRAIN, "--config", "{files}/latin1.yaml"], "not UTF-8"),
    ("config-is-dir", ["train", *TRAIN, "--config", "{files}/config_dir"], "is a directory"),
    ("config-missing", ["train", *TRAIN, "--config", "{files}/nope.yaml"], "does not exist"),
    # ---- data (custom task)
    ("custom-no-path", ["train", *TRAIN, *CUSTOM], "needs path="),
    ("custom-path-missing", ["train", *TRAIN, *CUSTOM, "--task-arg", "path={files}/nope.jsonl"], "nope.jsonl"),
    ("custom-no-field", ["train", *TRAIN, *CUSTOM, "--task-arg", "path={files}/good.jsonl", "--template",
                         "Review: Sentiment:"], "no {field}"),
    ("custom-unknown-field", ["train", *TRAIN, *CUSTOM, "--task-arg", "path={files}/good.jsonl", "--template",
                              "Review: {{txt}}"], "txt"),
    ("custom-not-utf8", ["train", *TRAIN, *CUSTOM, "--task-arg", "path={files}/latin1.jsonl"], "UTF-8"),
    ("custom-binary", ["train", *TRAIN, *CUSTOM, "--task-arg", "path={files}/binary.jsonl"], "binary.jsonl"),
    ("custom-torn-json", ["train", *TRAIN, *CUSTOM, "--task-arg", "path={files}/torn.jsonl"], "torn.jsonl"),
    ("custom-no-kind", ["train", *TRAIN, "--task", "custom", "--template", "{{text}}", "--task-arg",
                        "path={files}/good.jsonl"], "exactly one of label_words="),
    ("custom-no-label-column", ["train", *TRAIN, *CUSTOM, "--task-arg", "path={files}/no_label.csv"], "label"),
    ("custom-one-label-word", ["train", *TRAIN, "--task", "custom", "--template", "{{text}}", "--task-arg",
                               "path={files}/good.jsonl", "--task-arg", "label_words=[' good']"], "two label words"),
    # ---- models
    ("model-missing", ["train", *TRAIN, "--model", "{tmp}/no-such-model"], "does not exist"),
    ("model-truncated", ["train", *TRAIN, "--model", "{files}/truncated"], "truncated"),
    ("model-bad-config", ["train", *TRAIN, "--model", "{files}/bad_config"], "bad_config"),
    ("model-no-weights", ["train", *TRAIN, "--model", "{files}/no_weights"], "no_weights"),
    ("model-is-file", ["train", *TRAIN, "--model", "{files}/a_file"], "is a file"),
    # ---- output directories
    ("output-not-empty", ["train", *TRAIN, "--no-overwrite"], "is not empty"),
    ("output-is-file", ["train", *TRAIN, "--output-dir", "{files}/a_file"], "is a file"),
    ("output-under-file", ["train", *TRAIN, "--output-dir", "{files}/a_file/run"], "a_file"),
    ("output-read-only", ["train", *TRAIN, "--output-dir", "{readonly}/run"], "cannot write"),
    ("tensorboard-missing", ["train", *TRAIN, "--tensorboard"], "pip install tensorboard"),
    # ---- resume
    ("resume-no-checkpoint", ["train", *TRAIN, "--resume", "--no-overwrite"], "no complete checkpoint"),
    ("resume-changed-seed", ["train", "--output-dir", "{done}", "--resume", "--steps", "4", "--seed", "8"],
     "seed 7 -> 8"),
    ("resume-corrupt-config", ["train", "--output-dir", "{done}", "--resume", "--steps", "4"], "config.json"),
    ("resume-binary-config", ["train", "--output-dir", "{done}", "--resume", "--steps", "4"], "config.json"),
    # ---- eval
    ("eval-not-a-run", ["eval", "--checkpoint", "{files}/not_a_run"], "not a zotune run directory"),
    ("eval-missing-dir", ["eval", "--checkpoint", "{tmp}/nope"], "nope"),
    ("eval-corrupt-config", ["eval", "--checkpoint", "{done}"], "config.json"),
    ("eval-task-unknown", ["eval", "--model", "{model}", "--task", "no-such-task"], "unknown task"),
    ("eval-model-missing", ["eval", "--model", "{tmp}/no-model", "--task", "rte"], "does not exist"),
    ("eval-split", ["eval", "--model", "{model}", "--split", "train"], "invalid choice: 'train'"),
    ("eval-k-word", ["eval", "--model", "{model}", "--k", "many"], "invalid int value"),
    ("eval-json-is-dir", ["eval", "--model", "{model}", "--task", "rte", "--json", "{run}"], "is a directory"),
    ("eval-json-no-dir", ["eval", "--model", "{model}", "--task", "rte", "--json", "{new}/m.json"], "does not exist"),
    ("eval-batch-size-zero", ["eval", "--model", "{model}", "--task", "rte", "--batch-size", "0"], "batch_size"),
    # ---- plot
    ("plot-no-metrics", ["plot", "{files}/not_a_run", "--output", "{tmp}/c.png"], "has no metrics.jsonl"),
    ("plot-garbage-metrics", ["plot", "{files}/empty_metrics", "--output", "{tmp}/c.png"], "metrics.jsonl"),
    ("plot-labels", ["plot", "{done}", "--labels", "a", "b", "--output", "{tmp}/c.png"], "one label per run"),
    ("plot-output-under-file", ["plot", "{done}", "--output", "{files}/a_file/c.png"], "a_file"),
    # ---- bench
    ("bench-unknown", ["bench", "speed"], "invalid choice: 'speed'"),
    ("bench-step-optimizer", ["bench", "step", "--optimizers", "adamw"], "adamw"),
    ("bench-functions-steps", ["bench", "functions", "--steps", "many"], "invalid int value"),
    ("bench-quadratic-optimizer", ["bench", "quadratic", "--optimizers", "adamw"], "adamw"),
]

# cases that break a file of the finished run first
BREAK = {
    "resume-corrupt-config": ("config.json", b'{"model": "x", "ste'),
    "resume-binary-config": ("config.json", bytes(range(200, 256)) * 4),
    "eval-corrupt-config": ("config.json", b"[1, 2"),
}


def test_there_are_at_least_60_distinct_mistakes():
    assert len(CASES) >= 60
    assert len({c[0] for c in CASES}) == len(CASES)
    assert len({tuple(c[1]) for c in CASES}) == len(CASES) - 1  # two resume cases differ in the file only


@pytest.mark.parametrize(("argv", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_mistake_is_one_line_and_costs_nothing(argv, message, world, tmp_path, capsys, request):
    case = request.node.callspec.id
    if case == "tensorboard-missing":
        _hide_tensorboard(request)
    run = tmp_path / "run"
    run.mkdir()
    (run / SENTINEL).write_text("keep")
    done = tmp_path / "done"
    shutil.copytree(world["done"], done)
    (done / SENTINEL).write_text("keep")
    if case in BREAK:
        name, data = BREAK[case]
        (done / name).write_bytes(data)
    before = {p: p.read_bytes() for p in sorted(done.rglob("*")) if p.is_file()}
    places = {"model": world["model"], "files": world["files"], "run": run, "done": done,
              "new": tmp_path / "new", "tmp": tmp_path}
    if "{readonly}" in " ".join(argv):
        places["readonly"] = _read_only_parent(tmp_path)
    capsys.readouterr()
    code = main([a.format(**places) for a in argv])
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"exit {code}; stderr: {err[-2000:]}"
    assert "Traceback" not in out + err
    assert len(lines) == 1, f"expected one line, got: {err[-2000:]}"
    assert message.lower() in lines[0].lower(), lines[0]
    assert (run / SENTINEL).read_text() == "keep" and sorted(p.name for p in run.iterdir()) == [SENTINEL]
    assert {p: p.read_bytes() for p in sorted(done.rglob("*")) if p.is_file()} == before
    assert not (tmp_path / "new").exists()


def _hide_tensorboard(request) -> None:
    """Make ``import torch.utils.tensorboard`` fail, as on a machine without the package."""
    import sys

    monkeypatch = request.getfixturevalue("monkeypatch")
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setitem(sys.modules, "tensorboard", None)


def test_device_cuda_without_cuda_is_refused(world, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    run = tmp_path / "run"
    run.mkdir()
    (run / SENTINEL).write_text("keep")
    argv = [a.format(model=world["model"], run=run) for a in TRAIN]
    assert main(["train", *argv, "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no CUDA GPU" in err and len(err.splitlines()) == 1
    assert (run / SENTINEL).read_text() == "keep"


def test_plot_skips_the_torn_last_line_a_kill_leaves(world, tmp_path):
    done = tmp_path / "done"
    shutil.copytree(world["done"], done)
    with open(done / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 3, "lo')
    assert main(["plot", str(done), "--output", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").stat().st_size > 1000
