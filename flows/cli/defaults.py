"""Process defaults every ``docsrag`` command sets for itself, before Prefect is imported.

A user runs ``.venv/bin/docsrag ingest`` outside ``make`` too: without these, Prefect's server
(the temporary one the command starts) tries to send usage telemetry, and on a machine without
internet prints ``ERROR | prefect.server.services.telemetry - Failed to send telemetry`` on every
command. A value the user set is kept (``setdefault``): these are defaults, not overrides.
"""

from __future__ import annotations

import os

DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # the server's telemetry service (the error above)
    "DO_NOT_TRACK": "true",  # the convention other tools read too
    "HF_HUB_OFFLINE": "1",  # the packaged models never reach for a hub at run time
    "TOKENIZERS_PARALLELISM": "false",  # tokenizers' fork warning when the export runs in a subprocess
}


def apply() -> None:
    for name, value in DEFAULTS.items():
        os.environ.setdefault(name, value)
