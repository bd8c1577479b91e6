"""Errors that are the user's to fix.

The CLI prints a :class:`UserError` as one line (no traceback) and exits with status 2.
Raise it for bad configuration, unknown tasks/models/optimizers and missing data, with a
message that names the fix.
"""


class UserError(Exception):
    """A mistake in how zotune was called; the message says how to fix it."""
