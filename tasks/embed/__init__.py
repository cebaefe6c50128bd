"""Embedding models and their runtimes: the models, the measured choice of precision, the ONNX export."""

import os

# onnxruntime's Linux wheel carries a telemetry client: its first session writes a device id and
# queues an event about the process under ~/.cache/Microsoft, unless this is set before onnxruntime
# is imported (disabling it after the import is too late). Every runtime of this room is local.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
