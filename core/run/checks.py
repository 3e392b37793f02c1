"""Checks of a prepared run before it does any work: settings that the model cannot honour."""
from __future__ import annotations

import logging
from collections import Counter

from ..errors import UsageError
from ..model.blocks import choose_layers

log = logging.getLogger("blockquant")


def check_seqlen(model, seqlen: int) -> None:
    """Refuse a --seqlen beyond the model's position range (its max_position_embeddings)."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text, "max_position_embeddings", None)
    if isinstance(limit, int) and 0 < limit < seqlen:
        raise UsageError(f"--seqlen {seqlen} exceeds the model's {limit} positions (max_position_embeddings); "
                         f"pass --seqlen {limit} or less")


def check_something_quantized(run) -> None:
    """A run that would keep every layer in full precision is an error naming why (a warning with
    --allow_unquantized)."""
    s = run.settings
    quantize, kept, widths = 0, Counter(), set()
    for chain in run.groups:
        for block in chain:
            choice = choose_layers(block, s.scheme, run.traits.fp_layers, s.ignore_layers)
            quantize += len(choice.quantize)
            for name, why in choice.kept.items():
                kept[_reason(why)] += 1
                widths.add(block.module.get_submodule(name[len(block.ref.name) + 1:]).in_features)
    if quantize or not kept:
        return
    why = "; ".join(f"{n} layer(s): {reason}" for reason, n in kept.most_common(3))
    hint = ""
    if any("group_size" in r for r in kept):
        fits = [g for g in (32, 64, 128) if all(w % g == 0 for w in widths)]
        hint = f" (layer input widths: {', '.join(map(str, sorted(widths)[:6]))}" + \
               (f"; --group_size {max(fits)} divides them all)" if fits else ")")
    message = f"no layer would be quantized - {why}{hint}"
    if s.allow_unquantized:
        log.warning("%s; continuing because of --allow_unquantized", message)
        return
    raise UsageError(f"{message}; change the settings, or pass --allow_unquantized to write the model unquantized")


def _reason(why: str) -> str:
    """The kind of reason, with the group size kept: 'in_features 64 not divisible by group_size 256'
    and 'in_features 172 ...' count together."""
    if why.startswith("in_features"):
        return "in_features not divisible by group_size " + why.rsplit(" ", 1)[-1]
    if why.startswith("shape"):
        return "shapes that cannot be packed (dims must be multiples of 32)"
    return why
