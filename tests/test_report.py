"""Name compression, the run report, per-block progress lines and memory accounting."""
from __future__ import annotations

import io
import json
import logging
import re

import pytest
import torch

from blockquant.resources.memory import current_rss_bytes, human_bytes, peak_rss_bytes, peak_vram_bytes
from blockquant.run.report import (
    Progress, RunReport, compress_names, configure_logging, format_duration, format_ranges,
)


# ----------------------------------------------------------------------------- compress_names

def test_compress_contiguous_range():
    names = [f"model.layers.{i}.mlp.down_proj" for i in range(27)]
    assert compress_names(names) == ["model.layers.[0-26].mlp.down_proj"]
    assert compress_names(list(reversed(names))) == ["model.layers.[0-26].mlp.down_proj"]


def test_compress_non_contiguous_and_single():
    names = [f"model.layers.{i}.mlp.down_proj" for i in (0, 1, 2, 3, 5, 7, 8, 9)]
    assert compress_names(names) == ["model.layers.[0-3,5,7-9].mlp.down_proj"]
    assert compress_names(["model.layers.4.mlp.down_proj"]) == ["model.layers.4.mlp.down_proj"]
    assert compress_names(["a.1", "a.3"]) == ["a.[1,3]"]
    assert format_ranges([0, 1]) == "[0-1]" and format_ranges([7]) == "7"


def test_compress_several_numeric_positions():
    names = [f"model.layers.{i}.experts.{j}.w1" for i in range(2) for j in range(8)]
    assert compress_names(names) == ["model.layers.[0-1].experts.[0-7].w1"]
    # not a full product: layer 2 has only experts 0-3
    names += [f"model.layers.2.experts.{j}.w1" for j in range(4)]
    assert compress_names(names) == ["model.layers.[0-1].experts.[0-7].w1", "model.layers.2.experts.[0-3].w1"]


def test_compress_keeps_distinct_suffixes_apart_in_first_seen_order():
    names = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(4) for p in "qkvo"] + ["lm_head", "lm_head"]
    assert compress_names(names) == [
        "model.layers.[0-3].self_attn.q_proj", "model.layers.[0-3].self_attn.k_proj",
        "model.layers.[0-3].self_attn.v_proj", "model.layers.[0-3].self_attn.o_proj", "lm_head",
    ]
    # different depths never merge, and names whose numbers carry leading zeros stay as written
    assert compress_names(["a.0", "a.0.b", "a.1", "x.01", "x.1"]) == ["a.[0-1]", "a.0.b", "x.01", "x.1"]
    assert compress_names([]) == []


def test_compress_many_names_quickly():
    names = [f"model.layers.{i}.mlp.experts.{j}.{p}" for i in range(60) for j in range(128)
             for p in ("gate_proj", "up_proj", "down_proj")]
    assert compress_names(names) == [f"model.layers.[0-59].mlp.experts.[0-127].{p}"
                                     for p in ("gate_proj", "up_proj", "down_proj")]


# ----------------------------------------------------------------------------- RunReport

def _report() -> RunReport:
    report = RunReport(model="/models/tiny", adapter="generic", scheme="W4A16 (bits 4, group_size 128, sym)",
                       format="auto_round", output_dir="/out", settings={"iters": 200, "nsamples": 128},
                       data="built 128 samples x 2,048 tokens", wall_seconds=3723.4, capture_seconds=14,
                       tuning_seconds=3600)
    report.add_block("model.layers.0", layers=7, first_loss=0.0123, best_loss=0.0045, best_iter=180, seconds=4.21)
    report.add_block("model.layers.1", layers=7, first_loss=2e-3, best_loss=2e-3, best_iter=0, seconds=3.9,
                     rtn_fallback=True)
    report.add_quantized([f"model.layers.{i}.self_attn.q_proj" for i in range(2)])
    report.add_quantized([f"model.layers.{i}.mlp.down_proj" for i in range(2)])
    report.keep_fp("lm_head", "outside the quantized blocks")
    for i in range(2):
        report.keep_fp(f"model.layers.{i}.mlp.gate", "adapter fp_layers")
    report.peak_ram_bytes = 3 * 2 ** 30
    report.peak_vram_bytes = {"cuda:0": int(7.5 * 2 ** 30)}
    report.notes.append("kwarg position_bias cached per block")
    return report


