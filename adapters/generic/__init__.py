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


# The tokenizer class each family publishes and its special tokens (Llama 3: byte-level BPE in the plain fast
# class, bos added; Qwen3: Qwen2Tokenizer, no bos, <|endoftext|> and the chat markers), trained offline by the core.
TOKENIZERS = {
    "llama": ("PreTrainedTokenizerFast", dict(bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                              add_bos_token=True)),
    "qwen3": ("Qwen2Tokenizer", dict(additional_special_tokens=["<|im_start|>", "<|im_end|>"])),
}


def tiny_tokenizer(kind: str = "llama", vocab: int = 512):
    """The family's tokenizer class with its special tokens, at most ``vocab`` tokens (16 model rows spare)."""
    from blockquant.data.tiny import family_tokenizer

    class_name, specials = TOKENIZERS[kind]
    return family_tokenizer(class_name, vocab - 16, **specials)


def tiny_config(kind: str = "llama", layers: int = 4, hidden: int = 64, vocab: int = 512, tokenizer=None):
    """A tiny config of a standard decoder-only family ("llama" or "qwen3"); special token ids from ``tokenizer``."""
    tokenizer = tokenizer or tiny_tokenizer(kind, vocab)
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False,
                  bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,
                  eos_token_id=tokenizer.eos_token_id,   # no bos token (Qwen): the config names eos, as Qwen's do
                  pad_token_id=tokenizer.pad_token_id)
    if kind == "qwen3":
        from transformers import Qwen3Config

        return Qwen3Config(head_dim=hidden // 4, **common)
    from transformers import LlamaConfig

    return LlamaConfig(**common)


def build_example(kind: str = "llama", layers: int = 4, hidden: int = 64, seed: int = 0) -> ExampleModel:
    from transformers import AutoModelForCausalLM

    from blockquant.kit.examples import random_model

    tokenizer = tiny_tokenizer(kind)
    config = tiny_config(kind, layers, hidden, tokenizer=tokenizer)
    model = random_model(AutoModelForCausalLM.from_config, config, seed)
    return ExampleModel.of(f"tiny-{kind}", model, tokenizer)


@hookimpl
def example_model():
    return build_example("llama", hidden=128)   # widths of 128: the default group size quantizes every layer
