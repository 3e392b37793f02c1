"""The core's layers: no import cycle among its modules (imports inside functions count too), the lower
layers never import the run or the frame, and the core names no model family."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

CORE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "core")
LOWER = ("algorithm", "model", "data", "export", "resources")    # layers below the run and the frame
# what lower layers may use from above: the contract's typed values are the whole project's vocabulary
SHARED = ("blockquant.frame.contract",)


def _modules() -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(CORE):
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, name), CORE)[:-3].replace(os.sep, ".")
                rel = rel[:-len(".__init__")] if rel.endswith(".__init__") else ("" if rel == "__init__" else rel)
                out["blockquant" + ("." + rel if rel else "")] = os.path.join(folder, name)
    return out


def _imports(module: str, path: str, known: set[str]) -> set[str]:
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            names = [f"{base}.{a.name}" for a in node.names]
            if not any(n in known for n in names):   # names imported from a module, not submodules of a package
                names = [base]
        else:
            continue
        found.update(n for n in names if n in known and n != module)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(m, p, set(modules)) for m, p in modules.items()}


def test_no_import_cycle_in_the_core():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_lower_layers_import_neither_the_run_nor_the_frame():
    bad = []
    for module, targets in _graph().items():
        parts = module.split(".")
        if len(parts) < 3 or parts[1] not in LOWER:
            continue
        for target in targets - set(SHARED):
            tparts = target.split(".")
            if len(tparts) >= 2 and tparts[1] in ("run", "frame", "kit", "api"):
                bad.append(f"{module} -> {target}")
    assert not bad, "layering broken: " + ", ".join(sorted(bad))


def test_the_algorithm_reads_like_an_algorithm():
    """AutoRound and the quantizers need schemes, errors and memory tools only."""
    bad = [f"{m} -> {t}" for m, targets in _graph().items() if m.startswith("blockquant.algorithm.")
           for t in targets if not t.startswith(("blockquant.algorithm", "blockquant.config", "blockquant.errors",
                                                 "blockquant.resources.memory"))]
    assert not bad, ", ".join(sorted(bad))


def test_the_core_names_no_model_family():
    hits = []
    for path in _modules().values():
        for number, line in enumerate(open(path, encoding="utf-8"), 1):
            if re.search(r"gemma|qwen|flux", line, re.I):
                hits.append(f"{os.path.relpath(path, CORE)}:{number}")
    assert not hits, "model names in the core (move that knowledge into an adapter): " + ", ".join(hits)


# The one allowed: the quant command parses its arguments and checks the model path before it imports
# the commands (torch, transformers, the adapters: seconds), so usage errors are answered at once.
DEFERRED_IMPORTS = {("frame/cli.py", "_commands")}


def test_no_core_module_is_imported_inside_a_function():
    """Function-level imports of the core's own modules hide the import graph (and dodge cycles)."""
    hits = []
    for module, path in _modules().items():
        tree = ast.parse(open(path, encoding="utf-8").read())
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) \
                    and (os.path.relpath(path, CORE), fn.name) not in DEFERRED_IMPORTS:
                for node in ast.walk(fn):
                    if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("blockquant")):
                        hits.append(f"{os.path.relpath(path, CORE)}:{node.lineno}")
    assert not hits, "imports of core modules inside functions: " + ", ".join(hits)


def test_the_quant_command_answers_usage_errors_without_importing_torch():
    """The deferred import above is what it claims: parsing and the path check load no torch."""
    code = ("import sys\n"
            "from blockquant.frame.cli import main\n"
            "assert main(['/no/such/model']) == 2\n"
            "try:\n    main(['--iters', 'x'])\nexcept SystemExit as e:\n    assert e.code == 2, e.code\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "model folder /no/such/model does not exist" in done.stderr


# An adapter holds model knowledge only; what every family needs is the core's.  Lines of Python in the
# package (its example model included, its tests not).
ADAPTER_LINE_LIMITS = {"adapters/gemma4": 450, "adapters/qwen_vl": 300, "adapters/flux": 350,
                       "adapters/generic": 200, "examples/blockquant-llava/blockquant_llava": 120}


def test_adapters_stay_small():
    root = os.path.dirname(CORE)
    over = []
    for folder, limit in ADAPTER_LINE_LIMITS.items():
        lines = 0
        for where, _, files in os.walk(os.path.join(root, folder)):
            if "tests" not in os.path.relpath(where, root).split(os.sep):
                lines += sum(len(open(os.path.join(where, f), encoding="utf-8").readlines())
                             for f in files if f.endswith(".py"))
        if lines > limit:
            over.append(f"{folder}: {lines} lines (limit {limit})")
    assert not over, "adapters grew past their size (move what is not model knowledge into the core): " + "; ".join(over)
