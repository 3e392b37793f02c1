"""What a newcomer meets first: adapters whose optional dependency is missing, help text, the suite's
own adapters kept out of the environment."""
import importlib.metadata as md
import os
import subprocess
import sys

import pytest

from blockquant.frame import plugins
from blockquant.frame.cli import build_parser, main

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


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    options = {chunk.split()[0]: chunk for chunk in text[text.index("options:"):].split(" --")[1:]}
    for option, default in (("iters", "200"), ("nsamples", "128"), ("seqlen", "2048"), ("batch_size", "8"),
                            ("max_shard_size", "2GB"), ("seed", "42"), ("device", "auto"), ("format", "auto_round")):
        assert f"(default: {default})" in options[option], options[option]
    assert "default" not in options["asym"] and "default" not in options["sym"]
