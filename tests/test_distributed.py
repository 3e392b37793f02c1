"""Data-parallel runs (core/resources/distributed.py) in real processes: 2 gloo ranks on the CPU.

One pair of processes (torch.multiprocessing, gloo over a file rendezvous; started once for the
module: each start imports torch and transformers) runs the real engine on tiny saved models - the
first block's all-reduced gradient, a usage error, a generic and a Gemma 4 export; the tests compare
what they wrote with single-process runs in the test process.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from blockquant import api, load_quantized
from blockquant.algorithm.tuning import tune_block
from blockquant.model.blocks import choose_layers
from blockquant.resources import distributed
from blockquant.run.replay import Replayer, stream_loss, stream_sse

SAMPLES = dict(nsamples=6, seqlen=16, batch_size=4, seed=3)
RANKS = 2


def _ranks(fn, folder: str, *args):
    """Run ``fn(rank, *args)`` in RANKS processes joined in one gloo group."""
    mp.spawn(_entry, args=(fn, os.path.join(folder, "rendezvous"), args), nprocs=RANKS, join=True)


def _entry(rank, fn, rendezvous, args):
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=RANKS)
    try:
        fn(rank, *args)
    finally:
        tdist.destroy_process_group()


def _first_block_gradients(folder: str, out: str | None, chunk: int | None = None) -> dict[str, torch.Tensor]:
    """Capture (sharded when a process group is up), then one tuning iteration of block 0 with the
    loop's loss: the gradients the SignSGD step sees (all-reduced under a process group)."""
    run = api.prepare(folder, "generic", api.make_settings(device="cpu", iters=2, group_size=32, **SAMPLES))
    run.dp = distributed.start(run.device)
    api.capture_inputs(run)
    block = run.groups[0][0]
    run.loader.load(block)
    for p in block.module.parameters():
        p.requires_grad_(False)
    replayer = Replayer(run.hooks, run.stores[0], run.device, run.compute_dtype)
    streams = [None if s is None else dict(s) for s in run.stores[0].streams]
    states = [{} for _ in streams]
    with torch.no_grad():
        targets = replayer.run(block, streams, states, "fp", batch=4)
        targets = [None if t is None else {k: v * 1.01 for k, v in t.items()} for t in targets]   # a loss > 0 at v = 0

    def loss_fn(indices):
        outs = replayer.run(block, streams, states, "quant", indices, batch=chunk or len(indices))
        wanted = [targets[i] for i in indices]
        return run.dp.mean_loss(*stream_sse(outs, wanted))[0] if run.dp else stream_loss(outs, wanted)

    seen: dict[str, torch.Tensor] = {}
    layers = choose_layers(block, run.settings.scheme, (), ()).quantize
    names = [f"{name}.v" for name in layers] + [f"{name}.{part}" for name in layers for part in ("min_scale", "max_scale")]

    def reduce_grads(params):
        if run.dp:
            run.dp.reduce_grads(params)
        if not seen:
            seen.update({n: p.grad.clone() for n, p in zip(names, params)})

    # one mini-batch of every sample: under a process group each rank draws all it holds (its share)
    held, batch = None, len(streams)
    if run.dp:
        held = [i for i, s in enumerate(streams) if s is not None]
        batch = run.dp.batch_share(len(held), len(streams))
    tune_block(layers, run.settings.scheme, loss_fn, len(streams), iters=2, lr=0.5, minmax_lr=0.5, batch_size=batch,
               gradient_accumulate_steps=1, seed=0, reduce_grads=reduce_grads, samples=held)
    held = sum(s is not None for s in streams)
    assert held < len(streams) if run.dp else held == len(streams)
    if out:
        torch.save(seen, out)
    return seen


GENERIC = dict(SAMPLES, device="cpu", iters=30, group_size=32)
GEMMA = dict(nsamples=4, seqlen=24, batch_size=2, group_size=32, iters=3, device="cpu")
RESUME_ARGS = ["--adapter", "generic", "--iters", "15", "--nsamples", "2", "--seqlen", "16", "--batch_size", "2",
               "--group_size", "32", "--device", "cpu", "--seed", "5"]
RESUME = dict(adapter="generic", iters=15, nsamples=2, seqlen=16, batch_size=2, group_size=32, device="cpu", seed=5)


