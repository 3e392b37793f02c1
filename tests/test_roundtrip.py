"""Export round trip through the whole engine: written folder == in-memory quantized model; determinism."""
import hashlib
import json
import os

import pytest
import torch

import blockquant
from blockquant import api


def digest(folder):
    out = {}
    for root, _, files in os.walk(folder):
        for f in sorted(files):
            if f.endswith(".safetensors"):
                with open(os.path.join(root, f), "rb") as fh:
                    out[f] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.mark.parametrize("fmt,sym,bits", [("auto_round", True, 4), ("auto_round", False, 4), ("auto_gptq", True, 8)])
def test_load_quantized_matches_in_memory_model(tiny_folder, tmp_path, fmt, sym, bits):
    out = tmp_path / "out"
    result = api.quantize(tiny_folder("llama"), adapter="generic", iters=4, nsamples=4, seqlen=32, batch_size=2,
                          group_size=32, bits=bits, sym=sym, format=fmt, output_dir=str(out), keep_blocks=True)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = result.model(input_ids=ids).logits
        loaded = blockquant.load_quantized(str(out))
        got = loaded(input_ids=ids).logits
    assert torch.allclose(got, expected, rtol=2e-3, atol=2e-3), (got - expected).abs().max()
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc == json.loads((out / "quantization_config.json").read_text())
    assert qc["bits"] == bits and qc["group_size"] == 32 and qc["sym"] is sym
    if fmt == "auto_round":
        assert qc["quant_method"] == "auto-round" and qc["block_name_to_quantize"] == "model.layers"
        assert qc["packing_format"] == ("auto_round:auto_gptq" if sym else "auto_round")
    else:
        assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == "gptq"
    assert (out / "tokenizer.json").exists() and (out / "generation_config.json").exists()
    assert not (out.parent / "out.partial").exists()


def test_same_seed_gives_byte_identical_files(tiny_folder, tmp_path):
    kwargs = dict(adapter="generic", iters=3, nsamples=4, seqlen=32, batch_size=2, group_size=32, seed=7)
    a = api.quantize(tiny_folder("llama"), output_dir=str(tmp_path / "a"), **kwargs).output_dir
    b = api.quantize(tiny_folder("llama"), output_dir=str(tmp_path / "b"), **kwargs).output_dir
    assert digest(a) == digest(b) and digest(a)


def test_existing_output_is_refused_without_overwrite(tiny_folder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(blockquant.UsageError, match="--overwrite"):
        api.quantize(tiny_folder("llama"), adapter="generic", iters=0, nsamples=2, seqlen=16, output_dir=str(out))
    assert (out / "keep.txt").read_text() == "mine"
