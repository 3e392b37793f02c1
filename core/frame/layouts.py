"""Version gates that survive new releases.

A version range guesses; a probe knows.  An adapter whose replay depends on how the installed library
implements something (a container type, an argument's name) runs a tiny model once, reduces what it
saw to a hashable key, and lets a ``LayoutGate`` choose the handling it keeps for that key:

- a known key: its handling, with one warning when the release is newer than the newest one the
  adapter was tested with (the layout is known, so the run goes on);
- a key the adapter knows it cannot handle (``refused``): an error giving the reason;
- any other key: an error naming what was seen and the releases that work.

``requirement`` is the specifier for ``AdapterInfo.requires``: from the oldest supported release to the
next major one, so that a new minor release is judged by the probe, not by a guess.
"""
from __future__ import annotations

import importlib.metadata as md
import logging
from dataclasses import dataclass, field
from typing import Any, Generic, Hashable, Mapping, TypeVar

from packaging.version import Version

from ..errors import VersionError

log = logging.getLogger("blockquant")
T = TypeVar("T")


@dataclass(frozen=True)
class LayoutGate(Generic[T]):
    adapter: str                         # the adapter's name, for messages
    package: str                         # the distribution probed, e.g. "transformers"
    oldest: str                          # the oldest release supported
    newest_tested: str                   # the newest release the adapter's tests ran on
    known: Mapping[Hashable, T]          # probe key -> the adapter's handling (``name`` attribute shown)
    what: str = "layout"                 # what the probe looks at, e.g. "shared-KV layout"
    refused: Mapping[Hashable, str] = field(default_factory=dict)   # probe key -> why it cannot work
    _warned: set = field(default_factory=set, compare=False, repr=False)

    @property
    def requirement(self) -> str:
        return f">={self.oldest},<{Version(self.newest_tested).major + 1}"

    def installed(self) -> Version:
        return Version(md.version(self.package))

    def choose(self, key: Hashable, seen: str, version: Version | None = None) -> T:
        """The handling for probe ``key`` (``seen``: what the probe saw, in words) on ``version`` (default:
        the installed release)."""
        version = version or self.installed()
        if key in self.refused:
            raise VersionError(f"{self.package} {version} is not supported by the {self.adapter} adapter: "
                               f"{self.refused[key]}; pip install '{self.package}{self.requirement}'")
        handling = self.known.get(key)
        if handling is None:
            names = ", ".join(_name(h) for h in self.known.values())
            raise VersionError(
                f"{self.package} {version} {seen}, a {self.what} the {self.adapter} adapter does not know yet "
                f"(known: {names}); install a release it knows: "
                f"pip install '{self.package}>={self.oldest},<={self.newest_tested}'")
        if version > Version(self.newest_tested) and version not in self._warned:
            self._warned.add(version)
            log.warning("%s %s is newer than %s, the newest release the %s adapter was tested with; its %s (%s) "
                        "is known, so the run goes on - check with `quant verify`", self.package, version,
                        self.newest_tested, self.adapter, self.what, _name(handling))
        return handling


def _name(handling: Any) -> str:
    return str(getattr(handling, "name", handling))
