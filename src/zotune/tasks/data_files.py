"""Finding and reading the benchmark files, and seeded sampling.

Files are looked up first under a user-given ``data_dir`` and then in the data shipped inside
the package (``zotune/data``, copied unchanged from public repositories; see
``zotune/data/SOURCES.md``). Both use the same layout: ``<Task>/<variant>/<file>``.

>>> files = DataFiles()
>>> files.path("SST-2", "k-shot", "16-42", "train.tsv").name
'train.tsv'
>>> seeded_subset(list(range(10)), 3, seed=0)
[2, 8, 4]
"""

from __future__ import annotations

import csv
import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from zotune.errors import UserError

T = TypeVar("T")

#: The data shipped with zotune (a package-data folder next to this subpackage).
PACKAGE_DATA_DIR = Path(__file__).resolve().parent.parent / "data"


class DataFiles:
    """Resolves ``<Task>/<variant>/<file>`` paths: ``data_dir`` first, then the package data."""

    def __init__(self, data_dir: str | Path | None = None) -> None:
        self.data_dir = Path(data_dir).expanduser() if data_dir is not None else None
        if self.data_dir is not None and not self.data_dir.is_dir():
            raise UserError(f"data_dir {str(self.data_dir)!r} is not a directory; pass a folder laid out "
                            "like zotune/data (<Task>/<variant>/<file>)")

    def roots(self) -> list[Path]:
        return [r for r in (self.data_dir, PACKAGE_DATA_DIR) if r is not None]

    def find(self, *parts: str) -> Path | None:
        """The first existing ``root/parts`` among :meth:`roots`, or ``None``."""
        for root in self.roots():
            candidate = root.joinpath(*parts)
            if candidate.exists():
                return candidate
        return None

    def path(self, *parts: str) -> Path:
        """Like :meth:`find` but raises a :class:`UserError` naming the paths tried and the fix."""
        found = self.find(*parts)
        if found is None:
            tried = ", ".join(str(r.joinpath(*parts)) for r in self.roots())
            raise UserError(
                f"missing data file {'/'.join(parts)} (looked at: {tried}). Fix: reinstall zotune so its "
                "package data is complete, or pass data_dir=<folder> (CLI: --data-dir) holding "
                f"{'/'.join(parts)}")
        return found


@functools.lru_cache(maxsize=64)
def _read_text(path: str) -> str:
    return Path(path).read_text(encoding="utf-8")


def read_tsv_with_header(path: Path) -> list[dict[str, str]]:
    """GLUE-style tsv: a header row, tab-separated fields, no quoting."""
    lines = _read_text(str(path)).splitlines()
    header = lines[0].split("\t")
    rows = []
    for line in lines[1:]:
        if line.strip():
            values = line.split("\t")
            rows.append(dict(zip(header, values)))
    return rows


def read_csv_rows(path: Path, delimiter: str = ",") -> list[list[str]]:
    """Headerless csv/tsv with standard quoting (LM-BFF's SST-5 and TREC files)."""
    text = _read_text(str(path))
    quoting = csv.QUOTE_MINIMAL if delimiter == "," else csv.QUOTE_NONE
    return [row for row in csv.reader(text.splitlines(), delimiter=delimiter, quoting=quoting) if row]


@functools.lru_cache(maxsize=32)
def _parse_jsonl(path: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in _read_text(path).splitlines() if line.strip()]


@functools.lru_cache(maxsize=16)
def _parse_json(path: str) -> Any:
    return json.loads(_read_text(path))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a jsonl file. Cached: the objects are shared between calls, never modify them."""
    return _parse_jsonl(str(path))


def read_json(path: Path) -> Any:
    """A parsed json file. Cached: the object is shared between calls, never modify it."""
    return _parse_json(str(path))


def seeded_permutation(n: int, seed: int) -> list[int]:
    """``numpy.random.RandomState(seed).permutation(n)``: the sampler MeZO's ``sample_subset`` uses."""
    return np.random.RandomState(seed).permutation(n).tolist()


def seeded_subset(items: Sequence[T], n: int | None, seed: int) -> list[T]:
    """The first ``n`` items of a seeded permutation; all items in their order when ``n`` is None or larger."""
    if n is None or n >= len(items):
        return list(items)
    return [items[i] for i in seeded_permutation(len(items), seed)[:n]]


def check_count(value: int | None, what: str) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise UserError(f"{what} must be a non-negative integer or None, got {value!r}")