def test_render_contains_the_expected_lines():
    text = _report().render()
    lines = text.splitlines()
    for expected in [
        "blockquant run report",
        "  model        /models/tiny (adapter generic)",
        "  scheme       W4A16 (bits 4, group_size 128, sym)",
        "  settings     iters 200  nsamples 128",
        "  data         built 128 samples x 2,048 tokens",
        "  time         wall 1:02:03  capture 0:00:14  tuning 1:00:00",
        "  peak RAM     3.0 GiB",
        "  peak VRAM    cuda:0 7.5 GiB",
        "  blocks       2 quantized (1 kept RTN)",
        "  layers       4 quantized, 3 kept in full precision",
        "  model.layers.[0-1].self_attn.q_proj",
        "  model.layers.[0-1].mlp.down_proj",
        "  lm_head  (outside the quantized blocks)",
        "  model.layers.[0-1].mlp.gate  (adapter fp_layers)",
        "  kwarg position_bias cached per block",
    ]:
        assert expected in lines, f"missing line {expected!r} in\n{text}"
    block0 = next(l for l in lines if l.startswith("  model.layers.0 "))
    assert block0.split() == ["model.layers.0", "7", "0.0123", "0.0045", "180", "4.2s"]
    block1 = next(l for l in lines if l.startswith("  model.layers.1 "))
    assert block1.split()[-1] == "RTN"


def test_render_skips_unknown_fields_and_json_roundtrips():
    empty = RunReport().render()
    assert empty.splitlines()[0] == "blockquant run report" and "peak RAM" not in empty and "time" not in empty
    report = _report()
    data = json.loads(json.dumps(report.to_json()))
    assert data["blocks"][0]["best_iter"] == 180 and data["fp_layers"]["lm_head"] == "outside the quantized blocks"
    assert RunReport.from_json(data) == report


def test_measure_memory_reads_the_process():
    report = RunReport()
    report.measure_memory()
    assert report.peak_ram_bytes >= current_rss_bytes() > 0
    assert report.peak_vram_bytes == peak_vram_bytes()


# ----------------------------------------------------------------------------- Progress

def test_progress_lines_and_eta(caplog):
    now = [100.0]
    progress = Progress(28, None, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="blockquant"):
        now[0] += 4.0
        progress.block_done("model.layers.0", first_loss=0.0123, best_loss=0.0045, seconds=4.2)
        now[0] += 9.0
        line = progress.block_done("model.layers.1", rtn=True, seconds=0.5, layers=7)
    assert caplog.records[0].name == "blockquant"
    assert caplog.records[0].getMessage() == \
        "[ 1/28] model.layers.0  loss 0.0123 -> 0.0045  4.2s  elapsed 0:00:04  eta 0:01:48"
    expected = "[ 2/28] model.layers.1  rtn  0.5s  layers 7  elapsed 0:00:13  eta 0:02:49"
    assert line == expected


def test_progress_resumed_run_uses_own_pace_and_callable_log():
    lines = []
    now = [0.0]
    progress = Progress(10, lines.append, done=6, clock=lambda: now[0])
    now[0] = 30.0
    progress.block_done("blocks.6", first_loss=1.5e-05, best_loss=1.25e-05)
    expected = ["[ 7/10] blocks.6  loss 1.5e-05 -> 1.25e-05  elapsed 0:00:30  eta 0:01:30"]
    assert lines == expected
    shown = format_duration(None), format_duration(3599.6)
    assert shown == ("-", "1:00:00")


def test_configure_logging_writes_to_the_stream_once():
    stream = io.StringIO()
    logger = logging.getLogger("blockquant")
    before, level = list(logger.handlers), logger.level
    logger.handlers = [h for h in before if not getattr(h, "_blockquant", False)]   # an earlier CLI run's
    try:
        configure_logging(stream=stream)
        configure_logging(stream=stream)
        Progress(2, None).block_done("b.0")
        first = stream.getvalue()   # the line's shape only: on a busy machine the clock may read 0:00:01
        line_shape = re.compile(r"\[1/2\] b\.0  elapsed \d+:\d\d:\d\d  eta \d+:\d\d:\d\d\n$")
        assert line_shape.match(first), first
        assert stream.getvalue().count("\n") == 1
    finally:
        logger.handlers = before
        logger.setLevel(level)


# ----------------------------------------------------------------------------- memory

def test_peak_rss_tracks_a_real_allocation():
    before = peak_rss_bytes()
    block = torch.ones(64 * 2 ** 20, dtype=torch.uint8)     # 64 MiB, touched
    assert current_rss_bytes() >= 60 * 2 ** 20
    assert peak_rss_bytes() >= max(before, current_rss_bytes())
    del block


def test_peak_vram_without_cuda_context():
    vram = peak_vram_bytes()
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        assert vram == {}
    else:
        assert all(k.startswith("cuda:") and v >= 0 for k, v in vram.items())


@pytest.mark.parametrize("n, text", [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"),
                                     (2 ** 20 - 1, "1.0 MiB"), (int(7.1 * 2 ** 30), "7.1 GiB"),
                                     (3 * 2 ** 40, "3.0 TiB"), (5000 * 2 ** 40, "5000.0 TiB"), (-2048, "-2.0 KiB")])
def test_human_bytes(n, text):
    assert human_bytes(n) == text
