"""Calibration samples are framed by the tokenizer's own special tokens, as the model sees text in use."""
import pytest
import torch

from blockquant.data.calibration_data import build_token_samples, load_texts, special_frame
from blockquant.data.tiny import tiny_tokenizer


def _bert_tokenizer():
    from transformers import BertTokenizerFast

    words = sorted({w for t in load_texts(None)[:200] for w in t.lower().split() if w.isalpha()})[:400]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz") + words
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(dict.fromkeys(vocab))})


def test_decoder_samples_start_with_bos():
    tok = tiny_tokenizer(512)
    assert special_frame(tok) == ([tok.bos_token_id], [])
    samples = build_token_samples(tok, load_texts(None), nsamples=3, seqlen=24)
    for s in samples:
        ids = s["input_ids"][0]
        assert ids.shape == (24,) and ids[0] == tok.bos_token_id and (ids[1:] != tok.bos_token_id).all()


def test_encoder_samples_are_cls_text_sep():
    tok = _bert_tokenizer()
    cls, sep = tok.cls_token_id, tok.sep_token_id
    assert special_frame(tok) == ([cls], [sep])
    samples = build_token_samples(tok, load_texts(None), nsamples=4, seqlen=16)
    for s in samples:
        ids = s["input_ids"][0].tolist()
        assert len(ids) == 16 and ids[0] == cls and ids[-1] == sep
        assert cls not in ids[1:-1] and tok.decode(ids[1:-1]).strip()
    assert torch.equal(samples[0]["attention_mask"], torch.ones(1, 16, dtype=torch.long))


def test_tokenizer_without_special_tokens_gets_plain_text():
    from transformers import PreTrainedTokenizerFast

    base = tiny_tokenizer(512)
    plain = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer.__class__.from_str(
        base.backend_tokenizer.to_str()), eos_token=base.eos_token)
    plain.backend_tokenizer.post_processor = None
    assert special_frame(plain) == ([], [])
    samples = build_token_samples(plain, load_texts(None), nsamples=2, seqlen=12)
    assert all(s["input_ids"].shape == (1, 12) for s in samples)


def test_seqlen_must_leave_room_between_the_special_tokens():
    from blockquant.errors import DataError

    with pytest.raises(DataError, match="--seqlen 3 or more"):
        build_token_samples(_bert_tokenizer(), load_texts(None), nsamples=1, seqlen=2)
