"""Embedding models and their runtimes: the models, the measured choice of precision, the ONNX export."""
