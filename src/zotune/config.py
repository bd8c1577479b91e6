"""The run configuration: option groups as dataclasses, the CLI and YAML handling made from them.

Every option of ``zotune train`` is one dataclass field whose metadata holds its help text and,
where it has them, its choices and bounds (the style of TRL's ``SFTConfig``). The fields are
grouped by topic (:class:`ModelArgs`, :class:`TaskArgs`, :class:`OptimizerArgs`,
:class:`RunArgs`) and :class:`TrainConfig` inherits all of them, so access stays flat
(``config.lr``, ``config.task``). From the fields come:

* the argparse options (``--lr``, ``--eval-every``, one argument group per dataclass),
  see :func:`add_arguments`;
* the YAML/JSON config keys (``lr:``, ``eval_every:``), see :meth:`TrainConfig.from_dict`;
* the checks: every value is converted to its field's type (so ``lr: 1e-5``, which PyYAML
  reads as a string, is a number) and checked against the field's choices and bounds when the
  dataclass is built; a group's ``check()`` adds the checks that involve several fields.

Adding an option means adding one field with :func:`option` metadata here, nothing else.

>>> config = TrainConfig.from_dict({"lr": "1e-5", "steps": 10, "eval-every": 5})
>>> config.lr, config.steps, config.eval_every
(1e-05, 10, 5)
>>> TrainConfig.from_dict({"steps": "ten"})
Traceback (most recent call last):
...
zotune.errors.UserError: steps (--steps) must be an integer, got 'ten'
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zotune.errors import UserError
from zotune.models.tuning import PEFT_MODES, parse_peft_mode  # defined once, beside the tuning modes


def option(default: Any = None, help: str = "", *, choices: tuple[str, ...] | None = None,
           min: float | None = None, above: float | None = None, factory: Any = None) -> Any:
    """A config field: its default, ``--help`` text, allowed ``choices`` and bounds.

    ``min`` is an inclusive lower bound, ``above`` an exclusive one; ``factory`` makes mutable
    defaults (``dict``). ``None`` is always allowed for optional fields (``int | None``).
    """
    metadata = {"help": help, "choices": choices, "min": min, "above": above}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def flag(name: str) -> str:
    """The CLI flag of a field: ``eval_every`` -> ``--eval-every``."""
    return "--" + name.replace("_", "-")


class ConfigGroup:
    """Shared behaviour of the option groups: type conversion, choices, bounds, group checks."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Convert every value to its field's type and check it; raises :class:`UserError`.

        Runs when the dataclass is built and again before training (fields may be reassigned).
        """
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = _convert(f.name, getattr(self, f.name), hints[f.name])
            _check_bounds(f, value)
            setattr(self, f.name, value)
        # each group's own check(), in field order (model first)
        for cls in reversed(type(self).__mro__):
            own = cls.__dict__.get("check")
            if own is not None:
                own(self)


def _describe(kind: type) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            list: "a list of strings", dict: "a mapping (KEY: VALUE)"}[kind]


def _convert(name: str, value: Any, hint: Any) -> Any:
    """``value`` as the field's type; strings from YAML or the CLI are parsed ("1e-5" -> 1e-05)."""
    args = typing.get_args(hint)
    optional = type(None) in args
    kind = typing.get_origin(hint) or hint
    if optional:
        inner = next(a for a in args if a is not type(None))
        kind = typing.get_origin(inner) or inner
    if value is None:
        if optional:
            return None
        raise UserError(f"{name} ({flag(name)}) needs a value: {_describe(kind)}")
    bad = UserError(f"{name} ({flag(name)}) must be {_describe(kind)}, got {value!r}")
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if isinstance(value, bool):  # bool is an int subclass: `steps: true` is a mistake
        raise bad
    if kind is int:
        number = _number(value)
        if number is None or not math.isfinite(number) or number != int(number):
            raise bad
        return int(number)
    if kind is float:
        number = _number(value)
        if number is None:
            raise bad
        return float(number)
    if kind is str:
        if isinstance(value, str):
            return value
        raise bad
    if kind is list:
        items = [value] if isinstance(value, str) else value
        if isinstance(items, (list, tuple)) and all(isinstance(x, str) for x in items):
            return list(items)
        raise bad
    if kind is dict:
        if isinstance(value, str):  # --optimizer-args '{"alpha": 1e-6}' (JSON is YAML)
            value = _yaml_value(value, f"{name} ({flag(name)})")
        if isinstance(value, dict):
            return dict(value)
        raise bad
    raise TypeError(f"config field {name} has an unsupported type {hint}")  # a bug here, not the user's


