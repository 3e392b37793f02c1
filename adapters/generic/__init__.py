"""The generic adapter: standard decoder-only LMs (Llama, Mistral, Qwen2/3 style).

Blocks are found at the usual paths by the engine's defaults; every block receives the same
kwargs (rotary embeddings and mask are computed once by the model), so nothing is rebuilt.
"""
from __future__ import annotations

from blockquant import AdapterInfo, ExampleModel, hookimpl

from .gguf_layout import gguf_layout  # noqa: F401  (a hook implementation of this adapter)

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "granite", "gemma", "gemma2", "gemma3_text",
               "smollm3", "helium", "glm", "cohere", "starcoder2", "stablelm", "internlm2", "exaone", "falcon")


@hookimpl
def adapter_info():
    return AdapterInfo(
        name="generic",
        description="standard decoder-only language models (blocks at model.layers and similar)",
        model_types=MODEL_TYPES,
        requires={"transformers": ">=5.5.4,<6"},
        generic=True,
    )


def tiny_config(kind: str = "llama", layers: int = 4, hidden: int = 64, vocab: int = 512):
    """A tiny config of a standard decoder-only family ("llama" or "qwen3")."""
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False,
                  bos_token_id=0, eos_token_id=1, pad_token_id=2)
    if kind == "qwen3":
        from transformers import Qwen3Config

        return Qwen3Config(head_dim=hidden // 4, **common)
    from transformers import LlamaConfig

    return LlamaConfig(**common)


def build_example(kind: str = "llama", layers: int = 4, hidden: int = 64, seed: int = 0) -> ExampleModel:
    from transformers import AutoModelForCausalLM

    from blockquant.data.tiny import tiny_tokenizer
    from blockquant.kit.examples import random_model

    config = tiny_config(kind, layers, hidden)
    model = random_model(AutoModelForCausalLM.from_config, config, seed)
    return ExampleModel.of(f"tiny-{kind}", model, tiny_tokenizer(config.vocab_size))


@hookimpl
def example_model():
    return build_example("llama", hidden=128)   # widths of 128: the default group size quantizes every layer
