"""Adapter discovery, validation, selection and the per-run plugin manager.

Adapters (built-in and third-party alike) are entry points of the group ``blockquant.adapters``.
Each is loaded on its own: one that fails to import, or implements a hook the contract does not
have, is recorded as broken and never stops the others.  ``BLOCKQUANT_ADAPTERS`` limits which
entry points load (comma-separated names; empty loads none) - the way out when one misbehaves.
A run gets a fresh PluginManager holding the engine defaults plus the one selected adapter.
"""
from __future__ import annotations

import importlib.metadata as md
import importlib.util
import os
import traceback
from dataclasses import dataclass, field
from typing import Any

import pluggy

from . import defaults
from . import hookspecs
from .contract import AdapterInfo
from ..errors import AdapterError, VersionError
from .hookspecs import PROJECT
from .options import check_options_class, describe_options

GROUP = "blockquant.adapters"
ENV_SELECT = "BLOCKQUANT_ADAPTERS"


@dataclass
class AdapterEntry:
    """One adapter as discovered: where it comes from and whether it loads."""

    name: str
    value: str = ""
    distribution: str = ""
    version: str = ""
    module: Any = None
    info: AdapterInfo | None = None
    hooks: list[str] = field(default_factory=list)
    error: str | None = None
    missing: dict[str, str] = field(default_factory=dict)   # needed modules not installed -> what installs them

    @property
    def status(self) -> str:
        return "broken" if self.error else ("needs" if self.missing else "loaded")

    @property
    def needs_line(self) -> str:
        """``diffusers (pip install 'blockquant[EXTRA]')``: what is missing and the command that adds it."""
        installs = " ".join(f"'{v}'" for v in dict.fromkeys(self.missing.values()))
        return f"{', '.join(self.missing)} (pip install {installs})" if self.missing else ""

    def to_json(self) -> dict:
        info = self.info
        return {
            "name": self.name, "entry_point": self.value, "distribution": self.distribution, "version": self.version,
            "status": self.status, "error": self.error, "hooks": self.hooks,
            "model_types": list(info.model_types) if info else [],
            "architectures": list(info.architectures) if info else [],
            "pipelines": list(info.pipelines) if info else [],
            "requires": dict(info.requires) if info else {},
            "needs": dict(self.missing),
            "options": [dict(zip(("name", "type", "default", "help"), row)) for row in describe_options(info.options)]
                       if info else [],
            "description": info.description if info else "",
        }


def new_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(defaults, name="blockquant.frame.defaults")
    return pm


def _implemented(module) -> list[str]:
    names = []
    for attr in dir(module):
        fn = getattr(module, attr, None)
        if callable(fn) and hasattr(fn, f"{PROJECT}_impl"):
            names.append(attr)
    return sorted(names)


def check_adapter(name: str, module) -> tuple[AdapterInfo, list[str]]:
    """Register ``module`` alone with the defaults; raise AdapterError naming any contract breach."""
    pm = new_manager()
    try:
        pm.register(module, name=name)
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        known = ", ".join(sorted(h for h in dir(pm.hook) if not h.startswith("_")))
        raise AdapterError(f"adapter '{name}' breaks the hook contract: {e}. Hooks are: {known}") from e
    hooks = _implemented(module)
    info = pm.hook.adapter_info()
    if not isinstance(info, AdapterInfo):
        raise AdapterError(f"adapter '{name}' must implement adapter_info() returning blockquant.AdapterInfo")
    try:
        check_options_class(info.options, name)
    except TypeError as e:
        raise AdapterError(str(e)) from e
    return info, hooks


def discover() -> dict[str, AdapterEntry]:
    """Every adapter of the entry-point group, loaded one by one."""
    only = os.environ.get(ENV_SELECT)
    wanted = None if only is None else {n.strip() for n in only.split(",") if n.strip()}
    by_name: dict[str, list[md.EntryPoint]] = {}
    for ep in md.entry_points(group=GROUP):
        if wanted is not None and ep.name not in wanted:
            continue
        by_name.setdefault(ep.name, []).append(ep)
    entries: dict[str, AdapterEntry] = {}
    for name, eps in sorted(by_name.items()):
        dists = sorted({_dist_label(ep) for ep in eps})
        if len(dists) > 1:
            entries[name] = AdapterEntry(name=name, value=eps[0].value, distribution=" and ".join(dists),
                                         error=f"adapter name '{name}' is claimed by two distributions: "
                                               f"{' and '.join(dists)}; uninstall one of them")
            continue
        ep = eps[0]
        entry = AdapterEntry(name=name, value=ep.value, distribution=_dist_name(ep), version=_dist_version(ep))
        try:
            entry.module = ep.load()
            entry.info, entry.hooks = check_adapter(name, entry.module)
            entry.missing = {m: how for m, how in entry.info.needs.items() if not _importable(m)}
        except AdapterError as e:
            entry.error = str(e)
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # any import-time failure of a third-party package, sys.exit() included
            last = traceback.format_exception_only(type(e), e)[-1].strip()
            entry.error = f"failed to load {ep.value}: {last}"
        entries[name] = entry
    return entries


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _dist_name(ep) -> str:
    dist = getattr(ep, "dist", None)
    return dist.metadata["Name"] if dist is not None else "?"


