"""The ``quant`` command.

    quant [quantize] [--adapter NAME] [MODEL] [options]   quantize (MODEL omitted: the adapter's tiny example)
    quant verify --adapter NAME [MODEL]                  replay check before a long run
    quant adapters [--json]                              installed adapters and their status
    quant hooks [--json]                                 the hook contract and who implements it

Exit codes: 0 success, 2 usage or input errors, 1 runtime failures.

The parser and the dispatch are here (standard library only); the commands are in commands.py.
"""
from __future__ import annotations

import argparse
import logging
import sys

from ..errors import BlockquantError
from ..model.hub_names import is_hub_name

COMMANDS = ("quantize", "verify", "adapters", "hooks")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's layout and appends each option's default to its help (None/False: nothing)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (action.option_strings and action.nargs != 0 and "default" not in text
                and default not in (None, "", argparse.SUPPRESS) and not isinstance(default, (list, tuple))):
            text += " (default: %(default)s)"
        return text


def given_options(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The ``dest`` of every option the user typed (whatever its value), so that example-sized settings
    replace only the defaults the user left alone."""
    given = set()
    for action in parser._actions:
        for opt in action.option_strings:
            if any(a == opt or (opt.startswith("--") and a.startswith(opt + "=")) for a in argv):
                given.add(action.dest)
    return given


def _run_options(p: argparse.ArgumentParser, verify: bool = False) -> None:
    p.add_argument("model", nargs="?", help="model folder or hub name (org/name); omitted: the adapter's tiny example model")
    p.add_argument("--adapter", help="adapter name (see `quant adapters`); default: detected from config.json")
    p.add_argument("--nsamples", type=int, default=2 if verify else 128, help="calibration samples")
    p.add_argument("--seqlen", type=int, default=64 if verify else 2048, help="tokens per calibration sample")
    p.add_argument("--dataset", help="calibration data: a .txt/.jsonl/.parquet file or a hub dataset name "
                                     "(default: an offline corpus of Python docstrings)")
    p.add_argument("--images", help="image+text calibration: a folder of images with captions or a .jsonl of {image, text}")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--to_quant_block_names", help="block lists to quantize, comma-separated (overrides the adapter)")
    p.add_argument("--variable_inputs", choices=("rebuild", "cache"),
                   help="inputs that vary between blocks: rebuild them (adapter) or cache them per block (more RAM)")
    p.add_argument("--include_groups", default="", metavar="NAME[,NAME]",
                   help="optional block groups the adapter offers to quantize too (e.g. vision)")
    p.add_argument("--quant_vision", action="store_true", help="same as --include_groups vision")
    p.add_argument("--seed", type=int, default=42, help="random seed of calibration sampling and tuning")
    p.add_argument("--set", dest="options", action="append", default=[], metavar="KEY=VALUE",
                   help="an adapter option, repeatable (`quant adapters --options NAME` lists an adapter's options)")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging and tracebacks")


class _Parser(argparse.ArgumentParser):
    """Argument errors as two short lines (usage form, then the error), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"usage: quant [quantize|verify|adapters|hooks] [MODEL] [options]  (quant --help lists them)\n"
                     f"error: {one_line(message)}\n")


