"""Answering queued questions: retrieval, generation through the OpenAI-compatible API, the drain."""
