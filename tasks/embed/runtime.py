"""A local model's variants as files, and the runtimes that run them on this CPU.

Each variant (fp32, int8, ``ov-int8``, ...) is one file in the model cache, exported once per
machine by a child process (tasks/embed/model_export.py) and run in onnxruntime, or in OpenVINO
for the ``ov-`` variants. This module is below the two that use it: precision.py times these
runtimes to choose a variant, embedding.py loads the chosen one. Neither import comes back here,
so the choice and the loading need no import inside a function to meet.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# Files other than ``<key>-<variant>.onnx``: OpenVINO reads the plain (unfused) ONNX graph, since
# onnxruntime's fused operators are its own; NNCF's int8 is saved as OpenVINO's IR.
FILES = {"raw": "raw.onnx", "ov-bf16": "raw.onnx", "ov-int8": "ov-int8.xml"}


def cpu() -> str:
    """The CPU model and the flags that decide which variant is fastest."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    return " ".join([name or "unknown CPU", *(f for f in CPU_FLAGS if f in flags)])


def cpu_has_bf16() -> bool:
    return any(flag in cpu().split() for flag in BF16_FLAGS)


def model_file(folder: Path, variant: str, cache: Path) -> Path:
    return cache / f"{model_key(folder)}-{FILES.get(variant, f'{variant}.onnx')}"


def exported(folder: Path, variant: str, cache: Path) -> Path:
    """The variant's ONNX file, exported in a child process if this cache has none yet."""
    target = model_file(folder, variant, cache)
    if not target.exists():
        with export_lock(cache):
            if not target.exists():
                run_export(folder, cache, [variant], [])
    return target


@functools.cache
def model_key(folder: Path) -> str:
    """The weights by content, not by file time: two installs of the same package (two clones'
    venvs) share one export and one choice. Size plus the first and last MiB: ms, not a full hash."""
    weights = folder / "model.safetensors"
    if not weights.exists():
        return f"{folder.name}-0"
    digest = hashlib.sha256(str(weights.stat().st_size).encode())
    with open(weights, "rb") as data:
        digest.update(data.read(1 << 20))
        data.seek(max(0, weights.stat().st_size - (1 << 20)))
        digest.update(data.read(1 << 20))
    return f"{folder.name}-{digest.hexdigest()[:12]}"


class export_lock:
    """One process exports into a cache at a time; the others wait, then find the files."""

    def __init__(self, cache: Path):
        cache.mkdir(parents=True, exist_ok=True)
        self.path = cache / ".export.lock"

    def __enter__(self):
        self.file = open(self.path, "w")
        fcntl.flock(self.file, fcntl.LOCK_EX)

    def __exit__(self, *exc):
        self.file.close()


def run_export(folder: Path, cache: Path, variants: list[str], extra: list[str]) -> None:
    """The export child (``-I``: the user's folder is not on its path), its output read only on failure."""
    command = [sys.executable, "-I", "-m", "docsrag.tasks.embed.model_export", str(folder), str(cache),
               *variants, *extra]
    done = subprocess.run(command, check=False, capture_output=True, text=True,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if done.returncode:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-20:])
        raise RuntimeError(f"exporting the embedding model to ONNX failed (exit {done.returncode}):\n{tail}")


def max_tokens_of(folder: Path) -> int:
    """The model's own cut (sentence-transformers' ``max_seq_length``)."""
    config = folder / "sentence_bert_config.json"
    return json.loads(config.read_text()).get("max_seq_length", 256) if config.exists() else 256


class TextEncoder:
    """A model's texts as its graph takes them: the model's prompt put first (e5's ``query: `` and
    ``passage: ``, from sentence-transformers' ``config_sentence_transformers.json``), tokenized,
    cut at ``tokens``, padded to the batch's longest."""

    def __init__(self, folder: Path, tokens: int):
        from tokenizers import Tokenizer

        # A model whose tokenizer replaces thousands of characters (e5's, one pass per replacement
        # text) also ships the table: one str.translate here, and its tokenizer without those passes.
        table = folder / "normalization.json"
        self.table = str.maketrans(json.loads(table.read_text(encoding="utf-8"))) if table.exists() else None
        name = "tokenizer.translated.json" if self.table else "tokenizer.json"
        self.tokenizer = Tokenizer.from_file(str(folder / name))
        self.tokenizer.enable_truncation(tokens)
        pad = "<pad>" if self.tokenizer.token_to_id("<pad>") is not None else "[PAD]"  # XLM-R's, else BERT's
        self.tokenizer.enable_padding(pad_id=self.tokenizer.token_to_id(pad) or 0, pad_token=pad)
        config = folder / "config_sentence_transformers.json"
        self.prompts = (json.loads(config.read_text()).get("prompts") if config.exists() else None) or {}

    def __call__(self, texts: list[str], query: bool = False) -> dict:
        import numpy as np

        prompt = self.prompts.get("query" if query else "passage", "")
        texts = [prompt + text for text in texts]
        encoded = self.tokenizer.encode_batch([text.translate(self.table) for text in texts] if self.table else texts)
        ids = np.array([e.ids for e in encoded], dtype=np.int64)
        return {"input_ids": ids, "attention_mask": np.array([e.attention_mask for e in encoded], dtype=np.int64),
                "token_type_ids": np.zeros_like(ids)}