def build_parser(with_options: bool = False) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="quant", description="Block-by-block AutoRound weight quantization.",
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command")
    epilog = _commands().options_epilog() if with_options else None
    q = sub.add_parser("quantize", help="quantize a model (the default command)", epilog=epilog,
                       formatter_class=HelpFormatter)
    _run_options(q)
    q.add_argument("--scheme", help="W2A16, W3A16, W4A16 (default) or W8A16")
    q.add_argument("--bits", type=int, help="weight bits: 2, 3, 4 or 8; 6 for --format gguf:q6_k (overrides --scheme)")
    q.add_argument("--group_size", type=int, help="inputs per scale: -1 (per channel), 32, 64, 128 ...")
    q.add_argument("--sym", dest="sym", action="store_const", const=True, default=None,
                   help="symmetric quantization (what every scheme uses unless --asym)")
    q.add_argument("--asym", dest="sym", action="store_false", help="asymmetric quantization (a zero point per group)")
    q.add_argument("--iters", type=int, default=200, help="AutoRound iterations per block; 0 = RTN")
    q.add_argument("--lr", type=float, help="SignSGD learning rate (default 1/iters)")
    q.add_argument("--minmax_lr", type=float, help="learning rate of the clipping scales (default lr)")
    q.add_argument("--batch_size", type=int, default=8, help="samples per tuning step")
    q.add_argument("--gradient_accumulate_steps", type=int, default=1, help="mini-batches per tuning step")
    q.add_argument("--disable_amp", dest="amp", action="store_false",
                   help="tune in full precision (default: bf16 autocast on CPUs with native bf16 and on CUDA)")
    q.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile the tuning step: auto = only CUDA blocks of ~33M+ tuned weights "
                        "(on the CPU it does not pay off), on, off; compilation time counts as tuning time")
    q.add_argument("--device_map", help="'auto' to spread blocks over several GPUs with accelerate")
    q.add_argument("--cache_device", help="where the calibration cache lives: cpu or cuda[:N] (default: --device)")
    q.add_argument("--ignore_layers", default="", help="comma-separated layer name patterns kept in full precision")
    q.add_argument("--format", default="auto_round",
                   help="output format(s), comma-separated, each written to OUT/FORMAT from one tuning pass: auto_round, "
                        "auto_gptq, compressed-tensors, gguf:q4_0|q4_1|q8_0|q2_k|q3_k|q4_k|q6_k, or fake (quantize in memory, write nothing)")
    q.add_argument("--output_dir", "-o", help="output folder (default: MODEL-w{bits}g{group}-{format} here)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    q.add_argument("--fresh", action="store_true", help="discard an interrupted run's state instead of resuming it")
    q.add_argument("--allow_unquantized", action="store_true",
                   help="write the model even when no layer can be quantized (default: that is an error)")
    q.add_argument("--max_shard_size", default="2GB", help="largest output shard (e.g. 500MB, 2GB)")
    q.add_argument("--nproc", type=int, default=1,
                   help="data-parallel ranks on this machine (one per GPU, or CPU processes): starts them with "
                        "torch.distributed.run; several machines: torchrun, see README")
    v = sub.add_parser("verify", help="check that block-by-block replay reproduces the model (quantization off)",
                       epilog=epilog, formatter_class=HelpFormatter)
    _run_options(v, verify=True)
    a = sub.add_parser("adapters", help="list installed adapters")
    a.add_argument("--json", action="store_true")
    a.add_argument("--options", metavar="NAME", help="describe the options of adapter NAME")
    h = sub.add_parser("hooks", help="the hook contract: signatures and implementing adapters")
    h.add_argument("--json", action="store_true")
    return parser


def one_line(message: str) -> str:
    """An error message on one line (messages quoting other libraries' exceptions may hold newlines)."""
    return " ".join(message.split())


def _commands():
    """The commands' implementations (commands.py).  They import torch, transformers and the adapters
    (seconds), so this is the core's one import inside a function: argument errors and a mistyped model
    path are answered before it runs."""
    from . import commands
    return commands


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["quantize"] + argv
    parser = build_parser(with_options=bool({"-h", "--help"} & set(argv[1:])))
    args = parser.parse_args(argv)
    command = parser._subparsers._group_actions[0].choices.get(args.command)
    args.given = given_options(command, argv[1:]) if command is not None else set()
    try:
        if getattr(args, "model", None):
            is_hub_name(args.model)         # a mistyped path: reported before torch is imported
        return _commands().run(args, argv)
    except BlockquantError as e:
        if getattr(args, "verbose", False):
            logging.getLogger("blockquant").exception("details")
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
