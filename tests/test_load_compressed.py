"""``load_quantized`` reads compressed-tensors "pack-quantized" folders (CompressedLinear).

One run writes the same tuned codes as auto_round and compressed-tensors; both folders, loaded back,
must give the same logits bit for bit (same codes, same fp16 scales, same float32 dequantization).
"""
from __future__ import annotations

import json

import pytest
import torch

import blockquant
from blockquant import api
from blockquant.errors import ModelFileError
from blockquant.export.compressed_linear import CompressedLinear
from blockquant.export.qlinear import QuantLinear


@pytest.mark.parametrize("bits,group_size,sym", [(4, 32, True), (4, 32, False), (3, 64, True), (2, 32, False),
                                                 (8, -1, False)])
def test_load_quantized_reads_compressed_tensors_like_auto_round(tiny_folder, tmp_path, bits, group_size, sym):
    out = tmp_path / "out"
    api.quantize(tiny_folder("qwen3"), adapter="generic", iters=2, nsamples=2, seqlen=32, batch_size=2, bits=bits,
                 group_size=group_size, sym=sym, format="auto_round,compressed-tensors", output_dir=str(out))
    ct = blockquant.load_quantized(str(out / "compressed-tensors"))
    ar = blockquant.load_quantized(str(out / "auto_round"))
    ct_layers = {n: m for n, m in ct.named_modules() if isinstance(m, CompressedLinear)}
    ar_layers = {n: m for n, m in ar.named_modules() if isinstance(m, QuantLinear)}
    assert ct_layers and set(ct_layers) == set(ar_layers)
    for name, layer in ct_layers.items():
        assert torch.equal(layer.dequantize(), ar_layers[name].dequantize()), name
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(ct(input_ids=ids).logits, ar(input_ids=ids).logits)


def test_compressed_tensors_format_it_cannot_run_is_one_clear_error(tiny_folder, tmp_path):
    out = tmp_path / "out"
    api.quantize(tiny_folder("llama"), adapter="generic", iters=0, nsamples=2, seqlen=16, group_size=32,
                 format="compressed-tensors", output_dir=str(out))
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["format"] = "naive-quantized"
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match="format 'naive-quantized' is not read by load_quantized"):
        blockquant.load_quantized(str(out))
