"""Data safety, through the real ``quant`` command: the input model is never touched, one run per output,
damaged or changed resume state is refused in one line, nothing incomplete is published, a run that
quantizes nothing is an error, a misbehaving adapter is contained, and the smaller input errors.

Each case checks the exit code, the one ``error:`` line, that the model folder is byte-identical
afterwards, and that no complete-looking output exists on failure.  Most run ``cli.main`` in-process
(a fresh interpreter costs ~10 s of imports on two cores); the source-protection and argparse cases
also run the ``quant`` executable.  Interrupted states come from a forked run killed at a recorded step
(``BLOCKQUANT_FAULT``, see tests/forked.py).
"""
from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from blockquant.frame import cli, plugins
from blockquant.run.lock import OutputLock
from forked import run_child

QUANT = os.path.join(os.path.dirname(sys.executable), "quant")
ENV = dict(os.environ, HF_HUB_OFFLINE="1")
FAST = ["--adapter", "generic", "--iters", "0", "--nsamples", "2", "--seqlen", "16", "--group_size", "32",
        "--device", "cpu"]
TUNED = ["--adapter", "generic", "--iters", "2", "--nsamples", "2", "--seqlen", "16", "--batch_size", "2",
         "--group_size", "32", "--device", "cpu", "--max_shard_size", "60KB"]


@pytest.fixture
def model(tiny_folder, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(tiny_folder("llama", layers=2, hidden=64), dst)
    return str(dst)


def with_option(args: list[str], option: str, value: str) -> list[str]:
    """``args`` with ``option``'s value replaced (or the option added)."""
    if option not in args:
        return args + [option, value]
    i = args.index(option)
    return args[:i + 1] + [value] + args[i + 2:]


def tree_hash(folder: str) -> str:
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(folder)):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            h.update(os.path.relpath(path, folder).encode())
            h.update(open(path, "rb").read())
    return h.hexdigest()


def complete_output(out: str) -> bool:
    path = os.path.join(out, "config.json")
    return os.path.exists(path) and "quantization_config" in json.load(open(path))


def main(argv, capsys) -> tuple[int, str]:
    import logging

    logger = logging.getLogger("blockquant")
    for h in [h for h in logger.handlers if getattr(h, "_blockquant", False)]:
        logger.removeHandler(h)
    rc = cli.main(argv)
    return rc, capsys.readouterr().err


