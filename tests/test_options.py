"""Adapter options: declared as dataclasses, validated at startup, listed by the CLI, part of the resume
identity; and the RunContext that carries them to hooks."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Literal

import pytest

from blockquant import StashKey, api
from blockquant.adapters import qwen_vl
from blockquant.errors import UsageError
from blockquant.frame import cli
from blockquant.frame.contract import RunContext, Stash
from blockquant.frame.options import check_options_class, describe_options, parse_options

QUANT = os.path.join(os.path.dirname(sys.executable), "quant")


@dataclass
class Opts:
    steps: int = field(default=4, metadata={"help": "steps"})
    mode: Literal["a", "b"] = "a"
    scale: float = 1.5
    flag: bool = False
    name: str | None = None


def test_options_parse_strings_and_values_by_their_declared_types():
    opts = parse_options(Opts, {"steps": "7", "mode": "b", "scale": "2", "flag": "yes", "name": "none"}, "x")
    assert (opts.steps, opts.mode, opts.scale, opts.flag, opts.name) == (7, "b", 2.0, True, None)
    assert parse_options(Opts, {"steps": 3, "flag": False, "name": "n"}, "x") == Opts(steps=3, name="n")
    assert parse_options(None, {}, "x") is None
    rows = describe_options(Opts)
    assert rows[0] == ("steps", "int", "4", "steps") and rows[1][1] == "a|b" and rows[4][1] == "str or none"


@pytest.mark.parametrize("raw, message", [
    ({"step": "3"}, r"unknown option 'step' for adapter 'x'.*its options: flag, mode, name, scale, steps"),
    ({"steps": "three"}, r"option 'steps' of adapter 'x': 'three' is invalid \(expected an integer\)"),
    ({"mode": "c"}, r"option 'mode' of adapter 'x': 'c' is invalid \(expected one of a, b\)"),
    ({"flag": "maybe"}, r"option 'flag' of adapter 'x': 'maybe' is invalid \(expected true or false\)"),
    ({"steps": True}, r"'steps' of adapter 'x': True is invalid"),
])
def test_a_wrong_option_is_one_usage_error_naming_option_and_adapter(raw, message):
    with pytest.raises(UsageError, match=message):
        parse_options(Opts, raw, "x")


def test_an_options_class_without_defaults_or_with_an_odd_type_is_refused():
    @dataclass
    class NoDefault:
        steps: int

    @dataclass
    class OddType:
        table: dict = field(default_factory=dict)

    with pytest.raises(TypeError, match="option 'steps' needs a default"):
        check_options_class(NoDefault, "x")
    with pytest.raises(TypeError, match="option 'table' has type"):
        check_options_class(OddType, "x")


def test_a_misspelt_setting_is_not_silently_ignored(tiny_folder):
    with pytest.raises(UsageError, match=r"unknown option 'iter' for adapter 'generic'.*its options: none"):
        api.quantize(tiny_folder("llama", 2), adapter="generic", iter=5, format="fake")


def test_the_stash_is_typed_by_its_keys_and_private_to_a_run():
    key, other = StashKey[list](), StashKey[list]()
    ctx = RunContext(settings=api.make_settings())
    ctx.stash[key] = [1]
    assert ctx.stash[key] == [1] and ctx.stash.get(other) is None and key in ctx.stash
    assert ctx.stash.setdefault(other, [2]) == [2]
    assert key not in Stash() and RunContext(settings=ctx.settings).stash.get(key) is None


def test_the_cli_lists_and_describes_options(capsys):
    assert cli.main(["adapters", "--options", "qwen_vl"]) == 0
    out = capsys.readouterr().out
    assert "reinject_deepstack" in out and "bool" in out and "default True" in out
    assert cli.main(["adapters", "--options", "generic"]) == 0
    assert "has no options" in capsys.readouterr().out
    assert cli.main(["adapters"]) == 0
    assert "options:  reinject_deepstack (quant adapters --options qwen_vl)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["quantize", "--help"])
    assert "qwen_vl: reinject_deepstack (bool, default True)" in capsys.readouterr().out
    assert cli.main(["adapters", "--options", "nope"]) == 2


def test_resume_with_a_changed_option_is_refused_naming_it(tmp_path, capsys):
    folder = str(tmp_path / "qwen25")
    qwen_vl.example_qwen25().save(folder)
    out = str(tmp_path / "out")
    args = [folder, "-o", out, "--adapter", "qwen_vl", "--iters", "20", "--nsamples", "2", "--seqlen", "48",
            "--group_size", "32", "--device", "cpu"]
    proc = subprocess.Popen([QUANT] + args + ["--set", "reinject_deepstack=true"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    progress = os.path.join(out + ".partial", "progress.json")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not os.path.exists(progress):
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1]
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    with open(progress) as f:
        assert json.load(f)["identity"]["option reinject_deepstack"] is True
    logger = logging.getLogger("blockquant")
    for h in [h for h in logger.handlers if getattr(h, "_blockquant", False)]:
        logger.removeHandler(h)
    assert cli.main(args + ["--set", "reinject_deepstack=false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "option reinject_deepstack: was True, now False" in err and "--fresh" in err
