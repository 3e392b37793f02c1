"""Tiny random Qwen2.5-VL and Qwen3-VL models (``example_qwen25()``, ``example_qwen3()``: two deepstack
layers) with a working processor, built offline; ``save(folder)`` writes a hub-like folder."""
from __future__ import annotations

from blockquant import ExampleModel
from blockquant.data.processors import assemble
from blockquant.data.tiny import bpe_vocab_and_merges
from blockquant.kit.examples import random_model, token_ids

PROCESSORS = {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")
VISION_TOKENS = dict(image_token_id="<|image_pad|>", video_token_id="<|video_pad|>",
                     vision_start_token_id="<|vision_start|>", vision_end_token_id="<|vision_end|>")
BPE_SIZE = 320            # the core's tiny byte-level BPE (blockquant.data.tiny)
VOCAB_SIZE = 336          # model vocabulary (the tokenizer has 327 tokens)

# A chat template in the Qwen style: images become <|vision_start|><|image_pad|><|vision_end|>.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer():
    """A ``Qwen2Tokenizer`` (byte-level BPE) with the Qwen chat and vision special tokens."""
    from transformers import Qwen2Tokenizer

    vocab, merges = bpe_vocab_and_merges(BPE_SIZE, "Qwen2Tokenizer")   # trained with its own pipeline
    return Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                          additional_special_tokens=list(SPECIAL_TOKENS[1:]))


def tiny_image_processor(patch_size: int):
    """The Pillow Qwen-VL image processor, capped at 8x8 patches (16 image tokens) per image."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    unit = patch_size * 2
    return Qwen2VLImageProcessorPil(patch_size=patch_size, merge_size=2, temporal_patch_size=2,
                                    min_pixels=(2 * unit) ** 2, max_pixels=(4 * unit) ** 2)


def _text_config(tok, mrope_section, width: int = 64) -> dict:
    """Text width 64 (tests) or 128 (``example_model``: the default group size quantizes every text layer)."""
    s = width // 64
    return dict(vocab_size=VOCAB_SIZE, hidden_size=width, intermediate_size=96 if s == 1 else 2 * width,
                num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, head_dim=32 * s,
                max_position_embeddings=512, bos_token_id=None,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [n * s for n in mrope_section]},
                **token_ids(tok, eos_token_id="<|im_end|>", pad_token_id="<|endoftext|>"))


def qwen25_config(tok, width: int = 64):
    """Qwen2.5-VL: 4 text layers, 4 vision blocks (1 and 3 full attention, 0 and 2 windowed)."""
    from transformers import Qwen2_5_VLConfig

    vision = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=56, out_hidden_size=width, fullatt_block_indexes=[1, 3])
    return Qwen2_5_VLConfig(text_config=_text_config(tok, [4, 6, 6], width), vision_config=vision,
                            **token_ids(tok, **VISION_TOKENS))


def qwen3_config(tok):
    """Qwen3-VL: 4 text layers, 4 vision blocks, deepstack features from vision blocks 0 and 2."""
    from transformers import Qwen3VLConfig

    text = _text_config(tok, [6, 5, 5])
    text["rope_parameters"]["mrope_interleaved"] = True
    vision = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=64, deepstack_visual_indexes=[0, 2])
    return Qwen3VLConfig(text_config=text, vision_config=vision, **token_ids(tok, **VISION_TOKENS))


def _example(name: str, model_class: str, config, patch_size: int, seed: int) -> ExampleModel:
    import transformers

    config._attn_implementation = "sdpa"
    # random init with a scale that keeps activations lively in 4 layers
    model = random_model(getattr(transformers, model_class), config, seed, init_std=0.08)
    processor = assemble(PROCESSORS[config.model_type], CHAT_TEMPLATE, image_processor=tiny_image_processor(patch_size),
                         tokenizer=tiny_tokenizer())
    return ExampleModel.of(name, model, processor)


def example_qwen25(seed: int = 0, width: int = 64) -> ExampleModel:
    """A tiny Qwen2_5_VLForConditionalGeneration (0.27M parameters at width 64) and its processor."""
    config = qwen25_config(tiny_tokenizer(), width)
    return _example("tiny-qwen2.5-vl", "Qwen2_5_VLForConditionalGeneration", config, 14, seed)


def example_qwen3(seed: int = 0) -> ExampleModel:
    """A tiny Qwen3VLForConditionalGeneration (0.33M parameters, two deepstack layers) and its processor."""
    return _example("tiny-qwen3-vl", "Qwen3VLForConditionalGeneration", qwen3_config(tiny_tokenizer()), 16, seed)
