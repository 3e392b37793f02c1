"""Tiny random Gemma 4 models built offline: ``example_text(layers, kv_shared)`` (``Gemma4ForCausalLM``:
sliding and full layers, per-layer inputs, KV-shared layers) and ``example_multimodal()`` (plus a 2-block
vision tower and its processor).  ``save(folder)`` writes a hub-like folder.
"""
from __future__ import annotations

from blockquant import ExampleModel
from blockquant.data.processors import assemble
from blockquant.kit.examples import padded_vocab, random_model, token_ids

# Named special tokens of Gemma 4 tokenizers (transformers reads them as tokenizer.image_token etc.).
IMAGE_TOKENS = {"image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
                "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>"}
VIDEO_TOKEN = "<|video|>"          # Gemma4Processor adds it to the tokenizer if missing
SEED = 0


def text_config(layers: int = 4, kv_shared: int = 2, vocab_size: int = 512, **overrides):
    """The tiny text config of docs/models/gemma4.md (hidden 64, 2 heads, 1 KV head, head_dim 32, full layers 64),
    with 32-wide per-layer inputs so that every linear layer can be packed at 4 bits."""
    from transformers import Gemma4TextConfig

    values = dict(
        vocab_size=vocab_size, vocab_size_per_layer_input=vocab_size, hidden_size=64, intermediate_size=128,
        num_hidden_layers=layers, layer_types=["sliding_attention", "full_attention"] * (layers // 2),
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, global_head_dim=64, sliding_window=16,
        hidden_size_per_layer_input=32, num_kv_shared_layers=kv_shared, max_position_embeddings=4096,
        pad_token_id=0, eos_token_id=1, bos_token_id=2,   # GemmaTokenizer's ids
    )
    values.update(overrides)
    return Gemma4TextConfig(**values)


def tokenizer(multimodal: bool = False):
    """A ``GemmaTokenizer`` trained offline by the core; with ``multimodal``, Gemma 4's named media tokens too."""
    from blockquant.data.tiny import family_tokenizer

    named = dict(IMAGE_TOKENS) if multimodal else None
    tok = family_tokenizer("GemmaTokenizer", 512, add_bos_token=True, extra_special_tokens=named)
    if multimodal:
        tok.add_special_tokens({"additional_special_tokens": [VIDEO_TOKEN]})
    return tok


def image_processor():
    """Gemma 4's Pillow image processor at a tiny scale: 4-pixel patches, 2x2 pooling, 70 soft tokens max."""
    from transformers import Gemma4ImageProcessorPil

    return Gemma4ImageProcessorPil(patch_size=4, pooling_kernel_size=2, max_soft_tokens=70)


def example_text(layers: int = 4, kv_shared: int = 2, seed: int = SEED, **overrides) -> ExampleModel:
    """A tiny ``Gemma4ForCausalLM`` (about 0.26M parameters with 4 layers) and its tokenizer.

    ``overrides`` are ``Gemma4TextConfig`` fields (e.g. ``hidden_size_per_layer_input=0``)."""
    from transformers import Gemma4ForCausalLM

    model = random_model(Gemma4ForCausalLM, text_config(layers, kv_shared, **overrides), seed)
    return ExampleModel.of(f"tiny-gemma4-text-{layers}l" + (f"-kv{kv_shared}" if kv_shared else ""), model, tokenizer())


# Widths of the example a no-model run quantizes (``example_model``): every linear layer's input a multiple
# of 128, so the default scheme (W4A16, group size 128) quantizes all of them.
DEFAULT_SIZES = dict(hidden_size=128, intermediate_size=256, head_dim=64, global_head_dim=128,
                     hidden_size_per_layer_input=128)


def multimodal_config(layers: int = 4, kv_shared: int = 2, tok=None, **overrides):
    """Tiny ``Gemma4Config``: the text config above plus a 2-block vision tower (hidden 32)."""
    from transformers import Gemma4Config, Gemma4VisionConfig

    tok = tok or tokenizer(multimodal=True)
    vision = Gemma4VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        head_dim=16, patch_size=4, pooling_kernel_size=2, position_embedding_size=256,
    )
    ids = token_ids(tok, image_token_id=IMAGE_TOKENS["image_token"], boi_token_id=IMAGE_TOKENS["boi_token"],
                    eoi_token_id=IMAGE_TOKENS["eoi_token"], audio_token_id=IMAGE_TOKENS["audio_token"],
                    boa_token_id=IMAGE_TOKENS["boa_token"], eoa_token_index=IMAGE_TOKENS["eoa_token"],
                    video_token_id=VIDEO_TOKEN)
    return Gemma4Config(text_config=text_config(layers, kv_shared, vocab_size=padded_vocab(tok), **overrides).to_dict(),
                        vision_config=vision.to_dict(), **ids)


def example_multimodal(layers: int = 4, kv_shared: int = 2, seed: int = SEED, **overrides) -> ExampleModel:
    """A tiny ``Gemma4ForConditionalGeneration`` and its processor (images + text); ``overrides`` are
    text config fields (e.g. ``use_bidirectional_attention="vision"`` as in the larger Gemma 4 models)."""
    from transformers import Gemma4ForConditionalGeneration

    tok = tokenizer(multimodal=True)
    model = random_model(Gemma4ForConditionalGeneration, multimodal_config(layers, kv_shared, tok, **overrides), seed)
    processor = assemble("Gemma4Processor", image_processor=image_processor(), tokenizer=tok)
    return ExampleModel.of(f"tiny-gemma4-vision-{layers}l" + (f"-kv{kv_shared}" if kv_shared else ""), model, processor)
