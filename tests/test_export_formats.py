"""auto_round / auto_gptq layouts: packing, layer tensors, quantization_config, QuantLinear, loading.

Written tensors are read back from disk and dequantized here, independently, with the docs/formats.md
formula ``W[o, i] = scales[g, o] * (q[i, o] - (stored_zero[g, o] + offset))``.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from blockquant.config import QuantScheme
from blockquant.errors import UsageError
from blockquant.export.formats import (check_format, layer_layout_from_config, layer_tensors, packable,
                                       quantization_config)
from blockquant.export.packing import pack, unpack
from blockquant.export.shards import ShardWriter
from blockquant.export.loading import load_quantized
from blockquant.export.qlinear import QuantLinear
from blockquant.algorithm.quantizers import quantize

OUT, IN = 64, 256


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """docs/formats.md, 2/4/8 bits: word r holds values r*(32/b)+j in bits [j*b, (j+1)*b)."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32).view(1, -1, 1)
    return ((packed.unsqueeze(1) >> shifts) & (2 ** bits - 1)).reshape(-1, packed.shape[1])


def dequantize_from_disk(t: dict, name: str, bits: int, group_size: int, offset: int) -> torch.Tensor:
    q = unpack_rows(t[f"{name}.qweight"], bits)                          # [in, out]
    zeros = unpack_rows(t[f"{name}.qzeros"].t(), bits).t() + offset      # [G, out]
    g = torch.arange(q.shape[0]) // (q.shape[0] if group_size == -1 else group_size)
    return (t[f"{name}.scales"].float()[g] * (q - zeros[g]).float()).t()


def gptq_3bit_reference(values: list[int]) -> list[int]:
    """GPTQ's 3-bit word layout, word by word: 10 values, one split across words, 10, split, 10."""
    words = []
    for i in range(0, len(values), 32):
        v = values[i:i + 32]
        words.append(sum(v[j] << 3 * j for j in range(10)) | (v[10] & 3) << 30)
        words.append(v[10] >> 2 | sum(v[11 + j] << 3 * j + 1 for j in range(10)) | (v[21] & 1) << 31)
        words.append(v[21] >> 1 | sum(v[22 + j] << 3 * j + 2 for j in range(10)))
    return words


def random_weight(seed: int, out=OUT, inp=IN) -> torch.Tensor:
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_round_trip(bits):
    values = torch.randint(0, 2 ** bits, (64, 96), generator=torch.Generator().manual_seed(bits))
    for dim in (0, 1):
        packed = pack(values, bits, dim=dim)
        assert packed.dtype == torch.int32 and packed.shape[dim] == values.shape[dim] * bits // 32
        assert torch.equal(unpack(packed, bits, dim=dim), values.to(torch.int32))


def test_three_bit_packing_is_gptq_layout():
    values = torch.randint(0, 8, (96, 5), generator=torch.Generator().manual_seed(3))
    packed = pack(values, 3, dim=0)
    for col in range(values.shape[1]):
        expected = gptq_3bit_reference(values[:, col].tolist())
        assert [w & 0xFFFFFFFF for w in packed[:, col].tolist()] == expected


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_matches_formats_md_layout(bits):
    values = torch.randint(0, 2 ** bits, (64, 32), generator=torch.Generator().manual_seed(bits))
    assert torch.equal(unpack_rows(pack(values, bits, dim=0), bits), values.to(torch.int32))


CASES = [(sym, bits, gs, fmt) for sym in (True, False) for bits in (2, 4, 8) for gs in (-1, 32, 128)
         for fmt in (("auto_round", "auto_gptq") if sym else ("auto_round",))]


