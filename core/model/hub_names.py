"""Is a model argument a local folder or a hub name?  Standard library only: the CLI asks before it imports
torch, so a mistyped path is reported at once."""
from __future__ import annotations

import os
import re

from ..errors import ModelFileError


def is_hub_name(path: str) -> bool:
    """Whether ``path`` names a hub model (``org/name``, no such local folder); raises ModelFileError for a
    path that is neither a folder nor a hub name."""
    if os.path.isdir(path):
        return False
    if os.path.exists(path):
        raise ModelFileError(f"model path {path} is a file; pass the folder that holds config.json")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not path.startswith("."):
        return True
    raise ModelFileError(f"model folder {path} does not exist; pass a local folder or a hub name (org/name)")
