"""load_quantized reads what auto-round 0.16.1 itself writes for asymmetric models (skipped without
auto-round).  For 4 bits that is "auto_round:auto_awq": AutoAWQ's interleaved packing along the output
dimension with real zero points.  Each loaded layer must dequantize exactly as auto-round's own AWQ
dequantization (``dequantize_gemm``) reads the written tensors, and the loaded model must stay close
to the full-precision one.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("auto_round")
pytestmark = pytest.mark.interop

from auto_round.export.export_to_awq.utils import dequantize_gemm  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import blockquant  # noqa: E402
from blockquant.export.qlinear import QuantLinear  # noqa: E402


@pytest.fixture(scope="module")
def autoround_asym(tmp_path_factory):
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from blockquant.adapters.generic import build_example

    root = tmp_path_factory.mktemp("ar")
    build_example("llama", 2, 64).save(str(root / "src"))
    model = AutoModelForCausalLM.from_pretrained(str(root / "src"))
    tokenizer = AutoTokenizer.from_pretrained(str(root / "src"))
    rounder = AutoRound(model, tokenizer, bits=4, group_size=32, sym=False, iters=0, nsamples=2, seqlen=16)
    rounder.quantize_and_save(str(root / "out"), format="auto_round")
    out = next(r for r, _, files in os.walk(root / "out") if "config.json" in files)
    return str(root / "src"), out


def test_autoround_writes_awq_packing_for_asym(autoround_asym):
    _, out = autoround_asym
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert qc["packing_format"] == "auto_round:auto_awq" and qc["sym"] is False


def test_load_quantized_reads_autoround_awq_output(autoround_asym):
    from transformers import AutoModelForCausalLM

    src, out = autoround_asym
    tensors = load_file(os.path.join(out, "model.safetensors"))
    ours = blockquant.load_quantized(out)
    layers = [(n, m) for n, m in ours.named_modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14
    for name, module in layers:
        theirs = dequantize_gemm(tensors[f"{name}.qweight"], tensors[f"{name}.qzeros"], tensors[f"{name}.scales"], 4, 32)
        assert torch.equal(module.dequantize(torch.float16), theirs.t()), name   # theirs computes in fp16
    fp = AutoModelForCausalLM.from_pretrained(src)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits, fp(input_ids=ids).logits
    assert float((a - b).norm() / b.norm()) < 0.1
