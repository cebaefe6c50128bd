"""The packaged BERT model exported to ONNX, one file per variant: run as a child process.

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

# What each variant is. int8 weights are per output channel: per-tensor scales cost up to 0.3 of
# cosine on some texts (measured). reduce_range quantizes weights to 7 bits, which keeps VNNI's
# u8*s8 products from saturating and ran 10% faster on an AVX-512 VNNI EPYC (measured, 2026-12).
VARIANTS = {
    "fp32": None,
    "int8": {"per_channel": True, "reduce_range": False},
    "int8r": {"per_channel": True, "reduce_range": True},
    # Offered to the measurement only by the tests: the cosine guard's counterexample.
    "int8-per-tensor": {"per_channel": False, "reduce_range": False},
}


def export(folder: Path, variant: str, target: Path) -> None:
    """``target``: the model as ONNX at ``variant``, written atomically (another process may wait for it)."""
    fused = target.with_name(target.name.replace(f"-{variant}.onnx", "-fp32.onnx"))
    if variant != "fp32" and not fused.exists():
        export(folder, "fp32", fused)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        written = Path(scratch) / "model.onnx"
        if variant == "fp32":
            _export_fused(folder, written, Path(scratch))
        else:
            _quantize(fused, written, **VARIANTS[variant])
        os.replace(written, target)


def _export_fused(folder: Path, target: Path, scratch: Path) -> None:
    import torch
    from onnxruntime.transformers.optimizer import optimize_model
    from transformers import AutoModel

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
    raw = scratch / "raw.onnx"
    ids = torch.ones(2, 16, dtype=torch.long)
    torch.onnx.export(Encoder(), (ids, torch.ones_like(ids), torch.zeros_like(ids)), str(raw),
                      input_names=names, output_names=["hidden"], opset_version=17, dynamo=False,
                      dynamic_axes={name: {0: "batch", 1: "tokens"} for name in [*names, "hidden"]})
    optimize_model(str(raw), model_type="bert", num_heads=config["num_attention_heads"],
                   hidden_size=config["hidden_size"]).save_model_to_file(str(target))


def _quantize(fused: Path, target: Path, per_channel: bool, reduce_range: bool) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fused), str(target), per_channel=per_channel, reduce_range=reduce_range,
                     weight_type=QuantType.QInt8, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m docsrag.tasks.embed.model_export")
    parser.add_argument("folder", type=Path)
    parser.add_argument("cache", type=Path)
    parser.add_argument("variants", nargs="+", choices=sorted(VARIANTS))
    parser.add_argument("--choose", nargs=2, type=int, metavar=("TOKENS", "THREADS"),
                        help="measure the variants and write the choice (tasks/embed/precision.py)")
    args = parser.parse_args(argv)
    from docsrag.tasks.embed import precision

    for variant in args.variants:
        target = precision.model_file(args.folder, variant, args.cache)
        if not target.exists():
            export(args.folder, variant, target)
    if args.choose:
        tokens, threads = args.choose
        choice = precision.measure(args.folder, args.cache, args.variants, tokens, threads)
        print(json.dumps(choice.to_dict()))


if __name__ == "__main__":
    sys.exit(main())
