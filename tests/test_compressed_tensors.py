"""compressed-tensors "pack-quantized" output, read by transformers' compressed-tensors integration.

The folder blockquant writes is loaded with plain ``from_pretrained`` (compressed-tensors decompresses
it on the CPU); its logits must match the run's in-memory quantized model and ``load_quantized`` of the
auto_round folder written by the same run.
"""
from __future__ import annotations

import json

import pytest
import torch

import blockquant
from blockquant import api
from blockquant.config import QuantScheme
from blockquant.export.compressed import layer_tensors
from blockquant.algorithm.quantizers import quantize

pytest.importorskip("compressed_tensors")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("bits,group_size,sym", [(4, 32, True), (4, 64, False), (8, 32, True), (8, -1, False),
                                                 (2, 32, False), (3, 32, True)])
def test_compressed_tensors_decompresses_our_layer(bits, group_size, sym):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    from blockquant.export.compressed import weight_args

    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(bits)) * 0.05
    qw = quantize(w, QuantScheme(bits, group_size, sym))
    ours = {k[len("x."):]: v for k, v in layer_tensors("x", qw, None).items()}
    scheme = QuantizationScheme(targets=["Linear"], weights=weight_args(qw.scheme))
    theirs = PackedQuantizationCompressor.decompress(ours, scheme)["weight"]
    assert torch.equal(theirs.float(), qw.dequantize().half().float())


@pytest.mark.parametrize("bits,sym", [(4, True), (4, False), (8, True)])
def test_transformers_loads_compressed_tensors_output(tiny_folder, tmp_path, bits, sym):
    import transformers

    out = tmp_path / "out"
    result = api.quantize(tiny_folder("llama"), adapter="generic", iters=2, nsamples=4, seqlen=32, batch_size=2,
                          group_size=32, bits=bits, sym=sym, format="auto_round,compressed-tensors",
                          output_dir=str(out), keep_blocks=True)
    qc = json.loads((out / "compressed-tensors" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["ignore"] == ["lm_head"]
    # Asymmetric: transformers 5.23 + compressed-tensors 0.20.1 build the compressed module with an
    # unpacked zero point and refuse the packed one their own compressor writes; dequantize=True loads it.
    kwargs = {} if sym else {"quantization_config": transformers.CompressedTensorsConfig(dequantize=True)}
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(out / "compressed-tensors"), device_map="cpu",
                                                               dtype=torch.float32, **kwargs)
    ours = blockquant.load_quantized(str(out / "auto_round"))
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b, c = theirs(input_ids=ids).logits.float(), ours(input_ids=ids).logits, result.model(input_ids=ids).logits
    print(f"compressed-tensors W{bits} sym={sym}: relative logit error vs load_quantized {rel_err(a, b):.2e}")
    assert rel_err(a, b) < 2e-3 and rel_err(a, c) < 2e-3, (rel_err(a, b), rel_err(a, c))
