"""The run configuration: option groups, the CLI and YAML handling generated from them."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pytest

from zotune.cli import build_parser
from zotune.config import TrainConfig, add_arguments, config_from_args, flag, option
from zotune.errors import UserError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def train_help() -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"].format_help()


def test_every_field_has_help_and_a_group():
    fields = dataclasses.fields(TrainConfig)
    assert len(fields) == 50  # 42 + lora_layers, cache_mb (depth tuning) + max_forwards, max_seconds (race)
    #                           + cache_dir, plot (race cells share activations, skip curves.png) + offload
    #                           + cache_warm (bottoms filled before the clock starts)
    for f in fields:
        assert f.metadata.get("help", "").strip(), f"{f.name} has no help text"
    grouped = [f.name for g in TrainConfig.groups() for f in dataclasses.fields(g)]
    assert sorted(grouped) == sorted(TrainConfig.field_names())  # every field in exactly one group
    assert [g.__name__ for g in TrainConfig.groups()] == ["ModelArgs", "TaskArgs", "OptimizerArgs", "RunArgs"]


def test_help_explains_every_option():
    text = " ".join(train_help().split())
    for f in dataclasses.fields(TrainConfig):
        assert flag(f.name) in text, f.name
        first_words = " ".join(f.metadata["help"].split()[:4])
        assert first_words in text, f"--help lacks the help of {f.name}"
    for title in ("model options", "task options", "optimizer options", "run options"):
        assert title in text


def test_flat_access_and_defaults():
    config = TrainConfig()
    assert (config.model, config.task, config.optimizer, config.lr, config.steps) == ("smollm2-135m", "sst2",
                                                                                      "zosgd", None, 100)
    assert config.optimizer_args == {} and config.optimizer_args is not TrainConfig().optimizer_args


@pytest.mark.parametrize(("values", "expected"), [
    ({"lr": "1e-5"}, {"lr": 1e-5}),          # PyYAML reads 1e-5 (no dot) as a string
    ({"lr": 1}, {"lr": 1.0}),
    ({"steps": "20"}, {"steps": 20}),
    ({"steps": 2.0}, {"steps": 2}),
    ({"eps": "1e-3", "max-test": "0"}, {"eps": 1e-3, "max_test": 0}),
    ({"lora_targets": "q_proj"}, {"lora_targets": ["q_proj"]}),
    ({"optimizer_args": '{"alpha": 1e-6}'}, {"optimizer_args": {"alpha": 1e-6}}),
])
def test_values_are_converted_to_the_field_type(values, expected):
    config = TrainConfig.from_dict(values)
    for key, value in expected.items():
        assert getattr(config, key) == value and type(getattr(config, key)) is type(value)


@pytest.mark.parametrize(("values", "message"), [
    ({"steps": "ten"}, "steps (--steps) must be an integer, got 'ten'"),
    ({"steps": None}, "steps (--steps) needs a value"),
    ({"steps": 2.5}, "must be an integer"),
    ({"steps": True}, "must be an integer"),
    ({"lr": "fast"}, "lr (--lr) must be a number"),
    ({"lr": -1}, "--lr must be >= 0"),
    ({"lr": "nan"}, "--lr must be >= 0"),
    ({"eps": 0}, "--eps must be > 0"),
    ({"log_every": 0}, "--log-every must be >= 1"),
    ({"threads": -1}, "--threads must be >= 1"),
    ({"peft": "qlora"}, "unknown --peft 'qlora'"),
    ({"eval_before": "maybe"}, "must be true or false"),
    ({"task": 3}, "task (--task) must be a string"),
    ({"optimizer_args": [1]}, "must be a mapping"),
    ({"optimizer_args": {"lr": 1e-3}}, "use --lr instead"),
    ({"task_args": {"template": "{text}"}}, "use --template instead"),
    ({"stpes": 3}, "unknown config keys ['stpes']"),
])
def test_bad_values_are_refused_with_the_fix(values, message):
    with pytest.raises(UserError) as err:
        TrainConfig.from_dict(values)
    assert message in str(err.value)


def test_validation_runs_on_the_python_api_too():
    with pytest.raises(UserError, match="--batch-size must be >= 1"):
        TrainConfig(batch_size=0)


def test_the_demo_config_loads():
    from zotune.config import load_config_file

    config = TrainConfig.from_dict(load_config_file(str(CONFIGS / "demo.yaml")))
    assert (config.peft, config.lr, config.steps) == ("final_norm", 0.02, 60)


def test_a_new_option_is_one_field():
    """A field added to a group appears in the CLI, the YAML keys and the checks, with nothing else."""

    @dataclass
    class WithExtra(TrainConfig):
        temperature: float = option(1.0, "softmax temperature of the scorer", above=0)

    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    add_arguments(parser, WithExtra)
    assert "softmax temperature" in parser.format_help()
    args = parser.parse_args(["--temperature", "0.5", "--steps", "7"])
    config = config_from_args(args, WithExtra)
    assert (config.temperature, config.steps) == (0.5, 7)
    with pytest.raises(UserError, match="--temperature must be > 0"):
        WithExtra.from_dict({"temperature": 0})