def one_error(err: str, want_rc: int, rc: int, want: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert rc == want_rc, err
    assert "Traceback" not in err, err
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert want in errors[0], errors[0]
    return errors[0]


def refused(argv, capsys, want_rc, want, model, out) -> str:
    before = tree_hash(model)
    rc, err = main(argv, capsys)
    line = one_error(err, want_rc, rc, want)
    assert tree_hash(model) == before
    assert not complete_output(out)
    return line


# ------------------------------------------------------------------ source protection

@pytest.mark.parametrize("where,overwrite,how", [
    ("model", False, "is the input"), ("model", True, "is the input"),
    ("model/quantized", True, "is inside the input"), (".", True, "contains the input"),
])
def test_output_never_touches_the_model(model, tmp_path, capsys, where, overwrite, how):
    out = os.path.normpath(os.path.join(str(tmp_path), where))
    argv = [model, "-o", out] + FAST + (["--overwrite"] if overwrite else [])
    refused(argv, capsys, 2, how, model, out)
    assert not os.path.exists(out.rstrip("/") + ".partial") and not os.path.exists(out + ".lock")


def test_output_is_model_through_the_executable(model):
    before = tree_hash(model)
    p = subprocess.run([QUANT, model, "-o", model, "--overwrite"] + FAST, capture_output=True, text=True, env=ENV,
                       timeout=240)
    one_error(p.stderr, 2, p.returncode, "is the input")
    assert tree_hash(model) == before


def test_output_holding_the_calibration_file_is_refused(model, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    data = out / "calib.txt"
    data.write_text("some text " * 200)
    refused([model, "-o", str(out), "--overwrite", "--dataset", str(data)] + FAST, capsys, 2,
            "contains the input", model, str(out))
    assert data.exists()


# ------------------------------------------------------------------ output lock

def test_second_run_on_the_same_output_is_refused(model, tmp_path, capsys):
    out = str(tmp_path / "out")
    with OutputLock.acquire(out):   # a run holds the output (flock on OUT.lock)
        line = refused([model, "-o", out] + FAST, capsys, 2, "another run is writing", model, out)
    assert f"pid {os.getpid()} on host {socket.gethostname()}, started " in line
    assert not os.path.exists(out + ".partial")


def test_stale_lock_of_a_dead_run_is_taken_over(model, tmp_path, capsys):
    out = str(tmp_path / "out")
    with open(out + ".lock", "w") as f:
        json.dump({"pid": 999999, "host": socket.gethostname(), "started": 0}, f)
    rc, err = main([model, "-o", out] + FAST, capsys)
    assert rc == 0, err
    assert "taking over the lock" in err and "pid 999999" in err
    assert complete_output(out) and not os.path.exists(out + ".lock")


def test_lock_from_another_host_is_refused(model, tmp_path, capsys):
    out = str(tmp_path / "out")
    with open(out + ".lock", "w") as f:
        json.dump({"pid": 12, "host": "elsewhere", "started": 0}, f)
    refused([model, "-o", out] + FAST, capsys, 2, "was left by a run on another host", model, out)


# ------------------------------------------------------------------ interrupted state: tampering and changed inputs

@pytest.fixture
def interrupted(model, tmp_path):
    """A run killed right after its first (of two) blocks was recorded: (argv, out, partial)."""
    out = str(tmp_path / "out")
    argv = [model, "-o", out] + TUNED
    assert run_child(argv, str(tmp_path / "killed.log"), fault="block_saved:1") < 0
    return argv, out, out + ".partial"


def _progress(partial):
    return os.path.join(partial, "progress.json")


def _edit_progress(partial, change, rechecksum=False):
    from blockquant.run.resume import _checksum

    record = json.load(open(_progress(partial)))
    change(record)
    if rechecksum:
        record["checksum"] = _checksum(record)
    json.dump(record, open(_progress(partial), "w"))


def _parts(partial):
    folder = os.path.join(partial, "output")
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if ".part-" in f)


def _flip_byte(path, at=-5):
    data = bytearray(open(path, "rb").read())
    data[at] ^= 0x01
    open(path, "wb").write(bytes(data))


def _streams(partial):
    folder = os.path.join(partial, "resume")
    return os.path.join(folder, os.listdir(folder)[0])


TAMPER = {
    "progress-position-edited": (lambda p: _edit_progress(p, lambda r: r.update(position=0)), "progress.json is damaged"),
    "progress-writer-null": (lambda p: _edit_progress(p, lambda r: r.update(writer=None)), "progress.json is damaged"),
    "progress-garbage": (lambda p: open(_progress(p), "w").write("{garbage"), "progress.json is damaged"),
    "streams-truncated": (lambda p: os.truncate(_streams(p), 100), "is damaged"),
    "streams-garbage": (lambda p: open(_streams(p), "wb").write(b"garbage" * 50), "is damaged"),
    "streams-missing": (lambda p: os.remove(_streams(p)), "is missing"),
    "part-flipped-byte": (lambda p: _flip_byte(_parts(p)[0]), "is damaged"),
    "part-missing": (lambda p: os.remove(_parts(p)[0]), "is missing"),
}


@pytest.mark.parametrize("case", list(TAMPER))
def test_damaged_resume_state_is_refused(case, interrupted, model, capsys):
    argv, out, partial = interrupted
    damage, want = TAMPER[case]
    damage(partial)
    line = refused(argv, capsys, 2, want, model, out)
    assert "--fresh" in line
    assert not os.path.exists(out)
    rc, err = main(argv + ["--fresh"], capsys)   # the way on the message names
    assert rc == 0 and complete_output(out), err


def test_consistently_edited_state_is_never_published(interrupted, model, capsys):
    """A state whose checksum is valid but which lost a part (a bug, or a careful edit): the completeness
    check refuses to publish a checkpoint with missing tensors."""
    argv, out, partial = interrupted

    def drop_first_part(record):
        shard = record["writer"]["auto_round"]["shards"][0]   # the writer state of each --format
        with safe_open(os.path.join(partial, "output", shard["parts"].pop(0)), "pt") as f:
            lost = set(f.keys())
        shard["sums"].pop(0)
        shard["tensors"] = {k: v for k, v in shard["tensors"].items() if k not in lost}

    _edit_progress(partial, drop_first_part, rechecksum=True)
    line = refused(argv, capsys, 1, "is incomplete, so it was not published", model, out)
    assert "missing" in line and not os.path.exists(out)


def test_changed_calibration_content_is_refused(model, tmp_path, capsys):
    data = tmp_path / "calib.txt"
    data.write_text("\n".join(f"line {i} of the first calibration text, with some words" for i in range(300)))
    out = str(tmp_path / "out")
    argv = [model, "-o", out, "--dataset", str(data)] + TUNED
    assert run_child(argv, str(tmp_path / "killed.log"), fault="block_saved:1") < 0
    data.write_text("\n".join(f"entry {i}: another text entirely, same path, new content" for i in range(300)))
    refused(argv, capsys, 2, "the calibration data changed since the interrupted run", model, out)


def test_changed_model_weights_are_refused(model, tmp_path, capsys):
    out = str(tmp_path / "out")
    argv = [model, "-o", out] + TUNED
    assert run_child(argv, str(tmp_path / "killed.log"), fault="block_saved:1") < 0
    weights = os.path.join(model, "model.safetensors")
    tensors = load_file(weights)
    tensors["model.norm.weight"] = torch.cat([tensors["model.norm.weight"][:-1], torch.ones(1)])
    tensors["extra.marker"] = torch.zeros(1)
    save_file(tensors, weights, metadata={"format": "pt"})
    refused(argv, capsys, 2, "model_files: was", model, out)


def test_changed_adapter_options_are_refused(fake_adapters, model, tmp_path, capsys):
    out = str(tmp_path / "out")
    argv = [model, "-o", out, "--adapter", "optioned"] + TUNED[2:]
    assert run_child(argv + ["--set", "flavour=spicy"], str(tmp_path / "killed.log"), fault="block_saved:1") < 0
    refused(argv, capsys, 2, "option flavour: was 'spicy', now 'plain'", model, out)


# ------------------------------------------------------------------ nothing quantized

def test_nothing_quantized_is_an_error_naming_why(model, tmp_path, capsys):
    out = str(tmp_path / "out")
    argv = [model, "-o", out] + with_option(FAST, "--group_size", "256")
    line = refused(argv, capsys, 2, "no layer would be quantized", model, out)
    assert "not divisible by group_size 256" in line and "--group_size 64 divides them all" in line
    assert "--allow_unquantized" in line and not os.path.exists(out + ".partial")
    rc, err = main(argv + ["--allow_unquantized"], capsys)
    assert rc == 0 and "continuing because of --allow_unquantized" in err, err
    kept = json.load(open(os.path.join(out, "blockquant_report.json")))["fp_layers"]
    assert kept and all("not divisible by group_size 256" in why for why in kept.values())


# ------------------------------------------------------------------ adapters that misbehave

@pytest.fixture
def fake_adapters(tmp_path, monkeypatch):
    """Install entry points for modules written here: exits (sys.exit at import), raiser (a hook raises),
    optioned (an adapter with an option)."""
    (tmp_path / "bq_exits.py").write_text("import sys\nsys.exit(3)\n")
    (tmp_path / "bq_raiser.py").write_text(
        "from blockquant import AdapterInfo, hookimpl\n\n"
        "@hookimpl\ndef adapter_info():\n    return AdapterInfo(name='raiser', model_types=('llama',))\n\n"
        "@hookimpl\ndef calibration_batches(model, source, settings):\n    return helper()\n\n"
        "def helper():\n    raise ValueError('boom in the adapter')\n\n"
        "@hookimpl\ndef example_model():\n    raise ImportError('No module named fakelib')\n")
    (tmp_path / "bq_optioned.py").write_text(
        "from dataclasses import dataclass\nfrom blockquant import AdapterInfo, hookimpl\n\n"
        "@dataclass\nclass Options:\n    flavour: str = 'plain'\n\n"
        "@hookimpl\ndef adapter_info():\n    return AdapterInfo(name='optioned', model_types=('llama',), options=Options)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    real = md.entry_points
    extra = [md.EntryPoint(name="exits", value="bq_exits", group=plugins.GROUP),
             md.EntryPoint(name="raiser", value="bq_raiser", group=plugins.GROUP),
             md.EntryPoint(name="optioned", value="bq_optioned", group=plugins.GROUP)]

    def entry_points(**kw):
        found = list(real(**kw))
        return found + extra if kw.get("group") == plugins.GROUP else found

    monkeypatch.setattr(plugins.md, "entry_points", entry_points)


def test_adapter_exiting_at_import_is_marked_broken(fake_adapters, model, tmp_path, capsys):
    assert cli.main(["adapters"]) == 0
    assert "exits        broken" in capsys.readouterr().out
    assert cli.main(["adapters", "--json"]) == 0
    entries = {e["name"]: e for e in json.loads(capsys.readouterr().out)}
    assert entries["exits"]["status"] == "broken" and "SystemExit: 3" in entries["exits"]["error"]
    assert entries["generic"]["status"] == "loaded"
    assert cli.main(["hooks"]) == 0 and "implemented by" in capsys.readouterr().out
    rc, err = main([model, "-o", str(tmp_path / "out")] + FAST, capsys)
    assert rc == 0, err


def test_raising_hook_is_one_line_naming_adapter_and_hook(fake_adapters, model, tmp_path, capsys):
    out = str(tmp_path / "out")
    argv = [model, "-o", out, "--adapter", "raiser"] + FAST[2:]
    argv[argv.index("--iters") + 1] = "1"     # RTN without data would never ask for calibration batches
    refused(argv, capsys, 1, "adapter 'raiser' failed in hook calibration_batches: ValueError: boom in the adapter",
            model, out)
    rc, err = main(argv + ["--verbose"], capsys)
    assert rc == 1 and "Traceback" in err and "def helper" not in err and "in helper" in err


def test_raising_example_model_is_one_line(fake_adapters, model, tmp_path, capsys):
    out = str(tmp_path / "out")
    refused(["-o", out, "--adapter", "raiser", "--iters", "0"], capsys, 1,
            "adapter 'raiser' failed in hook example_model: ImportError: No module named fakelib", model, out)


# ------------------------------------------------------------------ smaller input errors

def _config(model, change):
    path = os.path.join(model, "config.json")
    config = json.load(open(path))
    json.dump(change(config), open(path, "w"))


def _int_weight(model):
    weights = os.path.join(model, "model.safetensors")
    tensors = load_file(weights)
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name] = tensors[name].to(torch.int32)
    save_file(tensors, weights, metadata={"format": "pt"})


SMALL = {
    "seqlen-beyond-positions": (None, ["--seqlen", "5000"], "--seqlen 5000 exceeds the model's 4096 positions"),
    "lr-negative": (None, ["--lr", "-1"], "--lr must be a positive number"),
    "lr-zero": (None, ["--lr", "0"], "--lr must be a positive number"),
    "minmax-lr-zero": (None, ["--minmax_lr", "0"], "--minmax_lr must be a positive number"),
    "int32-in-float-slot": (_int_weight, [], "is torch.int32 in the checkpoint but the model expects a floating-point"),
    "config-is-list": (lambda m: _config(m, lambda c: [c]), [], "holds a JSON list, not an object"),
    "unknown-architecture": (lambda m: _config(m, lambda c: dict(c, architectures=["NoSuchForCausalLM"])), [],
                             "names the architecture NoSuchForCausalLM, which is not a model class"),
    "mismatched-architecture": (lambda m: _config(m, lambda c: dict(c, architectures=["BertModel"])), [],
                                "architecture BertModel expects a BertConfig"),
}


@pytest.mark.parametrize("case", list(SMALL))
def test_small_input_errors(case, model, tmp_path, capsys):
    damage, extra, want = SMALL[case]
    if damage:
        damage(model)
    out = str(tmp_path / "out")
    argv = [model, "-o", out] + (with_option(FAST, *extra) if extra else FAST)
    refused(argv, capsys, 2, want, model, out)


def test_device_cuda_without_cuda_is_a_usage_error(model, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = str(tmp_path / "out")
    refused([model, "-o", out] + with_option(FAST, "--device", "cuda"), capsys, 2, "CUDA is not available", model, out)


def test_argparse_errors_are_two_short_lines():
    p = subprocess.run([QUANT, "--iters", "many"], capture_output=True, text=True, env=ENV, timeout=120)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 2, p.stderr
    assert lines[0].startswith("usage: quant") and lines[1] == "error: argument --iters: invalid int value: 'many'"
