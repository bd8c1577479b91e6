"""The ``zotune`` command line.

Subcommands are small modules that expose ``add_arguments(parser)`` and ``run(args) -> int``;
user mistakes raise :class:`zotune.errors.UserError`, which is printed as one line (no
traceback) with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import typing
from collections.abc import Sequence

from zotune import __version__
from zotune.errors import UserError

# name -> (module, one-line help). Modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("zotune.commands.train", "fine-tune a language model with a zeroth-order optimizer"),
    "eval": ("zotune.commands.evaluate", "evaluate a model or checkpoint on a task"),
    "race": ("zotune.commands.race", "run a grid of training runs and report who reaches what first"),
    "plot": ("zotune.commands.plot", "plot training curves of one or more runs"),
    "tasks": ("zotune.commands.listing", "list the available tasks"),
    "models": ("zotune.commands.listing", "list the embedded models and what they need"),
    "optimizers": ("zotune.commands.listing", "list the optimizers with their rules"),
    "replay": ("zotune.commands.replay", "rebuild a fine-tune's weights from the base model and its trajectory"),
    "bench": ("zotune.bench", "benchmarks: step, functions, quadratic, scale"),
}


class OneLineErrorParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line naming the fix (exit status 2)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``zotune`` parser with one subparser per command."""
    parser = OneLineErrorParser(
        prog="zotune",
        description="Memory-efficient zeroth-order fine-tuning of language models (MeZO, HiZOO, ZO-AdaMU, ...).",
        epilog="Run `zotune COMMAND --help` for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"zotune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineErrorParser)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=getattr(module, "DESCRIPTION", help_text),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p, name) if _takes_name(module) else module.add_arguments(p)
        p.set_defaults(_module=module, _command=name, _parser=p)
    return parser


def _takes_name(module: object) -> bool:
    import inspect

    return len(inspect.signature(module.add_arguments).parameters) == 2  # type: ignore[attr-defined]


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns its exit status (2 for a user mistake, printed as one line)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no "Loading weights" bars on every load
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # named by the command's parser: "zotune train: error: unrecognized arguments"
            getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as e:  # --help, --version (0) or a usage error (2, already printed)
        return e.code if isinstance(e.code, int) else 2
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        return int(args._module.run(args) or 0)
    except UserError as e:
        message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())  # always one line
        print(f"zotune {args._command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"zotune {args._command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` & co.: stop quietly, as Unix tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python would complain again when flushing stdout at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
