"""An offline text corpus every machine has: the docstrings of the installed Python standard library.

The docstrings are read with ``ast`` from the standard library's ``.py`` sources (nothing is
imported), split into paragraphs, and returned in a deterministic order (sorted file paths, then
source order).  Files are assigned to a "train" or "heldout" split by a stable hash of their path
relative to the standard library folder (about 10% heldout), so the split does not depend on where
Python is installed or on the order the files are found.
"""
from __future__ import annotations

import ast
import functools
import os
import re
import sysconfig
import zlib

SPLITS = ("train", "heldout")
HELDOUT_PERCENT = 10
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "turtledemo"}
_BLANK_LINE = re.compile(r"\n[ \t]*\n")
_WORD = re.compile(r"[A-Za-z]{2,}")


def stdlib_folder() -> str:
    """The folder holding the standard library's pure-Python sources."""
    return sysconfig.get_paths()["stdlib"]


def stdlib_sources(root: str | None = None) -> list[str]:
    """Relative paths (``/``-separated) of the standard library's ``.py`` files, sorted."""
    root = root or stdlib_folder()
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.startswith(".")]
        rel = os.path.relpath(folder, root)
        for name in files:
            if name.endswith(".py"):
                path = name if rel == "." else os.path.join(rel, name)
                found.append(path.replace(os.sep, "/"))
    return sorted(found)


def split_of(relpath: str) -> str:
    """"heldout" for about HELDOUT_PERCENT% of files (stable hash of the relative path), else "train"."""
    return "heldout" if zlib.crc32(relpath.encode("utf-8")) % 100 < HELDOUT_PERCENT else "train"


def _docstrings(tree: ast.AST):
    """Docstrings of a module and of its classes and functions, in source order."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc
        children = [c for c in ast.iter_child_nodes(node) if isinstance(c, (ast.stmt, ast.excepthandler))]
        stack.extend(reversed(children))


def paragraphs_of(text: str) -> list[str]:
    """Blank-line separated paragraphs of ``text`` that hold at least three words."""
    out = []
    for para in _BLANK_LINE.split(text.replace("\r\n", "\n")):
        para = para.strip()
        if len(_WORD.findall(para)) >= 3:
            out.append(para)
    return out


def file_paragraphs(path: str) -> list[str]:
    """Docstring paragraphs of one source file; [] when it cannot be read or parsed."""
    try:
        with open(path, "rb") as fh:
            tree = ast.parse(fh.read(), filename=path)
    except (OSError, SyntaxError, ValueError, UnicodeDecodeError, RecursionError, MemoryError):
        return []
    out = []
    for doc in _docstrings(tree):
        out.extend(paragraphs_of(doc))
    return out


@functools.lru_cache(maxsize=None)
def _split_paragraphs(root: str) -> dict[str, tuple[str, ...]]:
    splits: dict[str, list[str]] = {name: [] for name in SPLITS}
    for rel in stdlib_sources(root):
        splits[split_of(rel)].extend(file_paragraphs(os.path.join(root, rel)))
    return {name: tuple(paras) for name, paras in splits.items()}


def stdlib_paragraphs(split: str = "train") -> list[str]:
    """Docstring paragraphs of the installed standard library for ``split`` ("train" or "heldout").

    Deterministic for a given Python installation; computed once per process (a fresh list is
    returned on every call, so callers may modify it).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown corpus split {split!r}; use one of {', '.join(SPLITS)}")
    return list(_split_paragraphs(stdlib_folder())[split])


def image_prompts() -> list[str]:
    """Text-to-image calibration prompts (varied subjects, styles and compositions, written for this
    project), shipped as ``image_prompts.txt`` beside this module: what diffusion adapters calibrate with
    when no ``--dataset`` is given."""
    with open(os.path.join(os.path.dirname(__file__), "image_prompts.txt"), encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]
