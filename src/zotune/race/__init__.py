"""``zotune race``: which optimizer and tuning mode reaches which accuracy first, with error bars.

* :mod:`zotune.race.grid` -- the grid (tasks x optimizers x modes x lr grid x seeds x budget) as cells;
* :mod:`zotune.race.suites` -- the papers' protocols (``lmbff-k16``, ``superglue-1k``), quick and full;
* :mod:`zotune.race.runner` -- runs cells as ``zotune train`` processes, skips finished ones, resumes;
* :mod:`zotune.race.report` -- lr choice by dev, mean ± std, time to target, memory; md/JSON/CSV/PNG.
"""

from zotune.race.grid import LR_GRIDS, Cell, RaceSpec, build_spec
from zotune.race.report import summarize, write_report
from zotune.race.runner import print_commands, run_cells
from zotune.race.suites import SUITES

__all__ = ["LR_GRIDS", "SUITES", "Cell", "RaceSpec", "build_spec", "print_commands", "run_cells", "summarize",
           "write_report"]
