"""``zotune tasks``, ``zotune models``, ``zotune optimizers``: what is available."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.set_defaults(_listing=name)


def run(args: argparse.Namespace) -> int:
    kind = args._listing
    if kind == "tasks":
        from zotune.tasks import available_tasks

        for info in available_tasks():
            print(_row(info))
    elif kind == "models":
        from zotune.models import available_models

        for info in available_models():
            print(_row(info))
    else:
        import zotune.optim as zo

        for name in zo.available():
            cls = zo.get(name)
            aliases = ", ".join(getattr(cls, "aliases", ())[:2])
            state = len(getattr(cls, "state_buffers", ()))
            print(f"{name:<18} ({aliases}) {cls.forwards_per_step} forwards, {state}x params state: "
                  f"{getattr(cls, 'summary', '')}")
    return 0


def _row(info: object) -> str:
    import dataclasses

    if dataclasses.is_dataclass(info):
        d = dataclasses.asdict(info)
        name = d.pop("name", "")
        return f"{name:<16} " + "; ".join(f"{k}: {_text(v)}" for k, v in d.items() if v not in (None, "", [], ()))
    return str(info)


def _text(value: object) -> str:
    """A listing value as a user reads it: ``mezo, lmbff`` rather than ``('mezo', 'lmbff')``."""
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
