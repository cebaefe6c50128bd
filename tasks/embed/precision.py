"""Which variant of the local ONNX model this CPU runs: measured once, cached beside the exports.

The same int8 model is 2x faster than fp32 on an AVX-512 VNNI EPYC and no faster on an AVX2-only
one (measured): a flag name cannot tell. At first use the candidates are exported and timed on the
texts below with the threads an embedding batch gets; the fastest that meets the guard is kept.
The candidates, in two runtimes:

- onnxruntime: fp32 (the reference), int8 per-channel, int8 per-channel with ``reduce_range``;
- OpenVINO (where it is installed): ``ov-bf16``, the plain graph at bf16, offered only where the
  CPU has bf16 instructions; ``ov-int8``, NNCF's static int8 calibrated on other texts of the same
  kind (``quantization_texts``), with bf16 for the rest where the CPU has it.

The rule:

- the guard: every text's cosine to the fp32 vector is at least ``MIN_COSINE`` (the per-text
  minimum, not the mean: one broken text is one wrong search);
- a lossy variant must also be ``MIN_GAIN`` faster than fp32, or fp32 is kept (vectors that
  move for nothing are not worth it); variants within ``TIE`` of the fastest are a tie, won by
  the one nearer fp32.

The choice is a JSON file keyed by model, token limit, CPU (model name and the flags that decide
int8 and bf16 speed) and the candidates offered, so a cache shared by two machines does not hand
one the other's choice, and a runtime installed later is measured. The variant is part of the embedder id
(``embedding.resolve``): another choice re-embeds. The variants' files and runtimes are tasks/embed/runtime.py's.

bf16: onnxruntime's CPU provider has no bf16 matrix kernels on x86, OpenVINO's has; torch bf16
autocast would load torch at every start (seconds, ~1 GB), so it is not a candidate.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from docsrag.tasks.embed import runtime
from docsrag.tasks.embed.e5 import E5_MODEL

MIN_COSINE = 0.98
MIN_GAIN = 1.10
# Variants this close in speed are a tie (a shared machine's noise, measured: int8 and int8r swapped
# places between two runs): the one nearer fp32 is kept, so two like machines keep the same one.
TIE = 0.95
ONNXRUNTIME = ("fp32", "int8", "int8r")
CALIBRATION_TEXTS = 48


@dataclass
class Measured:
    texts_per_s: float
    min_cosine: float


@dataclass
class Choice:
    variant: str
    tokens: int
    threads: int
    cpu: str
    measured: dict[str, Measured] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    guard: str = f"per-text cosine to fp32 >= {MIN_COSINE}; a lossy variant >= {MIN_GAIN}x fp32's speed"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Choice:
        measured = {name: Measured(**m) for name, m in data.pop("measured").items()}
        return cls(**data, measured=measured)

    def describe(self) -> str:
        speeds = ", ".join(f"{name} {m.texts_per_s:.1f} texts/s (min cosine {m.min_cosine:.4f})"
                           for name, m in self.measured.items())
        return (f"embedding precision for this CPU ({self.cpu}, {self.threads} threads, {self.tokens} tokens): "
                f"{self.variant}; measured {speeds}")


def choose(measured: dict[str, Measured]) -> tuple[str, dict[str, str]]:
    """-> (the variant kept, {variant rejected: why}). fp32 is the reference and always eligible."""
    reference = measured["fp32"].texts_per_s
    rejected = {}
    for name, m in measured.items():
        if name != "fp32" and m.min_cosine < MIN_COSINE:
            rejected[name] = f"min cosine {m.min_cosine:.4f} < {MIN_COSINE}"
        elif name != "fp32" and m.texts_per_s < MIN_GAIN * reference:
            rejected[name] = f"{m.texts_per_s / reference:.2f}x fp32's speed < {MIN_GAIN}x"
    eligible = {name: m for name, m in measured.items() if name not in rejected}
    fastest = max(m.texts_per_s for m in eligible.values())
    tied = {name: m for name, m in eligible.items() if m.texts_per_s >= TIE * fastest}
    return max(tied, key=lambda name: tied[name].min_cosine), rejected


def candidates() -> tuple[str, ...]:
    """What ``auto`` measures on this CPU: onnxruntime's variants, and OpenVINO's where it is installed."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return ONNXRUNTIME
    return (*ONNXRUNTIME, *(("ov-bf16",) if runtime.cpu_has_bf16() else ()), "ov-int8")


