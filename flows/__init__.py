"""The Prefect flows (ingest, watch, answer, evaluate), the CLI (``cli``) and the HTTP API (``api``)."""