def _on_each_rank(rank, work: str, generic: str, gemma: str, four_blocks: str):
    from blockquant.errors import UsageError

    dp = distributed.start(torch.device("cpu"))
    held = list(range(rank, 8, 2)) + ([9] if rank == 0 else [])     # rank 0 holds 5 samples, rank 1 holds 4
    torch.save({batch: dp.batch_share(len(held), batch) for batch in (1, 2, 4, 8, 9, 20)}, os.path.join(work, f"shares.{rank}"))

    api.quantize(four_blocks, output_dir=os.path.join(work, "uninterrupted"), **RESUME)
    _first_block_gradients(generic, os.path.join(work, f"grads.{rank}"))
    with pytest.raises(UsageError, match="every rank needs one"):
        api.quantize(generic, adapter="generic", output_dir=os.path.join(work, "none"), **dict(GENERIC, nsamples=1))
    api.quantize(generic, adapter="generic", output_dir=os.path.join(work, "generic"), **GENERIC)
    api.quantize(gemma, adapter="gemma4", output_dir=os.path.join(work, "gemma4"), **GEMMA)


@pytest.fixture(scope="module")
def two_ranks(tiny_folder, tmp_path_factory):
    """What the two ranks wrote (folder), the generic model folder, the Gemma 4 example and its folder."""
    from blockquant.adapters import gemma4

    work = str(tmp_path_factory.mktemp("ranks"))
    example = gemma4.example_text()
    gemma = os.path.join(work, "gemma4-model")
    example.save(gemma)
    generic = tiny_folder("llama", 2, 64)
    _ranks(_on_each_rank, work, work, generic, gemma, tiny_folder("llama", 4, 64))
    return work, generic, example, gemma


def test_each_rank_draws_its_share_of_a_mini_batch(two_ranks):
    """A mini-batch is split in proportion to the samples each rank holds (5 and 4 here), at least one
    each, never more than a rank holds; the shares add up to the batch size."""
    work = two_ranks[0]
    shares = [torch.load(os.path.join(work, f"shares.{rank}")) for rank in range(RANKS)]
    got = {batch: (shares[0][batch], shares[1][batch]) for batch in shares[0]}
    assert got == {1: (1, 1), 2: (1, 1), 4: (2, 2), 8: (4, 4), 9: (5, 4), 20: (5, 4)}


def test_all_reduced_gradient_equals_single_process(two_ranks):
    """Equal up to float summation order.  Rounding offsets: to 1e-5 of the largest entry.  Clipping
    scales: their gradients sum many cancelling terms in float32 (values ~1e-9..1e-7 with a noise floor
    ~5e-10), so the bound is twice the largest gap the one-process gradient itself shows when the same
    mini-batch runs one sample at a time."""
    work, folder, _, _ = two_ranks
    single = _first_block_gradients(folder, None)
    reordered = _first_block_gradients(folder, None, chunk=1)
    ranks = [torch.load(os.path.join(work, f"grads.{rank}")) for rank in range(RANKS)]
    floor = max((reordered[n] - g).abs().max().item() for n, g in single.items() if not n.endswith(".v"))
    assert 0 < floor < 1e-8
    for name, g in single.items():
        assert g.abs().max() > 0, name
        bound = 1e-5 * g.abs().max().item() if name.endswith(".v") else 2 * floor
        for got in ranks:
            assert got[name].shape == g.shape
            assert (got[name] - g).abs().max().item() <= bound, name
    for name in single:        # every rank steps with the same gradient
        assert torch.equal(ranks[0][name], ranks[1][name]), name


def _logits(folder_or_model, ids):
    model = load_quantized(folder_or_model) if isinstance(folder_or_model, str) else folder_or_model
    with torch.no_grad():
        return model(ids, use_cache=False).logits.float()


def _kl(fp, q):
    return torch.nn.functional.kl_div(q.log_softmax(-1), fp.log_softmax(-1), log_target=True, reduction="batchmean").item()


def _codes(folder):
    from safetensors.torch import load_file

    return {k: v for f in sorted(os.listdir(folder)) if f.endswith(".safetensors")
            for k, v in load_file(os.path.join(folder, f)).items() if k.endswith("qweight")}


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([(packed >> (4 * i)) & 15 for i in range(8)])


