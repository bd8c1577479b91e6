"""The race grid: tasks x optimizers x tuning modes x lr grid x seeds x one budget, as cells.

A grid comes from a suite (:mod:`zotune.race.suites`), a YAML file and flags, in that order
of precedence (later wins). Every cell is one ordinary ``zotune train`` run with its own
output directory, described by the :class:`~zotune.train.TrainConfig` options it passes.

Budget: exactly one of ``steps``, ``forwards`` or ``seconds`` per race. ``forwards`` and
``seconds`` become ``--max-forwards`` / ``--max-seconds`` (with an effectively unbounded
``--steps``); seconds count only time inside optimizer steps, not evaluation.

Seeds: each seed is both the data seed (which LM-BFF split / MeZO sample) and the seed of the
directions and batch order, as in the papers' tables (one run per data seed).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zotune.errors import UserError
from zotune.models.tuning import parse_peft_mode

#: ``steps`` of a cell whose budget is forwards or seconds (the loop stops on the budget first)
UNBOUNDED_STEPS = 10**9
BUDGET_KINDS = ("steps", "forwards", "seconds")
BASELINES = ("zeroshot", "icl")
#: demonstrations in the ICL baseline's prompt unless the grid says otherwise (LM-BFF k = 16)
DEFAULT_DEMONSTRATIONS = 16
#: what a race grid may set; ``train`` holds any other ``zotune train`` option for every cell
GRID_KEYS = ("suite", "budget_preset", "model", "tasks", "optimizers", "peft", "seeds", "steps", "forwards",
             "seconds", "eval_every", "eval_every_forwards", "lr", "baselines", "icl_demonstrations", "target", "train")

#: Learning-rate grids per optimizer (class name) and tuning mode. Full/LoRA/prefix rows follow
#: the papers' grids (MeZO Table 15 and its OPT script, ZO-Bench sweeps, HiZOO, ZO-AdaMU
#: Appendix B; docs/methods.md); final_norm/norms (576 / 35k norm weights, no paper grid)
#: bracket the lr measured best for the demo (2e-2, docs/demo.md). First-order AdamW: MeZO's
#: FT-Adam grid for full tuning; for the norm modes a bracket of common fine-tuning rates.
LR_GRIDS: dict[str, dict[str, list[float]]] = {
    "ZOSGD": {"full": [1e-7, 1e-6, 1e-5], "lora": [1e-5, 5e-5, 1e-4], "prefix": [1e-3, 5e-3, 1e-2],
              "final_norm": [1e-2, 3e-2], "norms": [1e-3, 3e-3]},
    "ZOAdam": {"full": [1e-6, 1e-5, 1e-4], "lora": [1e-5, 1e-4, 1e-3], "prefix": [1e-4, 1e-3, 1e-2],
               "final_norm": [1e-2, 3e-2], "norms": [1e-3, 3e-3]},
    "HiZOO": {"full": [1e-7, 1e-6, 1e-5], "lora": [1e-5, 5e-5, 1e-4], "prefix": [1e-3, 5e-3, 1e-2],
              "final_norm": [1e-2, 3e-2], "norms": [1e-3, 3e-3]},
    "ZOAdaMU": {"full": [1e-6, 1e-4, 1e-2], "lora": [1e-3, 1e-2], "prefix": [1e-5, 1e-4, 1e-3],
                "final_norm": [1e-2, 3e-2], "norms": [1e-3, 3e-3]},
    "FirstOrderAdamW": {"full": [1e-5, 5e-5, 8e-5], "lora": [1e-4, 5e-4, 1e-3], "prefix": [1e-3, 1e-2],
                        "final_norm": [3e-3, 1e-2], "norms": [1e-3, 3e-3]},
}


@dataclass(frozen=True)
class Cell:
    """One run of the race: its directory name, what it is, and its ``zotune train`` options."""

    name: str
    kind: str  # "train", "zeroshot" or "icl"
    options: dict[str, Any]

    def argv(self, output_dir: Path | str) -> list[str]:
        """``zotune train`` arguments (after ``train``) that run this cell into ``output_dir``."""
        return [*options_to_flags(self.options), "--output-dir", str(output_dir)]


@dataclass
class RaceSpec:
    """A race grid; :meth:`cells` expands it. Build it with :func:`build_spec`."""

    model: str = "smollm2-135m"
    tasks: list[str] = field(default_factory=list)
    optimizers: list[str] = field(default_factory=list)
    peft: list[str] = field(default_factory=lambda: ["final_norm"])
    seeds: list[int] = field(default_factory=lambda: [42])
    budget_kind: str = "steps"
    budget: float = 0
    eval_every: int = 0
    #: dev evaluation every this many forwards (converted per optimizer to steps, so that methods
    #: with 2, 5 or 9 forwards per step are compared at the same points); 0: ``eval_every`` steps
    eval_every_forwards: int = 0
    lr: dict[str, Any] = field(default_factory=dict)
    baselines: list[str] = field(default_factory=list)
    icl_demonstrations: int = 0
    target: str | float = "zosgd"
    train: dict[str, Any] = field(default_factory=dict)
    suite: str | None = None
    budget_preset: str | None = None
    #: set by ``--lr-from``: per ``"method|mode"`` the probe's dev by lr and grid-edge flag, so the
    #: report judges a chosen lr by the grid it was chosen from (the race holds only the winner)
    lr_probe: dict[str, dict[str, Any]] = field(default_factory=dict)

    def lr_grid(self, optimizer_cls: type, peft: str, variant: str | None = None) -> list[float]:
        """The lr grid of one optimizer x mode: the race's own (``lr:``, for the ``variant`` spec
        first, then the optimizer's names, then ``*``) or :data:`LR_GRIDS`. An entry ``"x30"`` is
        30 times the optimizer's default lr for the mode (``lr_by_mode``), so one grid of factors
        fits every method and mode."""
        from zotune.train import TrainConfig, default_lr

        keys = ([variant] if variant else []) + [optimizer_cls.__name__, *getattr(optimizer_cls, "aliases", ()), "*"]
        for key in keys:
            for given, grid in self.lr.items():
                if normalize_name(given) == normalize_name(key):
                    grid = grid.get(peft) if isinstance(grid, dict) else grid
                    if grid is not None:
                        base = default_lr(TrainConfig(peft=peft), optimizer_cls)
                        return [_lr_value(x, base) for x in (grid if isinstance(grid, list) else [grid])]
        table = LR_GRIDS.get(optimizer_cls.__name__, {})
        if peft in table:
            return list(table[peft])
        return [default_lr(TrainConfig(peft=peft), optimizer_cls)]

    def cells(self) -> list[Cell]:
        """Every cell of the grid, task by task (baselines first), in a stable order."""
        entries = [optimizer_entry(spec) for spec in self.optimizers]
        out: list[Cell] = []
        common = {"model": self.model, "eval_every": self.eval_every, "progress": False, **self.train}
        for task in self.tasks:
            for seed in self.seeds:
                base = {**common, "task": task, "seed": seed, "data_seed": seed, "steps": 0}
                if "zeroshot" in self.baselines:  # 0 steps: the mode changes nothing but the cache's use
                    out.append(Cell(f"{task}__zeroshot__s{seed}", "zeroshot", {**base, "peft": self.zeroshot_peft()}))
                if "icl" in self.baselines:
                    demos = self.icl_demonstrations or DEFAULT_DEMONSTRATIONS
                    opts = {**base, "peft": "full",
                            "task_args": {**self.train.get("task_args", {}), "demonstrations": demos}}
                    out.append(Cell(f"{task}__icl{demos}__s{seed}", "icl", opts))
            for peft in self.peft:
                mode = re.sub(r"[^A-Za-z0-9_]", "", peft)  # "top:2+head" -> "top2head": no ":" or "+" in names
                for entry in entries:
                    every = self.eval_every
                    if self.eval_every_forwards:
                        every = max(1, round(self.eval_every_forwards / entry.forwards_per_step))
                    for lr in self.lr_grid(entry.cls, peft, entry.spec if entry.args else None):
                        for seed in self.seeds:
                            opts = {**common, "task": task, "peft": peft, "optimizer": entry.name, "lr": lr,
                                    "seed": seed, "data_seed": seed, "eval_every": every, **self.budget_options()}
                            if entry.args:
                                opts["optimizer_args"] = {**self.train.get("optimizer_args", {}), **entry.args}
                            opts.setdefault("save_every", every)  # a killed cell resumes
                            if "zeroshot" in self.baselines:  # that cell is the evaluation before
                                opts.setdefault("eval_before", False)  # training, once per task and seed
                            out.append(Cell(f"{task}__{mode}__{entry.label}__lr{lr:g}__s{seed}", "train", opts))
        return out

    def zeroshot_peft(self) -> str:
        """The zero-shot cell's tuning mode: a frozen-bottom mode of the race (``final_norm``, else
        the first ``top:K``), so that the cell evaluates dev and test through the activation cache,
        as the trained cells of that mode will, and fills the race's shared store with their rows
        (nothing trains at 0 steps); ``full`` when the race has none. The ICL cell's prompts
        (demonstrations + example) are seen once by one cell: it keeps the plain batched forward."""
        if "final_norm" in self.peft:
            return "final_norm"
        return next((mode for mode in self.peft if parse_peft_mode(mode)[0] == "top"), "full")

    def budget_options(self) -> dict[str, Any]:
        if self.budget_kind == "steps":
            return {"steps": int(self.budget)}
        if self.budget_kind == "forwards":
            return {"steps": UNBOUNDED_STEPS, "max_forwards": int(self.budget)}
        return {"steps": UNBOUNDED_STEPS, "max_seconds": float(self.budget)}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def normalize_name(name: str) -> str:
    """An optimizer name compared case- and separator-blind: ZO-SGD, zo_sgd, zosgd."""
    return re.sub(r"[-_ ]", "", str(name).lower())


def lrs_from_probe(spec: RaceSpec, source: Path) -> tuple[dict[str, dict[str, list[float]]],
                                                          dict[str, dict[str, dict[str, Any]]]]:
    """The lr an earlier race (a probe) chose on dev for each of ``spec``'s optimizers and modes,
    as a grid of one: ``{optimizer spec: {mode: [lr]}}``, and the probe's evidence, ``{optimizer
    spec: {"method|mode": {source, task, dev_by_lr, lr_edge, seeds}}}`` (for :attr:`RaceSpec.lr_probe`).
    ``source`` is that race's directory or its summary.json. A method the probe chose different lrs
    for on different tasks is refused (race those tasks separately); a probe on one task gives its
    lr to every task (MeZO's protocol tunes on one). An optimizer with an lr of its own in ``spec.lr``
    is not looked up (the probe need not have raced it)."""
    import json

    from zotune.race.report import optimizer_label

    path = source / "summary.json" if source.is_dir() else source
    try:
        rows = [r for r in json.loads(path.read_text())["rows"] if r.get("kind") == "train"]
    except FileNotFoundError:
        raise UserError(f"--lr-from {source}: no summary.json there (zotune race --collect {source} "
                        "writes it)") from None
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise UserError(f"--lr-from {path}: not a race summary ({e})") from None
    lrs_out: dict[str, dict[str, list[float]]] = {}
    evidence: dict[str, dict[str, dict[str, Any]]] = {}
    given = {normalize_name(k) for k in spec.lr}
    for name in spec.optimizers:
        if normalize_name(name) in given:
            continue
        entry = optimizer_entry(name)
        label = optimizer_label(entry.cls.__name__, entry.args)
        for mode in spec.peft:
            matching = [r for r in rows if r["method"] == label and r["peft"] == mode]
            chosen = {(r["task"], float(r["lr"])) for r in matching}
            lrs = sorted({lr for _, lr in chosen})
            if not lrs:
                raise UserError(f"--lr-from {path}: the probe has no {label} row in mode {mode}; give its grid "
                                f"with --lr {name}=...")
            if len(lrs) > 1:
                raise UserError(f"--lr-from {path}: the probe chose different lrs for {label} ({mode}) on its "
                                f"tasks: {', '.join(f'{t} {lr:g}' for t, lr in sorted(chosen))}; race the tasks "
                                "separately")
            lrs_out.setdefault(name, {})[mode] = lrs
            first = matching[0]
            evidence.setdefault(name, {})[f"{label}|{mode}"] = {
                "source": str(source), "task": first["task"], "dev_by_lr": first.get("dev_by_lr", {}),
                "lr_edge": bool(first.get("lr_edge", False)), "seeds": first.get("seeds")}
    return lrs_out, evidence


def parse_optimizer_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"zosgd:layer_fraction=0.5:layer_schedule=cyclic"`` -> ``("zosgd", {"layer_fraction": 0.5, ...})``:
    a race entry that runs one optimizer with extra constructor options (a variant of its own in
    the report, e.g. LeZO as ZO-SGD with layer sampling). Values are read as YAML scalars."""
    import yaml

    name, *pairs = str(spec).split(":")
    args: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"optimizer {spec!r}: options go as NAME:KEY=VALUE[:KEY=VALUE], "
                            "e.g. zosgd:layer_fraction=0.5")
        args[key.strip()] = yaml.safe_load(value)
    return name.strip(), args


