"""The questions API: the FastAPI app, its schema, its page and its answering worker."""
