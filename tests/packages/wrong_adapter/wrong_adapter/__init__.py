"""Deliberately wrong adapters for blockquant's own tests (see replay.py and patch.py)."""

from blockquant import ExampleModel


def tiny_sliding_lm(seed: int = 0) -> ExampleModel:
    """A tiny Gemma3 text model whose layers alternate sliding and full attention, so the mask and
    the rotary embeddings given to a block depend on the block (variable inputs)."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from blockquant.data.tiny import tiny_tokenizer

    torch.manual_seed(seed)
    config = Gemma3TextConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                              layer_types=["sliding_attention", "full_attention"] * 2, max_position_embeddings=512,
                              bos_token_id=0, eos_token_id=1, pad_token_id=2)
    model = Gemma3ForCausalLM(config).eval()
    tokenizer = tiny_tokenizer(512)

    return ExampleModel.of("tiny-sliding-lm", model, tokenizer)
