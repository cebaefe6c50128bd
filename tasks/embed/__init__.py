"""Embedding models and their runtimes: the models, the measured choice of precision, the ONNX export."""

import os
import sys

# Every runtime of this room is local, and none of them reports on the process.
# onnxruntime's Linux wheel carries a telemetry client: its first session writes a device id and
# queues an event about the process under ~/.cache/Microsoft, unless this is set before onnxruntime
# is imported (disabling it after the import is too late).
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
# OpenVINO and NNCF send their events through the openvino_telemetry package when it imports (a
# dependency of both, installed with them); each falls back to a stub that sends nothing without it.
sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]
