"""Interop with auto-round 0.16.1 (skipped where it is not installed).

1. auto-round's own QuantLinear.pack, given our codes' scales and zero points, writes byte-identical
   qweight / qzeros / scales to ``layer_tensors`` (2, 3, 4 and 8 bits).
2. ``transformers.AutoModelForCausalLM.from_pretrained`` loads a folder written by blockquant on the CPU
   through auto-round's kernels, and its logits match ``load_quantized``'s to fp16 rounding.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("auto_round")

from auto_round_extension.torch import qlinear_torch, qlinear_torch_zp  # noqa: E402

from blockquant.config import QuantScheme  # noqa: E402
from blockquant.export.formats import layer_tensors  # noqa: E402
from blockquant.export.loading import load_quantized  # noqa: E402
from blockquant.algorithm.quantizers import quantize  # noqa: E402
from test_export_formats import export_tiny_llama, random_weight  # noqa: E402

OUT, IN = 64, 256


@pytest.mark.parametrize("bits,group_size,sym", [(2, 32, True), (3, 32, True), (4, 128, True), (8, -1, True),
                                                 (2, 64, False), (3, 32, False), (4, 32, False), (8, 128, False)])
def test_autoround_packs_the_same_bytes(bits, group_size, sym):
    qw = quantize(random_weight(bits + group_size), QuantScheme(bits, group_size, sym))
    linear = torch.nn.Linear(IN, OUT)
    linear.weight.data = qw.dequantize()
    module_cls = qlinear_torch_zp.QuantLinear if sym else qlinear_torch.QuantLinear
    theirs = module_cls(bits, IN if group_size == -1 else group_size, IN, OUT, bias=True)
    theirs.device = torch.device("cpu")   # auto-round sets this before packing
    theirs.pack(linear, qw.scale, qw.zero, None)
    ours = layer_tensors("x", qw, linear.bias.data, "auto_round")
    for name in ("qweight", "qzeros", "scales", "bias"):
        assert torch.equal(getattr(theirs, name).cpu(), ours[f"x.{name}"]), name


@pytest.mark.parametrize("fmt,scheme", [("auto_round", QuantScheme(4, 32, True)), ("auto_round", QuantScheme(2, 32, False)),
                                        ("auto_round", QuantScheme(3, 32, True)), ("auto_gptq", QuantScheme(4, 32, True))])
def test_transformers_loads_our_folder_with_autoround(tmp_path, fmt, scheme):
    import transformers

    extra = {"model.layers.0.mlp.down_proj": {"bits": 16}, "model.layers.1.self_attn.o_proj": {"bits": 8}}
    export_tiny_llama(str(tmp_path), fmt, scheme, tie=True, extra=extra)
    # transformers sends gptq checkpoints to optimum/gptqmodel; an AutoRoundConfig routes them to auto-round.
    kwargs = {"quantization_config": transformers.AutoRoundConfig()} if fmt == "auto_gptq" else {}
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), device_map="cpu", **kwargs)
    assert type(theirs.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert theirs.model.layers[1].self_attn.o_proj.bits == 8
    ours = load_quantized(str(tmp_path))
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = theirs(ids).logits.float(), ours(ids).logits
    assert (a - b).abs().max() <= 4e-3 * b.abs().max()
