"""Every command on folders stored the way models are published: bfloat16 (one float16 case), weights
split into safetensors shards with an index.  ``quant verify`` runs in the engine's compute precision."""
import json
import os

import pytest
import torch

from blockquant import api, load_quantized
from blockquant.frame import plugins
from blockquant.frame.cli import main
from blockquant.model.published import publish_like


def _published(tmp_path_factory, adapter: str, dtype=torch.bfloat16, example=None) -> str:
    if example is None:
        example = plugins.run_manager(plugins.get_adapter(adapter)).hook.example_model()
    folder = str(tmp_path_factory.mktemp(f"{adapter}-published") / example.name)
    example.save(folder)
    assert publish_like(folder, dtype)
    return folder


@pytest.fixture(scope="module")
def qwen3_bf16(tmp_path_factory):
    from blockquant.adapters.generic import build_example

    return _published(tmp_path_factory, "generic", example=build_example("qwen3"))


def test_published_folder_is_sharded_bf16_with_index(qwen3_bf16):
    index = json.load(open(os.path.join(qwen3_bf16, "model.safetensors.index.json")))
    files = sorted(set(index["weight_map"].values()))
    assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert not os.path.exists(os.path.join(qwen3_bf16, "model.safetensors"))
    assert json.load(open(os.path.join(qwen3_bf16, "config.json")))["dtype"] == "bfloat16"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(qwen3_bf16)   # Qwen3's class and special tokens: no bos
    assert type(tok).__name__ == "Qwen2Tokenizer" and (tok.bos_token, tok.eos_token) == (None, "<|endoftext|>")


@pytest.fixture(scope="module")
def builtin_bf16(tmp_path_factory):
    """builtin_bf16(adapter) -> the adapter's example saved as a bf16 sharded folder (once per module)."""
    cache = {}
    return lambda adapter: cache.get(adapter) or cache.setdefault(adapter, _published(tmp_path_factory, adapter))


# The tokenizer classes the families publish: (folder inside the model, class, special tokens).  Llama 3
# ships its byte-level BPE in the plain fast class, which transformers 5 saves and loads as TokenizersBackend.
FAMILY_TOKENIZERS = {
    "generic": [("", "TokenizersBackend", {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"})],
    "gemma4": [("", "GemmaTokenizer", {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"})],
    "qwen_vl": [("", "Qwen2Tokenizer", {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})],
    "flux": [("tokenizer", "CLIPTokenizer", {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>"}),
             ("tokenizer_2", "T5Tokenizer", {"eos_token": "</s>", "pad_token": "<pad>"})],
}


def _check_tokenizers(folder: str, adapter: str) -> None:
    from transformers import AutoTokenizer

    for sub, class_name, specials in FAMILY_TOKENIZERS[adapter]:
        path = os.path.join(folder, sub)
        assert json.load(open(os.path.join(path, "tokenizer_config.json")))["tokenizer_class"] == class_name
        tok = AutoTokenizer.from_pretrained(path)
        assert type(tok).__name__ == class_name
        assert {key: getattr(tok, key) for key in specials} == specials
        ids = tok("the return value")["input_ids"]
        assert (ids[0] == tok.bos_token_id) == (specials.get("bos_token") is not None)   # bos added where it exists
        assert tok.decode(ids, skip_special_tokens=True).strip() == "the return value"


@pytest.mark.parametrize("adapter", ["generic", "gemma4", "qwen_vl", "flux"])
def test_every_builtin_example_has_its_family_tokenizer_and_quantizes(builtin_bf16, adapter, tmp_path):
    folder = builtin_bf16(adapter)
    _check_tokenizers(folder, adapter)
    out = str(tmp_path / "out")
    steps = ["--set", "num_inference_steps=2"] if adapter == "flux" else []
    assert main(["quantize", folder, "--adapter", adapter, "--iters", "1", "--nsamples", "2", "--seqlen", "32",
                 "--batch_size", "2", "-o", out] + steps) == 0
    _check_tokenizers(out, adapter)   # the quantized folder carries the same tokenizer


@pytest.mark.parametrize("adapter", ["generic", "gemma4", "qwen_vl", "flux"])
def test_verify_bf16_sharded_folder_for_every_builtin_adapter(builtin_bf16, adapter, capsys):
    folder = builtin_bf16(adapter)
    weights = os.path.join(folder, "transformer" if adapter == "flux" else "")
    assert any(f.endswith(".safetensors.index.json") for f in os.listdir(weights))
    steps = ["--set", "num_inference_steps=2"] if adapter == "flux" else []
    assert main(["verify", "--adapter", adapter, folder, "--nsamples", "2", "--seqlen", "32"] + steps) == 0
    out = capsys.readouterr().out
    assert "both in float32" in out and "OK: every block within 1e-05" in out, out


def test_verify_float16_folder(tmp_path_factory):
    from blockquant.adapters.generic import build_example

    folder = _published(tmp_path_factory, "generic", torch.float16, build_example("llama"))
    report = api.verify(folder, adapter="generic", nsamples=2, seqlen=32)
    assert report.ok and report.dtype == "float32" and report.max_error <= 1e-5, report.render()


def test_quantize_and_load_bf16_sharded_folder(qwen3_bf16, tmp_path):
    out = str(tmp_path / "out")
    result = api.quantize(qwen3_bf16, adapter="generic", iters=2, nsamples=2, seqlen=32, batch_size=2, group_size=32,
                          output_dir=out)
    assert len(result.report.quantized_layers) == 28
    model = load_quantized(out, dtype=torch.float32)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[0, 5, 9, 17]])).logits
    assert logits.shape[-1] == 512 and torch.isfinite(logits).all()
    # non-block tensors keep the checkpoint's bfloat16
    from safetensors import safe_open

    files = [f for f in os.listdir(out) if f.endswith(".safetensors")]
    dtypes = {}
    for f in files:
        with safe_open(os.path.join(out, f), "pt") as st:
            for k in st.keys():
                if k.endswith("embed_tokens.weight"):
                    dtypes[k] = st.get_tensor(k).dtype
    assert set(dtypes.values()) == {torch.bfloat16}
