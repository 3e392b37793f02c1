"""A tiny byte-level BPE tokenizer for the example models, trained offline on the stdlib corpus.

Training is deterministic (same corpus, same vocabulary bytes) and runs once per process per
``vocab_size``; every call returns a fresh ``PreTrainedTokenizerFast`` so that a caller adding
tokens (an image placeholder, say) never changes what the next caller gets.
"""
from __future__ import annotations

import functools
import json
import os

from .corpus import stdlib_paragraphs

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SPECIAL_TOKENS = (BOS, EOS, PAD, UNK)
TRAIN_CHARS = 600_000   # characters of the corpus' train split used for training (speed)


def _training_texts(max_chars: int = TRAIN_CHARS) -> list[str]:
    """An evenly spread, deterministic subset of the train split of about ``max_chars`` characters."""
    paragraphs = stdlib_paragraphs("train")
    total = sum(len(p) for p in paragraphs) or 1
    step = max(1, round(total / max_chars))
    return paragraphs[::step]


@functools.lru_cache(maxsize=None)
def _trained_json(vocab_size: int) -> str:
    """The serialized ``tokenizers`` tokenizer for ``vocab_size`` (cached per process)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_texts(), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = 512, model_max_length: int = 4096):
    """A byte-level BPE ``transformers.PreTrainedTokenizerFast`` with ``vocab_size`` tokens.

    Special tokens: bos ``<s>`` (prepended to every encoded text, as many decoder tokenizers do),
    eos ``</s>``, pad ``<pad>``, unk ``<unk>`` (ids 0-3).  Byte-level, so any text encodes.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be at least {minimum} for a byte-level tokenizer (got {vocab_size})")
    backend = Tokenizer.from_str(_trained_json(vocab_size))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        model_max_length=model_max_length,
    )


def bpe_vocab_and_merges(vocab_size: int = 512) -> tuple[dict, list[tuple[str, str]]]:
    """The byte-level BPE of ``tiny_tokenizer`` as (vocab, merges), for a family's own tokenizer class
    (a BPE tokenizer class that takes ``vocab=`` and ``merges=``); the four special tokens are ids 0-3."""
    model = json.loads(_trained_json(vocab_size))["model"]
    return dict(model["vocab"]), [tuple(m) for m in model["merges"]]


def write_tokenizer(tokenizer, folder: str) -> list[str]:
    """Write ``tokenizer`` (tokenizer.json and its configs) into ``folder``; returns the files written."""
    os.makedirs(folder, exist_ok=True)
    return [str(p) for p in tokenizer.save_pretrained(folder)]
