"""The run report (what was quantized, how well, how long, how much memory) and per-block progress.

``compress_names`` folds numbered module names into ranges so that a report on a model with
thousands of layers stays short: ``model.layers.[0-26].mlp.down_proj``.
"""
from __future__ import annotations

import dataclasses
import importlib.abc
import logging
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

from transformers.utils import logging as hf_logging

from ..resources.memory import human_bytes, peak_rss_bytes, peak_vram_bytes

LOGGER_NAME = "blockquant"


# ----------------------------------------------------------------------------- name compression

def format_ranges(numbers) -> str:
    """Sorted integers as ranges: {3} -> "3", {0, 1, 2, 5, 7, 8} -> "[0-2,5,7-8]"."""
    values = sorted(set(numbers))
    runs: list[str] = []
    start = prev = values[0]
    for v in values[1:] + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        runs.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return runs[0] if len(values) == 1 else "[" + ",".join(runs) + "]"


def _is_index(part: str) -> bool:
    """A plain ASCII decimal without leading zeros (so that folding it back gives the same text)."""
    return part.isascii() and part.isdigit() and (part == "0" or not part.startswith("0"))


def compress_names(names: list[str]) -> list[str]:
    """Fold names that differ only in numeric dot-separated parts into ranges.

    ``["a.0.b", "a.1.b", "a.2.b", "a.5.b"]`` -> ``["a.[0-2,5].b"]``.  Positions are merged one at a
    time from the last to the first, so ``layers.{0,1}.experts.{0..7}.w1`` becomes
    ``layers.[0-1].experts.[0-7].w1``.  Output order follows each pattern's first name.
    """
    patterns: list[tuple] = []
    seen = set()
    for name in names:
        if name in seen:
            continue
        seen.add(name)
        patterns.append(tuple(frozenset([int(p)]) if _is_index(p) else p for p in name.split(".")))
    width = max((len(p) for p in patterns), default=0)
    changed = True
    while changed:
        changed = False
        for pos in range(width - 1, -1, -1):
            merged: dict[tuple, list] = {}
            for pat in patterns:
                if pos < len(pat) and isinstance(pat[pos], frozenset):
                    key = (len(pat), pos, pat[:pos], pat[pos + 1:])
                else:
                    key = (pat,)
                merged.setdefault(key, []).append(pat)
            if len(merged) < len(patterns):
                changed = True
                patterns = [group[0] if len(group) == 1 else
                            group[0][:pos] + (frozenset().union(*(g[pos] for g in group)),) + group[0][pos + 1:]
                            for group in merged.values()]
    return [".".join(format_ranges(p) if isinstance(p, frozenset) else p for p in pat) for pat in patterns]


# ----------------------------------------------------------------------------- the report

def format_duration(seconds: float | None) -> str:
    """h:mm:ss ("0:01:20"); "-" for None."""
    if seconds is None:
        return "-"
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


@dataclass
class BlockRecord:
    """One quantized block: how many layers, the tuning loss (first and best) and its time."""

    name: str
    layers: int = 0
    first_loss: float | None = None
    best_loss: float | None = None
    best_iter: int | None = None
    seconds: float = 0.0
    rtn_fallback: bool = False      # tuning made things worse (or was skipped): RTN weights were kept