@pytest.mark.parametrize("sym,bits,group_size,fmt", CASES)
def test_written_layer_dequantizes_to_quantized_weight(tmp_path, sym, bits, group_size, fmt):
    scheme = QuantScheme(bits=bits, group_size=group_size, sym=sym)
    check_format(fmt, scheme)
    qw = quantize(random_weight(bits * 1000 + group_size), scheme)
    bias = torch.randn(OUT)
    writer = ShardWriter(str(tmp_path))
    writer.add(layer_tensors("model.layers.0.mlp.up_proj", qw, bias, fmt))
    assert writer.finish() == ["model.safetensors"]
    t = load_file(tmp_path / "model.safetensors")
    name = "model.layers.0.mlp.up_proj"
    groups = 1 if group_size == -1 else IN // group_size
    assert t[f"{name}.qweight"].dtype == torch.int32 and t[f"{name}.qweight"].shape == (IN * bits // 32, OUT)
    assert t[f"{name}.qzeros"].dtype == torch.int32 and t[f"{name}.qzeros"].shape == (groups, OUT * bits // 32)
    assert t[f"{name}.scales"].dtype == torch.float16 and t[f"{name}.scales"].shape == (groups, OUT)
    assert t[f"{name}.bias"].dtype == torch.float16 and torch.equal(t[f"{name}.bias"], bias.half())
    if fmt == "auto_gptq":
        assert torch.equal(t[f"{name}.g_idx"], (torch.arange(IN) // (IN if group_size == -1 else group_size)).int())
    else:
        assert f"{name}.g_idx" not in t
    offset = 0 if (fmt == "auto_round" and not sym) else 1     # plain asym auto_round: real zero points
    if sym:   # zero_point 2^(b-1), stored as 2^(b-1) - 1
        assert (unpack_rows(t[f"{name}.qzeros"].t(), bits) == 2 ** (bits - 1) - 1).all()
    w = dequantize_from_disk(t, name, bits, group_size, offset)
    torch.testing.assert_close(w, qw.dequantize(), rtol=2 ** -10, atol=1e-6)


def test_check_format_refusals():
    for bits in (2, 3, 4, 8):
        check_format("auto_round", QuantScheme(bits=bits))
        check_format("auto_gptq", QuantScheme(bits=bits))
    with pytest.raises(UsageError, match="--format auto_round"):
        check_format("auto_gptq", QuantScheme(sym=False))
    with pytest.raises(UsageError, match="unknown --format"):
        check_format("gguf", QuantScheme())
    check_format("fake", QuantScheme(sym=False))
    assert packable(64, 96, 4) and not packable(64, 100, 4) and not packable(48, 64, 8)


def test_quantization_config_contents():
    sym = quantization_config("auto_round", QuantScheme(bits=4, group_size=32), iters=50,
                              block_names=["model.layers"], extra_config={}, version="0.16.1")
    assert sym == {"quant_method": "auto-round", "packing_format": "auto_round:auto_gptq", "bits": 4,
                   "group_size": 32, "sym": True, "data_type": "int", "block_name_to_quantize": "model.layers",
                   "iters": 50, "autoround_version": "0.16.1"}
    extra = {"model.language_model.layers.0.mlp.gate": {"bits": 16}, "model.language_model.layers.1.o": {"bits": 8}}
    asym = quantization_config("auto_round", QuantScheme(bits=2, group_size=64, sym=False), iters=0,
                               block_names=["model.language_model.layers", "model.visual.blocks"],
                               extra_config=extra, version="0.16.1")
    assert asym["packing_format"] == "auto_round" and asym["extra_config"] == extra
    assert asym["block_name_to_quantize"] == "model.language_model.layers,model.visual.blocks"
    gptq = quantization_config("auto_gptq", QuantScheme(bits=4, group_size=128), iters=200,
                               block_names=["model.language_model.layers"], extra_config=extra, version="0.16.1")
    assert {k: gptq[k] for k in ("quant_method", "bits", "group_size", "sym", "desc_act", "checkpoint_format")} == \
        {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False, "checkpoint_format": "gptq"}
    assert gptq["dynamic"] == {r"-:^model\.language_model\.layers\.0\.mlp\.gate$": {},
                               r"+:^model\.language_model\.layers\.1\.o$": {"bits": 8}}
    for cfg in (asym, gptq):
        json.dumps(cfg)
        assert layer_layout_from_config(cfg, "model.language_model.layers.0.mlp.gate") is None
        assert layer_layout_from_config(cfg, "model.language_model.layers.1.o").bits == 8
        assert layer_layout_from_config(cfg, "model.language_model.layers.1.q").bits == cfg["bits"]
    assert layer_layout_from_config(asym, "x").zero_offset == 0
    assert layer_layout_from_config(gptq, "x").zero_offset == 1 and layer_layout_from_config(sym, "x").zero_offset == 1


@pytest.mark.parametrize("fmt,scheme", [("auto_round", QuantScheme(4, 32, True)), ("auto_gptq", QuantScheme(8, -1, True)),
                                        ("auto_round", QuantScheme(2, 128, False)), ("auto_gptq", QuantScheme(3, 64, True))])
def test_quant_linear_matches_dequantized_linear(fmt, scheme):
    qw = quantize(random_weight(7), scheme)
    bias = torch.randn(OUT).half().float()
    module = QuantLinear.from_quantized(qw, bias, fmt)
    assert set(module.state_dict()) == {k[len("x."):] for k in layer_tensors("x", qw, bias, fmt)}
    x = torch.randn(3, 5, IN)
    torch.testing.assert_close(module(x), F.linear(x, qw.dequantize(), bias), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(module(x.bfloat16()), F.linear(x.bfloat16(), qw.dequantize(torch.bfloat16),
                                                              bias.bfloat16()), rtol=2e-2, atol=2e-2)
    cached = QuantLinear.from_quantized(qw, bias, fmt, cache_weight=True)
    assert torch.equal(cached(x), module(x)) and len(cached._cache) == 1
    cached.to(torch.device("cpu"))
    assert not cached._cache


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_quant_linear_on_cuda():
    qw = quantize(random_weight(8), QuantScheme(4, 32, True))
    module = QuantLinear.from_quantized(qw, None, "auto_round").cuda()
    x = torch.randn(4, IN)
    torch.testing.assert_close(module(x.cuda().half()).float().cpu(), F.linear(x, qw.dequantize()), rtol=2e-2, atol=2e-2)


# -- load_quantized on a tiny Llama -----------------------------------------------------------------

def tiny_llama(tie: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_bias=True,
                         tie_word_embeddings=tie, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def export_tiny_llama(folder: str, fmt: str, scheme: QuantScheme, tie: bool, extra: dict):
    """Quantize model.layers' linears, write config.json + shards; return the dequantized fp model."""
    model = tiny_llama(tie)
    state = {k: v for k, v in model.state_dict().items() if not (tie and k == "lm_head.weight")}
    writer = ShardWriter(folder, max_shard_size=40_000)
    for i, layer in enumerate(model.model.layers):
        group = {}
        for name, module in layer.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            full = f"model.layers.{i}.{name}"
            state.pop(f"{full}.weight"), state.pop(f"{full}.bias", None)
            if extra.get(full, {}).get("bits", 0) >= 16:
                group.update({f"{full}.weight": module.weight.data, **({f"{full}.bias": module.bias.data} if module.bias is not None else {})})
                continue
            qw = quantize(module.weight.data, QuantScheme(**{**scheme.__dict__, **extra.get(full, {})}))
            group.update(layer_tensors(full, qw, module.bias, fmt, packing_sym=scheme.sym))
            module.weight.data = qw.dequantize()
            if module.bias is not None:
                module.bias.data = module.bias.data.half().float()
        for k in [k for k in state if k.startswith(f"model.layers.{i}.")]:
            group[k] = state.pop(k)
        writer.add(group)
        writer.flush()
    writer.add(state)
    writer.finish()
    model.config.save_pretrained(folder)
    config = json.load(open(os.path.join(folder, "config.json")))
    config["quantization_config"] = quantization_config(fmt, scheme, iters=0, block_names=["model.layers"],
                                                        extra_config=extra, version="0.16.1")
    json.dump(config, open(os.path.join(folder, "config.json"), "w"))
    return model


@pytest.mark.parametrize("fmt,scheme,tie", [("auto_round", QuantScheme(4, 32, True), True),
                                            ("auto_gptq", QuantScheme(4, 32, True), False),
                                            ("auto_round", QuantScheme(2, -1, False), False)])
def test_load_quantized_matches_dequantized_model(tmp_path, fmt, scheme, tie):
    extra = {"model.layers.0.mlp.down_proj": {"bits": 16}, "model.layers.1.self_attn.o_proj": {"bits": 8}}
    reference = export_tiny_llama(str(tmp_path), fmt, scheme, tie, extra)
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
    loaded = load_quantized(str(tmp_path))
    assert not loaded.training
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, QuantLinear)
    assert loaded.model.layers[1].self_attn.o_proj.bits == 8
    assert type(loaded.model.layers[0].mlp.down_proj) is torch.nn.Linear
    if tie:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, rtol=1e-3, atol=1e-3)


def test_load_quantized_refuses_incomplete_folders(tmp_path):
    with pytest.raises(UsageError, match="config.json"):
        load_quantized(str(tmp_path))
    tiny_llama(False).config.save_pretrained(tmp_path)
    with pytest.raises(UsageError, match="quantization_config"):
        load_quantized(str(tmp_path))
    config = json.load(open(tmp_path / "config.json"))
    config["quantization_config"] = {"quant_method": "auto-round", "bits": 4, "group_size": 32}
    json.dump(config, open(tmp_path / "config.json", "w"))
    with pytest.raises(UsageError, match="safetensors"):
        load_quantized(str(tmp_path))


def test_load_quantized_diffusers_transformer(tmp_path):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                   num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                   axes_dims_rope=[4, 6, 6]).eval()
    scheme, state = QuantScheme(4, 32, True), dict(model.state_dict())
    writer = ShardWriter(str(tmp_path), prefix="diffusion_pytorch_model", max_shard_size=50_000)
    for path in ("transformer_blocks", "single_transformer_blocks"):
        group = {}
        for name, module in getattr(model, path)[0].named_modules():
            if isinstance(module, torch.nn.Linear) and packable(module.in_features, module.out_features, 4):
                full = f"{path}.0.{name}"
                qw = quantize(module.weight.data, scheme)
                state.pop(f"{full}.weight"), state.pop(f"{full}.bias")
                group.update(layer_tensors(full, qw, module.bias, "auto_round"))
                module.weight.data, module.bias.data = qw.dequantize(), module.bias.data.half().float()
        writer.add(group)
    writer.add(state)
    assert writer.finish()[-1] == "diffusion_pytorch_model.safetensors.index.json"
    model.save_config(tmp_path)
    config = json.load(open(tmp_path / "config.json"))
    config["quantization_config"] = quantization_config("auto_round", scheme, iters=0, extra_config={}, version="0.16.1",
                                                        block_names=["transformer_blocks", "single_transformer_blocks"])
    json.dump(config, open(tmp_path / "config.json", "w"))
    loaded = load_quantized(str(tmp_path))
    assert type(loaded) is FluxTransformer2DModel and isinstance(loaded.transformer_blocks[0].attn.to_q, QuantLinear)
    inputs = dict(hidden_states=torch.randn(1, 16, 4), encoder_hidden_states=torch.randn(1, 8, 32),
                  pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]), img_ids=torch.zeros(16, 3),
                  txt_ids=torch.zeros(8, 3))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).sample, model(**inputs).sample, rtol=1e-3, atol=1e-3)
