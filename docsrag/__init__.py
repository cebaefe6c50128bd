"""docsrag: keep a documentation release searchable and answerable.

One import name, rooms by concern: ``docsrag.flows`` (the Prefect flows, the CLI and the HTTP
API), ``docsrag.tasks`` (the steps, a subpackage per concern) and ``docsrag.testing`` (what tests,
benchmarks and users share: the OpenAI-compatible emulator, a Milvus server that can be killed).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("docsrag")
except PackageNotFoundError:  # a checkout that was never installed
    __version__ = "0+unknown"
