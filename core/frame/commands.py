"""The ``quant`` commands, run by cli.py once the arguments are parsed: quantize, verify, adapters, hooks."""
from __future__ import annotations

import json

from ..api import quantize, verify
from ..errors import UsageError
from ..resources import distributed
from ..run.report import configure_logging
from .options import describe_options
from .plugins import discover, get_adapter, hook_table


def run(args, argv: list[str]) -> int:
    """Run the parsed command (``argv``: the command line, for the data-parallel launcher)."""
    configure_logging(getattr(args, "verbose", False))
    if getattr(args, "nproc", 1) > 1 and distributed.launched_ranks() == 1:
        return distributed.launch(_without_nproc(argv), args.nproc)
    handlers = {"quantize": cmd_quantize, "verify": cmd_verify, "adapters": cmd_adapters, "hooks": cmd_hooks}
    return handlers[args.command](args)


def options_epilog() -> str:
    """The adapters' options, for ``quant quantize --help``."""
    lines = ["adapter options (--set KEY=VALUE):"]
    for e in discover().values():
        rows = describe_options(e.info.options) if e.info else []
        for name, tp, default, text in rows:
            lines.append(f"  {e.name}: {name} ({tp}, default {default})  {text}")
    return "\n".join(lines) if len(lines) > 1 else ""


def _size(text: str) -> int:
    units = {"KB": 1000, "MB": 1000 ** 2, "GB": 1000 ** 3, "KIB": 1024, "MIB": 1024 ** 2, "GIB": 1024 ** 3, "B": 1}
    t = text.strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if t.endswith(unit):
            try:
                return int(float(t[: -len(unit)]) * units[unit])
            except ValueError:
                break
    try:
        return int(t)
    except ValueError:
        raise UsageError(f"--max_shard_size {text} is not a size; use e.g. 500MB or 2GB") from None


def _settings_kwargs(args, given: set[str] | None = None) -> dict:
    keys = ("nsamples", "seqlen", "dataset", "images", "device", "to_quant_block_names", "variable_inputs",
            "quant_vision", "seed", "verbose", "scheme", "bits", "group_size", "sym", "iters",
            "lr", "minmax_lr", "amp", "compile", "batch_size", "gradient_accumulate_steps", "device_map", "cache_device",
            "format", "output_dir", "overwrite", "fresh", "allow_unquantized")
    out = {k: getattr(args, k) for k in keys if hasattr(args, k)}
    if hasattr(args, "ignore_layers"):
        out["ignore_layers"] = tuple(p for p in args.ignore_layers.split(",") if p)
    if getattr(args, "include_groups", ""):
        out["include_groups"] = tuple(g.strip() for g in args.include_groups.split(",") if g.strip())
    options = {}
    for item in getattr(args, "options", []):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set {item}: expected KEY=VALUE")
        options[key.strip()] = value.strip()    # parsed by the adapter's option types
    out["options"] = options
    if hasattr(args, "max_shard_size"):
        out["max_shard_size"] = _size(args.max_shard_size)
    if given is not None:
        out["explicit"] = sorted((given & set(out)) | set(options))
    return out


def cmd_adapters(args) -> int:
    entries = discover()
    if args.options:
        return _print_options(get_adapter(args.options, entries))
    if args.json:
        print(json.dumps([e.to_json() for e in entries.values()], indent=2))
        return 0
    for e in entries.values():
        print(f"{e.name:<12} {e.status:<7} {e.distribution} {e.version}  ({e.value})")
        if e.error:
            print(f"    error: {e.error}")
            continue
        if e.missing:
            print(f"    needs:    {e.needs_line}")
        info = e.info
        handles = ", ".join(list(info.model_types) + list(info.architectures) + list(info.pipelines)) or "-"
        print(f"    handles:  {handles}")
        if info.requires:
            print(f"    requires: {', '.join(f'{k}{v}' for k, v in info.requires.items())}")
        print(f"    hooks:    {', '.join(e.hooks)}")
        if info.options is not None:
            print(f"    options:  {', '.join(row[0] for row in describe_options(info.options))} "
                  f"(quant adapters --options {e.name})")
    return 0


def _print_options(entry) -> int:
    rows = describe_options(entry.info.options)
    if not rows:
        print(f"adapter '{entry.name}' has no options")
        return 0
    print(f"options of adapter '{entry.name}' (--set KEY=VALUE, or blockquant.quantize(..., KEY=VALUE)):")
    for name, tp, default, text in rows:
        print(f"  {name:<24} {tp:<16} default {default:<10} {text}")
    return 0


def cmd_hooks(args) -> int:
    rows = hook_table(discover())
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        flag = " [firstresult]" if row["firstresult"] else ""
        print(f"{row['signature']}{flag}\n    {row['summary']}\n    implemented by: {', '.join(row['implemented_by']) or '-'}")
    return 0


def cmd_quantize(args) -> int:
    result = quantize(args.model, args.adapter, **_settings_kwargs(args, args.given))
    if result.output_dir and distributed.is_main_process():
        print(result.output_dir)
    return 0


def cmd_verify(args) -> int:
    report = verify(args.model, args.adapter, **_settings_kwargs(args, args.given))
    print(report.render())
    return 0 if report.ok else 1


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out
