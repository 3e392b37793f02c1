"""The reliability battery: bad inputs and faults, each through the real ``quant`` CLI.

Every case gives the command, the exit code it must end with (2 usage/input, 1 runtime), a piece of
the one-line ``error:`` message, and checks that no Python traceback was printed and that no
complete-looking output (OUT/config.json with a quantization_config) exists afterwards.  Cases that
fail before a model loads run as subprocesses of the venv's ``quant``; model-loading cases run
``cli.main`` in-process (a subprocess per case costs ~10 s of imports on two cores), and a few of
those are repeated as subprocesses to pin the exit code and stderr of the real executable.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from blockquant.frame import cli

QUANT = os.path.join(os.path.dirname(sys.executable), "quant")
FAST = ["--adapter", "generic", "--iters", "0", "--nsamples", "2", "--seqlen", "16", "--group_size", "32",
        "--device", "cpu"]
ENV = dict(os.environ, HF_HUB_OFFLINE="1")


@pytest.fixture
def model(tiny_folder, tmp_path):
    """A private copy of a tiny 2-block llama folder, free to damage."""
    dst = tmp_path / "model"
    shutil.copytree(tiny_folder("llama", layers=2, hidden=64), dst)
    return str(dst)


def complete_output(out: str) -> bool:
    path = os.path.join(out, "config.json")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        return "quantization_config" in json.load(f)


def check(rc, stderr, out, want_rc, want_msg):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert rc == want_rc, stderr
    assert "Traceback" not in stderr, stderr
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    assert want_msg in errors[0], errors[0]
    assert not complete_output(out)


def run_subprocess(argv, timeout=240, preexec=None):
    p = subprocess.run([QUANT] + argv, capture_output=True, text=True, env=ENV, timeout=timeout, preexec_fn=preexec)
    return p.returncode, p.stderr


def fresh_log_handler():
    """Drop the CLI's log handler so the next cli.main binds one to this test's captured stderr."""
    import logging

    logger = logging.getLogger("blockquant")
    for h in [h for h in logger.handlers if getattr(h, "_blockquant", False)]:
        logger.removeHandler(h)


def run_inprocess(argv, capsys):
    fresh_log_handler()
    rc = cli.main(argv)
    return rc, capsys.readouterr().err


# ------------------------------------------------------------------- model damage for the cases

def _weights(model):
    return os.path.join(model, "model.safetensors")


def _rewrite(model, change):
    tensors = load_file(_weights(model))
    change(tensors)
    save_file(tensors, _weights(model), metadata={"format": "pt"})


def _edit_config(model, **values):
    path = os.path.join(model, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(values)
    with open(path, "w") as f:
        json.dump(config, f)


def _truncate(model):
    size = os.path.getsize(_weights(model))
    with open(_weights(model), "r+b") as f:
        f.truncate(size - 1000)


def _corrupt_header(model):
    with open(_weights(model), "r+b") as f:
        f.seek(8)
        f.write(b"\x00garbage{{{")


def _index_missing_shard(model):
    os.remove(_weights(model))
    with open(os.path.join(model, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}, f)


def _bad_json(model):
    with open(os.path.join(model, "config.json"), "w") as f:
        f.write("{not json")


def _nan_weight(t):
    t["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")


def _text(tmp, name, text):
    path = os.path.join(tmp, name)
    with open(path, "w") as f:
        f.write(text)
    return path


# Each case: id, how to build (model, tmp) -> argv, exit code, message, subprocess?
CASES = [
    ("missing-folder", lambda m, t: [os.path.join(t, "nope")], 2, "does not exist", True),
    ("model-is-file", lambda m, t: [_weights(m)], 2, "is a file", False),
    ("hub-name-offline", lambda m, t: ["someorg/somemodel"], 2, "hub is offline", False),
    ("no-config", lambda m, t: (os.remove(os.path.join(m, "config.json")), [m])[1], 2, "neither config.json", False),
    ("config-not-json", lambda m, t: (_bad_json(m), [m])[1], 2, "not valid JSON", False),
    ("unknown-adapter", lambda m, t: [m, "--adapter", "nosuch"], 2, "unknown adapter 'nosuch'", False),
    # checked in the order that costs the user least: a wrong path before any adapter is looked up,
    # an unknown adapter before a hub download
    ("missing-folder-and-adapter", lambda m, t: [os.path.join(t, "nope"), "--adapter", "nosuch"], 2, "does not exist",
     False),
    ("hub-name-unknown-adapter", lambda m, t: ["someorg/somemodel", "--adapter", "nosuch"], 2,
     "unknown adapter 'nosuch'", False),
    ("unsupported-model-type", lambda m, t: (_edit_config(m, model_type="made_up_lm", architectures=["MadeUpLM"]),
                                          [m, "--adapter", ""])[1],
     2, "no adapter handles model_type 'made_up_lm'", False),
    ("bits", lambda m, t: [m, "--bits", "5"], 2, "--bits 5 is not supported", True),
    ("group-size", lambda m, t: [m, "--group_size", "12"], 2, "--group_size 12 is invalid", False),
    ("scheme", lambda m, t: [m, "--scheme", "W5A16"], 2, "unknown --scheme W5A16", False),
    ("nsamples", lambda m, t: [m, "--nsamples", "0"], 2, "--nsamples must be a positive integer", False),
    ("seqlen", lambda m, t: [m, "--seqlen", "-4"], 2, "--seqlen must be a positive integer", False),
    ("iters", lambda m, t: [m, "--iters", "-1"], 2, "--iters must be 0", False),
    ("shard-size", lambda m, t: [m, "--max_shard_size", "lots"], 2, "--max_shard_size lots is not a size", False),
    ("device-name", lambda m, t: [m, "--device", "tpu"], 2, "--device tpu is not a device", False),
    ("no-weights", lambda m, t: (os.remove(_weights(m)), [m])[1], 2, "no weights in", False),
    ("index-missing-shard", lambda m, t: (_index_missing_shard(m), [m])[1], 2, "listed in the index is missing", False),
    ("truncated-shard", lambda m, t: (_truncate(m), [m])[1], 2, "model.safetensors is", True),
    ("corrupt-shard", lambda m, t: (_corrupt_header(m), [m])[1], 2, "is corrupt", False),
    ("missing-block-tensor", lambda m, t: (_rewrite(m, lambda d: d.pop("model.layers.1.mlp.up_proj.weight")), [m])[1],
     2, "model.layers.1.mlp.up_proj.weight is missing from the checkpoint", False),
    ("nan-in-weights", lambda m, t: (_rewrite(m, _nan_weight), [m])[1], 2, "contains NaN or Inf", False),
    ("shape-mismatch", lambda m, t: (_edit_config(m, intermediate_size=96), [m])[1], 2,
     "the config and weights do not match", False),
    ("unknown-block-list", lambda m, t: [m, "--to_quant_block_names", "model.nothing"], 2,
     "block list 'model.nothing' does not exist", False),
    ("dataset-missing", lambda m, t: [m, "--dataset", os.path.join(t, "none.txt")], 2, "no such file", False),
    ("dataset-empty", lambda m, t: [m, "--dataset", _text(t, "empty.txt", "\n\n")], 2, "holds no text", False),
    ("dataset-too-small", lambda m, t: [m, "--dataset", _text(t, "small.txt", "a few words only"), "--seqlen", "64"],
     2, "not enough calibration data", False),
    ("output-is-file", lambda m, t: [m, "-o", _text(t, "afile", "x")], 2, "is a file; choose a folder", False),
    ("output-not-empty", lambda m, t: (os.makedirs(os.path.join(t, "out")), _text(os.path.join(t, "out"), "keep", "x"),
                                       [m])[2], 2, "exists and is not empty; pass --overwrite", False),
    ("cuda-missing", lambda m, t: [m, "--device", "cuda"], 2, "CUDA is not available", False),
]


@pytest.mark.parametrize("make,want_rc,want_msg,proc", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(make, want_rc, want_msg, proc, model, tmp_path, capsys):
    if want_msg.startswith("CUDA") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    argv = make(model, str(tmp_path))
    out = str(tmp_path / "out")
    if "-o" not in argv:
        argv = argv + ["-o", out]
    else:
        out = argv[argv.index("-o") + 1]
    argv = argv + [a for i, a in enumerate(FAST) if not _overridden(FAST, i, argv)]
    rc, err = run_subprocess(argv) if proc else run_inprocess(argv, capsys)
    check(rc, err, out, want_rc, want_msg)
    if want_msg not in ("model.layers.1.mlp.up_proj.weight is missing from the checkpoint", "contains NaN or Inf"):
        # (found in the block loop, after capture was saved: a repaired shard resumes from there)
        assert not os.path.exists(out.rstrip("/") + ".partial"), "an input error left a partial output behind"


def _overridden(fast, i, argv) -> bool:
    """True when the option at ``fast[i]`` (or the value after it) is given in ``argv`` already."""
    opt = fast[i] if fast[i].startswith("--") else fast[i - 1]
    return opt in argv


def test_in_features_not_divisible_kept_in_fp(model, tmp_path, capsys):
    """Layers whose in_features is not divisible by the group size are kept with a note, never a crash
    (every layer here: allowed by --allow_unquantized, an error without it - see test_safety)."""
    out = str(tmp_path / "out")
    argv = [model, "-o", out] + [a for i, a in enumerate(FAST) if not _overridden(FAST, i, ["--group_size"])]
    fresh_log_handler()
    assert cli.main(argv + ["--group_size", "256", "--allow_unquantized"]) == 0   # hidden 64 < 256: every layer is kept
    with open(os.path.join(out, "blockquant_report.json")) as f:
        kept = json.load(f)["fp_layers"]
    assert kept and all("not divisible by group_size 256" in why for why in kept.values())
    assert complete_output(out)


# ------------------------------------------------------------------- resource faults

@pytest.fixture
def tmpfs(tmp_path):
    """mount(size, ro=False) -> a fresh tmpfs folder (skips when mounting is not allowed)."""
    mounted = []

    def mount(size: str, ro: bool = False) -> str:
        where = tmp_path / f"fs{len(mounted)}"
        where.mkdir()
        opts = f"size={size}" + (",ro" if ro else "")
        if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)],
                                                           capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounted.append(str(where))
        return str(where)

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", where], capture_output=True)


def test_not_enough_disk_is_refused_before_work(model, tmpfs, capsys):
    fs = tmpfs("256k")   # the tiny model's checkpoint needs ~0.4 MB + 4 MB margin
    out = os.path.join(fs, "out")
    rc, err = run_inprocess([model, "-o", out] + FAST, capsys)
    check(rc, err, out, 1, "not enough disk space in")
    assert "calibration:" not in err            # refused before calibration and capture
    assert not os.path.exists(out + ".partial") or not os.listdir(out + ".partial")


def test_read_only_output_parent(model, tmpfs, capsys):
    out = os.path.join(tmpfs("1m", ro=True), "out")
    rc, err = run_inprocess([model, "-o", out] + FAST, capsys)
    check(rc, err, out, 2, "is not writable; choose another --output_dir")


def _limit_file_size(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # EFBIG instead of a kill
    return apply


def test_disk_full_while_writing(model, tmp_path, capsys):
    """Files stop growing past 100 kB (RLIMIT_FSIZE): the write fails mid-run, the run says how to resume."""
    out = str(tmp_path / "out")
    rc, err = run_subprocess([model, "-o", out] + FAST, preexec=_limit_file_size(100_000))
    check(rc, err, out, 1, "free disk space and re-run")
    assert os.path.isdir(out + ".partial")
    rc, err = run_inprocess([model, "-o", out] + FAST, capsys)   # space is back: the same command finishes
    assert rc == 0, err
    assert complete_output(out)


def test_sigterm_during_block_loop_exits_resumable(model, tmp_path):
    out = str(tmp_path / "out")
    argv = [QUANT, model, "-o", out] + FAST + ["--iters", "60"]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=ENV)
    progress = os.path.join(out + ".partial", "progress.json")
    deadline = time.time() + 180
    while not os.path.exists(progress) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    check(proc.returncode, err, out, 1, "stopped by SIGTERM")
    assert "re-run the same command to resume" in err
    with open(progress) as f:
        assert json.load(f)["blocks_done"] >= 1


def test_cuda_oom_in_calibration_falls_back_to_cpu(model, tmp_path, monkeypatch, capsys):
    """A CUDA OOM during a calibration forward moves the run to the CPU (torch.cuda.empty_cache is stubbed
    because this build has no CUDA; the OOM is raised by a global forward hook, once)."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    raised = []

    def oom_once(module, args):
        if isinstance(module, LlamaDecoderLayer) and not raised:
            raised.append(1)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    handle = torch.nn.modules.module.register_module_forward_pre_hook(oom_once)
    try:
        out = str(tmp_path / "out")
        fresh_log_handler()
        rc = cli.main([model, "-o", out] + FAST + ["--iters", "1"])   # RTN alone would not calibrate
    finally:
        handle.remove()
    err = capsys.readouterr().err
    assert raised and rc == 0, err
    assert "retrying this batch on the CPU" in err
    assert complete_output(out)


def test_ram_warning_names_the_options_that_lower_it(model, caplog):
    """A predicted peak above the available RAM is a warning naming --nsamples/--seqlen and --cache_device."""
    from blockquant.api import make_settings, prepare
    from blockquant.resources.budget import check_memory

    run = prepare(model, "generic", make_settings(nsamples=200_000, seqlen=4096, device="cpu"))
    with caplog.at_level("WARNING", logger="blockquant"):
        check_memory(run)
    assert "predicted peak RAM" in caplog.text
    assert "--nsamples" in caplog.text and "--cache_device" in caplog.text
