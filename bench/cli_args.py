"""The command-line options every benchmark takes, each benchmark with its own defaults."""
from __future__ import annotations

import argparse


def run_parser(iters: int, nsamples: int, seqlen: int | None, batch_size: int, group_size: int | None = 128,
               bits: bool = False) -> argparse.ArgumentParser:
    """A parser with --iters, --nsamples, --seqlen, --batch_size (and --group_size, --bits where given)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=iters)
    ap.add_argument("--nsamples", type=int, default=nsamples)
    if seqlen is not None:
        ap.add_argument("--seqlen", type=int, default=seqlen)
    ap.add_argument("--batch_size", type=int, default=batch_size)
    if bits:
        ap.add_argument("--bits", type=int, default=4)
    if group_size is not None:
        ap.add_argument("--group_size", type=int, default=group_size)
    return ap
