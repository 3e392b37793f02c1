"""Which transformers releases the gemma4 adapter supports, and how each stores shared KV state.

Gemma 4's KV-shared layers (the last ``num_kv_shared_layers`` layers) have no key/value
projections: they read the keys and values that the last non-shared layer of their type stored in
``shared_kv_states`` during the same forward.  How that state looks depends on the release:

- 5.5.0-5.5.3: no ``shared_kv_states`` at all; shared layers read K/V from the cache only, so the
  model's output depends on ``use_cache``.  Refused.
- 5.5.4-5.6.x: a plain ``dict`` keyed by the storing layer's INDEX (``kv_shared_layer_index``).
- 5.23.x: a ``KVSharingDict`` keyed by LAYER TYPE ("sliding_attention", "full_attention").

Releases in between (5.7-5.22) use yet other layouts (5.12 and 5.17: a plain dict keyed by layer
type) and were not run against this adapter, so they are refused with the supported range, as are
releases newer than the last one verified.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from packaging.version import Version

# Verified release windows: (first, first_not_included).  Keep SUPPORTED_TEXT in step.
VERIFIED = (("5.5.4", "5.7"), ("5.23", "5.24"))
SUPPORTED_TEXT = "5.5.4-5.6.x or 5.23.x"
INSTALL_HINT = "pip install 'transformers==5.23.*'"


def requirement() -> str:
    """The PEP 440 specifier of ``VERIFIED`` (declared in ``AdapterInfo.requires``)."""
    low, high = VERIFIED[0][0], VERIFIED[-1][1]
    gap_start, gap_end = Version(VERIFIED[0][1]), Version(VERIFIED[-1][0])
    gaps = [f"!=5.{minor}.*" for minor in range(gap_start.minor, gap_end.minor)]
    return ",".join([f">={low}", f"<{high}", *gaps])


def installed() -> Version:
    import transformers

    return Version(transformers.__version__)


def refusal(version: Version) -> str | None:
    """Why ``version`` is refused (a message naming the supported range), or None when supported."""
    if any(Version(lo) <= version < Version(hi) for lo, hi in VERIFIED):
        return None
    if Version("5.5.0") <= version < Version("5.5.4"):
        why = ("its KV-shared layers read keys/values from the cache only, so the model's output changes "
               "with use_cache and block-by-block replay cannot reproduce it")
    elif version < Version("5.5.0"):
        why = "it has no Gemma 4 models"
    else:
        why = "this release was not verified with the gemma4 adapter"
    return (f"transformers {version} is not supported by the gemma4 adapter: {why}. "
            f"Supported: transformers {SUPPORTED_TEXT}; {INSTALL_HINT}")


def check_supported() -> None:
    """Raise ``VersionError`` for an unsupported installed transformers."""
    message = refusal(installed())
    if message:
        from blockquant.errors import VersionError

        raise VersionError(message)


@dataclass(frozen=True)
class KVStrategy:
    """How one release names and holds shared KV state.

    ``new_state`` makes an empty container of the type the release's text model passes to its
    layers; ``store_key(attn)`` / ``read_key(attn)`` are the keys a storing / KV-shared attention
    module writes / reads.
    """

    name: str
    new_state: Callable[[], object]
    store_key: Callable[[object], object]
    read_key: Callable[[object], object]


def _kv_sharing_dict():
    from transformers.cache_utils import KVSharingDict

    return KVSharingDict()


BY_INDEX = KVStrategy("dict keyed by layer index", dict,
                      store_key=lambda attn: attn.layer_idx,
                      read_key=lambda attn: attn.kv_shared_layer_index)
BY_TYPE = KVStrategy("KVSharingDict keyed by layer type", _kv_sharing_dict,
                     store_key=lambda attn: attn.layer_type,
                     read_key=lambda attn: attn.layer_type)


def kv_strategy(version: Version | None = None) -> KVStrategy:
    """The shared-KV strategy of ``version`` (default: the installed transformers)."""
    version = installed() if version is None else version
    message = refusal(version)
    if message:
        from blockquant.errors import VersionError

        raise VersionError(message)
    return BY_INDEX if version < Version("5.7") else BY_TYPE
