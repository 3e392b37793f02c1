"""The offline corpus, the tiny tokenizer, calibration text loading and token sample building."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest
import torch

from blockquant.data import corpus
from blockquant.data.calibration_data import (
    CalibrationSource, TokenSamples, build_token_samples, default_calibration_batches, describe_samples,
    load_texts, split_text,
)
from blockquant.config import RunSettings
from blockquant.errors import DataError
from blockquant.data.tiny import _family_model, _trained_json, tiny_tokenizer, write_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _no_bos_tokenizer(with_bos_token: bool):
    """The tiny vocabulary without the bos template (GPT-2 / Qwen style: bos never added)."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(_trained_json(512))
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    extra = {"bos_token": "<s>"} if with_bos_token else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", **extra)


# ----------------------------------------------------------------------------- corpus

def test_corpus_splits_are_disjoint_and_deterministic():
    corpus._split_paragraphs.cache_clear()
    train = corpus.stdlib_paragraphs("train")
    heldout = corpus.stdlib_paragraphs("heldout")
    assert len(train) > 2000 and len(heldout) > 100
    assert 0.03 < len(heldout) / (len(train) + len(heldout)) < 0.2
    assert all(p.strip() == p and p and "\n\n" not in p for p in train[:500])
    # cached, and a fresh copy each call
    again = corpus.stdlib_paragraphs("train")
    assert again == train and again is not train
    again.clear()
    assert corpus.stdlib_paragraphs("train") == train
    # split is by file: no file contributes to both
    files = corpus.stdlib_sources()
    assert files == sorted(files) and not any("/test/" in f or f.startswith(("test/", "idlelib/")) for f in files)
    assert {corpus.split_of(f) for f in files} == {"train", "heldout"}
    with pytest.raises(ValueError, match="heldout"):
        corpus.stdlib_paragraphs("validation")


FAMILIES = ("Qwen2Tokenizer", "GemmaTokenizer", "LlamaTokenizer")   # byte-level and byte-fallback BPE classes


def test_corpus_and_tokenizers_identical_in_a_fresh_process(tok):
    code = (
        f"import hashlib, json\nFAMILIES = {FAMILIES!r}\n"
        "from blockquant.data.corpus import stdlib_paragraphs\n"
        "from blockquant.data.tiny import _family_model, _trained_json\n"
        "h = hashlib.sha256(json.dumps([stdlib_paragraphs('train'), stdlib_paragraphs('heldout')]).encode())\n"
        "print(h.hexdigest(), hashlib.sha256(_trained_json(512).encode()).hexdigest())\n"
        "print(*(hashlib.sha256(_family_model(c, 512).encode()).hexdigest() for c in FAMILIES))\n"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345", HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    import hashlib

    here = hashlib.sha256(json.dumps([corpus.stdlib_paragraphs("train"),
                                      corpus.stdlib_paragraphs("heldout")]).encode()).hexdigest()
    families = [hashlib.sha256(_family_model(c, 512).encode()).hexdigest() for c in FAMILIES]
    assert out.stdout.split() == [here, hashlib.sha256(_trained_json(512).encode()).hexdigest()] + families


# ----------------------------------------------------------------------------- tiny tokenizer

def test_tiny_tokenizer_specials_roundtrip_and_retraining_is_identical(tok, tmp_path):
    assert len(tok) == 512 and tok.model_max_length == 4096
    assert [tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token] == ["<s>", "</s>", "<pad>", "<unk>"]
    assert [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id] == [0, 1, 2, 3]
    text = "Return the number of items — naïve café ✓ 42"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.decode(ids, skip_special_tokens=True) == text
    assert len(tok("the return value of the function")["input_ids"]) < 15   # merges learned from the corpus

    before = _trained_json(512)
    _trained_json.cache_clear()
    assert _trained_json(512) == before

    # each call is a fresh object: adding a token to one leaves the next untouched
    other = tiny_tokenizer()
    other.add_special_tokens({"additional_special_tokens": ["<image>"]})
    assert len(tiny_tokenizer()) == 512 and len(other) == 513

    files = write_tokenizer(tok, str(tmp_path / "tk"))
    assert any(f.endswith("tokenizer.json") for f in files)
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "tk"))
    assert loaded(text)["input_ids"] == ids and loaded.eos_token_id == 1 and loaded.pad_token_id == 2
    with pytest.raises(ValueError, match="at least 260"):
        tiny_tokenizer(vocab_size=100)


# ----------------------------------------------------------------------------- load_texts

