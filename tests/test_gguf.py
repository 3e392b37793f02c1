"""GGUF output read back with the gguf package (its reader and its own dequantization).

Quantized layers must dequantize (gguf.quants) to blockquant's weights: exactly for Q4_0 / Q8_0, to
the fp16 rounding of the stored min for Q4_1, and for the K-quants (Q2_K, Q3_K, Q4_K, Q6_K) exactly to
the grid of quantized sub-block scales blockquant reports (``dequantize_k``), itself close to the
tuned weight.  llama.cpp's converter
permutes the q/k rows of its "llama" architecture; that permutation is written here as llama.cpp
writes it.  The llama.cpp runtime check itself lives in bench/gguf_llamacpp.py.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from blockquant import UsageError, api
from blockquant.frame.cli import main
from blockquant.export.gguf_kquants import dequantize_k

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize  # noqa: E402

# how far the K-quants' scale grid may move a tuned weight, relative to its largest magnitude (~ half a
# code step at the grid's coarsest sub-block scale)
K_MOVE = {"Q2_K": 0.25, "Q3_K": 0.1, "Q4_K": 0.05, "Q6_K": 0.01}
TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"


def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (rows of q_proj / k_proj)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """tiny models with 256-wide rows (Q4_K super-blocks) and a chat template."""
    from blockquant.adapters.generic import build_example

    folders = {}
    for kind in ("llama", "qwen3"):
        folder = str(tmp_path_factory.mktemp(kind) / "model")
        build_example(kind, layers=2, hidden=256).save(folder)
        path = os.path.join(folder, "tokenizer_config.json")
        config = json.load(open(path))
        config["chat_template"] = TEMPLATE
        json.dump(config, open(path, "w"))
        folders[kind] = folder
    return folders


def read(path: str):
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    return reader, tensors


def weight(t) -> torch.Tensor:
    return torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).float()


def field(reader, key):
    f = reader.fields[key]
    return f.contents()


def check_file(path: str, result, arch: str, expected_type: str):
    model = result.run.model
    config = model.config
    reader, tensors = read(path)
    assert field(reader, "general.architecture") == arch
    assert field(reader, f"{arch}.block_count") == config.num_hidden_layers
    assert field(reader, f"{arch}.attention.head_count_kv") == config.num_key_value_heads
    assert field(reader, "tokenizer.chat_template") == TEMPLATE
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(result.run.source.path)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    assert field(reader, "tokenizer.ggml.tokens")[:len(vocab)] == [t for t, _ in vocab]
    # a tokenizer without a bos token (Qwen): the gguf package takes config.json's, as llama.cpp's converter does
    bos = tok.bos_token_id if tok.bos_token_id is not None else config.bos_token_id
    assert field(reader, "tokenizer.ggml.bos_token_id") == bos
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    for i in range(config.num_hidden_layers):
        for hf, short in (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                          ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                          ("mlp.down_proj", "ffn_down")):
            qw = result.quantized_weights[f"model.layers.{i}.{hf}"]
            t = tensors[f"blk.{i}.{short}.weight"]
            want_type = expected_type if not (expected_type.endswith("_K") and qw.qweight.shape[1] % 256) else \
                "Q4_1" if expected_type == "Q4_K" else "F16"
            assert t.tensor_type.name == want_type
            ours = dequantize_k(qw, want_type.lower()) if want_type.endswith("_K") else qw.dequantize()
            if want_type.endswith("_K"):   # the scale grid moves the tuned weight by little
                tuned = qw.dequantize()
                assert (ours - tuned).abs().max() <= K_MOVE[want_type] * tuned.abs().max()
            if want_type == "F16":
                ours = ours.half().float()
            if arch == "llama" and short in heads:
                ours = llama_cpp_permute(ours, heads[short])
            got = weight(t)
            if want_type == "Q4_1":   # the min d * z is stored as fp16
                assert torch.allclose(got, ours, rtol=0, atol=float(ours.abs().max()) * 2 ** -10)
            else:
                assert torch.equal(got, ours)
        norm = tensors[f"blk.{i}.attn_norm.weight"]
        assert norm.tensor_type.name == "F32"
        assert torch.equal(weight(norm), model.model.layers[i].input_layernorm.weight.detach().float())
    embed = tensors["token_embd.weight"]
    assert embed.tensor_type.name == "F16"
    assert torch.equal(weight(embed), model.model.embed_tokens.weight.detach().half().float())
    assert torch.equal(weight(tensors["output.weight"]), model.lm_head.weight.detach().half().float())
    assert tensors["output_norm.weight"].tensor_type.name == "F32"


@pytest.mark.parametrize("kind,fmt,bits,group,sym", [
    ("llama", "gguf:q4_0", 4, 32, True), ("llama", "gguf:q8_0", 8, 32, True), ("llama", "gguf:q4_1,gguf:q4_k", 4, 32, False),
    ("qwen3", "gguf:q4_k", 4, 32, False), ("llama", "gguf:q6_k", 6, 16, True), ("qwen3", "gguf:q3_k", 3, 16, True),
    ("llama", "gguf:q2_k", 2, 16, False)])
def test_gguf_reads_back_to_blockquant_weights(source, tmp_path, kind, fmt, bits, group, sym):
    out = tmp_path / "out"
    result = api.quantize(source[kind], adapter="generic", iters=2, nsamples=2, seqlen=32, batch_size=2,
                          bits=bits, group_size=group, sym=sym, format=fmt, output_dir=str(out), keep_blocks=True)
    formats = fmt.split(",")
    for f in formats:
        gtype = f.split(":")[1].upper()
        folder = out if len(formats) == 1 else out / f.replace(":", "-")
        assert sorted(os.listdir(folder)) == sorted([f"model-{gtype}.gguf"] + (["blockquant_report.json"] if len(formats) == 1 else []))
        check_file(str(folder / f"model-{gtype}.gguf"), result, "llama" if kind == "llama" else "qwen3", gtype)


def test_q4_k_rows_shorter_than_a_super_block_fall_back_to_q4_1(tiny_folder, tmp_path):
    out = tmp_path / "out"
    api.quantize(tiny_folder("llama"), adapter="generic", iters=0, nsamples=2, seqlen=16, bits=4, group_size=32, sym=False,
                 format="gguf:q4_k", output_dir=str(out))
    _, tensors = read(str(out / "model-Q4_K.gguf"))
    assert {t.tensor_type.name for n, t in tensors.items() if n.startswith("blk.") and "norm" not in n} == {"Q4_1"}


def test_group_16_k_quant_rows_shorter_than_a_super_block_stay_f16(tiny_folder, tmp_path):
    out = tmp_path / "out"
    result = api.quantize(tiny_folder("llama"), adapter="generic", iters=0, nsamples=2, seqlen=16, bits=6,
                          group_size=16, sym=True, format="gguf:q6_k", output_dir=str(out), keep_blocks=True)
    _, tensors = read(str(out / "model-Q6_K.gguf"))
    t = tensors["blk.0.ffn_down.weight"]
    assert t.tensor_type.name == "F16"
    ours = result.quantized_weights["model.layers.0.mlp.down_proj"].dequantize(torch.float16).float()
    assert torch.equal(weight(t), ours)


def test_scheme_the_gguf_type_cannot_hold_is_a_usage_error(tiny_folder, tmp_path, capsys):
    with pytest.raises(UsageError, match="--format gguf:q4_0 needs --bits 4 --group_size 32 --sym true"):
        api.quantize(tiny_folder("llama"), adapter="generic", iters=0, nsamples=2, seqlen=16, group_size=128,
                     format="gguf:q4_0", output_dir=str(tmp_path / "a"))
    code = main(["quantize", tiny_folder("llama"), "--adapter", "generic", "--iters", "0", "--format", "gguf:q4_k",
                 "--group_size", "32", "-o", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 2 and "--format gguf:q4_k needs --bits 4 --group_size 32 --sym false" in err
    assert not (tmp_path / "b").exists() and not (tmp_path / "b.partial").exists()
    code = main(["quantize", tiny_folder("llama"), "--adapter", "generic", "--format", "gguf:q5_0", "-o", str(tmp_path / "c")])
    assert code == 2 and "unknown --format gguf:q5_0" in capsys.readouterr().err


def test_gemma4_refuses_gguf_before_tuning(tmp_path):
    from blockquant.kit.testing import example_folder

    with pytest.raises(UsageError, match="GGUF export of Gemma 4 is not supported"):
        api.quantize(example_folder("gemma4"), adapter="gemma4", iters=0, nsamples=2, seqlen=16, bits=4, group_size=32,
                     format="gguf:q4_0", output_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_chunked_writing_and_encoding_give_the_same_file(tiny_folder, tmp_path, monkeypatch):
    """Tensors outside the blocks are read and converted a row chunk at a time (the embedding is never
    whole in memory) and quantized layers encoded a chunk of rows at a time: the bytes do not change."""
    import blockquant.export.gguf_output as gguf_output
    import blockquant.export.gguf_quants as gguf_quants

    def run(out):
        api.quantize(tiny_folder("qwen3"), adapter="generic", iters=0, nsamples=2, seqlen=16, bits=4, group_size=32,
                     sym=False, format="gguf:q4_1", output_dir=str(out))
        return (out / "model-Q4_1.gguf").read_bytes()

    whole = run(tmp_path / "whole")
    monkeypatch.setattr(gguf_output, "CHUNK_BYTES", 1000)     # 7 embedding rows of 64 F16 values at a time
    monkeypatch.setattr(gguf_quants, "ENCODE_WEIGHTS", 300)   # 4 rows of 64 weights at a time
    assert run(tmp_path / "chunked") == whole
