"""A tiny random LLaVA (CLIP vision tower + Llama text model) and its processor, built offline."""
from __future__ import annotations

from blockquant import ExampleModel
from blockquant.kit.examples import random_model

IMAGE_TOKEN = "<image>"
IMAGE_SIZE, PATCH = 32, 8      # 16 patches + the CLS token = 17 image tokens per image


def build_processor():
    """LlavaProcessor = the Pillow image processor (no torchvision needed) + blockquant's tiny tokenizer."""
    from transformers import LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    from blockquant.data.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer(512)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_processor = LlavaImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, do_center_crop=True,
                                             crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                          vision_feature_select_strategy="full", num_additional_image_tokens=1,
                          image_token=IMAGE_TOKEN)


def tiny_config(vocab_size: int, image_token_id: int, layers: int = 4):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=32)
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                       vision_feature_layer=-1, vision_feature_select_strategy="full")


def build_example(layers: int = 4, seed: int = 0) -> ExampleModel:
    from transformers import LlavaForConditionalGeneration

    processor = build_processor()
    tokenizer = processor.tokenizer
    config = tiny_config(len(tokenizer), tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), layers)
    model = random_model(LlavaForConditionalGeneration, config, seed)
    return ExampleModel.of("tiny-llava", model, processor)
