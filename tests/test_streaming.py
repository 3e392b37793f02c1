"""Streaming correctness: sharded and single-file sources, fp16/bf16/fp32 sources and tied embeddings
load block by block and quantize; reads are plain copies (no mapped shard stays resident); the
report's peak RAM is the process's real high-water mark."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from blockquant import api
from blockquant.adapters.generic import build_example
from blockquant.resources.memory import peak_rss_bytes
from blockquant.model.model_io import WeightStore

RUN = dict(iters=2, nsamples=2, seqlen=16, batch_size=2, group_size=32, device="cpu")


def save(folder, dtype=torch.float32, tied=False, shard=None, seed=0):
    ex = build_example("llama", layers=2, hidden=64, seed=seed)
    model = ex.model
    if tied:
        model.config.tie_word_embeddings = True
        model.tie_weights() if hasattr(model, "tie_weights") else None
        model.lm_head.weight = model.model.embed_tokens.weight
    model.to(dtype)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(folder, **kwargs)
    ex.processor.save_pretrained(folder)
    return str(folder)


def quantize(model, out):
    return api.quantize(model, "generic", output_dir=str(out), **RUN)


def tensors(out) -> dict[str, torch.Tensor]:
    files = [f for f in os.listdir(out) if f.endswith(".safetensors")]
    merged = {}
    for f in files:
        merged.update(load_file(os.path.join(out, f)))
    return merged


def test_sharded_and_single_file_sources_give_the_same_output(tmp_path):
    single = save(tmp_path / "single")
    sharded = save(tmp_path / "sharded", shard="60KB")
    assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(sharded) if f.endswith(".safetensors")]) > 2
    a, b = tensors(quantize(single, tmp_path / "a").output_dir), tensors(quantize(sharded, tmp_path / "b").output_dir)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_source_dtypes_stream_and_keep_their_dtype(tmp_path, dtype):
    model = save(tmp_path / "model", dtype=dtype)
    result = quantize(model, tmp_path / "out")
    out = tensors(result.output_dir)
    assert "model.layers.1.mlp.down_proj.qweight" in out
    assert out["model.layers.1.mlp.down_proj.scales"].dtype == torch.float16
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.input_layernorm.weight"):
        assert out[name].dtype == dtype, name
    source = load_file(os.path.join(model, "model.safetensors"))
    assert torch.equal(out["model.norm.weight"], source["model.norm.weight"])
    # block weights existed only while their block was processed
    blocks = result.run.model.model.layers
    assert all(p.device.type == "meta" for p in blocks.parameters())
    assert result.run.loader.loaded_bytes > 0
    assert result.report.peak_ram_bytes > 0 and all(b.first_loss is not None for b in result.report.blocks)


def test_tied_embeddings_load_and_are_saved_once(tmp_path):
    model = save(tmp_path / "model", tied=True)
    with safe_open(os.path.join(model, "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    result = quantize(model, tmp_path / "out")
    m = result.run.model
    assert m.lm_head.weight is m.model.embed_tokens.weight
    out = tensors(result.output_dir)
    assert "model.embed_tokens.weight" in out and "lm_head.weight" not in out
    assert "model.layers.0.self_attn.q_proj.qweight" in out


def test_weight_store_reads_copies_not_maps(tmp_path):
    folder = save(tmp_path / "model")
    store = WeightStore(folder)
    name = "model.layers.0.mlp.up_proj.weight"
    first = store.get(name)
    assert store.nbytes(name) == first.numel() * first.element_size()
    before = first.clone()
    path = os.path.join(folder, "model.safetensors")
    with open(path, "r+b") as f:   # zero the whole data section: a copy does not change
        f.seek(8 + int.from_bytes(f.read(8), "little"))
        f.write(bytes(os.path.getsize(path) - f.tell()))
    assert torch.equal(first, before)
    assert not store.get(name).any()


def test_peak_ram_is_the_real_high_water_mark():
    """A 256 MiB allocation that is freed again stays in the peak but not in the current RSS."""
    code = (
        "from blockquant.resources.memory import peak_rss_bytes, current_rss_bytes\n"
        "before = peak_rss_bytes()\n"
        "buf = bytearray(256 * 2**20)\n"
        "for i in range(0, len(buf), 4096): buf[i] = 1\n"
        "del buf\n"
        "print(before, peak_rss_bytes(), current_rss_bytes())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    before, peak, now = map(int, out.split())
    assert peak - before >= 250 * 2 ** 20
    assert peak - now >= 250 * 2 ** 20
    assert peak_rss_bytes() > 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
def test_freed_layer_sized_buffers_leave_the_resident_set():
    """After map_large_allocations (every run calls it), 4 MiB buffers interleaved with small live
    ones go back to the OS when freed (with glibc's default dynamic threshold they stay resident:
    259 of 260 MiB on this project's machines)."""
    code = (
        "import sys, torch\n"
        "from blockquant.resources.memory import map_large_allocations, current_rss_bytes\n"
        "mapped = sys.argv[1] == 'on' and map_large_allocations()\n"
        "warm = torch.empty(8 << 20, dtype=torch.uint8); warm.fill_(1); del warm\n"
        "base, big, small = current_rss_bytes(), [], []\n"
        "for i in range(64):\n"
        "    big.append(torch.ones(4 << 20, dtype=torch.uint8))\n"
        "    small.append(torch.ones(64 << 10, dtype=torch.uint8))\n"
        "peak = current_rss_bytes()\n"
        "del big\n"
        "print(int(mapped), (peak - base) >> 20, (current_rss_bytes() - base) >> 20)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, "on"], capture_output=True, text=True, check=True).stdout
    mapped, grew, left = map(int, out.split())
    if not mapped:
        pytest.skip("not glibc")
    assert grew >= 250 and left < 32


def test_all_finite_checks_every_chunk():
    from blockquant.model.model_io import all_finite

    t = torch.zeros(10, 7, dtype=torch.bfloat16)
    assert all_finite(t, chunk=16)
    for bad in (float("nan"), float("inf"), float("-inf")):
        u = t.clone()
        u[-1, -1] = bad              # in the last, short chunk
        assert not all_finite(u, chunk=16)
    assert all_finite(torch.empty(0, 3))


def test_predicted_output_size_matches_the_written_checkpoint(tmp_path):
    """The free-disk check's estimate is close to what a run really writes."""
    from blockquant.resources.budget import predicted_output_bytes

    result = quantize(save(tmp_path / "model", dtype=torch.bfloat16), tmp_path / "out")
    written = sum(os.path.getsize(os.path.join(result.output_dir, f))
                  for f in os.listdir(result.output_dir) if f.endswith(".safetensors"))
    assert 0.8 * written <= predicted_output_bytes(result.run) <= 1.2 * written


def test_weight_store_floating_dtype_comes_from_the_headers(tmp_path):
    from safetensors.torch import save_file

    save_file({"a.ids": torch.arange(4), "b.weight": torch.ones(2, 2, dtype=torch.bfloat16)}, str(tmp_path / "model.safetensors"))
    assert WeightStore(str(tmp_path)).floating_dtype() == torch.bfloat16
    save_file({"a.ids": torch.arange(4)}, str(tmp_path / "ints.safetensors"))
    assert WeightStore(str(tmp_path), prefix="ints").floating_dtype() == torch.float32     # no float tensor
