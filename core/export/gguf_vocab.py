"""The tokenizer of a GGUF file, as llama.cpp's converter embeds a byte-level BPE ("gpt2") tokenizer:
the token list in id order (ids without a token become ``[PADn]``), token types (normal, control for
special added tokens, user-defined for other added tokens), the merges, the special token ids,
add_bos/add_eos and the chat template (the last four through the gguf package's ``SpecialVocab``).
"""
from __future__ import annotations

import json
import os

from ..errors import UsageError

NORMAL, CONTROL, USER_DEFINED = 1, 3, 4   # llama.cpp's token types


class GgufVocab:
    """Read once (before tuning, so an unsupported tokenizer stops the run early); ``add_to`` writes
    the tokenizer.* keys into a ``gguf.GGUFWriter``."""

    def __init__(self, folder: str, vocab_size: int):
        import gguf
        from transformers import AutoTokenizer

        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise UsageError(f"{folder} has no tokenizer.json; GGUF export embeds the tokenizer and needs a fast "
                             "(tokenizer.json) tokenizer beside the model")
        with open(path) as f:
            kind = (json.load(f).get("model") or {}).get("type")
        if kind != "BPE":
            raise UsageError(f"GGUF export supports byte-level BPE tokenizers only; {path} is {kind}")
        tokenizer = AutoTokenizer.from_pretrained(folder)
        by_id = {i: t for t, i in tokenizer.get_vocab().items()}
        added = tokenizer.added_tokens_decoder
        self.tokens, self.types = [], []
        for i in range(max(vocab_size, len(by_id))):
            if i not in by_id:
                self.tokens.append(f"[PAD{i}]")
                self.types.append(USER_DEFINED)
            elif i in added:
                self.tokens.append(by_id[i])
                self.types.append(CONTROL if added[i].special else USER_DEFINED)
            else:
                self.tokens.append(by_id[i])
                self.types.append(NORMAL)
        self.special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(self.tokens))

    def add_to(self, writer) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        self.special.add_to_gguf(writer, quiet=True)