@dataclass(frozen=True)
class OptimizerEntry:
    """One entry of the race's optimizer list: a name, or a variant ``NAME:KEY=VALUE``."""

    spec: str
    name: str
    args: dict[str, Any]
    cls: type
    forwards_per_step: float  #: of an instance with ``args`` (FZOO's depend on ``n_queries``)

    @property
    def label(self) -> str:
        """Its part of a cell name: ``zosgd``, ``zosgd-layer_fraction0.5`` (no ":" or "=")."""
        label = normalize_name(self.name) + "".join(f"-{k}{v}" for k, v in self.args.items())
        return re.sub(r"[^A-Za-z0-9_.-]", "", label)


def optimizer_entry(spec: str) -> OptimizerEntry:
    """Parse and check one optimizer entry: an unknown name is a UserError listing the optimizers;
    a variant is built on one small weight, so that a misspelt or invalid option fails before any
    cell runs (and its forwards per step are those of its options)."""
    from zotune.train import resolve_optimizer

    name, args = parse_optimizer_spec(spec)
    cls = resolve_optimizer(name)
    forwards = float(cls.forwards_per_step)
    if args:
        import torch

        try:
            forwards = float(cls([torch.nn.Parameter(torch.zeros(4, 4))], lr=1e-3, **args).forwards_per_step)
        except (TypeError, ValueError) as exc:
            raise UserError(f"optimizer {spec!r}: {exc}") from None
    return OptimizerEntry(str(spec), name, args, cls, forwards)


