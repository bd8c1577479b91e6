"""Layer-sampled perturbation: which layers a step perturbs and updates.

LeZO (Wang et al., arXiv 2410.09823) and MeZO-BCD (arXiv 2501.19099) perturb and update only
a subset of the layers at each step, chosen at random, so the other layers cost no noise
generation and no pass over their weights. In zotune this is an engine option of every
optimizer, ``layer_fraction``: a *layer* (unit) is a numbered block of the model
(``model.layers.3``: every parameter whose name has ``.3.`` as its first numbered component)
and every other module with trainable tensors is one too (embeddings, final norm, head);
optimizers built from tensors rather than a module treat each tensor as a layer. A step picks
``max(1, round(layer_fraction * units))`` units without replacement, from a generator seeded
by ``mix_seed(seed, step, LAYER_SUBSET_SAMPLE)``: a pure function of (seed, step), the same on
every rank and after a resume.

``layer_schedule`` chooses the order in which the units are visited (MeZO-BCD's block
selection rules):

* ``"random"`` (default; LeZO): an independent random subset of k units every step;
* ``"cyclic"``: the units in their model order (embeddings, block 0, 1, ..., final norm, head),
  k per step: a cycle of ``ceil(units / k)`` steps visits every unit exactly once (the last
  group of a cycle is smaller when k does not divide the number of units);
* ``"permuted"``: cyclic over a fresh random permutation per cycle (random reshuffling), the
  permutation of cycle c drawn from ``mix_seed(seed, c, LAYER_CYCLE_SAMPLE)``.

Every schedule is a pure function of (seed, step, number of units, fraction), so a resumed or
replayed run visits the same units.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from zotune.optim.noise import mix_seed

#: the ``sample`` slot of :func:`~zotune.optim.noise.mix_seed` reserved for the layer subset
#: (direction seeds use small sample numbers and HiZOO's warm-up probes 2**20 + k)
LAYER_SUBSET_SAMPLE = (1 << 40) + 1
#: the ``sample`` slot of the per-cycle permutation of the ``"permuted"`` schedule
LAYER_CYCLE_SAMPLE = (1 << 40) + 2
#: the orders in which units are visited (see the module docstring)
LAYER_SCHEDULES = ("random", "cyclic", "permuted")


def layer_key(name: str) -> str:
    """``model.layers.3.mlp.up_proj.weight`` -> ``model.layers.3``; a parameter outside the
    numbered blocks belongs to its module's layer (``model.norm.weight`` -> ``model.norm``)."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) or name


def layer_units(names: Sequence[str]) -> list[int]:
    """The unit index of each parameter name: equal layer keys share a unit, numbered in order."""
    index: dict[str, int] = {}
    return [index.setdefault(layer_key(n), len(index)) for n in names]


def subset_size(n_units: int, fraction: float) -> int:
    """How many units a step perturbs: ``max(1, round(fraction * n_units))`` (halves round up)."""
    return min(n_units, max(1, math.floor(fraction * n_units + 0.5)))


def cycle_length(n_units: int, fraction: float) -> int:
    """Steps of one cycle of the ``cyclic`` and ``permuted`` schedules: ``ceil(units / k)``."""
    return -(-n_units // subset_size(n_units, fraction))


def layer_subset(seed: int, step: int, n_units: int, fraction: float,
                 schedule: str = "random") -> frozenset[int]:
    """The units step ``step`` perturbs and updates (all of them when ``fraction >= 1``)."""
    k = subset_size(n_units, fraction)
    if k >= n_units:
        return frozenset(range(n_units))
    if schedule == "random":
        gen = torch.Generator().manual_seed(mix_seed(seed, step, LAYER_SUBSET_SAMPLE))
        return frozenset(torch.randperm(n_units, generator=gen)[:k].tolist())
    cycle, position = divmod(step, cycle_length(n_units, fraction))
    if schedule == "cyclic":
        order = list(range(n_units))
    elif schedule == "permuted":
        gen = torch.Generator().manual_seed(mix_seed(seed, cycle, LAYER_CYCLE_SAMPLE))
        order = torch.randperm(n_units, generator=gen).tolist()
    else:
        raise ValueError(f"layer_schedule must be one of {', '.join(LAYER_SCHEDULES)}, got {schedule!r}")
    return frozenset(order[position * k : (position + 1) * k])