def _dist_version(ep) -> str:
    dist = getattr(ep, "dist", None)
    return dist.version if dist is not None else "?"


def _dist_label(ep) -> str:
    return f"{_dist_name(ep)} {_dist_version(ep)}"


def get_adapter(name: str, entries: dict[str, AdapterEntry] | None = None) -> AdapterEntry:
    entries = discover() if entries is None else entries
    if name not in entries:
        raise AdapterError(
            f"unknown adapter '{name}'; installed adapters: {', '.join(sorted(entries)) or 'none'} "
            "(see `quant adapters`; a third-party adapter is installed with pip)"
        )
    entry = entries[name]
    if entry.error:
        raise AdapterError(f"adapter '{name}' is broken: {entry.error}")
    check_needs(entry)
    return entry


def check_needs(entry: AdapterEntry) -> None:
    """Refuse an adapter whose optional modules are not installed, naming the install command."""
    if entry.missing:
        raise AdapterError(f"adapter '{entry.name}' needs {entry.needs_line}")


def detect_adapter(source, entries: dict[str, AdapterEntry] | None = None) -> AdapterEntry:
    """Choose the adapter for a model folder from config.json / model_index.json."""
    entries = discover() if entries is None else entries
    ok = [e for e in entries.values() if not e.error]
    pipeline = source.pipeline_class
    model_type, archs = source.model_type, set(source.architectures)

    def matches(info: AdapterInfo) -> bool:
        if pipeline:
            return pipeline in info.pipelines
        return model_type in info.model_types or bool(archs & set(info.architectures))

    specific = [e for e in ok if matches(e.info) and not e.info.generic]
    generic = [e for e in ok if matches(e.info) and e.info.generic]
    found = specific or generic
    what = f"pipeline {pipeline}" if pipeline else f"model_type '{model_type}' ({', '.join(sorted(archs)) or 'no architectures'})"
    if len(found) == 1:
        check_needs(found[0])
        return found[0]
    if len(found) > 1:
        raise AdapterError(f"several adapters handle {what}: {', '.join(e.name for e in found)}; choose one with --adapter")
    candidates = ", ".join(sorted(e.name for e in ok)) or "none"
    raise AdapterError(
        f"no adapter handles {what}; installed adapters: {candidates}. Pass --adapter NAME "
        "(for a standard decoder-only LM try --adapter generic, and check it with `quant verify --adapter generic MODEL`)"
    )


def check_versions(entry: AdapterEntry) -> None:
    """Refuse to run outside the library versions the adapter declares."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    for dist, spec in (entry.info.requires if entry.info else {}).items():
        try:
            installed = md.version(dist)
        except md.PackageNotFoundError:
            raise VersionError(f"adapter '{entry.name}' needs {dist}{spec}, which is not installed: pip install '{dist}{spec}'")
        if Version(installed) not in SpecifierSet(spec):
            raise VersionError(
                f"adapter '{entry.name}' supports {dist}{spec}; installed {dist} is {installed}. "
                f"Install a supported version: pip install '{dist}{spec}'"
            )


def run_manager(entry: AdapterEntry) -> pluggy.PluginManager:
    """A fresh manager for one run: engine defaults + this adapter only."""
    pm = new_manager()
    pm.register(entry.module, name=entry.name)
    pm.check_pending()
    if os.environ.get("BLOCKQUANT_TRACE_HOOKS"):
        pm.trace.root.setwriter(lambda msg: os.write(2, msg.encode()))
        pm.enable_tracing()
    return pm


def hook_table(entries: dict[str, AdapterEntry]) -> list[dict]:
    """The contract: each hook's signature, firstresult flag, and which adapters implement it."""
    import inspect

    rows = []
    for name in sorted(n for n in dir(hookspecs) if hasattr(getattr(hookspecs, n), f"{PROJECT}_spec")):
        fn = getattr(hookspecs, name)
        opts = getattr(fn, f"{PROJECT}_spec")
        doc = (fn.__doc__ or "").strip().splitlines()
        rows.append({
            "hook": name, "signature": f"{name}{inspect.signature(fn)}", "firstresult": bool(opts.get("firstresult")),
            "summary": doc[0] if doc else "", "implemented_by": sorted(e.name for e in entries.values() if name in e.hooks),
        })
    return rows