def options_to_flags(options: dict[str, Any]) -> list[str]:
    """TrainConfig options as ``zotune train`` flags (the inverse of its argument parser)."""
    import json

    flags: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, dict):
            flags += [flag, json.dumps(value, sort_keys=True)]
        elif isinstance(value, (list, tuple)):
            flags += [flag, *map(str, value)]
        else:
            flags += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    return flags


def build_spec(file_values: dict[str, Any], flag_values: dict[str, Any]) -> RaceSpec:
    """Suite preset < YAML values < flags; validates everything before any cell runs."""
    from zotune.race.suites import suite_values

    for source in (file_values, flag_values):
        unknown = sorted(set(source) - set(GRID_KEYS))
        if unknown:
            raise UserError(f"unknown race grid keys {unknown}; valid keys: {', '.join(GRID_KEYS)}")
    merged = {**file_values, **{k: v for k, v in flag_values.items() if v is not None}}
    values: dict[str, Any] = {}
    if merged.get("suite"):
        values.update(suite_values(merged["suite"], merged.get("budget_preset") or "quick"))
    given_budget = [k for k in BUDGET_KINDS if merged.get(k) is not None]
    if given_budget:  # a budget given in the file or flags replaces the suite's
        for k in BUDGET_KINDS:
            values.pop(k, None)
    if merged.get("eval_every_forwards") is not None:  # so does a cadence in forwards
        values.pop("eval_every", None)
    if isinstance(values.get("train"), dict) and isinstance(merged.get("train"), dict):
        merged["train"] = {**values["train"], **merged["train"]}
    values.update({k: v for k, v in merged.items() if v is not None})
    return _validate(values)


