"""Let the editable install of blockquant win over a folder named ``blockquant`` in the current directory.

scripts/setup copies this module into the venv's site-packages with a .pth file that imports it at startup,
after setuptools' own .pth (the names sort after it).  setuptools maps the import name ``blockquant`` to the
clone's ``core/`` folder through a finder that Python asks after its path finder; from the clone's parent
folder the path finder would import the clone itself (a folder named ``blockquant`` without __init__.py) as
an empty namespace package.  Moving that finder just before the path finder fixes the order; it answers only
for blockquant's own names, so every other import is untouched.  Without the finder this does nothing.
"""
import sys
from importlib.machinery import PathFinder


def _blockquant_finders() -> list:
    """The editable finders in ``sys.meta_path`` that map the name ``blockquant`` (setuptools' MAPPING)."""
    found = []
    for finder in sys.meta_path:
        module = sys.modules.get(getattr(finder, "__module__", ""))
        if "blockquant" in getattr(module, "MAPPING", {}):
            found.append(finder)
    return found


def install() -> None:
    finders = _blockquant_finders()
    for finder in finders:
        sys.meta_path.remove(finder)
    at = sys.meta_path.index(PathFinder) if PathFinder in sys.meta_path else len(sys.meta_path)
    sys.meta_path[at:at] = finders


install()
