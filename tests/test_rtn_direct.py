"""RTN (--iters 0) without calibration: the weights are quantized as they stream in, with no capture
and no replay, and the output is byte for byte what the calibrated path writes."""
import glob
import os

import pytest
import torch

from blockquant import api
from blockquant.model.published import publish_like


def _files(folder: str) -> dict[str, bytes]:
    paths = glob.glob(os.path.join(folder, "**", "*.safetensors"), recursive=True)
    return {os.path.relpath(p, folder): open(p, "rb").read() for p in sorted(paths)}


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "calib.txt"
    path.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog." for i in range(40)))
    return str(path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rtn_without_data_is_byte_identical_to_the_calibrated_path(tiny_folder, tmp_path, corpus_file, dtype):
    folder = tiny_folder("qwen3")
    if dtype != torch.float32:
        import shutil

        folder = shutil.copytree(folder, tmp_path / "bf16")
        publish_like(str(folder), dtype)
    common = dict(adapter="generic", iters=0, group_size=32, nsamples=4, seqlen=32)
    direct = api.quantize(str(folder), output_dir=str(tmp_path / "direct"), **common)
    replayed = api.quantize(str(folder), output_dir=str(tmp_path / "replayed"), dataset=corpus_file, **common)
    assert direct.run.stores == [] and direct.run.batches == []     # no calibration built, nothing captured
    assert any("no calibration data" in n for n in direct.report.notes)
    assert replayed.run.stores and not any("no calibration data" in n for n in replayed.report.notes)
    a, b = _files(direct.output_dir), _files(replayed.output_dir)
    assert a and a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]
    assert len(direct.report.quantized_layers) == 28


def test_rtn_without_data_never_calibrates(tiny_folder, tmp_path, monkeypatch):
    from blockquant.run import quantize as quantize_mod

    def no_capture(run):
        raise AssertionError("RTN without data captured calibration inputs")

    monkeypatch.setattr(quantize_mod, "capture_inputs", no_capture)
    result = api.quantize(tiny_folder("llama"), adapter="generic", iters=0, group_size=32,
                          output_dir=str(tmp_path / "out"))
    assert len(result.report.blocks) == 4
