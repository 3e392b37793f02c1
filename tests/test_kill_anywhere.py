"""Kill-anywhere resume: a run SIGKILLed at any recorded step - calibration forwards, each stage of a
block's record, every export step, each shard, the copy of the source files, the final rename -
resumes (same command) to an output byte-identical to an uninterrupted run, without redoing a
finished block.

The kill is deterministic: ``BLOCKQUANT_FAULT=NAME[:N]`` (blockquant/faults.py, test-only) makes the
run SIGKILL itself the N-th time it passes point NAME.  Each run is a forked child of this test
process running ``cli.main`` (a real separate process that dies by SIGKILL, without paying the
interpreter and import start-up of a fresh ``quant`` per case).
"""
from __future__ import annotations

import json
import os
import re
import signal

import pytest

from forked import run_child

ARGS = ["--adapter", "generic", "--iters", "2", "--nsamples", "2", "--seqlen", "16", "--batch_size", "2",
        "--group_size", "32", "--device", "cpu", "--max_shard_size", "60KB"]
BLOCKS = 3
REPORT = "blockquant_report.json"


def snapshot(out: str) -> dict[str, bytes]:
    """Every file of the output (relative path -> bytes); the report by its run-independent fields."""
    files = {}
    for root, _, names in os.walk(out):
        for name in names:
            path = os.path.join(root, name)
            files[os.path.relpath(path, out)] = open(path, "rb").read()
    report = json.loads(files.pop(REPORT))
    blocks = [{k: v for k, v in b.items() if k != "seconds"} for b in report["blocks"]]
    files[REPORT] = json.dumps([blocks, report["quantized_layers"], report["fp_layers"], report["settings"],
                                report["scheme"], report["model"]], sort_keys=True).encode()
    return files


@pytest.fixture(scope="module")
def model(tiny_folder):
    return tiny_folder("llama", layers=BLOCKS, hidden=64)


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kill-reference")
    out = str(tmp / "out")
    assert run_child([model, "-o", out] + ARGS, str(tmp / "log")) == 0
    files = snapshot(out)
    assert sum(n.endswith(".safetensors") for n in files) >= 3, sorted(files)   # several shards to kill between
    return files


# fault point -> blocks the resumed run finds done (None: nothing recorded yet, the re-run starts over)
POINTS = {
    "calibration_forward:1": None,
    "calibration_forward:2": None,
    "block_written:1": None,          # first block's part written, its state not yet recorded
    "block_saved:1": 1,
    "streams_saved:2": 1,             # second block's streams written, progress not yet updated
    "block_written:3": 2,
    "block_saved:3": 3,
    "export_outside": 3,
    "shard_written:1": 3,
    "shard_written:2": 3,
    "export_shards": 3,
    "file_copied:2": 3,
    "export_files": 3,
    "export_configs": 3,
    "export_report": 3,
    "published": 3,                   # renamed to OUT, the partial folder not yet removed
}


@pytest.mark.parametrize("point", list(POINTS))
def test_killed_anywhere_resumes_to_identical_output(point, model, reference, tmp_path):
    out = str(tmp_path / "out")
    argv = [model, "-o", out] + ARGS
    assert run_child(argv, str(tmp_path / "killed.log"), fault=point) == -signal.SIGKILL, \
        open(tmp_path / "killed.log").read()
    assert not os.path.exists(os.path.join(out, "config.json")) or point == "published"
    log = str(tmp_path / "resumed.log")
    assert run_child(argv, log) == 0, open(log).read()
    text = open(log).read()
    done = re.search(r"(\d+) block\(s\) already done", text)
    if POINTS[point] is None:
        assert done is None, text
    else:
        assert done and int(done.group(1)) == POINTS[point], text
    assert snapshot(out) == reference
    assert not os.path.exists(out + ".partial") and not os.path.exists(out + ".lock")


def test_killed_while_replacing_an_old_output(model, reference, tmp_path):
    """--overwrite: killed after the old output was moved aside, before the new one took its place."""
    out = str(tmp_path / "out")
    os.makedirs(out)
    open(os.path.join(out, "old.txt"), "w").write("old")
    argv = [model, "-o", out, "--overwrite"] + ARGS
    assert run_child(argv, str(tmp_path / "killed.log"), fault="publish_replaced") == -signal.SIGKILL
    assert not os.path.exists(out)
    assert run_child(argv, str(tmp_path / "resumed.log")) == 0
    assert snapshot(out) == reference
