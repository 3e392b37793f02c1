"""Tiny tokenizers for the example models, trained offline on the stdlib corpus.

``tiny_tokenizer``: a generic byte-level BPE (``PreTrainedTokenizerFast``).  ``family_tokenizer``: a
tokenizer of the transformers class a model family ships (named by the adapter), trained with that
class's own normalizer and pre-tokenizer and carrying its special tokens, so that an example folder's
tokenizer_config.json names the family's class as published checkpoints do.

Training is deterministic (same corpus, same vocabulary bytes) and runs once per process per
class and size; every call returns a fresh tokenizer so that a caller adding tokens (an image
placeholder, say) never changes what the next caller gets.
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
def _trained_json(vocab_size: int, specials: bool = True) -> str:
    """The serialized ``tokenizers`` tokenizer for ``vocab_size`` (cached per process); without
    ``specials``, ``vocab_size`` learned tokens and no special tokens or bos template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=UNK if specials else None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS) if specials else [],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_texts(), trainer=trainer)
    if not specials:
        return tok.to_str()
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


def bpe_vocab_and_merges(vocab_size: int = 512, class_name: str | None = None) -> tuple[dict, list[tuple[str, str]]]:
    """(vocab, merges) for a BPE tokenizer class that takes ``vocab=`` and ``merges=``: trained with the
    pipeline of the transformers class ``class_name`` and without foreign special tokens (``_family_model``),
    or without ``class_name`` the byte-level BPE of ``tiny_tokenizer`` (its four special tokens are ids 0-3)."""
    model = json.loads(_family_model(class_name, vocab_size) if class_name else _trained_json(vocab_size))
    model = model if class_name else model["model"]
    return dict(model["vocab"]), [tuple(m) for m in model["merges"]]


BYTE_PIECES = tuple(f"<0x{b:02X}>" for b in range(256))   # byte-fallback tokens, named as SentencePiece does


@functools.lru_cache(maxsize=None)
def _family_model(class_name: str, vocab_size: int) -> str:
    """The vocabulary and merges (JSON of a ``tokenizers`` BPE model) for the transformers tokenizer class
    ``class_name``, trained with the normalizer and pre-tokenizer the class builds (cached per process).

    A class with byte fallback (the SentencePiece lineage) keeps its default special tokens at ids 0..,
    followed by the 256 byte pieces and the learned tokens, ``vocab_size`` in all, learned from words split
    at spaces; a byte-level class (the GPT-2 lineage) learns ``vocab_size`` tokens from the 256 byte symbols,
    and its special tokens are appended by the class."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    cls = getattr(transformers, class_name)
    pipeline = json.loads(cls().backend_tokenizer.to_str())
    model = pipeline["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"{class_name} is not a BPE tokenizer class; family_tokenizer trains BPE only")
    fallback = bool(model.get("byte_fallback"))
    byte_level = '"ByteLevel"' in json.dumps(pipeline.get("pre_tokenizer"))
    front = sorted(model["vocab"], key=model["vocab"].get) + list(BYTE_PIECES) if fallback else []
    pipeline.update(added_tokens=[], post_processor=None, decoder=None)
    if fallback:   # trained as SentencePiece trains: split at spaces, "\u2581" starting a word
        pipeline["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "never",
                                     "split": True}
    tok = Tokenizer.from_str(json.dumps(pipeline))
    tok.model = models.BPE(byte_fallback=fallback)
    alphabet = dict(initial_alphabet=pre_tokenizers.ByteLevel.alphabet()) if byte_level else dict(limit_alphabet=128)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=front, show_progress=False, **alphabet)
    tok.train_from_iterator(_training_texts(), trainer=trainer)
    return json.dumps(json.loads(tok.to_str())["model"])


def family_tokenizer(class_name: str, vocab_size: int = 512, **kwargs):
    """A tokenizer of the transformers class ``class_name`` (the one a model family publishes, named by its
    adapter) over a BPE trained offline with the class's own pipeline (``_family_model``).

    ``kwargs`` go to the class: special tokens where the family's differ from the class defaults,
    ``add_bos_token``, ``extra_special_tokens``, ``additional_special_tokens``, ``model_max_length``.  A class
    without a pipeline of its own (``PreTrainedTokenizerFast``, as byte-level families without a dedicated
    class publish) gets ``tiny_tokenizer``'s byte-level BPE with the given special tokens appended."""
    import transformers
    from tokenizers import Tokenizer

    cls = getattr(transformers, class_name)
    if getattr(cls, "model", None) is None:
        backend = Tokenizer.from_str(_trained_json(vocab_size, specials=False))
        return cls(tokenizer_object=backend, **kwargs)
    vocab, merges = bpe_vocab_and_merges(vocab_size, class_name)
    return cls(vocab=vocab, merges=merges, **kwargs)


def write_tokenizer(tokenizer, folder: str) -> list[str]:
    """Write ``tokenizer`` (tokenizer.json and its configs) into ``folder``; returns the files written."""
    os.makedirs(folder, exist_ok=True)
    return [str(p) for p in tokenizer.save_pretrained(folder)]