class OnnxEmbedder:
    """A BERT-family sentence-transformers model exported to ONNX, in onnxruntime: mean pooling and
    normalization as sentence-transformers does them, texts sorted by length so each batch pads
    little. Inputs are cut at ``tokens``."""

    BATCH = 32

    def __init__(self, folder: Path, model_file: Path, tokens: int, threads: int, id: str):
        self.id = id
        self.dim = json.loads((folder / "config.json").read_text())["hidden_size"]
        self.encode = TextEncoder(folder, tokens)
        self._load(model_file, threads)

    def _load(self, model_file: Path, threads: int) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])

    def _hidden(self, inputs: dict):
        return self.session.run(None, inputs)[0]

    def embed(self, texts: list[str], query: bool = False) -> list[list[float]]:
        import numpy as np

        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        vectors: list = [None] * len(texts)
        for start in range(0, len(order), self.BATCH):
            batch = order[start:start + self.BATCH]
            inputs = self.encode([texts[i] for i in batch], query)
            mask = inputs["attention_mask"]
            hidden = self._hidden(inputs)
            pooled = (hidden * mask[:, :, None]).sum(axis=1) / mask.sum(axis=1, keepdims=True)
            pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
            for row, i in enumerate(batch):
                vectors[i] = pooled[row].tolist()
        return vectors


class OpenVinoEmbedder(OnnxEmbedder):
    """The same model in OpenVINO: the plain ONNX graph at bf16 (``ov-bf16``), or NNCF's static int8
    (``ov-int8``, bf16 for what stays in floating point where the CPU has it). OpenVINO has bf16
    matrix kernels on x86, which onnxruntime's CPU provider lacks.

    One inference at a time, on every core the concurrent batches share: two requests of this
    dynamic-shape model run at once (one stream each) hung the first ingest of a test run once in
    three, both inside ``infer`` at no CPU, as two requests specializing a new input shape at the
    same moment deadlock on few cores. Taking turns costs 3-10% (MiniLM int8, 2 cores, measured).
    ``measuring``: the measurement's terms, as onnxruntime is timed (``threads`` only), and no
    compiled model kept for a variant only timed (hundreds of MB for e5)."""

    def __init__(self, folder: Path, model_file: Path, tokens: int, threads: int, id: str, measuring: bool = False):
        self.measuring = measuring
        super().__init__(folder, model_file, tokens, threads, id)

    def _load(self, model_file: Path, threads: int) -> None:
        import openvino

        core = openvino.Core()
        if not self.measuring:
            # OpenVINO's compiled model kept beside the exports: 0.27 s to load instead of 1.3 s to
            # compile at every start (measured, MiniLM int8), which an unchanged re-run paid for
            # nothing. A folder per file as written, so a file exported again is compiled again.
            written = model_file.stat()
            core.set_property({"CACHE_DIR": str(model_file.parent / "openvino" /
                                                f"{model_file.stem}-{written.st_size}-{written.st_mtime_ns}")})
        shared = threads if self.measuring else threads * max(1, (os.cpu_count() or 1) // threads)
        self.compiled = core.compile_model(str(model_file), "CPU", {
            "INFERENCE_PRECISION_HINT": "bf16" if cpu_has_bf16() else "f32",
            "NUM_STREAMS": 1, "INFERENCE_NUM_THREADS": shared})
        self.request = self.compiled.create_infer_request()
        self.turn = threading.Lock()

    def _hidden(self, inputs: dict):
        with self.turn:
            return self.request.infer(inputs)[0]  # a copy (share_outputs is off): the next infer reuses the tensor


def onnx_embedder(folder: Path, variant: str, cache: Path, tokens: int, threads: int, id: str,
                  measuring: bool = False) -> OnnxEmbedder:
    """The runtime that runs ``variant``: onnxruntime, or OpenVINO for the ``ov-`` variants."""
    file = exported(folder, variant, cache)
    if variant.startswith("ov-"):
        return OpenVinoEmbedder(folder, file, tokens, threads, id, measuring)
    return OnnxEmbedder(folder, file, tokens, threads, id)