def _number(value: Any) -> int | float | None:
    """An int or float from a number or a numeric string; None if it is neither."""
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        for parse in (int, float):
            try:
                return parse(value.strip())
            except ValueError:
                pass
    return None


def _check_bounds(f: dataclasses.Field, value: Any) -> None:
    if value is None:
        return
    name, meta = f.name, f.metadata
    if meta.get("choices") and value not in meta["choices"]:
        raise UserError(f"unknown {flag(name)} {value!r}; choose one of {', '.join(meta['choices'])}")
    if meta.get("min") is not None and not value >= meta["min"]:  # `not >=` also refuses NaN
        raise UserError(f"{flag(name)} must be >= {meta['min']}, got {value}")
    if meta.get("above") is not None and not value > meta["above"]:
        raise UserError(f"{flag(name)} must be > {meta['above']}, got {value}")


def yaml_load(text: str) -> Any:
    """``yaml.safe_load`` that reads ``1e-5`` as a number (YAML 1.2; PyYAML's 1.1 rules need a dot).

    >>> yaml_load("lr: 1e-5")
    {'lr': 1e-05}
    """
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789."),
    )
    return yaml.load(text, Loader=Loader)  # Loader is a SafeLoader: no arbitrary objects


def _yaml_value(raw: str, where: str) -> Any:
    import yaml

    try:
        return yaml_load(raw)
    except yaml.YAMLError as e:
        problem = str(e).splitlines()[0]
        raise UserError(f"{where}: {raw!r} is not a valid YAML value ({problem}); quote it") from None


# ---------------------------------------------------------------------------- the groups


@dataclass
class ModelArgs(ConfigGroup):
    """model and tuning mode"""

    model: str = option("smollm2-135m", "embedded model name (smollm2-135m, gemma3-270m), local Hugging Face "
                                        "directory or hub id (offline cache only)")
    dtype: str = option("float32", "model dtype: float32, bfloat16 or float16 (low precision keeps an fp32 "
                                   "master copy of the trainable weights)")
    device: str | None = option(None, "torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available, "
                                      "else cpu; under torchrun: the rank's device)")
    peft: str = option("full", f"tuning mode, one of {', '.join(PEFT_MODES)}: which weights train (full: all; "
                               "lora/prefix: peft adapters; final_norm/norms: layer-norm weights only; top:K: "
                               "every weight of the last K decoder blocks and the final norm, top:K+head also "
                               "the LM head)")
    lora_r: int = option(8, "LoRA rank (--peft lora)", min=1)
    lora_alpha: int = option(16, "LoRA scaling alpha (--peft lora)", min=1)
    lora_targets: list[str] | None = option(None, "module names LoRA adapts (default: peft's choice for the "
                                                  "architecture), e.g. --lora-targets q_proj v_proj")
    lora_layers: str | None = option(None, "decoder blocks LoRA adapts (--peft lora): top:K for the last K "
                                           "only (default: every block)")
    prefix_tokens: int = option(5, "virtual tokens of prefix tuning (--peft prefix)", min=1)
    cache_mb: float = option(1024.0, "memory bound (MB) of the frozen-bottom activation cache: the blocks "
                                     "below the lowest trainable weight run once per example; 0 switches it "
                                     "off", min=0)
    cache_warm: bool = option(True, "with the activation cache on, run the frozen bottom over the training "
                                    "rows before the first step, so step times measure steps, not the cache "
                                    "filling (not under a --max-seconds budget alone: its rows are unknown)")
    offload: str = option("none", "where the decoder blocks live: none (on --device), or cpu: in pinned CPU "
                                  "memory, streamed through the GPU one block at a time, for models larger "
                                  "than GPU memory (zosgd, zo-momentum, zo-sign, zo-adam, helene; one process; "
                                  "see docs/offload.md)", choices=("none", "cpu"))
    cache_dir: str | None = option(None, "also keep the frozen-bottom activations on disk in this folder, shared "
                                         "by runs on the same model and examples (an lr sweep, `zotune race`): "
                                         "a row another run computed is read back, bit for bit")

    def check(self) -> None:
        """The tuning mode must be known, and the device exist on this machine."""
        parse_peft_mode(self.peft, "--peft")
        if self.lora_layers is not None and parse_peft_mode(self.peft, "--peft")[0] != "lora":
            raise UserError(f"--lora-layers applies to --peft lora only (the mode is {self.peft!r})")
        if self.offload != "none":
            refusal = offload_device_refusal(self.device)
            if refusal is not None:
                raise UserError(refusal)
        if self.device is None:
            return
        import torch

        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise UserError(f"--device {self.device!r} is not a torch device; use cpu, cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {self.device}: this machine has no CUDA GPU available to torch; "
                            "use --device cpu (or omit --device)")


