"""GGUF layout (llama.cpp) of the Llama / Mistral / Qwen2 / Qwen3 family, as llama.cpp's own
converter (convert_hf_to_gguf.py) writes it: tensor names from the gguf package's name map, the
``{arch}.*`` hyper-parameters, and for the "llama" architecture (Llama, Mistral) the q/k rows
permuted from the Hugging Face rotary layout (halves) to llama.cpp's (interleaved pairs).
"""
from __future__ import annotations

import torch

from blockquant import GgufLayout, UsageError, hookimpl

ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
PRE_TOKENIZERS = {"qwen2": "qwen2", "qwen3": "qwen2"}   # tokenizer.ggml.pre by model_type


def rope_permutation(rows: int, heads: int) -> torch.Tensor:
    """Source row of each GGUF row: per head, HF's [first half, second half] -> interleaved pairs."""
    return torch.arange(rows).view(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise UsageError(f"GGUF export of rope_type {rope_type!r} is not supported (llama.cpp needs extra rope "
                         "tensors for it); use --format auto_round or compressed-tensors for this model")
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _pre_tokenizer(config) -> str:
    if config.model_type in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[config.model_type]
    return "llama-bpe" if config.vocab_size >= 128000 else "default"   # Llama 3 tokenizers; else llama.cpp's default


@hookimpl
def gguf_layout(model):
    import gguf

    config = model.config
    arch = ARCHS.get(config.model_type)
    if arch is None:
        return None
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    metadata = {
        f"{arch}.vocab_size": config.vocab_size,
        f"{arch}.context_length": config.max_position_embeddings,
        f"{arch}.embedding_length": config.hidden_size,
        f"{arch}.block_count": config.num_hidden_layers,
        f"{arch}.feed_forward_length": config.intermediate_size,
        f"{arch}.attention.head_count": heads,
        f"{arch}.attention.head_count_kv": kv_heads,
        f"{arch}.attention.key_length": head_dim,
        f"{arch}.attention.value_length": head_dim,
        f"{arch}.rope.dimension_count": head_dim,
        f"{arch}.rope.freq_base": _rope_theta(config),
        f"{arch}.attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
        "tokenizer.ggml.pre": _pre_tokenizer(config),
    }

    def row_order(name: str):
        if arch != "llama":
            return None
        for proj, n in (("self_attn.q_proj.", heads), ("self_attn.k_proj.", kv_heads)):
            if proj in name:
                return rope_permutation(n * head_dim, n)
        return None

    return GgufLayout(arch=arch, tensor_name=lambda name: names.get_name(name, try_suffixes=(".weight", ".bias")),
                      metadata=metadata, row_order=row_order)
