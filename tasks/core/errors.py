"""The one error family: what a person can act on.

Each room's errors derive from ``DocsragError`` (beside the builtin they always were, so callers
that catch ``ValueError`` or ``LookupError`` still do). Its message says what failed, why, and
what to do; the CLI prints it in one line and no traceback. Anything else that reaches the CLI is
a bug and is shown as one, traceback and all.
"""


class DocsragError(Exception):
    """A failure with a reason a person can act on (a bad input, a refused source, a service down)."""
