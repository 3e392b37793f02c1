"""The docs a third-party author reads name only what exists, and point nowhere outside the repository."""
from __future__ import annotations

import importlib
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", "CONTRIBUTING.md"] + sorted(
    os.path.join(d, f)[len(ROOT) + 1:] for d, _, files in os.walk(os.path.join(ROOT, "docs")) for f in files
    if f.endswith(".md"))
DOTTED = re.compile(r"\bblockquant(?:\.[A-Za-z_]\w*)+")


def _resolve(dotted: str):
    """Import the longest module prefix of ``dotted`` and walk the rest as attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


@pytest.mark.parametrize("doc", DOCS)
def test_every_blockquant_name_in_the_docs_exists(doc):
    with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
        text = f.read()
    missing = []
    for name in sorted(set(DOTTED.findall(text))):
        if name.startswith("blockquant.adapters.") and name.count(".") == 2 and name.split(".")[2] not in (
                "generic", "gemma4", "qwen_vl", "flux"):
            continue
        try:
            _resolve(name)
        except (ImportError, AttributeError):
            missing.append(name)
    assert not missing, f"{doc} names what does not exist: {', '.join(missing)}"


@pytest.mark.parametrize("doc", DOCS)
def test_docs_point_to_files_in_the_repository(doc):
    with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
        text = f.read()
    assert "../shared" not in text and "ARCHITECTURE.md" not in text and "MODEL_NOTES.md" not in text
    for link in re.findall(r"\]\(([^)#:]+)\)", text):
        assert os.path.exists(os.path.join(ROOT, os.path.dirname(doc), link)), f"{doc} links to missing {link}"
