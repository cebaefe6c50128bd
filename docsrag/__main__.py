"""``python -m docsrag``: the CLI, as the ``docsrag`` console script runs it."""

from docsrag.flows.cli import run

run()
