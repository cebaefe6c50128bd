"""A local BERT-family model exported to ONNX (and OpenVINO's IR), one file per variant: run as a child process.

``python -m docsrag.tasks.embed.model_export FOLDER CACHE VARIANT...`` exports the variants named, and with
``--choose TOKENS THREADS`` also measures them on this CPU and writes the choice (tasks/embed/precision.py).

Why a process of its own: torch's tracer and the ONNX tooling warn (``TracerWarning``, exporter
deprecations, quantizer notes) through ``warnings`` and ``logging``, both process-wide. Silencing
them from a thread of the command raced with the command's own imports (an import's
``catch_warnings`` restores the filters while the export still runs) and hid the command's own
warnings meanwhile. Here the tools say what they like to a pipe the command reads only when the
export fails. It also keeps torch out of the command's memory: only this process imports it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from docsrag.tasks.embed import precision, runtime

# onnxruntime's int8 variants. int8 weights are per output channel: per-tensor scales cost up to
# 0.3 of cosine on some texts (measured). reduce_range quantizes weights to 7 bits, which keeps
# VNNI's u8*s8 products from saturating and ran 10% faster on an AVX-512 VNNI EPYC (measured, 2026-12).
ORT_INT8 = {
    "int8": {"per_channel": True, "reduce_range": False},
    "int8r": {"per_channel": True, "reduce_range": True},
    # Offered to the measurement only by the tests: the cosine guard's counterexample.
    "int8-per-tensor": {"per_channel": False, "reduce_range": False},
}
VARIANTS = ("raw", "fp32", *ORT_INT8, "ov-bf16", "ov-int8")


def export(folder: Path, variant: str, cache: Path) -> None:
    """The model at ``variant`` in ``cache``, written atomically (another process may wait for it),
    after what it is made from: the plain graph first, then fp32 (fused) or OpenVINO's int8."""
    target = runtime.model_file(folder, variant, cache)
    source = {"raw": None, "ov-bf16": None, "fp32": "raw", "ov-int8": "raw"}.get(variant, "fp32")
    if source and not runtime.model_file(folder, source, cache).exists():
        export(folder, source, cache)
    if target.exists():
        return  # ov-bf16 is the plain graph itself
    made_from = source and runtime.model_file(folder, source, cache)
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        written = Path(scratch) / target.name
        if source is None:
            _export_plain(folder, written)
        elif variant == "fp32":
            _fuse(folder, made_from, written)
        elif variant == "ov-int8":
            _quantize_openvino(folder, made_from, written)
        else:
            _quantize(made_from, written, **ORT_INT8[variant])
        for companion in written.parent.glob(f"{written.stem}.*"):  # OpenVINO's weights before its .xml
            if companion != written:
                os.replace(companion, target.with_name(companion.name))
        os.replace(written, target)


def _export_plain(folder: Path, target: Path) -> None:
    import torch
    from transformers import AutoModel

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
    ids = torch.ones(2, 16, dtype=torch.long)
    torch.onnx.export(Encoder(), (ids, torch.ones_like(ids), torch.zeros_like(ids)), str(target),
                      input_names=names, output_names=["hidden"], opset_version=17, dynamo=False,
                      dynamic_axes={name: {0: "batch", 1: "tokens"} for name in [*names, "hidden"]})


def _fuse(folder: Path, plain: Path, target: Path) -> None:
    from onnxruntime.transformers.optimizer import optimize_model

    config = json.loads((folder / "config.json").read_text())
    optimize_model(str(plain), model_type="bert", num_heads=config["num_attention_heads"],
                   hidden_size=config["hidden_size"]).save_model_to_file(str(target))


def _quantize(fused: Path, target: Path, per_channel: bool, reduce_range: bool) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fused), str(target), per_channel=per_channel, reduce_range=reduce_range,
                     weight_type=QuantType.QInt8, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


def _quantize_openvino(folder: Path, plain: Path, target: Path) -> None:
    """NNCF's static int8 (weights and activations; the transformer preset keeps what int8 hurts,
    as softmax and layer norm, in floating point), its scales fitted on ``quantization_texts``,
    one text per sample as they come: whole chunks and short openings."""
    import nncf
    import openvino

    encode = runtime.TextEncoder(folder, runtime.max_tokens_of(folder))
    samples = [encode([text]) for text in precision.quantization_texts(folder)]
    quantized = nncf.quantize(openvino.Core().read_model(str(plain)), nncf.Dataset(samples),
                              model_type=nncf.ModelType.TRANSFORMER, subset_size=len(samples))
    openvino.save_model(quantized, str(target), compress_to_fp16=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m docsrag.tasks.embed.model_export")
    parser.add_argument("folder", type=Path)
    parser.add_argument("cache", type=Path)
    parser.add_argument("variants", nargs="+", choices=VARIANTS)
    parser.add_argument("--choose", nargs=2, type=int, metavar=("TOKENS", "THREADS"),
                        help="measure the variants and write the choice (tasks/embed/precision.py)")
    args = parser.parse_args(argv)
    for variant in args.variants:
        if not runtime.model_file(args.folder, variant, args.cache).exists():
            export(args.folder, variant, args.cache)
    if args.choose:
        tokens, threads = args.choose
        choice = precision.measure(args.folder, args.cache, args.variants, tokens, threads)
        print(json.dumps(choice.to_dict()))


if __name__ == "__main__":
    sys.exit(main())
