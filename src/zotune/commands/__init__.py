"""CLI subcommands (see :mod:`zotune.cli`)."""
