"""The README's code blocks run as written.

Every ``quant`` line of every bash block runs through the real CLI, in a scratch folder, with its
placeholders filled in (``MODEL``: a tiny model of the line's adapter stored like a published checkpoint,
``FLUX_PIPELINE_FOLDER``, ``captions.jsonl``, ``OUT``); lines that calibrate or tune get a small budget
appended (``--nsamples 2 --seqlen 32``, ``--iters 1`` where they tune, one denoising step for flux), which argparse lets override what
the line says.  ``pip install`` lines must name extras that exist; ``bash scripts/...`` lines scripts
that exist.  The Python block runs as it is.
"""
import os
import re
import shlex

import pytest
from fixture_adapters import tomllib

from blockquant.frame import plugins
from blockquant.frame.cli import main
from blockquant.model.published import publish_like

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, re.S)


def _lines(kind: str, prefix: str) -> list[str]:
    out = []
    for lang, body in BLOCKS:
        if lang == kind:
            out += [line.split("  #")[0].strip() for line in body.splitlines() if line.strip().startswith(prefix)]
    return out


QUANT_LINES = _lines("bash", "quant ")


def test_readme_opens_with_the_two_commands():
    lang, body = BLOCKS[0]
    assert README.index("```") < README.index("\n## ")
    assert lang == "bash" and body.split("\n")[:2] == ["bash scripts/demo gemma4", "bash scripts/test"]
    for line in body.strip().splitlines():
        assert os.path.exists(os.path.join(ROOT, shlex.split(line)[1]))
    assert "bash scripts/test" in open(os.path.join(ROOT, ".ci", "run")).read()


def test_pip_lines_name_extras_that_exist():
    extras = set(tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]["optional-dependencies"])
    lines = _lines("bash", "pip install")
    assert lines
    for line in lines:
        target = shlex.split(line)[-1]
        named = re.fullmatch(r"\.(?:\[([\w,]+)\])?", target)
        assert named, line
        assert set((named.group(1) or "").split(",")) - {""} <= extras, line
    for name, entry in plugins.discover().items():   # every extra an adapter asks for is named in the README
        for install in (entry.info.needs.values() if entry.info else ()):
            extra = re.fullmatch(r"blockquant\[(\w+)\]", install)
            if extra:
                assert f"'.[{extra.group(1)}]'" in README, (name, install)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Placeholder -> value, built on first use."""
    from blockquant.adapters.generic import build_example

    made = {}

    def get(adapter: str) -> str:
        if adapter not in made:
            example = (build_example("qwen3", hidden=128) if adapter == "generic" else
                       plugins.run_manager(plugins.get_adapter(adapter)).hook.example_model())
            folder = str(tmp_path_factory.mktemp(adapter) / example.name)
            example.save(folder)
            publish_like(folder)
            made[adapter] = folder
        return made[adapter]

    return get


def _captions(folder) -> str:
    from blockquant.data.image_data import draw_shape

    lines = []
    for i, shape in enumerate(("circle", "square")):
        draw_shape(shape, "red", "blue", (56, 56)).save(folder / f"{i}.png")
        lines.append(f'{{"image": "{i}.png", "text": "a red {shape} on a blue background"}}')
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return str(folder / "captions.jsonl")


@pytest.mark.parametrize("line", QUANT_LINES)
def test_quant_line_runs_as_written(line, folders, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = shlex.split(line)[1:]
    adapter = argv[argv.index("--adapter") + 1] if "--adapter" in argv else "generic"
    values = {"MODEL": lambda: folders(adapter), "FLUX_PIPELINE_FOLDER": lambda: folders("flux"),
              "OUT": lambda: str(tmp_path / "out"), "captions.jsonl": lambda: _captions(tmp_path)}
    argv = [values[a]() if a in values else a for a in argv]
    command = argv[0] if argv[0] in ("verify", "adapters", "hooks") else "quantize"
    if command in ("quantize", "verify"):
        argv += ["--nsamples", "2", "--seqlen", "32"] + (["--set", "num_inference_steps=1"] if adapter == "flux" else [])
    if command == "quantize" and not ("--iters" in argv and argv[argv.index("--iters") + 1] == "0"):
        argv += ["--iters", "1"]
    if "--nproc" in argv:          # as many ranks as this machine's test can afford
        argv[argv.index("--nproc") + 1] = "2"
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    if command == "verify":
        assert "OK: every block within" in out
    if command == "quantize":
        # the printed folder; ranks started by --nproc print from their own processes: the -o folder
        written = out.strip().splitlines()[-1] if out.strip() else str(tmp_path / "out")
        fmt = argv[argv.index("--format") + 1] if "--format" in argv else "auto_round"
        folders_written = [os.path.join(written, f.replace(":", "-")) for f in fmt.split(",")] if "," in fmt else [written]
        for folder in folders_written:   # several formats: one folder each
            names = os.listdir(folder)
            assert "config.json" in names or "model_index.json" in names or any(n.endswith(".gguf") for n in names)


def test_python_block_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = [body for lang, body in BLOCKS if lang == "python"]
    assert len(code) == 1
    exec(compile(code[0], "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "OK: every block within" in out and "blockquant run report" in out
    assert "torch.Size([1, 3," in out