def _as_list(value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _lr_value(value: Any, default: float) -> float:
    """A learning rate of a grid: a number, or ``"xF"``: F times the mode's ``default``."""
    if isinstance(value, str) and value.strip().lower().startswith("x"):
        return float(value.strip()[1:]) * default
    return float(value)


def _check_lr_grid(name: str, grid: Any) -> None:
    """An optimizer's lr grid (a list, or a list per tuning mode) holds at least one lr, each > 0
    (a number, or ``xF``: F times the mode's default lr)."""
    for mode, lrs in (grid.items() if isinstance(grid, dict) else [(None, grid)]):
        where = f"--lr {name}" + (f" ({mode})" if mode else "")
        values = lrs if isinstance(lrs, list) else [lrs]
        try:
            bad = [v for v in values if not _lr_value(v, 1.0) > 0]
        except (TypeError, ValueError):
            raise UserError(f"{where}: learning rates must be numbers, or xF for F times the mode's default lr, "
                            f"got {lrs!r}") from None
        if not values or bad:
            raise UserError(f"{where}: the lr grid needs at least one learning rate > 0, got {lrs!r}")


def _validate(values: dict[str, Any]) -> RaceSpec:
    """Check the grid: names exist, it is not empty, the budget is one positive number."""
    from zotune.tasks import canonical_task_name
    from zotune.train import TrainConfig, resolve_optimizer

    tasks = _as_list(values.get("tasks"), "tasks")
    optimizers = _as_list(values.get("optimizers"), "optimizers")
    baselines = _as_list(values.get("baselines"), "baselines")
    for task in tasks:
        canonical_task_name(task)  # raises a UserError naming the valid tasks
    for spec in optimizers:
        optimizer_entry(spec)
    peft = _as_list(values.get("peft", ["final_norm"]), "peft")
    for mode in peft:  # raises a UserError naming the modes (top:K included)
        parse_peft_mode(mode, "tuning mode in the race grid")
    bad = [b for b in baselines if b not in BASELINES]
    if bad:
        raise UserError(f"unknown baselines {bad}; choose from {', '.join(BASELINES)}")
    try:
        seeds = [int(s) for s in _as_list(values.get("seeds", [42]), "seeds")]
    except ValueError:
        raise UserError(f"seeds must be integers, got {values.get('seeds')!r}") from None
    if not tasks or not seeds or not (optimizers or baselines) or (optimizers and not peft):
        raise UserError("the race grid is empty: give at least one task (--tasks), one seed (--seeds) and one "
                        "optimizer (--optimizers) or baseline (--baselines), or a --suite")
    budget = {k: values[k] for k in BUDGET_KINDS if values.get(k) is not None}
    if optimizers and len(budget) != 1:
        raise UserError("give the race budget as exactly one of --steps, --forwards or --seconds"
                        + (f" (got {', '.join(budget)})" if budget else ""))
    kind, amount = next(iter(budget.items())) if budget else ("steps", 0)
    try:
        amount = float(amount)
    except (TypeError, ValueError):
        raise UserError(f"the race budget --{kind} must be a number, got {amount!r}") from None
    if optimizers and not amount > 0:
        raise UserError(f"the race budget --{kind} must be > 0, got {amount:g}")
    train = dict(values.get("train") or {})
    reserved = {"task", "optimizer", "lr", "seed", "data_seed", "peft", "output_dir", "resume", "overwrite",
                "steps", "max_forwards", "max_seconds"}
    clash = sorted(set(train) & reserved)
    if clash:
        raise UserError(f"train options {clash} are set by the race grid itself; use tasks/optimizers/peft/"
                        "seeds/lr and the budget instead")
    TrainConfig.from_dict(train)  # unknown option names fail here, with the valid ones listed
    eval_every = int(values.get("eval_every") or 0)
    eval_every_forwards = int(values.get("eval_every_forwards") or 0)
    if eval_every < 0 or eval_every_forwards < 0:
        raise UserError("--eval-every and --eval-every-forwards must be >= 0")
    if eval_every and eval_every_forwards:
        raise UserError("give the dev evaluation cadence as one of --eval-every (steps) or --eval-every-forwards")
    lr = values.get("lr") or {}
    if not isinstance(lr, dict):
        raise UserError("the race's lr grid must map optimizer names to lists of learning rates "
                        "(--lr zosgd=1e-3,1e-2)")
    for name, grid in lr.items():
        if name.strip() != "*":  # *: every optimizer without a grid of its own
            resolve_optimizer(parse_optimizer_spec(name)[0])
        _check_lr_grid(name, grid)
    target = values.get("target", "zosgd")
    if isinstance(target, str):
        try:
            target = float(target)
        except ValueError:
            resolve_optimizer(target)
    return RaceSpec(model=str(values.get("model", "smollm2-135m")), tasks=[str(t) for t in tasks],
                    optimizers=[str(o) for o in optimizers], peft=peft, seeds=seeds, budget_kind=kind,
                    budget=amount, eval_every=eval_every, eval_every_forwards=eval_every_forwards, lr=lr,
                    baselines=baselines,
                    icl_demonstrations=int(values.get("icl_demonstrations") or 0), target=target, train=train,
                    suite=values.get("suite"), budget_preset=values.get("budget_preset"))
