"""ShardWriter: shard boundaries, index, single file, resume, determinism, safetensors validity."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from blockquant.errors import BlockquantError
from blockquant.export.shards import ShardWriter, write_safetensors


def group(i: int, numel: int = 256) -> dict[str, torch.Tensor]:
    """A block's worth of tensors: 4 bytes * numel int32 + 2 bytes * numel fp16 (+ a small fp32)."""
    g = torch.Generator().manual_seed(i)
    return {
        f"layers.{i}.q.qweight": torch.randint(-2**31, 2**31 - 1, (numel,), generator=g, dtype=torch.int32),
        f"layers.{i}.q.scales": torch.randn(numel, generator=g).half(),
        f"layers.{i}.norm.weight": torch.randn(8, generator=g),
    }


GROUP_BYTES = 256 * 4 + 256 * 2 + 8 * 4   # 1568


def files_of(folder: str) -> dict[str, bytes]:
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}


def write_all(folder, groups, max_size, flush_every=True):
    writer = ShardWriter(folder, max_shard_size=max_size)
    for i in groups:
        writer.add(group(i))
        if flush_every:
            writer.flush()
    return writer.finish()


def test_shard_boundaries_and_index(tmp_path):
    # 3 groups fit under 5000 bytes, a 4th would not: shards of 3, 3 and 1 groups.
    names = write_all(str(tmp_path), range(7), max_size=5000)
    assert names == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)] + ["model.safetensors.index.json"]
    assert sorted(os.listdir(tmp_path)) == sorted(names)
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    assert index["metadata"]["total_size"] == 7 * GROUP_BYTES
    expected = {name: f"model-0000{i // 3 + 1}-of-00003.safetensors" for i in range(7) for name in group(i)}
    assert index["weight_map"] == expected
    for k in (1, 2, 3):
        path = tmp_path / f"model-0000{k}-of-00003.safetensors"
        loaded = load_file(path)
        members = [i for i in range(7) if i // 3 + 1 == k]
        assert set(loaded) == {n for i in members for n in group(i)}
        for i in members:
            for n, t in group(i).items():
                assert torch.equal(loaded[n], t) and loaded[n].dtype == t.dtype
        with safe_open(path, "pt") as f:
            assert f.metadata() == {"format": "pt"}


def test_single_file_without_index(tmp_path):
    names = write_all(str(tmp_path), range(3), max_size=10 ** 9)
    assert names == ["model.safetensors"] and os.listdir(tmp_path) == ["model.safetensors"]
    expected = {n: t for i in range(3) for n, t in group(i).items()}
    assert open(tmp_path / "model.safetensors", "rb").read() == save(expected, {"format": "pt"})


def test_oversized_group_gets_its_own_shard(tmp_path):
    writer = ShardWriter(str(tmp_path), prefix="diffusion_pytorch_model", max_shard_size=2000)
    writer.add(group(0, numel=16))          # small
    writer.add(group(1, numel=2048))        # 12 KiB > limit: its own shard
    writer.add(group(2, numel=16))
    names = writer.finish()
    assert names[-1] == "diffusion_pytorch_model.safetensors.index.json"
    weight_map = json.load(open(tmp_path / names[-1]))["weight_map"]
    shard_of = {i: {weight_map[n] for n in group(i)} for i in range(3)}
    assert all(len(s) == 1 for s in shard_of.values())
    assert len({next(iter(s)) for s in shard_of.values()}) == 3


def test_flush_points_and_repeats_give_identical_bytes(tmp_path):
    a, b, c = (str(tmp_path / x) for x in "abc")
    write_all(a, range(7), 5000, flush_every=True)
    write_all(b, range(7), 5000, flush_every=False)
    write_all(c, range(7), 5000, flush_every=True)
    assert files_of(a) == files_of(b) == files_of(c)


@pytest.mark.parametrize("stop_after", [1, 3, 5])
def test_resume_gives_identical_bytes(tmp_path, stop_after):
    ref, out = str(tmp_path / "ref"), str(tmp_path / "out")
    write_all(ref, range(7), 5000)

    writer = ShardWriter(out, max_shard_size=5000)
    for i in range(stop_after):
        writer.add(group(i))
        writer.flush()
    state = json.loads(json.dumps(writer.state()))
    # The run goes on a little past the recorded state, then dies: those files must not count.
    writer.add(group(stop_after))
    writer.flush()
    writer.add(group(stop_after + 1))
    del writer

    resumed = ShardWriter.resume(out, "model", 5000, state)
    for i in range(stop_after, 7):
        resumed.add(group(i))
        resumed.flush()
    resumed.finish()
    assert files_of(out) == files_of(ref)


def test_state_lists_shards_with_tensor_names_and_sizes(tmp_path):
    writer = ShardWriter(str(tmp_path), max_shard_size=5000)
    for i in range(4):
        writer.add(group(i))
    state = writer.state()
    assert [len(s["parts"]) for s in state["shards"]] == [1, 1]
    assert state["shards"][0]["tensors"] == {n: t.numel() * t.element_size() for i in range(3) for n, t in group(i).items()}
    assert set(state["shards"][1]["tensors"]) == set(group(3))
    assert all(os.path.isfile(tmp_path / p) for s in state["shards"] for p in s["parts"])


def test_resume_refuses_missing_or_damaged_files_and_other_settings(tmp_path):
    writer = ShardWriter(str(tmp_path), max_shard_size=5000)
    for i in range(4):
        writer.add(group(i))
        writer.flush()
    state = writer.state()
    with pytest.raises(BlockquantError, match="other settings"):
        ShardWriter.resume(str(tmp_path), "model", 4000, state)
    os.remove(tmp_path / state["shards"][0]["parts"][1])
    with pytest.raises(BlockquantError, match="missing"):
        ShardWriter.resume(str(tmp_path), "model", 5000, state)
    part = tmp_path / state["shards"][0]["parts"][0]   # a flipped bit: refused on resume and on finish
    data = bytearray(part.read_bytes())
    data[-3] ^= 0x10
    part.write_bytes(bytes(data))
    with pytest.raises(BlockquantError, match="is damaged .*--fresh"):
        ShardWriter.resume(str(tmp_path), "model", 5000, state)
    with pytest.raises(BlockquantError, match="is damaged"):
        writer.finish()


class _Died(Exception):
    pass


@pytest.mark.parametrize("stop_at", [1, 2, 3])
def test_resume_after_an_interrupted_finish(tmp_path, stop_at):
    """finish() records each shard through ``saved``; a finish that died after any record resumes to the same files."""
    ref, out = str(tmp_path / "ref"), str(tmp_path / "out")
    write_all(ref, range(7), 5000)
    writer = ShardWriter(out, max_shard_size=5000)
    for i in range(7):
        writer.add(group(i))
        writer.flush()
    states = [writer.state()]

    def saved(state):
        states.append(state)
        if len(states) == stop_at + 1:
            raise _Died

    with pytest.raises(_Died):
        writer.finish(saved)
    resumed = ShardWriter.resume(out, "model", 5000, states[-1])
    resumed.finish()
    assert files_of(out) == files_of(ref)


def test_duplicate_names_are_refused(tmp_path):
    writer = ShardWriter(str(tmp_path), max_shard_size=5000)
    writer.add(group(0))
    with pytest.raises(BlockquantError, match="written twice"):
        writer.add({"layers.0.q.qweight": torch.zeros(4)})
    for i in range(1, 4):
        writer.add(group(i))
    resumed = ShardWriter.resume(str(tmp_path), "model", 5000, writer.state())
    with pytest.raises(BlockquantError, match="written twice"):
        resumed.add(group(0))


def test_shared_storage_and_views_are_written(tmp_path):
    base = torch.arange(12, dtype=torch.float32)
    writer = ShardWriter(str(tmp_path))
    writer.add({"a": base, "tied": base, "view": base[4:8], "t": base.reshape(3, 4).t()})
    writer.finish()
    loaded = load_file(tmp_path / "model.safetensors")
    assert torch.equal(loaded["tied"], base) and torch.equal(loaded["view"], base[4:8])
    assert torch.equal(loaded["t"], base.reshape(3, 4).t())


def test_finish_removes_stale_shards_of_the_prefix(tmp_path):
    write_all(str(tmp_path), range(7), 5000)
    (tmp_path / "keep.txt").write_text("x")
    names = write_all(str(tmp_path), range(2), 10 ** 9)
    assert sorted(os.listdir(tmp_path)) == sorted(names + ["keep.txt"])


def test_writer_matches_safetensors_for_every_dtype(tmp_path):
    dtypes = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
              torch.int16, torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn]
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": (torch.randn(3, 5, generator=g) * 9).to(dt) for i, dt in enumerate(dtypes)}
    tensors.update(scalar=torch.tensor(2.5), empty=torch.zeros(0, 3))
    from blockquant.export.shards import _order
    write_safetensors(str(tmp_path / "x.safetensors"), _order(tensors.items()))
    assert (tmp_path / "x.safetensors").read_bytes() == save(tensors, {"format": "pt"})
