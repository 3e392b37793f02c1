"""Building an adapter's tiny example model (the ``example_model`` hook) from its config classes, offline.

What every family's example needs and only the model knowledge differs: a seeded random model whose
activations stay lively in a few layers (``random_model``), the ids of the special tokens its config
names (``token_ids``), a vocabulary rounded up past the tokenizer (``padded_vocab``).  Return it with
``ExampleModel.of(name, model, tokenizer_or_processor)``: a processor assembled without torchvision
(``blockquant.data.processors.assemble``) saves itself with the real class name.
"""
from __future__ import annotations

import torch


def random_model(model_class, config, seed: int = 0, init_std: float | None = None) -> torch.nn.Module:
    """``model_class(config)`` in eval mode, its weights drawn after ``torch.manual_seed(seed)``.

    ``init_std``: redraw every matrix from N(0, init_std) (the default initialisation of some tiny
    models leaves activations near constant after a few layers).  The generation config's eos and pad
    ids are the text config's, so that a composite model generates like its text model."""
    torch.manual_seed(seed)
    model = model_class(config).eval()
    if init_std is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, init_std)
    text = config.get_text_config()
    model.generation_config.eos_token_id = text.eos_token_id
    model.generation_config.pad_token_id = text.pad_token_id
    return model


def token_ids(tokenizer, **tokens: str) -> dict[str, int]:
    """``{field: id}`` of the named special tokens, e.g. ``token_ids(tok, image_token_id="<image>")``."""
    return {field: tokenizer.convert_tokens_to_ids(token) for field, token in tokens.items()}


def padded_vocab(tokenizer, multiple: int = 8) -> int:
    """The tokenizer's size rounded up to a multiple of ``multiple`` (model vocabularies usually are)."""
    return -(-len(tokenizer) // multiple) * multiple