def test_load_txt_paragraphs_and_lines(tmp_path):
    paras = tmp_path / "p.txt"
    paras.write_text("first para\nstill first\n\n\nsecond\n   \nthird\n", encoding="utf-8")
    assert load_texts(str(paras)) == ["first para\nstill first", "second", "third"]
    lines = tmp_path / "l.txt"
    lines.write_text("one\r\ntwo\nthree\n", encoding="utf-8")
    assert load_texts(str(lines)) == ["one", "two", "three"]
    assert split_text("only one text") == ["only one text"]


def test_load_jsonl_fields(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"text": "a text", "prompt": "not this"}, {"prompt": "a prompt"}, {"id": 3, "body": "first str"},
            {"id": 4}, "a bare string"]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert load_texts(str(path)) == ["a text", "a prompt", "first str", "a bare string"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        load_texts(str(bad))


def test_load_tsv_column_or_first(tmp_path):
    named = tmp_path / "p.tsv"
    named.write_text("id\tcaption\n1\ta boat\n2\ta tree\n", encoding="utf-8")
    assert load_texts(str(named)) == ["a boat", "a tree"]          # the header names the column
    bare = tmp_path / "bare.tsv"
    bare.write_text("a boat\t1\na tree\t2\n", encoding="utf-8")
    assert load_texts(str(bare)) == ["a boat", "a tree"]           # no header: the first column


def test_load_json_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(["x", {"text": "y"}]), encoding="utf-8")
    assert load_texts(str(path)) == ["x", "y"]


def test_load_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3], "text": ["alpha", "", "gamma"]}), path)
    assert load_texts(str(path)) == ["alpha", "gamma"]
    other = tmp_path / "o.parquet"
    pq.write_table(pa.table({"n": [1], "content": ["only string column"]}), other)
    assert load_texts(str(other)) == ["only string column"]
    numbers = tmp_path / "n.parquet"
    pq.write_table(pa.table({"n": [1, 2]}), numbers)
    with pytest.raises(DataError, match="no text column"):
        load_texts(str(numbers))


def test_load_lists_none_and_errors(tmp_path):
    assert load_texts(["a", " ", "b"]) == ["a", "b"]
    assert load_texts(None) == corpus.stdlib_paragraphs("train")
    with pytest.raises(DataError, match="must be strings"):
        load_texts(["a", 3])
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(DataError, match="nope.txt: no such file"):
        load_texts(missing)
    with pytest.raises(DataError, match="no such file"):
        load_texts("data/sub/calib")
    empty = tmp_path / "e.txt"
    empty.write_text("\n  \n\n", encoding="utf-8")
    with pytest.raises(DataError, match="holds no text"):
        load_texts(str(empty))
    with pytest.raises(DataError, match="holds no text"):
        load_texts([" ", ""])
    with pytest.raises(DataError, match="is a folder"):
        load_texts(str(tmp_path))
    (tmp_path / "x.csv").write_text("a,b\n", encoding="utf-8")
    with pytest.raises(DataError, match="unsupported file type"):
        load_texts(str(tmp_path / "x.csv"))


def test_hub_name_offline_and_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)          # import datasets -> ImportError
    with pytest.raises(DataError, match=r"needs the `datasets` library.*--dataset path/to/file.txt"):
        load_texts("NeelNanda/pile-10k")
    monkeypatch.setitem(sys.modules, "datasets", types.ModuleType("datasets"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"hub is unreachable \(HF_HUB_OFFLINE is set\).*\.jsonl\|\.parquet"):
        load_texts("wikitext:train")


# ----------------------------------------------------------------------------- token samples

def _check_shapes(samples, nsamples, seqlen):
    assert len(samples) == nsamples
    for s in samples:
        assert set(s) == {"input_ids", "attention_mask"}
        assert s["input_ids"].shape == (1, seqlen) and s["input_ids"].dtype == torch.long
        assert torch.equal(s["attention_mask"], torch.ones(1, seqlen, dtype=torch.long))


def test_samples_are_exact_and_start_with_bos(tok):
    texts = corpus.stdlib_paragraphs("heldout")
    samples = build_token_samples(tok, texts, nsamples=6, seqlen=100, seed=1)
    _check_shapes(samples, 6, 100)
    assert all(int(s["input_ids"][0, 0]) == tok.bos_token_id for s in samples)
    assert isinstance(samples, TokenSamples) and samples.texts_total == len(texts)
    assert not samples.exhausted and samples.texts_tokenized < len(texts)    # stopped tokenizing early
    # the stream is the shuffled texts joined by eos: the first sample starts with one of the texts
    body = samples[0]["input_ids"][0, 1:].tolist()
    first_text_ids = body[:body.index(tok.eos_token_id)] if tok.eos_token_id in body else body
    assert any(tok(t, add_special_tokens=False)["input_ids"][:len(first_text_ids)] == first_text_ids for t in texts)

    again = build_token_samples(tok, texts, nsamples=6, seqlen=100, seed=1)
    other = build_token_samples(tok, texts, nsamples=6, seqlen=100, seed=2)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(samples, again))
    assert not all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(samples, other))


