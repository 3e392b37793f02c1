"""The flux adapter's tiny offline FluxPipeline: deterministic folder, loads with diffusers, generates."""
import json
import os

import pytest
import torch

pytest.importorskip("diffusers")

from blockquant.adapters import flux  # noqa: E402
from blockquant.adapters.flux.example import build_pipeline, save_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two independently built pipelines saved to two folders."""
    folders = []
    for tag in ("a", "b"):
        folder = str(tmp_path_factory.mktemp(f"flux-{tag}") / "pipe")
        save_pipeline(build_pipeline(), folder)
        folders.append(folder)
    return folders


def _files(folder):
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def test_saved_folder_is_byte_identical_across_builds(saved):
    a, b = (_files(f) for f in saved)
    assert sorted(a) == sorted(b)
    assert "transformer/diffusion_pytorch_model.safetensors" in a
    different = [name for name in a if a[name] != b[name]]
    assert not different, f"files differ between two builds: {different}"


def test_folder_looks_like_a_hub_flux_folder(saved):
    with open(os.path.join(saved[0], "model_index.json")) as f:
        index = json.load(f)
    assert index["_class_name"] == "FluxPipeline"
    assert index["tokenizer_2"] == ["transformers", "T5TokenizerFast"]
    assert index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
    with open(os.path.join(saved[0], "transformer", "config.json")) as f:
        config = json.load(f)
    # packing: in_channels = 4 x latent channels; rope axes sum to the head dim
    assert config["in_channels"] == 64 and sum(config["axes_dims_rope"]) == config["attention_head_dim"]


def test_from_pretrained_generates_what_the_built_pipeline_generates(saved):
    from diffusers import FluxPipeline

    built = build_pipeline()
    loaded = FluxPipeline.from_pretrained(saved[0])
    loaded.set_progress_bar_config(disable=True)
    kw = dict(height=64, width=64, num_inference_steps=2, max_sequence_length=16, output_type="np")
    a = built("a red fox in the snow", generator=torch.Generator().manual_seed(3), **kw).images
    b = loaded("a red fox in the snow", generator=torch.Generator().manual_seed(3), **kw).images
    assert a.shape == (1, 64, 64, 3)
    assert torch.equal(torch.from_numpy(a), torch.from_numpy(b))


def test_tokenizers_encode_the_prompt_vocabulary():
    pipe = build_pipeline()
    clip = pipe.tokenizer("a red fox")["input_ids"]
    t5 = pipe.tokenizer_2("a red fox")["input_ids"]
    assert clip[0] == pipe.tokenizer.bos_token_id and clip[-1] == pipe.tokenizer.eos_token_id
    assert len(clip) <= 2 + 4          # learnt merges: about one token per word
    assert t5[-1] == pipe.tokenizer_2.eos_token_id and len(t5) == 4   # whole-word pieces + </s>
    assert pipe.tokenizer_2.unk_token_id not in t5
    assert "fox" in pipe.tokenizer.decode(clip) and "fox" in pipe.tokenizer_2.decode(t5)


def test_example_model_hook_carries_the_pipeline():
    example = flux.example_model()
    assert example.pipeline is not None and example.model is example.pipeline.transformer
    assert type(example.model).__name__ == "FluxTransformer2DModel"
    assert not any(k.startswith("_blockquant") for k in vars(example.model))    # nothing attached to the model
    # every linear layer of the blocks quantizes at the default W4A16 g128
    assert example.model.inner_dim % 128 == 0
