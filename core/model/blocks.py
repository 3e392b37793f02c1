"""Finding blocks and the layers inside them that get quantized."""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass

import torch

from ..frame.contract import BlockRef, Traits
from ..errors import AdapterError, UsageError
from ..export.formats import packable

# Where standard transformers models keep their decoder blocks.
USUAL_BLOCK_PATHS = (
    "model.layers", "model.language_model.layers", "model.decoder.layers", "transformer.h",
    "gpt_neox.layers", "transformer.blocks", "model.transformer.h", "layers",
)


def get_module(root: torch.nn.Module, path: str) -> torch.nn.Module | None:
    module = root
    for part in path.split(".") if path else []:
        if not hasattr(module, part):
            return None
        module = getattr(module, part)
    return module


def find_block_paths(model: torch.nn.Module) -> list[str]:
    """The first usual block path that holds a ModuleList, else the largest ModuleList of like blocks."""
    for path in USUAL_BLOCK_PATHS:
        module = get_module(model, path)
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            return [path]
    best, size = None, 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > size:
            if len({type(m) for m in module}) == 1:
                best, size = name, len(module)
    return [best] if best else []


@dataclass
class Block:
    ref: BlockRef
    module: torch.nn.Module


def resolve_groups(model: torch.nn.Module, traits: Traits, override: str | None = None,
                   include: tuple[str, ...] = ()) -> list[list[Block]]:
    """The block groups to quantize, as chains of ``Block``: the adapter's groups, then the optional groups
    named in ``include`` (--include_groups).

    ``override`` is --to_quant_block_names: comma-separated groups; ``+`` chains lists in one group.
    """
    unknown = [n for n in include if n not in traits.optional_groups]
    if unknown:
        have = ", ".join(sorted(traits.optional_groups)) or "none"
        raise UsageError(f"--include_groups {unknown[0]}: this model has no optional block group of that name "
                         f"(its optional groups: {have})")
    groups = list(traits.block_groups) + [traits.optional_groups[n] for n in include]
    if override:
        groups = [[p.strip() for p in g.split("+") if p.strip()] for g in override.split(",") if g.strip()]
    if not groups:
        raise AdapterError("no block groups to quantize: the adapter found no blocks; pass --to_quant_block_names")
    out, number = [], 0
    for g, chain in enumerate(groups):
        blocks: list[Block] = []
        for path in chain:
            module_list = get_module(model, path)
            if not isinstance(module_list, torch.nn.ModuleList):
                raise UsageError(
                    f"block list '{path}' does not exist in {type(model).__name__}; "
                    f"block lists found: {', '.join(find_block_paths(model)) or 'none'}"
                )
            for i, module in enumerate(module_list):
                blocks.append(Block(BlockRef(group=g, path=path, index=i, position=len(blocks), number=number), module))
                number += 1
        out.append(blocks)
    return out


def bind_inputs(module: torch.nn.Module, args: tuple, kwargs: dict) -> dict:
    """A call's positional arguments bound to parameter names, so that ``module(**result)`` repeats it."""
    if not args:
        return dict(kwargs)
    signature = inspect.signature(module.forward)
    bound = signature.bind_partial(*args, **kwargs)
    out: dict = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            raise AdapterError(f"{type(module).__name__}.forward takes *{name}; blocks must take named arguments")
        else:
            out[name] = value
    return out


@dataclass
class LayerChoice:
    quantize: dict[str, torch.nn.Linear]   # full name -> layer
    kept: dict[str, str]                   # full name -> reason


def choose_layers(block: Block, scheme, fp_layers: tuple[str, ...], ignore: tuple[str, ...]) -> LayerChoice:
    """The nn.Linear layers of a block to quantize, and those kept in full precision (with why)."""
    patterns = [re.compile(p) for p in fp_layers]
    quantize, kept = {}, {}
    prefix = block.ref.name
    for local, module in block.module.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        name = f"{prefix}.{local}"
        if any(p.search(name) for p in patterns):
            kept[name] = "kept in full precision by the adapter"
        elif any(_matches(pattern, name) for pattern in ignore):
            kept[name] = "--ignore_layers"
        elif scheme.group_size != -1 and module.in_features % scheme.group_size:
            kept[name] = f"in_features {module.in_features} not divisible by group_size {scheme.group_size}"
        elif not packable(module.in_features, module.out_features, scheme.bits):
            kept[name] = f"shape {module.out_features}x{module.in_features} cannot be packed (dims must be multiples of 32)"
        else:
            quantize[name] = module
    return LayerChoice(quantize, kept)


def _matches(pattern: str, name: str) -> bool:
    if pattern in name:
        return True
    try:
        return re.search(pattern, name) is not None
    except re.error:
        return False
