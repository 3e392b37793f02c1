"""End to end with the qwen_vl adapter: quantize with images, export, reload, generate; old weight names; CLI."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import blockquant
from blockquant import api
from blockquant.frame import cli
from blockquant.adapters import qwen_vl
from blockquant.data.processors import load_processor
from blockquant.data.image_data import synthetic_images
from blockquant.export.qlinear import QuantLinear

FAST = dict(nsamples=4, batch_size=2, seqlen=64, group_size=32, seed=0)
PROCESSOR_FILES = {"preprocessor_config.json", "processor_config.json", "chat_template.jinja", "tokenizer.json", "tokenizer_config.json",
                   "generation_config.json"}


def _generate(folder: str, model_type: str, tokens: int = 4):
    model = blockquant.load_quantized(folder)
    processor = load_processor(folder)
    record = synthetic_images(1, seed=7)[0]
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}],
        tokenize=False, add_generation_prompt=True)
    batch = processor(images=[record.image], text=[text], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return model, processor, out[:, batch["input_ids"].shape[1]:]


def test_qwen3_quantize_with_images_export_reload_generate(tmp_path):
    source = tmp_path / "qwen3"
    qwen_vl.example_qwen3().save(str(source))
    out = tmp_path / "out"
    result = api.quantize(str(source), adapter="qwen_vl", quant_vision=True, iters=2, output_dir=str(out), **FAST)
    assert PROCESSOR_FILES <= set(os.listdir(out))
    with open(out / "config.json") as f:
        qcfg = json.load(f)["quantization_config"]
    assert set(qcfg["block_name_to_quantize"].split(",")) == {"model.language_model.layers", "model.visual.blocks"}
    assert qcfg["bits"] == 4 and qcfg["group_size"] == 32
    model, processor, new = _generate(str(out), "qwen3_vl")
    assert new.shape == (1, 4)
    assert isinstance(model.model.language_model.layers[0].self_attn.q_proj, QuantLinear)
    assert isinstance(model.model.visual.blocks[0].attn.qkv, QuantLinear)
    assert not isinstance(model.model.visual.deepstack_merger_list[0].linear_fc1, QuantLinear)
    assert isinstance(processor.decode(new[0]), str)
    assert len(result.report.blocks) == 8


def _to_old_names(folder):
    """Rewrite a Qwen2.5-VL checkpoint with the names older hub checkpoints use."""
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    renamed = {}
    for name, tensor in tensors.items():
        if name.startswith("model.language_model."):
            name = "model." + name[len("model.language_model."):]
        elif name.startswith("model.visual."):
            name = name[len("model."):]
        renamed[name] = tensor
    save_file(renamed, path, metadata={"format": "pt"})
    return sorted(renamed)


def test_qwen25_old_checkpoint_names_load_and_export_current_names(tmp_path):
    import transformers

    source = tmp_path / "qwen25-old"
    example = qwen_vl.example_qwen25()
    example.save(str(source))
    names = _to_old_names(str(source))
    assert any(n.startswith("model.layers.") for n in names) and any(n.startswith("visual.blocks.") for n in names)
    assert not any(n.startswith(("model.language_model.", "model.visual.")) for n in names)
    out = tmp_path / "out"
    api.quantize(str(source), adapter="qwen_vl", quant_vision=True, iters=0, output_dir=str(out), **FAST)
    written = load_file(str(out / "model.safetensors"))
    assert "model.language_model.layers.0.self_attn.q_proj.qweight" in written
    assert "model.visual.blocks.0.attn.qkv.qweight" in written
    assert "model.language_model.embed_tokens.weight" in written and "model.visual.merger.mlp.0.weight" in written
    assert not any(n.startswith(("model.layers.", "visual.")) for n in written)
    _, _, new = _generate(str(out), "qwen2_5_vl", tokens=3)
    assert new.shape == (1, 3)
    # transformers itself reads the old names the same way (the source folder still runs)
    reloaded = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(str(source))
    assert torch.equal(reloaded.lm_head.weight, example.model.lm_head.weight)


def test_cli_quantizes_and_verifies_the_example(tmp_path, capsys):
    out = tmp_path / "cli-out"
    code = cli.main(["--adapter", "qwen_vl", "--nsamples", "2", "--batch_size", "2", "--seqlen", "32",
                     "--iters", "1", "--group_size", "32", "--quant_vision", "-o", str(out)])
    assert code == 0
    assert PROCESSOR_FILES | {"model.safetensors", "config.json"} <= set(os.listdir(out))
    assert cli.main(["verify", "--adapter", "qwen_vl", "--quant_vision", "--nsamples", "2"]) == 0
    assert "OK: every block within" in capsys.readouterr().out


@pytest.mark.parametrize("images", ["missing-folder", "notes.txt"])
def test_bad_images_argument_is_a_usage_error(tmp_path, capsys, images):
    (tmp_path / "notes.txt").write_text("not images")
    code = cli.main(["verify", "--adapter", "qwen_vl", "--images", str(tmp_path / images)])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: ")