@dataclass
class RunReport:
    """Everything a run reports; ``render()`` for people, ``to_json()`` for files and tools."""

    model: str = ""
    adapter: str = ""
    scheme: str = ""                # e.g. "W4A16 (bits 4, group_size 128, sym)"
    format: str = ""
    output_dir: str = ""
    settings: dict = field(default_factory=dict)     # iters, nsamples, seqlen, ...
    data: str = ""                  # calibration_data.describe_samples(...)
    wall_seconds: float | None = None
    capture_seconds: float | None = None
    tuning_seconds: float | None = None
    peak_ram_bytes: int | None = None
    peak_vram_bytes: dict[str, int] = field(default_factory=dict)
    blocks: list[BlockRecord] = field(default_factory=list)
    quantized_layers: list[str] = field(default_factory=list)
    fp_layers: dict[str, str] = field(default_factory=dict)   # layer name -> why it stays in full precision
    notes: list[str] = field(default_factory=list)

    def add_block(self, name: str, **info) -> BlockRecord:
        """Record one finished block; ``info`` holds BlockRecord fields."""
        record = BlockRecord(name=name, **info)
        self.blocks.append(record)
        return record

    def add_quantized(self, names) -> None:
        self.quantized_layers.extend(names)

    def keep_fp(self, name: str, reason: str) -> None:
        """Note that layer ``name`` stays in full precision, and why."""
        self.fp_layers[name] = reason

    def measure_memory(self) -> None:
        """Fill the peak RAM and VRAM fields from the process's high-water marks."""
        self.peak_ram_bytes = peak_rss_bytes()
        self.peak_vram_bytes = peak_vram_bytes()

    def to_json(self) -> dict:
        """A JSON-serializable dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "RunReport":
        values = dict(data)
        values["blocks"] = [BlockRecord(**b) for b in values.get("blocks", [])]
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def render(self) -> str:
        """A readable multi-line text report."""
        lines = ["blockquant run report"]

        def row(label: str, value) -> None:
            if value not in (None, "", {}, []):
                lines.append(f"  {label:<12} {value}")

        row("model", self.model + (f" (adapter {self.adapter})" if self.adapter else ""))
        row("scheme", self.scheme)
        row("format", self.format)
        row("output", self.output_dir)
        row("settings", "  ".join(f"{k} {v}" for k, v in self.settings.items()))
        row("data", self.data)
        row("time", "  ".join(f"{label} {format_duration(value)}" for label, value in (
            ("wall", self.wall_seconds), ("capture", self.capture_seconds), ("tuning", self.tuning_seconds))
            if value is not None))
        row("peak RAM", None if self.peak_ram_bytes is None else human_bytes(self.peak_ram_bytes))
        row("peak VRAM", "  ".join(f"{d} {human_bytes(n)}" for d, n in self.peak_vram_bytes.items()))
        fallbacks = sum(b.rtn_fallback for b in self.blocks)
        row("blocks", f"{len(self.blocks)} quantized" + (f" ({fallbacks} kept RTN)" if fallbacks else ""))
        row("layers", f"{len(self.quantized_layers)} quantized, {len(self.fp_layers)} kept in full precision")
        if self.blocks:
            lines += ["", "blocks"]
            width = max(len("block"), *(len(b.name) for b in self.blocks))
            lines.append(f"  {'block':<{width}}  layers  first loss   best loss  best iter     time")
            for b in self.blocks:
                best_iter = "-" if b.best_iter is None else str(b.best_iter)
                lines.append(f"  {b.name:<{width}}  {b.layers:>6}  {_loss(b.first_loss):>10}  {_loss(b.best_loss):>10}"
                             f"  {best_iter:>9}  {b.seconds:>6.1f}s" + ("  RTN" if b.rtn_fallback else ""))
        if self.quantized_layers:
            lines += ["", "quantized layers"] + [f"  {n}" for n in compress_names(self.quantized_layers)]
        if self.fp_layers:
            lines += ["", "kept in full precision"]
            by_reason: dict[str, list[str]] = {}
            for name, reason in self.fp_layers.items():
                by_reason.setdefault(reason, []).append(name)
            for reason, names in by_reason.items():
                lines += [f"  {n}  ({reason})" for n in compress_names(names)]
        if self.notes:
            lines += ["", "notes"] + [f"  {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


def sample_count_note(nsamples: int, captured: int, rows: int, adapter: str) -> str | None:
    """One line when the samples tuning sees are not --nsamples, and why (None when they are)."""
    if captured == nsamples:
        return None
    if rows == nsamples:
        return (f"calibration: --nsamples {nsamples} became {captured} sample(s): adapter '{adapter}' runs its "
                f"{nsamples} records as batched forwards of several rows (padded), and each forward is one sample")
    return (f"calibration: {captured} sample(s) ({rows} rows) for --nsamples {nsamples}: adapter '{adapter}' builds "
            "its own calibration batches (its calibration line above says how)")


# ----------------------------------------------------------------------------- progress

# Known-harmless third-party noise, hidden unless --verbose: torch's note that a bf16 input meets a float32
# norm weight (it computes correctly, unfused), transformers' fallback to its Pillow image processors.
HARMLESS_WARNINGS = ("Mismatch dtype between input and weight",)
HARMLESS_LOG_LINES = ("requires torchvision (not installed); falling back to",)


class _DropHarmless(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in HARMLESS_LOG_LINES)


class _QuietOnImport(importlib.abc.MetaPathFinder):
    """Quiets diffusers' logging module as it is imported: progress bars off, errors only.  (Adapters import
    diffusers when they load a pipeline; importing it just to quiet it would cost seconds on every run.)"""

    MODULE = "diffusers.utils.logging"

    def find_spec(self, fullname, path, target=None):
        if fullname != self.MODULE:
            return None
        for finder in sys.meta_path:
            spec = finder.find_spec(fullname, path, target) if finder is not self and hasattr(finder, "find_spec") else None
            if spec is not None and spec.loader is not None:
                run = spec.loader.exec_module

                def exec_module(module):
                    run(module)
                    _quiet_diffusers(module, True)
                spec.loader.exec_module = exec_module
                return spec
        return None


def _quiet_diffusers(module, quiet: bool) -> None:
    if quiet:
        module.disable_progress_bar()
        module.set_verbosity_error()
    else:
        module.enable_progress_bar()
        module.set_verbosity_warning()


def quiet_third_party(verbose: bool = False) -> None:
    """Normal mode: no third-party progress bars (transformers' "Writing model shards", diffusers' loading
    bars) and none of the known-harmless warnings above; ``verbose`` shows them all."""
    handlers = logging.getLogger("transformers").handlers   # child loggers' records pass their filters
    for handler in handlers:
        for f in [f for f in handler.filters if isinstance(f, _DropHarmless)]:
            handler.removeFilter(f)
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _QuietOnImport)]
    if _QuietOnImport.MODULE in sys.modules:
        _quiet_diffusers(sys.modules[_QuietOnImport.MODULE], not verbose)
    if verbose:
        hf_logging.enable_progress_bar()
        return
    if _QuietOnImport.MODULE not in sys.modules:
        sys.meta_path.insert(0, _QuietOnImport())
    hf_logging.disable_progress_bar()
    for handler in handlers:
        handler.addFilter(_DropHarmless())
    for text in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=text)


def configure_logging(verbose: bool = False, stream=None) -> logging.Logger:
    """Send the "blockquant" logger's INFO (DEBUG when verbose) lines to stderr, once; quiet third-party
    output unless ``verbose``."""
    quiet_third_party(verbose)
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not any(getattr(h, "_blockquant", False) for h in logger.handlers):
        handler = logging.StreamHandler(stream or sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._blockquant = True
        logger.addHandler(handler)
    return logger


class Progress:
    """One log line per finished block with elapsed time and ETA.

    ``log`` is a ``logging.Logger`` (default: the "blockquant" logger) or any callable taking a
    string.  ``done`` counts blocks finished before this run (a resumed run); the ETA uses only the
    pace of blocks finished by this process.
    """

    def __init__(self, total_blocks: int, log: logging.Logger | Callable[[str], Any] | None = None,
                 done: int = 0, clock: Callable[[], float] = time.monotonic):
        self.total = total_blocks
        self.done = self.resumed = done
        self.clock = clock
        self.start = clock()
        self.log = log if log is not None else logging.getLogger(LOGGER_NAME)

    def block_done(self, name: str, **info) -> str:
        """Count one block as done and log its line; returns the line.

        Recognised ``info``: first_loss, best_loss, seconds, rtn (bool); others are appended as
        ``key value``.
        """
        self.done += 1
        elapsed = self.clock() - self.start
        pace = elapsed / max(1, self.done - self.resumed)
        eta = pace * max(0, self.total - self.done)
        width = len(str(self.total))
        parts = [f"[{self.done:>{width}}/{self.total}] {name}"]
        first, best, seconds = info.pop("first_loss", None), info.pop("best_loss", None), info.pop("seconds", None)
        if info.pop("rtn", False):
            parts.append("rtn")
        if first is not None or best is not None:
            parts.append(f"loss {_loss(first)} -> {_loss(best)}")
        if seconds is not None:
            parts.append(f"{seconds:.1f}s")
        parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items()]
        parts += [f"elapsed {format_duration(elapsed)}", f"eta {format_duration(eta)}"]
        line = "  ".join(parts)
        if isinstance(self.log, logging.Logger):
            self.log.info(line)
        else:
            self.log(line)
        return line


class TuningProgress:
    """While one block tunes: a line every ``interval`` seconds with the iteration, the last loss, the
    rate and the block's ETA (silent for blocks that finish sooner).  Called as ``progress(done, loss)``."""

    def __init__(self, block: str, iters: int, log: logging.Logger | Callable[[str], Any] | None = None,
                 interval: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.block, self.iters, self.interval, self.clock = block, iters, interval, clock
        self.start = self.last = clock()
        self.log = log if log is not None else logging.getLogger(LOGGER_NAME)
        self.lines: list[str] = []

    def __call__(self, done: int, loss: float) -> None:
        now = self.clock()
        if now - self.last < self.interval or done >= self.iters:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        line = (f"      {self.block}  iter {done}/{self.iters}  loss {_loss(loss)}  {rate:.2f} it/s  "
                f"eta {format_duration((self.iters - done) / rate)}")
        self.lines.append(line)
        self.log.info(line) if isinstance(self.log, logging.Logger) else self.log(line)
