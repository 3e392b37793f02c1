"""Calibration text: where it comes from (``load_texts``) and how it becomes token samples.

``--dataset`` may name a .txt, .jsonl, .json, .tsv or .parquet file, a hub dataset ("org/name[:split]",
only when the ``datasets`` library is installed and the hub is reachable), or nothing (the
offline standard-library corpus).  Text samples are cut from the concatenated token stream of
all texts, so short texts are never dropped and every sample has exactly ``seqlen`` tokens.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import random
import re
from dataclasses import dataclass
from typing import Any

from ..errors import DataError
from .corpus import stdlib_paragraphs

log = logging.getLogger("blockquant")

TEXT_SUFFIXES = (".txt", ".text", ".md")
FILE_SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".json", ".tsv", ".parquet")
TEXT_FIELDS = ("text", "prompt")
TSV_COLUMNS = TEXT_FIELDS + ("caption",)
LOCAL_HINT = "pass local data with --dataset path/to/file.txt|.jsonl|.parquet, or leave --dataset out for the built-in offline corpus"
_BLANK_LINE = re.compile(r"\n[ \t]*\n")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?$")


@dataclass
class CalibrationSource:
    """What the user passed as calibration data, and the tokenizer/processor found beside the model."""

    spec: None | str | list[str] = None
    tokenizer: Any = None
    processor: Any = None
    images: str | None = None


# ----------------------------------------------------------------------------- loading texts

def load_texts(spec) -> list[str]:
    """The calibration texts named by ``spec`` (see the module docstring); never empty."""
    if spec is None:
        return _nonempty(stdlib_paragraphs("train"), "the built-in standard-library corpus")
    if isinstance(spec, (list, tuple)):
        bad = [type(t).__name__ for t in spec if not isinstance(t, str)]
        if bad:
            raise DataError(f"calibration texts must be strings (got {bad[0]}); pass a list of str")
        return _nonempty(list(spec), "the given list of texts")
    if not isinstance(spec, (str, os.PathLike)):
        raise DataError(f"--dataset must be a file path, a hub dataset name or a list of texts (got {type(spec).__name__})")
    spec = os.fspath(spec)
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        raise DataError(f"--dataset {spec} is a folder; pass one .txt, .jsonl or .parquet file")
    if os.path.isfile(path):
        return _nonempty(_read_file(path), path)
    if _looks_like_path(spec) or not _HUB_NAME.match(spec):
        raise DataError(f"--dataset {spec}: no such file; check the path, or {LOCAL_HINT}")
    return _nonempty(_load_hub(spec), f"hub dataset {spec}")


def _nonempty(texts: list[str], what: str) -> list[str]:
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise DataError(f"{what} holds no text; {LOCAL_HINT} (with at least one non-blank text)")
    return texts


def _looks_like_path(spec: str) -> bool:
    """A file suffix, a leading ./ / ~, a backslash or more than one slash: meant as a local path."""
    return (spec.lower().endswith(FILE_SUFFIXES) or spec.startswith((".", "/", "~"))
            or "\\" in spec or spec.count("/") > 1)


def _read_file(path: str) -> list[str]:
    lower = path.lower()
    if lower.endswith(".jsonl"):
        return _read_jsonl(path)
    if lower.endswith(".json"):
        return _read_json(path)
    if lower.endswith(".tsv"):
        return _read_tsv(path)
    if lower.endswith(".parquet"):
        return _read_parquet(path)
    if lower.endswith(TEXT_SUFFIXES):
        return split_text(_read(path))
    raise DataError(f"--dataset {path}: unsupported file type; use .txt (paragraphs), .jsonl, .json, .tsv or .parquet")


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError as exc:
        raise DataError(f"--dataset {path}: cannot read it ({exc.strerror}); check the file's permissions") from exc


def split_text(text: str) -> list[str]:
    """Paragraphs separated by blank lines; a text without blank lines gives one text per line."""
    text = text.replace("\r\n", "\n").strip("\n")
    parts = _BLANK_LINE.split(text) if _BLANK_LINE.search(text) else text.split("\n")
    return [p.strip() for p in parts if p.strip()]


def text_of(record) -> str | None:
    """The text of one JSON record: a string, or field "text", "prompt", or the first string field."""
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        for key in TEXT_FIELDS:
            if isinstance(record.get(key), str):
                return record[key]
        for value in record.values():
            if isinstance(value, str):
                return value
    return None


def jsonl_records(path: str):
    """Yield ``(line number, record)`` for each non-blank line of a .jsonl file (DataError on bad JSON)."""
    for number, line in enumerate(_read(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not valid JSON ({exc.msg}); write one JSON object per line") from exc


def _read_jsonl(path: str) -> list[str]:
    texts = []
    for number, record in jsonl_records(path):
        text = text_of(record)
        if text is not None:
            texts.append(text)
    return texts


def _read_json(path: str) -> list[str]:
    try:
        data = json.loads(_read(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg}); use a list of strings or of {{\"text\": ...}} objects") from exc
    if isinstance(data, dict):
        data = next((v for k, v in data.items() if isinstance(v, list)), [data])
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of strings or of {{\"text\": ...}} objects")
    return [t for t in map(text_of, data) if t is not None]


def _read_tsv(path: str) -> list[str]:
    """The column named text/prompt/caption when the first row names one (a header), else the first column."""
    rows = [r for r in csv.reader(_read(path).splitlines(), delimiter="\t") if r]
    header = [c.strip().lower() for c in rows[0]] if rows else []
    column = next((header.index(k) for k in TSV_COLUMNS if k in header), None)
    if column is None:
        return [r[0] for r in rows]
    return [r[column] for r in rows[1:] if len(r) > column]


def _read_parquet(path: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise DataError(f"reading {path} needs pyarrow; pip install pyarrow (or pip install blockquant[data])") from exc
    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: not a readable parquet file ({exc}); check the file") from exc
    import pyarrow as pa

    strings = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
    column = next((c for c in TEXT_FIELDS if c in strings), strings[0] if strings else None)
    if column is None:
        raise DataError(f"{path}: no text column (columns: {', '.join(schema.names)}); add a string column named \"text\"")
    values = pq.read_table(path, columns=[column]).column(column).to_pylist()
    return [v for v in values if isinstance(v, str)]


def hub_offline() -> bool:
    """True when the environment forbids the Hugging Face hub (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)."""
    truthy = {"1", "true", "yes", "on"}
    return any(os.environ.get(k, "").strip().lower() in truthy for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _load_hub(spec: str) -> list[str]:
    name, _, split = spec.partition(":")
    try:
        import datasets
    except ImportError:
        raise DataError(f"--dataset {spec}: no such local file, and loading a hub dataset needs the `datasets` "
                        f"library (pip install datasets), or {LOCAL_HINT}") from None
    if hub_offline():
        raise DataError(f"--dataset {spec}: no such local file, and the hub is unreachable (HF_HUB_OFFLINE is set); "
                        f"{LOCAL_HINT}")
    try:
        data = datasets.load_dataset(name, split=split or "train")
    except Exception as exc:  # network, authentication, missing dataset: all user-fixable
        raise DataError(f"--dataset {spec}: could not load it from the hub ({type(exc).__name__}: {exc}); "
                        f"{LOCAL_HINT}") from exc
    features = getattr(data, "features", {}) or {}
    strings = [k for k, v in features.items() if getattr(v, "dtype", None) in ("string", "large_string")]
    column = next((c for c in TEXT_FIELDS if c in strings), strings[0] if strings else None)
    if column is None:
        raise DataError(f"hub dataset {spec} has no text column (columns: {', '.join(features)}); {LOCAL_HINT}")
    return [t for t in data[column] if isinstance(t, str)]


# ----------------------------------------------------------------------------- token samples

class TokenSamples(list):
    """A list of samples ({"input_ids", "attention_mask"}) that also says where they came from."""

    texts_total: int = 0        # texts given
    texts_used: int = 0         # texts whose tokens went into the samples
    texts_tokenized: int = 0    # texts tokenized before enough tokens were collected
    tokens_tokenized: int = 0   # tokens in those texts (separators included)
    exhausted: bool = False     # True when every text was tokenized (tokens_tokenized = all there is)


def _separator_ids(tokenizer) -> list[int]:
    if getattr(tokenizer, "eos_token_id", None) is not None:
        return [tokenizer.eos_token_id]
    return list(tokenizer("\n\n", add_special_tokens=False)["input_ids"])


def special_frame(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer itself puts around every text: (before, after), e.g.
    ([bos], []) for decoders that prepend bos, ([cls], [sep]) for BERT-style encoders, ([], [])
    for tokenizers that add none.  Read from how it encodes a one-word text."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for k in range(len(full) - len(plain) + 1):
        if full[k:k + len(plain)] == plain:
            return list(full[:k]), list(full[k + len(plain):])
    return [], []


def build_token_samples(tokenizer, texts: list[str], nsamples: int, seqlen: int, seed: int = 42,
                        batch_texts: int = 256) -> TokenSamples:
    """Exactly ``nsamples`` samples of exactly ``seqlen`` tokens, cut from the texts' token stream.

    The texts are shuffled with ``seed``, tokenized in batches (stopping once enough tokens are
    collected) and concatenated with the eos token between them.  Every sample is framed by the
    special tokens the tokenizer adds to a text (``special_frame``: bos, or [CLS] ... [SEP]), so the
    model is calibrated on what it sees in use.  Too little data is a DataError.
    """
    if tokenizer is None:
        raise DataError("text calibration needs a tokenizer, and none was found beside the model; "
                        "add the tokenizer files (tokenizer.json, tokenizer_config.json) to the model folder")
    if nsamples <= 0 or seqlen <= 0:
        raise DataError(f"--nsamples and --seqlen must be positive (got {nsamples}, {seqlen})")
    import torch

    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    head, tail = special_frame(tokenizer)
    body = seqlen - len(head) - len(tail)
    if body <= 0:
        raise DataError(f"--seqlen {seqlen} leaves no room for text between the tokenizer's {len(head) + len(tail)} "
                        f"special token(s); use --seqlen {len(head) + len(tail) + 1} or more")
    needed = nsamples * body
    sep = _separator_ids(tokenizer)
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)

    stream: list[int] = []
    tokenized = used = 0
    while tokenized < len(order) and len(stream) < needed:
        chunk = [texts[i] for i in order[tokenized:tokenized + batch_texts]]
        for ids in tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]:
            tokenized += 1
            if not ids:
                continue
            if len(stream) < needed:
                used += 1
            stream.extend((sep if stream else []) + list(ids))
    if len(stream) < needed:
        where = "after bos" if head and not tail else "besides the special tokens"
        per_sample = f" ({body:,} text tokens per sample {where})" if head or tail else ""
        raise DataError(
            f"not enough calibration data: {len(texts):,} texts hold {len(stream):,} tokens, but --nsamples "
            f"{nsamples} x --seqlen {seqlen} needs {needed:,}{per_sample}; lower --nsamples or --seqlen, "
            f"or pass more text with --dataset"
        )
    flat = torch.tensor(stream[:needed], dtype=torch.long).view(nsamples, body)
    if head or tail:
        flat = torch.cat([torch.tensor([head] * nsamples, dtype=torch.long).view(nsamples, len(head)), flat,
                          torch.tensor([tail] * nsamples, dtype=torch.long).view(nsamples, len(tail))], dim=1)
    samples = TokenSamples(
        {"input_ids": row.unsqueeze(0).clone(), "attention_mask": torch.ones(1, seqlen, dtype=torch.long)}
        for row in flat
    )
    samples.texts_total, samples.texts_used, samples.texts_tokenized = len(texts), used, tokenized
    samples.tokens_tokenized, samples.exhausted = len(stream), tokenized == len(texts)
    return samples


def _short(n: int) -> str:
    for unit, size in (("B", 10 ** 9), ("M", 10 ** 6), ("k", 10 ** 3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def describe_samples(samples) -> str:
    """One line on what ``build_token_samples`` built, e.g. for the log and the run report."""
    if not samples:
        return "built 0 samples"
    seqlen = samples[0]["input_ids"].shape[-1]
    line = f"built {len(samples):,} samples x {seqlen:,} tokens"
    if isinstance(samples, TokenSamples) and samples.texts_total:
        line += f" from {samples.texts_used:,} of {samples.texts_total:,} texts"
        if samples.exhausted:
            line += f" ({_short(samples.tokens_tokenized)} tokens available)"
        else:
            line += f" (tokenized {samples.texts_tokenized:,} texts, {_short(samples.tokens_tokenized)} tokens)"
    return line


def default_calibration_batches(model, source: CalibrationSource, settings) -> TokenSamples:
    """The engine's text-LM calibration: ``load_texts`` + ``build_token_samples`` (one sample per batch)."""
    tokenizer = source.tokenizer
    if tokenizer is None and source.processor is not None:
        tokenizer = getattr(source.processor, "tokenizer", None)
    texts = load_texts(source.spec)
    samples = build_token_samples(tokenizer, texts, settings.nsamples, settings.seqlen, settings.seed)
    log.info("calibration: %s", describe_samples(samples))
    return samples