def offload_device_refusal(device: str | None) -> str | None:
    """Why ``--offload cpu`` cannot run with ``--device`` here (None: it can): it needs a CUDA GPU."""
    import torch

    if device is not None and not str(device).startswith("cuda"):
        return (f"--offload cpu streams the decoder blocks from CPU memory through a CUDA GPU; with --device "
                f"{device} the weights are in that memory already: drop --offload")
    if not torch.cuda.is_available():
        return ("--offload cpu streams the decoder blocks from CPU memory through a CUDA GPU, and this machine "
                "has none available to torch: drop --offload")
    return None


@dataclass
class TaskArgs(ConfigGroup):
    """task, data and objective"""

    task: str = option("sst2", "task name (see `zotune tasks`), or 'custom' with --task-arg path=FILE ...")
    template: str | None = option(None, "prompt template: a named template of the task (see `zotune tasks`), "
                                        "or for --task custom a format string over the data fields, e.g. "
                                        "'Review: {text} Sentiment:'")
    task_args: dict[str, Any] = option(help="extra task arguments as a JSON/YAML mapping (or use --task-arg "
                                            "KEY=VALUE)", factory=dict)
    k: int = option(16, "examples per class for LM-BFF k-shot tasks", min=1)
    data_seed: int = option(42, "data split seed (LM-BFF: 13, 21, 42, 87, 100)")
    max_train: int | None = option(None, "cap on training examples (default: the task's)", min=1)
    max_dev: int | None = option(None, "cap on dev examples (default: the task's)", min=1)
    max_test: int | None = option(1000, "cap on test examples", min=0)
    data_dir: str | None = option(None, "folder with the task's data files (for tasks not shipped with zotune)")
    max_length: int = option(256, "token budget of a prompt plus its candidate (longer prompts are cut on the "
                                  "left)", min=1)
    objective: str = option("ce", "what the optimizer minimises: ce (cross-entropy), accuracy (-accuracy, "
                                  "non-differentiable) or f1 (-F1)", choices=("ce", "accuracy", "f1"))

    def check(self) -> None:
        """A setting with its own option may not also come as a task argument."""
        _refuse_duplicates(self, self.task_args, "--task-arg")


