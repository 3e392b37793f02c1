"""The suite's own adapter packages (tests/packages/*), visible to the test run only.

They are never installed: ``register()`` writes a ``NAME-VERSION.dist-info`` (METADATA and
entry_points.txt, read from each package's pyproject.toml) into a throwaway folder and puts that
folder and the package sources on ``sys.path`` and ``PYTHONPATH`` (for the ``quant`` subprocesses).
``importlib.metadata`` then finds their entry points exactly as it finds installed ones, while the
user's ``.venv`` keeps only what the user installed.
"""
from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

try:
    import tomllib
except ImportError:  # Python 3.10
    from pip._vendor import tomli as tomllib

PACKAGES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "packages")


def _dist_info(root: str, project: dict) -> None:
    name, version = project["name"], project["version"]
    folder = os.path.join(root, f"{name.replace('-', '_')}-{version}.dist-info")
    os.makedirs(folder)
    with open(os.path.join(folder, "METADATA"), "w") as f:
        f.write(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\nSummary: {project.get('description', '')}\n")
    with open(os.path.join(folder, "entry_points.txt"), "w") as f:
        for group, entries in project.get("entry-points", {}).items():
            f.write(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items()) + "\n")


def register() -> list[str]:
    """Make every package under tests/packages discoverable; returns the paths added."""
    root = tempfile.mkdtemp(prefix="blockquant-test-adapters-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    paths = [root]
    for name in sorted(os.listdir(PACKAGES)):
        pyproject = os.path.join(PACKAGES, name, "pyproject.toml")
        if os.path.exists(pyproject):
            with open(pyproject, "rb") as f:
                _dist_info(root, tomllib.load(f)["project"])
            paths.append(os.path.dirname(pyproject))
    sys.path[:0] = paths
    os.environ["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return paths
