"""``zotune plot``: training curves of one or several runs on one PNG."""

from __future__ import annotations

import argparse
from pathlib import Path

DESCRIPTION = """\
Plot the training loss and dev metric of one or more run directories on one PNG.

example:
  zotune plot runs/sst2-mezo runs/sst2-hizoo --output compare.png
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``zotune plot``."""
    parser.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl)")
    parser.add_argument("--output", "-o", default="curves.png", help="PNG to write (default: curves.png)")
    parser.add_argument("--labels", nargs="+", help="legend labels, one per run")
    parser.add_argument("--smooth", type=int, default=10, help="moving-mean window of the loss curve")


def run(args: argparse.Namespace) -> int:
    """Draw the curves and print the PNG's path."""
    from zotune.errors import UserError
    from zotune.plotting import plot_runs

    if args.labels and len(args.labels) != len(args.runs):
        raise UserError(f"--labels needs one label per run ({len(args.runs)}), got {len(args.labels)}")
    output = Path(args.output)
    if output.is_dir():
        raise UserError(f"--output {output} is a directory; give a file name, e.g. {output / 'curves.png'}")
    parent = next((p for p in output.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UserError(f"--output {output}: {parent} is a file, not a directory; choose another --output")
    path = plot_runs(args.runs, args.output, labels=args.labels, smooth=max(1, args.smooth))
    print(path)
    return 0
