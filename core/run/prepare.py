"""Steps 1-5 of a run: select the adapter, gate versions, load the model, pin traits, patch, find the
block groups, choose devices, and materialise the weights outside the blocks."""
from __future__ import annotations

import logging
import os
import tempfile

import torch

from ..config import EXAMPLE_SETTINGS, RunSettings
from ..errors import AdapterError, UsageError
from ..export.formats import check_format
from ..frame import plugins
from ..frame.contract import RunContext, Traits
from ..frame.hooks import AdapterHooks, reported
from ..frame.options import parse_options
from ..model.blocks import resolve_groups
from ..model.hub_names import is_hub_name
from ..model.published import publish_like
from ..model.model_io import ModelSource, WeightStore, materialize, still_meta, tie_if_needed
from ..model.streaming import BlockLoader
from ..resources import components, devices
from .checks import check_seqlen
from .context import Run

log = logging.getLogger("blockquant")


def prepare(model: str | None, adapter: str | None, settings: RunSettings) -> Run:
    """Steps 1-5: adapter, versions, options, load, traits, patches; non-block weights materialised."""
    run = Run(ctx=RunContext(settings=settings))
    if model is None and not adapter:
        raise UsageError("pass a model folder, or --adapter NAME to quantize that adapter's tiny example model")
    if model is not None:
        is_hub_name(model)                     # a wrong path fails at once, before the adapters are imported
    entries = plugins.discover()
    if adapter:
        run.entry = plugins.get_adapter(adapter, entries)   # an unknown name fails before a hub download
        plugins.check_versions(run.entry)      # before the example is built
    if model is None:
        parse_options(run.entry.info.options, settings.options, run.entry.name)     # a wrong option: say so first
        model = _example_folder(run)
    run.ctx.source = ModelSource.resolve(model)
    if run.entry is None:
        run.entry = plugins.detect_adapter(run.source, entries)
        plugins.check_versions(run.entry)
    run.ctx.options = parse_options(run.entry.info.options, settings.options, run.entry.name)
    log.info("adapter %s (%s %s) for %s", run.entry.name, run.entry.distribution, run.entry.version, run.source.path)
    run.hooks = AdapterHooks(plugins.run_manager(run.entry), run.ctx, run.entry.name)
    run.ctx.loaded = run.hooks.load_model(source=run.source, settings=settings)
    run.ctx.traits = pin_traits(run)
    if run.traits.checkpoint_renames and run.loaded.weights is not None:
        old = run.loaded.weights
        run.loaded.weights = WeightStore(old.folder, old.prefix, run.traits.checkpoint_renames, old.key_map)
    if settings.format != "fake":
        for fmt in settings.formats:
            check_format(fmt, settings.scheme)
    run.hooks.patch_model(model=run.model)
    run.ctx.groups = resolve_groups(run.model, run.traits, settings.to_quant_block_names, settings.include_groups)
    check_seqlen(run.model, settings.seqlen)
    run.device = devices.select_device(settings.device)
    run.cache_device = devices.select_device(settings.cache_device) if settings.cache_device else run.device
    run.model_dtype = _model_dtype(run.model)
    run.compute_dtype = run.model_dtype if run.device.type == "cuda" else torch.float32
    store = run.loaded.weights
    block_prefixes = [b.ref.name for chain in run.groups for b in chain]
    if run.loaded.pipeline is not None:
        components.place_components(run.loaded.pipeline, run.model, [b.module for chain in run.groups for b in chain],
                                    run.device, settings.device_map)
    if store is not None:
        _materialize_outside(run.model, store, block_prefixes, run.device)
    tie_if_needed(run.model)
    missing = still_meta(run.model, block_prefixes)
    if missing:
        raise AdapterError(f"weights missing outside the blocks after loading: {', '.join(missing[:5])}")
    run.keep_blocks = store is None or settings.keep_blocks
    run.loader = BlockLoader(store, run.device, None)
    return run


def _example_folder(run: Run) -> str:
    pm = plugins.run_manager(run.entry)
    with reported(run.entry.name, "example_model"):      # building or saving the example
        example = pm.hook.example_model()
        if example is None or example.save is None:
            raise AdapterError(f"adapter '{run.entry.name}' has no example model; pass a model folder")
        run.tmpdir = tempfile.TemporaryDirectory(prefix=f"blockquant-{run.entry.name}-example-")
        folder = os.path.join(run.tmpdir.name, example.name)
        example.save(folder)
    publish_like(folder)    # stored as models are published: bfloat16 shards with an index
    log.info("no model given: using %s's tiny example model %s (bfloat16, sharded)", run.entry.name, example.name)
    if torch.get_num_threads() > 1:
        # a tiny model's matrices are too small to share between CPU threads: one thread is faster, and on a
        # busy machine many times faster (threads wait for each other at every operation)
        torch.set_num_threads(1)
        log.info("example run: one CPU thread (tiny matrices)")
    changed = run.settings.apply_defaults({**EXAMPLE_SETTINGS, **example.settings})
    if changed:
        fields = run.settings.__dataclass_fields__
        log.info("example-sized run: %s (pass them to choose)",
                 ", ".join(f"--{k} {v}" if k in fields else f"--set {k}={v}" for k, v in changed.items()))
    return folder


def pin_traits(run: Run) -> Traits:
    """The adapter's traits (``fixed_attrs``) with the user's ``--variable_inputs`` over them."""
    traits = run.hooks.traits(run.model)
    if run.settings.variable_inputs:
        traits = traits.updated({"variable_inputs": run.settings.variable_inputs}, "--variable_inputs")
    return traits


def _model_dtype(model) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _materialize_outside(model, store, block_prefixes: list[str], device) -> None:
    inside = tuple(p + "." for p in block_prefixes)
    for name, module in model.named_modules():
        if name and (name + ".").startswith(inside):
            continue
        for pname, p in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            full = f"{name}.{pname}" if name else pname
            if p.device.type == "meta" and full in store:
                materialize(module, name, store, device)
                break