@dataclass
class OptimizerArgs(ConfigGroup):
    """optimizer and schedule"""

    optimizer: str = option("zosgd", "optimizer name or alias (see `zotune optimizers`), or adamw: the "
                                     "first-order baseline (backprop)")
    steps: int = option(100, "number of optimizer steps", min=0)
    max_forwards: int = option(0, "also stop once the optimizer has run this many forward passes (0: no limit)",
                               min=0)
    max_seconds: float = option(0.0, "also stop after this many seconds inside optimizer steps, evaluation "
                                     "excluded (0: no limit)", min=0)
    batch_size: int = option(16, "examples per step (global, split across data-parallel ranks)", min=1)
    lr: float | None = option(None, "learning rate (default: the setting the MeZO, ZO-Bench, HiZOO or "
                                    "ZO-AdaMU papers publish for the optimizer and tuning mode)", min=0)
    eps: float | None = option(None, "perturbation scale (default by tuning mode: full 1e-3, lora 1e-2, "
                                     "prefix 1e-1, norms 1e-2)", above=0)
    weight_decay: float = option(0.0, "decoupled weight decay (not applied to biases and norms)", min=0)
    schedule: str = option("constant", "learning-rate schedule: constant, or linear decay to 0",
                           choices=("constant", "linear"))
    warmup_steps: int = option(0, "linear learning-rate warm-up steps", min=0)
    distribution: str = option("gaussian", "perturbation distribution: gaussian or rademacher")
    optimizer_args: dict[str, Any] = option(help="extra optimizer arguments as a JSON/YAML mapping (or use "
                                                 "--opt KEY=VALUE)", factory=dict)
    seed: int = option(0, "seed of the perturbation directions and the batch order")

    def check(self) -> None:
        """A setting with its own option may not also come as an optimizer argument."""
        _refuse_duplicates(self, self.optimizer_args, "--opt")


@dataclass
class RunArgs(ConfigGroup):
    """output, evaluation, checkpoints and logging"""

    output_dir: str = option("runs/zotune", "where the run writes its files")
    eval_every: int = option(0, "evaluate on dev every N steps (0: only at the end); keeps the best "
                                "weights in best/", min=0)
    eval_before: bool = option(True, "evaluate dev and test before training")
    eval_batch_size: int = option(32, "examples per evaluation batch", min=1)
    early_stop: int = option(0, "stop after N evaluations without dev improvement (0: never)", min=0)
    save_every: int = option(0, "write checkpoint/ every N steps (it is always written at the end)", min=0)
    resume: bool = option(False, "continue the run in --output-dir from its checkpoint, with the settings it "
                                 "was started with")
    overwrite: bool = option(False, "replace a non-empty --output-dir (only once every check has passed)")
    log_every: int = option(1, "write a metrics.jsonl line every N steps", min=1)
    tensorboard: bool = option(False, "also log to TensorBoard in OUTPUT_DIR/tensorboard (needs the "
                                      "tensorboard package)")
    progress: bool = option(True, "show a progress bar")
    plot: bool = option(True, "draw curves.png at the end (`zotune race` draws its own plot instead)")
    threads: int | None = option(None, "CPU threads for torch (default: torch's choice)", min=1)


def _refuse_duplicates(config: Any, extra: dict[str, Any], form: str) -> None:
    names = {f.name for f in dataclasses.fields(config)}
    for key, value in extra.items():
        if key in names:
            raise UserError(f"{form} {key}={value}: {key} has its own option; use {flag(key)} instead "
                            f"(or `{key}:` in the config file)")


