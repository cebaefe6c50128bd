"""What tests, benchmarks and users share, as ``prefect.testing`` is for Prefect: an
OpenAI-compatible emulator of gpt-oss on vLLM, a Milvus server that can be killed and restarted,
the answer queue's fault soak and the index lifecycle's state machine."""