def test_short_texts_are_never_dropped():
    tok = _no_bos_tokenizer(with_bos_token=True)          # has a bos token but does not add it
    word_ids = tok("abc", add_special_tokens=False)["input_ids"]
    texts = ["abc"] * 1000
    per_text = len(word_ids) + 1                           # text + eos separator
    nsamples, seqlen = 10, 50
    samples = build_token_samples(tok, texts, nsamples, seqlen)
    _check_shapes(samples, nsamples, seqlen)
    stream = torch.cat([s["input_ids"][0] for s in samples]).tolist()
    assert stream[:2 * per_text] == word_ids + [tok.eos_token_id] + word_ids + [tok.eos_token_id]
    assert stream.count(tok.eos_token_id) == (nsamples * seqlen) // per_text      # every text is used
    assert samples.texts_used == -(-nsamples * seqlen // per_text)

    # exactly enough: 1000 texts of len(word_ids) tokens with 999 separators
    total = 1000 * len(word_ids) + 999
    exact = build_token_samples(tok, texts, 1, total)
    assert exact.texts_used == 1000 and exact.exhausted
    with pytest.raises(DataError) as info:
        build_token_samples(tok, texts, 1, total + 1)
    message = str(info.value)
    assert f"1,000 texts hold {total:,} tokens" in message and f"needs {total + 1:,}" in message
    assert "lower --nsamples or --seqlen" in message and "--dataset" in message


def test_not_enough_data_message_with_bos(tok):
    with pytest.raises(DataError, match=r"needs 1,023 \(1,023 text tokens per sample after bos\)"):
        build_token_samples(tok, ["tiny"] * 3, nsamples=1, seqlen=1024)
    with pytest.raises(DataError, match="needs a tokenizer"):
        build_token_samples(None, ["x"], 1, 8)


def test_no_eos_tokenizer_uses_newlines():
    tok = _no_bos_tokenizer(with_bos_token=False)
    tok.eos_token = None
    samples = build_token_samples(tok, ["ab", "cd"] * 20, 2, 8)
    _check_shapes(samples, 2, 8)
    assert "\n\n" in tok.decode(samples[0]["input_ids"][0])


def test_describe_and_default_batches(tok, tmp_path, caplog):
    path = tmp_path / "calib.txt"
    path.write_text("\n\n".join(f"paragraph number {i} about quantization" for i in range(200)), encoding="utf-8")
    settings = RunSettings(nsamples=4, seqlen=64, seed=7)
    with caplog.at_level("INFO", logger="blockquant"):
        batches = default_calibration_batches(None, CalibrationSource(spec=str(path), tokenizer=tok), settings)
    _check_shapes(batches, 4, 64)
    line = describe_samples(batches)
    assert line.startswith("built 4 samples x 64 tokens from ") and "of 200 texts" in line
    assert line in caplog.text

    processor = types.SimpleNamespace(tokenizer=tok)       # a processor carrying its tokenizer
    via_processor = default_calibration_batches(None, CalibrationSource(spec=str(path), processor=processor), settings)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, via_processor))

    everything = build_token_samples(tok, load_texts(str(path)), 1, 200)
    assert everything.exhausted          # 200 texts fit in one tokenizer batch: all were tokenized
    assert describe_samples(everything) == (f"built 1 samples x 200 tokens from {everything.texts_used:,} of 200 "
                                            f"texts ({everything.tokens_tokenized / 1000:.1f}k tokens available)")
    assert describe_samples([]) == "built 0 samples"
    assert describe_samples([{"input_ids": torch.zeros(1, 5)}]) == "built 1 samples x 5 tokens"


def test_default_corpus_gives_full_size_calibration(tok):
    settings = RunSettings(nsamples=32, seqlen=512)
    samples = default_calibration_batches(None, CalibrationSource(spec=None, tokenizer=tok), settings)
    _check_shapes(samples, 32, 512)
