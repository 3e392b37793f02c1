"""What a newcomer meets first: adapters whose optional dependency is missing, help text, the suite's
own adapters kept out of the environment."""
import importlib.metadata as md
import os
import subprocess
import sys

import pytest

from blockquant.frame import plugins
from blockquant.frame.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_adapter_with_missing_optional_dependency_is_listed_as_needs(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "diffusers", None)    # as if diffusers were not installed
    entries = plugins.discover()
    flux = entries["flux"]
    assert flux.status == "needs" and flux.error is None
    assert flux.needs_line == "diffusers (pip install 'blockquant[flux]')"
    assert entries["generic"].status == "loaded" and entries["gemma4"].status == "loaded"
    assert main(["adapters"]) == 0
    out = capsys.readouterr().out
    assert "flux         needs" in out and "    needs:    diffusers (pip install 'blockquant[flux]')" in out


@pytest.mark.parametrize("argv", [["--adapter", "flux"], ["verify", "--adapter", "flux"]])
def test_selecting_an_adapter_that_needs_an_extra_is_one_line_exit_2(monkeypatch, capsys, argv):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: adapter 'flux' needs diffusers (pip install 'blockquant[flux]')"


def test_detected_adapter_that_needs_an_extra_names_it(monkeypatch, tmp_path, capsys):
    (tmp_path / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    monkeypatch.setitem(sys.modules, "PIL", None)
    assert main([str(tmp_path)]) == 2
    assert "adapter 'flux' needs PIL (pip install 'blockquant[flux]')" in capsys.readouterr().err


def test_fixture_adapters_are_registered_for_the_tests_only():
    names = {ep.name for ep in md.entry_points(group=plugins.GROUP)}
    assert {"broken", "demo", "t5", "wrong_replay", "wrong_patch"} <= names   # visible to the suite
    for dist in ("blockquant-demo-adapter", "blockquant-broken-adapter"):
        location = str(md.distribution(dist).locate_file(""))
        assert not location.startswith(sys.prefix), f"{dist} is installed in {sys.prefix}"
    # a process started without the test run's PYTHONPATH (the user's `quant adapters`) does not see them
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-m", "blockquant", "adapters"], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=300).stdout
    listed = {line.split()[0] for line in out.splitlines() if line and not line.startswith(" ")}
    assert {"generic", "gemma4", "qwen_vl", "flux"} <= listed and not listed & {"broken", "demo", "t5", "wrong_replay"}


def test_import_from_the_clones_parent_folder(tmp_path):
    """There the clone is a folder named blockquant (no __init__.py) in the current directory; the editable
    install (scripts/setup) still wins over it."""
    (tmp_path / "blockquant" / "core").mkdir(parents=True)
    code = "import blockquant; print(blockquant.quantize.__module__, blockquant.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    module, path = out.stdout.split()
    assert module == "blockquant.api" and not path.startswith(str(tmp_path))


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    options = {chunk.split()[0]: chunk for chunk in text[text.index("options:"):].split(" --")[1:]}
    for option, default in (("iters", "200"), ("nsamples", "128"), ("seqlen", "2048"), ("batch_size", "8"),
                            ("max_shard_size", "2GB"), ("seed", "42"), ("device", "auto"), ("format", "auto_round")):
        assert f"(default: {default})" in options[option], options[option]
    assert "default" not in options["asym"] and "default" not in options["sym"]


def test_example_run_uses_example_sized_settings_the_user_did_not_pass():
    from blockquant import api
    from blockquant.config import EXAMPLE_SETTINGS

    run = api.prepare(None, "generic", api.make_settings(nsamples=4))
    s = run.settings
    assert s.nsamples == 4                                     # passed: kept
    assert (s.seqlen, s.iters) == (EXAMPLE_SETTINGS["seqlen"], EXAMPLE_SETTINGS["iters"])
    assert run.model.config.hidden_size % 128 == 0            # the default group size quantizes every layer
    folder = run.source.path
    assert any(f.endswith(".safetensors.index.json") for f in os.listdir(folder))
    run = api.prepare(None, "flux", api.make_settings(num_inference_steps=3))
    assert run.settings.nsamples == 4 and run.settings.options["num_inference_steps"] == 3


def test_a_model_run_keeps_the_defaults(tiny_folder):
    from blockquant import api

    run = api.prepare(tiny_folder("llama"), "generic", api.make_settings())
    assert (run.settings.nsamples, run.settings.seqlen, run.settings.iters) == (128, 2048, 200)


def test_tuning_progress_lines_every_interval_with_iteration_loss_and_rate():
    import torch

    from blockquant.algorithm.tuning import tune_block
    from blockquant.config import QuantScheme
    from blockquant.run.report import TuningProgress

    now = [0.0]
    lines = []
    ticker = TuningProgress("model.layers.0", 20, log=lines.append, interval=10.0, clock=lambda: now[0])
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 32)
    x = torch.randn(8, 64)
    target = layer(x).detach()

    def loss_fn(indices):
        now[0] += 3.0                      # each iteration "takes" 3 s on the injected clock
        return torch.nn.functional.mse_loss(layer(x[indices]), target[indices])

    seen = []

    def progress(done, loss):
        seen.append(done)
        ticker(done, loss)

    tune_block({"l": layer}, QuantScheme(group_size=32), loss_fn, 8, iters=20, lr=0.05, minmax_lr=0.05, batch_size=4,
               gradient_accumulate_steps=1, seed=0, progress=progress)
    assert seen == list(range(1, 21))
    # 3 s per iteration, a line once 10 s have passed since the last: iterations 4, 8, 12, 16 (not the last, 20)
    assert [line.split()[2] for line in lines] == ["4/20", "8/20", "12/20", "16/20"], lines
    assert lines[0].split()[:3] == ["model.layers.0", "iter", "4/20"] and "it/s" in lines[0] and "loss" in lines[0]


def test_sample_count_note_says_why():
    from blockquant.run.report import sample_count_note

    assert sample_count_note(8, 8, 8, "generic") is None
    assert "became 1 sample(s)" in sample_count_note(8, 1, 8, "qwen_vl")
    assert "builds its own calibration batches" in sample_count_note(4, 8, 8, "flux")
