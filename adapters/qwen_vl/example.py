"""Tiny, randomly initialised Qwen2.5-VL and Qwen3-VL models with a working processor, built offline.

``example_qwen25()`` and ``example_qwen3()`` return a ``blockquant.ExampleModel`` whose ``save(folder)``
writes a hub-like folder (config.json, generation_config.json, model.safetensors, tokenizer files,
preprocessor_config.json, processor_config.json naming the real processor class, chat_template.jinja) that
the engine's loader reads back.  The Qwen3-VL model has two deepstack layers (visual features added
after text layers 0 and 1).  The tokenizer is a ``Qwen2Tokenizer`` over the core's tiny byte-level BPE.
"""
from __future__ import annotations

import torch

from blockquant import ExampleModel
from blockquant.data.processors import assemble, save_processor_config
from blockquant.data.tiny import bpe_vocab_and_merges

PROCESSORS = {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")
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


def _token_ids(tokenizer) -> dict:
    return {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}


def _text_config(tokenizer, mrope_section, width: int = 64) -> dict:
    """Text width 64 (tests) or 128 (``example_default``: the default group size quantizes every text layer)."""
    scale = width // 64
    return dict(vocab_size=VOCAB_SIZE, hidden_size=width, intermediate_size=96 * scale if scale == 1 else 2 * width,
                num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, head_dim=32 * scale,
                max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [n * scale for n in mrope_section]},
                bos_token_id=None, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"))


def qwen25_config(tokenizer, width: int = 64):
    """Qwen2.5-VL: 4 text layers, 4 vision blocks (1 and 3 full attention, 0 and 2 windowed)."""
    from transformers import Qwen2_5_VLConfig

    vision = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=56, out_hidden_size=width, fullatt_block_indexes=[1, 3])
    return Qwen2_5_VLConfig(text_config=_text_config(tokenizer, [4, 6, 6], width), vision_config=vision,
                            **_token_ids(tokenizer))


def qwen3_config(tokenizer):
    """Qwen3-VL: 4 text layers, 4 vision blocks, deepstack features from vision blocks 0 and 2."""
    from transformers import Qwen3VLConfig

    text = _text_config(tokenizer, [6, 5, 5])
    text["rope_parameters"]["mrope_interleaved"] = True
    vision = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=64,
                  deepstack_visual_indexes=[0, 2])
    return Qwen3VLConfig(text_config=text, vision_config=vision, **_token_ids(tokenizer))


def _build(model_class, config, seed: int):
    torch.manual_seed(seed)
    config._attn_implementation = "sdpa"
    model = model_class(config).eval()
    with torch.no_grad():   # random init with a scale that keeps activations lively in 4 layers
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    model.generation_config.eos_token_id = config.get_text_config().eos_token_id
    model.generation_config.pad_token_id = config.get_text_config().pad_token_id
    return model


def _example(name: str, model_class_name: str, config_fn, patch_size: int, seed: int) -> ExampleModel:
    import transformers

    tokenizer = tiny_tokenizer()
    config = config_fn(tokenizer)
    model = _build(getattr(transformers, model_class_name), config, seed)
    processor = assemble(PROCESSORS[config.model_type], CHAT_TEMPLATE, image_processor=tiny_image_processor(patch_size),
                         tokenizer=tokenizer)

    def save(folder: str) -> None:
        model.save_pretrained(folder)
        save_processor_config(processor, folder)

    return ExampleModel(name=name, model=model, processor=processor, save=save)


def example_qwen25(seed: int = 0) -> ExampleModel:
    """A tiny Qwen2_5_VLForConditionalGeneration (0.27M parameters) and its processor."""
    return _example("tiny-qwen2.5-vl", "Qwen2_5_VLForConditionalGeneration", qwen25_config, 14, seed)


def example_default(seed: int = 0) -> ExampleModel:
    """The example ``quant --adapter qwen_vl`` quantizes: the tiny Qwen2.5-VL with text width 128."""
    return _example("tiny-qwen2.5-vl", "Qwen2_5_VLForConditionalGeneration",
                    lambda tok: qwen25_config(tok, width=128), 14, seed)


def example_qwen3(seed: int = 0) -> ExampleModel:
    """A tiny Qwen3VLForConditionalGeneration (0.33M parameters, two deepstack layers) and its processor."""
    return _example("tiny-qwen3-vl", "Qwen3VLForConditionalGeneration", qwen3_config, 16, seed)
