"""Crash and interrupt resume: a run stopped by SIGINT or killed by SIGKILL after a finished block
resumes (same command) to an output byte-identical to an uninterrupted run; a resume with other
settings is refused.  The interrupted runs are real ``quant`` subprocesses; the reference and the
resumes run ``cli.main`` in-process (same code, no interpreter start-up)."""
from __future__ import annotations

import glob
import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from blockquant.frame import cli

QUANT = os.path.join(os.path.dirname(sys.executable), "quant")
ENV = dict(os.environ, HF_HUB_OFFLINE="1")
ARGS = ["--adapter", "generic", "--iters", "15", "--nsamples", "2", "--seqlen", "16", "--batch_size", "2",
        "--group_size", "32", "--device", "cpu"]


def main(argv) -> int:
    logger = logging.getLogger("blockquant")   # rebind the CLI's log handler to this test's stderr
    for h in [h for h in logger.handlers if getattr(h, "_blockquant", False)]:
        logger.removeHandler(h)
    return cli.main(argv)


@pytest.fixture(scope="module")
def model(tiny_folder):
    return tiny_folder("llama", layers=4, hidden=64)


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    """The output of an uninterrupted run: {file name: bytes} of its safetensors files."""
    out = str(tmp_path_factory.mktemp("reference") / "out")
    assert main([model, "-o", out] + ARGS) == 0
    return weight_bytes(out)


def weight_bytes(out: str) -> dict[str, bytes]:
    files = sorted(glob.glob(os.path.join(out, "*.safetensors")))
    assert files, f"no safetensors in {out}"
    return {os.path.basename(f): open(f, "rb").read() for f in files}


def start_and_stop(model, out, sig) -> tuple[int, str, dict]:
    """Start ``quant``, wait until progress.json records a finished block, send ``sig``; (rc, stderr, progress)."""
    proc = subprocess.Popen([QUANT, model, "-o", out] + ARGS, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=ENV)
    progress = os.path.join(out + ".partial", "progress.json")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        try:
            with open(progress) as f:
                if json.load(f)["blocks_done"] >= 1:
                    break
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(sig)
    err = proc.communicate(timeout=120)[1]
    with open(progress) as f:
        return proc.returncode, err, json.load(f)


def test_sigint_resumes_to_identical_output(model, reference, tmp_path, capsys):
    out = str(tmp_path / "out")
    rc, err, progress = start_and_stop(model, out, signal.SIGINT)
    assert rc == 1, err
    assert "error: stopped by SIGINT" in err and "re-run the same command to resume" in err
    assert "Traceback" not in err
    assert not os.path.exists(out)
    assert 1 <= progress["blocks_done"] < 4
    assert main([model, "-o", out] + ARGS) == 0
    logs = capsys.readouterr().err
    assert f"{progress['blocks_done']} block(s) already done" in logs
    assert weight_bytes(out) == reference
    assert not os.path.exists(out + ".partial")
    assert not os.path.exists(os.path.join(out, "progress.json"))


def test_sigkill_resumes_to_identical_output_and_other_settings_are_refused(model, reference, tmp_path, capsys):
    out = str(tmp_path / "out")
    rc, _, progress = start_and_stop(model, out, signal.SIGKILL)
    assert rc == -signal.SIGKILL
    assert progress["blocks_done"] >= 1 and not os.path.exists(out)
    # other settings: refused, naming what changed and the two ways on; the saved state is untouched
    changed = [a if a != "15" else "16" for a in ARGS]
    capsys.readouterr()
    assert main([model, "-o", out] + changed) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: an interrupted run with different settings exists")
    assert "iters: was 15, now 16" in err and "--fresh" in err
    with open(os.path.join(out + ".partial", "progress.json")) as f:
        assert json.load(f)["blocks_done"] == progress["blocks_done"]
    # the same command resumes and matches the uninterrupted run byte for byte
    assert main([model, "-o", out] + ARGS) == 0
    assert weight_bytes(out) == reference


def test_fresh_discards_interrupted_state(model, tmp_path, capsys):
    out = str(tmp_path / "out")
    os.makedirs(out + ".partial")
    with open(os.path.join(out + ".partial", "progress.json"), "w") as f:
        json.dump({"identity": {"iters": 999}, "blocks_done": 3}, f)
    fast = [a if a != "15" else "0" for a in ARGS]
    assert main([model, "-o", out] + fast) == 2               # the stale state is refused...
    assert main([model, "-o", out, "--fresh"] + fast) == 0    # ...and --fresh starts over
    assert "already done" not in capsys.readouterr().err