# Field order of the resulting dataclass is the reverse of this base list (dataclasses collect
# fields from the last base first): model, task, optimizer, run, which is the order of
# config.json and --help.
@dataclass
class TrainConfig(RunArgs, OptimizerArgs, TaskArgs, ModelArgs):
    """Everything a run needs. Field names are the CLI flags (``--lr``, ``--eval-every``, ...) and
    the keys of a YAML config file."""

    @classmethod
    def field_names(cls) -> list[str]:
        """The option names, in order."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def groups(cls) -> list[type]:
        """The option groups (model, task, optimizer, run, then any subclass adding fields)."""
        return [c for c in reversed(cls.__mro__) if issubclass(c, ConfigGroup) and _own_fields(c)]

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> TrainConfig:
        """Build from config-file keys (``eval_every`` or ``eval-every``); unknown keys are refused."""
        known = set(cls.field_names())
        clean = {str(k).replace("-", "_"): v for k, v in values.items()}
        clean.pop("data_parallel", None)  # recorded in config.json by train(), not a setting
        unknown = sorted(set(clean) - known)
        if unknown:
            raise UserError(f"unknown {source} keys {unknown}; valid keys: {', '.join(sorted(known))}")
        return cls(**clean)


# ---------------------------------------------------------------------------- CLI and YAML


def add_arguments(parser: argparse.ArgumentParser, config_cls: type = TrainConfig) -> None:
    """One ``--flag`` per field, in one argument group per option group; every default is None so
    that the values given can be told apart from the defaults (flags override the config file)."""
    for group_cls in config_cls.groups():
        doc = (group_cls.__doc__ or "").strip()
        title = group_cls.__name__.removesuffix("Args").lower() + " options"
        group = parser.add_argument_group(f"{title} ({doc})" if doc and "\n" not in doc and len(doc) < 60 else title)
        hints = typing.get_type_hints(group_cls)
        own = _own_fields(group_cls)
        for f in dataclasses.fields(group_cls):
            if f.name in own:
                _add_field(group, f, hints[f.name])


def _own_fields(cls: type) -> set[str]:
    """The fields a class declares itself (not those it inherits)."""
    import inspect

    return set(inspect.get_annotations(cls))


def _add_field(group: Any, f: dataclasses.Field, hint: Any) -> None:
    text = f.metadata["help"]
    default = f.default if f.default is not dataclasses.MISSING else None
    if default not in (None, "") and not isinstance(default, bool):
        text += f" (default: {default})"
    elif isinstance(default, bool) and default:
        text += " (default: on)"
    kwargs: dict[str, Any] = {"default": None, "help": text.replace("%", "%%")}
    if hint is bool or hint == "bool":
        kwargs["action"] = argparse.BooleanOptionalAction
    elif "list" in str(hint):
        kwargs.update(nargs="+", metavar=f.name.upper().removesuffix("S"))
    elif f.metadata.get("choices"):
        kwargs["metavar"] = "{" + ",".join(f.metadata["choices"]) + "}"
    else:
        kwargs["metavar"] = f.name.upper()
    group.add_argument(flag(f.name), **kwargs)


def parse_key_values(items: list[str], flag_name: str) -> dict[str, Any]:
    """``["alpha=1e-6", "label_words={0: a}"]`` -> values parsed as YAML scalars/mappings."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"{flag_name} expects KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if key in out:
            raise UserError(f"{flag_name} {key}= is given twice; give it once")
        out[key] = _yaml_value(raw, f"{flag_name} {key}")
    return out


def load_config_file(path: str) -> dict[str, Any]:
    """The mapping in a YAML (or JSON) config file."""
    import yaml

    p = Path(path)
    if not p.exists():
        raise UserError(f"config file {path} does not exist")
    if p.is_dir():
        raise UserError(f"--config {path} is a directory; give a YAML file (e.g. configs/demo.yaml)")
    try:
        data = yaml_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not UTF-8 text; give a YAML file") from None
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of options (KEY: VALUE lines)")
    return data


def saved_run_config(output_dir: str, config_cls: type = TrainConfig) -> dict[str, Any]:
    """The settings a run in ``output_dir`` was started with (its config.json), if any."""
    path = Path(output_dir) / "config.json"
    if not path.exists():
        return {}
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{path} is corrupt (not a JSON object); restore it from a copy, or start a new run "
                        "in another --output-dir") from None
    if not isinstance(saved, dict):
        raise UserError(f"{path} is corrupt (not a JSON object); restore it from a copy, or start a new run "
                        "in another --output-dir")
    keep = set(config_cls.field_names()) - {"resume", "overwrite"}  # never inherited by a new command
    return {k: v for k, v in saved.items() if k in keep}


def config_from_args(args: argparse.Namespace, config_cls: type = TrainConfig) -> TrainConfig:
    """Saved run settings (with --resume) < the --config file < the flags given."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update({str(k).replace("-", "_"): v for k, v in load_config_file(args.config).items()})
    for name in config_cls.field_names():
        given = getattr(args, name, None)
        if given is not None:
            values[name] = given
    if values.get("resume"):
        values = {**saved_run_config(values.get("output_dir", config_cls.output_dir), config_cls), **values}
    for cli_flag, key in (("opt", "optimizer_args"), ("task_arg", "task_args")):
        pairs = parse_key_values(getattr(args, cli_flag, None) or [], flag(cli_flag))
        if pairs:  # merged into the mapping from the file or --optimizer-args/--task-args
            given = values.get(key)
            values[key] = {**(_convert(key, given, dict[str, Any]) if given is not None else {}), **pairs}
    return config_cls.from_dict(values)