def test_two_ranks_match_one_process_generic(two_ranks, tmp_path):
    """The 2-rank export loads, is complete (no partial folder left), and its quality is the single
    run's; one calibration batch for two ranks was a usage error on both (``_on_each_rank``)."""
    work, folder, _, _ = two_ranks
    api.quantize(folder, adapter="generic", output_dir=str(tmp_path / "one"), **GENERIC)
    two_dir = os.path.join(work, "generic")
    assert not os.path.exists(two_dir + ".partial") and not os.path.exists(os.path.join(work, "none"))
    one, two = _codes(str(tmp_path / "one")), _codes(two_dir)
    assert one.keys() == two.keys() and len(one) == 14
    from transformers import AutoModelForCausalLM

    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    fp = _logits(AutoModelForCausalLM.from_pretrained(folder).eval(), ids)
    kl_one, kl_two = _kl(fp, _logits(str(tmp_path / "one"), ids)), _kl(fp, _logits(two_dir, ids))
    same = sum((_nibbles(one[k]) == _nibbles(two[k])).sum().item() for k in one) / (8 * sum(v.numel() for v in one.values()))
    print(f"KL to fp: one process {kl_one:.3e}, two ranks {kl_two:.3e}; identical 4-bit codes {same:.1%}")
    # SignSGD takes sign(gradient): entries near zero flip with the summation order and the runs part
    # ways (bench/distributed.py measures the gap on longer runs); the quality stays the same
    assert abs(kl_two - kl_one) <= 0.25 * kl_one and same > 0.5


def test_gemma4_shared_kv_under_two_ranks(two_ranks, tmp_path):
    """Gemma 4's KV-shared layers read per-sample replay state: with the samples sharded it stays per
    rank, and the export matches a one-process run's quality."""
    work, _, example, gemma = two_ranks
    one = api.quantize(gemma, adapter="gemma4", output_dir=str(tmp_path / "one"), **GEMMA).output_dir
    model = load_quantized(os.path.join(work, "gemma4"))
    assert sum(type(m).__name__ == "QuantLinear" for m in model.modules()) == 32
    ids = example.processor(["Shared keys and values are read by later layers."], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        fp = example.model(ids, use_cache=False).logits
        two_q, one_q = model(ids, use_cache=False).logits, load_quantized(one)(ids, use_cache=False).logits
    assert torch.isfinite(two_q).all()
    cos = [torch.nn.functional.cosine_similarity(q.flatten(), fp.flatten(), dim=0).item() for q in (one_q, two_q)]
    print(f"Gemma 4 logits cosine to fp: one process {cos[0]:.3f}, two ranks {cos[1]:.3f}")
    assert cos[1] > 0.7 and abs(cos[1] - cos[0]) < 0.05


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of rank ``rank`` among the processes ``parent`` (the launcher) started (Linux /proc)."""
    try:
        with open(f"/proc/{parent}/task/{parent}/children") as f:
            children = [int(c) for c in f.read().split()]
    except OSError:
        return None
    for pid in children:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if f"RANK={rank}".encode() in f.read().split(b"\0"):
                    return pid
        except OSError:
            continue
    return None


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the rank's process in /proc")
def test_resume_after_a_rank_dies(two_ranks, tiny_folder, tmp_path):
    """``quant --nproc 2``; rank 1 is SIGKILLed after a finished block; the same command resumes and the
    weights are byte-identical to an uninterrupted 2-rank run (the fixture's, same settings)."""
    import json
    import signal
    import subprocess
    import sys
    import time

    work = two_ranks[0]
    quant = os.path.join(os.path.dirname(sys.executable), "quant")
    out = str(tmp_path / "out")
    cmd = [quant, tiny_folder("llama", 4, 64), "-o", out, "--nproc", "2"] + RESUME_ARGS
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    progress, killed, deadline = os.path.join(out + ".partial", "progress.json"), False, time.time() + 240
    while not killed and time.time() < deadline and proc.poll() is None:
        try:
            with open(progress) as f:
                done = json.load(f)["blocks_done"]
        except (OSError, ValueError, KeyError):
            done = 0
        pid = _rank_pid(proc.pid, 1) if done >= 1 else None
        if pid:
            os.kill(pid, signal.SIGKILL)
            killed = True
        time.sleep(0.02)
    _, stderr = proc.communicate(timeout=120)
    assert killed and proc.returncode != 0, stderr[-2000:]
    with open(progress) as f:
        assert 1 <= json.load(f)["blocks_done"] < 4
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resumed after model.layers." in open(os.path.join(out, "blockquant_report.json")).read()
    names = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert names == sorted(f for f in os.listdir(os.path.join(work, "uninterrupted")) if f.endswith(".safetensors"))
    for name in names:
        with open(os.path.join(out, name), "rb") as a, open(os.path.join(work, "uninterrupted", name), "rb") as b:
            assert a.read() == b.read(), name