def choice_file(folder: Path, cache: Path, tokens: int, variants: tuple[str, ...] | None = None) -> Path:
    """Keyed by the candidates too: a choice made before a runtime was offered (OpenVINO, installed
    later) is measured again with it, not kept for good."""
    measured = hashlib.sha256(f"{runtime.cpu()}|{','.join(variants or candidates())}".encode()).hexdigest()[:12]
    return cache / f"{runtime.model_key(folder)}-{tokens}t-{measured}.choice.json"


def chosen(folder: Path, cache: Path, tokens: int, threads: int, variants: tuple[str, ...] | None = None) -> Choice:
    """The cached choice, or measured now (once per model, token limit and CPU; tens of seconds)."""
    variants = variants or candidates()
    path = choice_file(folder, cache, tokens, variants)
    if not path.exists():
        with runtime.export_lock(cache):
            if not path.exists():
                runtime.run_export(folder, cache, list(variants), ["--choose", str(tokens), str(threads)])
                choice = Choice.from_dict(json.loads(path.read_text()))
                # Once per machine: say what was measured and kept, and where it is cached.
                print(f"docsrag: {choice.describe()} (cached in {path})", file=sys.stderr)
                return choice
    return Choice.from_dict(json.loads(path.read_text()))


def measure(folder: Path, cache: Path, variants: list[str], tokens: int, threads: int) -> Choice:
    """Time each variant on the calibration texts (rounds interleaved, best round kept: the
    machine may be shared) and compare its vectors with fp32's; write and return the choice."""
    import numpy as np

    texts = calibration_texts(folder)
    embedders = {v: runtime.onnx_embedder(folder, v, cache, tokens, threads, v, measuring=True) for v in variants}
    vectors = {v: np.array(e.embed(texts)) for v, e in embedders.items()}  # also the warm-up
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(3):
        for variant, embedder in embedders.items():
            start = time.perf_counter()
            embedder.embed(texts)
            best[variant] = min(best[variant], time.perf_counter() - start)
    measured = {v: Measured(round(len(texts) / best[v], 1),
                            round(float((vectors[v] * vectors["fp32"]).sum(axis=1).min()), 4)) for v in variants}
    variant, rejected = choose(measured)
    choice = Choice(variant, tokens, threads, runtime.cpu(), measured, rejected)
    target = choice_file(folder, cache, tokens, tuple(variants))
    written = target.with_suffix(".tmp")
    written.write_text(json.dumps(choice.to_dict(), indent=2))
    os.replace(written, target)
    return choice


def calibration_texts(folder: Path | None = None) -> list[str]:
    """English technical prose of chunk size (~800 characters): this project's own docstrings,
    always at hand (the docs themselves are someone else's text and not shipped); for a model that
    reads other languages, also half of this project's own texts in Korean and Indonesian (e5's
    int8 lost more on Korean questions than on English text: min cosine 0.980 against 0.996)."""
    return _docstring_texts()[:CALIBRATION_TEXTS] + _other_languages(folder)[::2]


def quantization_texts(folder: Path | None = None) -> list[str]:
    """What NNCF calibrates its int8 scales on: the same kind of texts, none of those the guard
    measures (a variant judged on the texts it was fitted to would be judged too kindly)."""
    return _docstring_texts()[CALIBRATION_TEXTS:] + _other_languages(folder)[1::2]


def _other_languages(folder: Path | None) -> list[str]:
    if folder is None or not folder.name.startswith(E5_MODEL):
        return []
    return (Path(__file__).parent / "texts_ko_id.txt").read_text(encoding="utf-8").splitlines()


@functools.cache
def _docstring_texts() -> list[str]:
    pieces, current = [], ""
    modules = (path for path in Path(__file__).parents[1].glob("*/*.py") if path.name != "__init__.py")
    for path in sorted(modules, key=lambda path: path.name):  # every room's modules
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            doc = isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and ast.get_docstring(node)
            if doc:
                current = f"{current} {' '.join(doc.split())}".strip()
                if len(current) >= 800:
                    pieces.append(current)
                    current = ""
    # A mix of lengths as a release has: whole pieces and their first sentences.
    return [p if n % 3 else p[:200] for n, p in enumerate(pieces)]
