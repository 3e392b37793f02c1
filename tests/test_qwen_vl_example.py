"""The qwen_vl tiny example models, their offline processor and the hub-like folders they save."""
from __future__ import annotations

import json
import os

import pytest
import torch

from blockquant.adapters import qwen_vl
from blockquant.data.processors import load_processor
from blockquant.data.image_data import synthetic_images


def _inputs(processor, n=2, seed=0):
    records = synthetic_images(n, seed=seed)
    texts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r.text}]}],
        tokenize=False, add_generation_prompt=True) for r in records]
    return processor(images=[r.image for r in records], text=texts, padding=True, return_tensors="pt")


@pytest.mark.parametrize("build, cls, model_type", [
    (qwen_vl.example_qwen25, "Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl"),
    (qwen_vl.example_qwen3, "Qwen3VLForConditionalGeneration", "qwen3_vl"),
])
def test_example_saves_a_folder_that_reloads(tmp_path, build, cls, model_type):
    import transformers

    example = build()
    model = example.model
    assert type(model).__name__ == cls and model.config.model_type == model_type
    assert 200_000 < sum(p.numel() for p in model.parameters()) < 400_000
    batch = _inputs(example.processor)
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits
    example.save(str(tmp_path))
    files = set(os.listdir(tmp_path))
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "preprocessor_config.json", "processor_config.json", "chat_template.jinja"} <= files
    with open(tmp_path / "processor_config.json") as f:
        assert json.load(f)["processor_class"] == qwen_vl.example.PROCESSORS[model_type]
    # the processor loads back from the folder (assembled from its parts: no torchvision here)
    loaded = load_processor(str(tmp_path))
    assert loaded.chat_template == example.processor.chat_template
    assert type(loaded.tokenizer).__name__ == "Qwen2Tokenizer" and "<s>" not in loaded.tokenizer.get_vocab()
    again = _inputs(loaded)
    assert again.keys() == batch.keys()
    assert all(torch.equal(again[k], batch[k]) for k in batch)
    reloaded = getattr(transformers, cls).from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**again, use_cache=False).logits, logits)


def test_examples_are_deterministic_and_qwen3_has_deepstack():
    a, b = qwen_vl.example_qwen3(), qwen_vl.example_qwen3()
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    visual = a.model.model.visual
    assert list(visual.deepstack_visual_indexes) == [0, 2] and len(visual.deepstack_merger_list) == 2
    q25 = qwen_vl.example_model().model.model.visual
    assert list(q25.fullatt_block_indexes) == [1, 3]


def test_tokenizer_has_the_qwen_special_tokens_and_template():
    example = qwen_vl.example_qwen25()
    tok = example.processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>")}
    assert len(set(ids.values())) == 4 and all(i < example.model.config.text_config.vocab_size for i in ids.values())
    assert example.model.config.image_token_id == ids["<|image_pad|>"]
    text = example.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}], tokenize=False,
        add_generation_prompt=True)
    assert text == "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(tok("a red circle on a blue background")["input_ids"]) == "a red circle on a blue background"
