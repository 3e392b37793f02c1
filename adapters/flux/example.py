"""A tiny random FluxPipeline built offline: tiny CLIP and T5 encoders with locally built tokenizers,
a tiny VAE, the flow-matching scheduler and a 2+2-block FLUX transformer of width 128 (about 1.9M
parameters, so that every linear layer quantizes at the default W4A16 g128).

Everything is deterministic: the same seed gives byte-identical saved folders.  Both tokenizers are built
from the default prompts without the ``tokenizers`` trainers (whose tie-breaking varies between runs):
the T5 Unigram vocabulary from word counts with rounded scores, the CLIP BPE merges by a small greedy
learner with ordered tie-breaking.
"""
from __future__ import annotations

import collections
import json
import math
import os
import re

import torch

from .prompts import DEFAULT_PROMPTS

# Sizes that fit together: transformer in_channels = 4 x VAE latent channels (2x2 packing),
# joint_attention_dim = T5 width, pooled_projection_dim = CLIP width, sum(axes_dims_rope) = head dim.
TEXT_DIM = 32
LATENT_CHANNELS = 16
IMAGE_SIZE = 64            # the VAE's sample_size: default calibration/generation resolution
CLIP_MAX_LENGTH = 77


def _learn_merges(words: collections.Counter, count: int) -> list[tuple[str, str]]:
    """Byte-pair merges learnt greedily; ties broken by the pair itself, so the result is reproducible."""
    splits = {w: list(w[:-1]) + [w[-1] + "</w>"] for w in words}
    merges = []
    for _ in range(count):
        pairs = collections.Counter()
        for word, parts in splits.items():
            for pair in zip(parts, parts[1:]):
                pairs[pair] += words[word]
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for word, parts in splits.items():
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            splits[word] = merged
    return merges


def _clip_tokenizer():
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for piece in alphabet + [c + "</w>" for c in alphabet]:
        vocab[piece] = len(vocab)
    words = collections.Counter(w for p in DEFAULT_PROMPTS for w in re.findall(r"[a-z]+", p.lower()))
    merges = _learn_merges(words, 200)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)


def _t5_tokenizer():
    from transformers import T5Tokenizer

    words = collections.Counter(w for p in DEFAULT_PROMPTS for w in re.findall(r"\S+", p.lower()))
    chars = collections.Counter(c for p in DEFAULT_PROMPTS for c in p.lower() if not c.isspace())
    total = sum(words.values()) + sum(chars.values())
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    # Word pieces score higher than characters; scores rounded so that the file is reproducible.
    for word, count in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])):
        vocab.append(("\u2581" + word, round(math.log(count / total), 4)))
    for char, count in sorted(chars.items(), key=lambda kv: (-kv[1], kv[0])):
        vocab.append((char, round(math.log(count / total) - 10.0, 4)))
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def build_components(seed: int = 0, num_layers: int = 2, num_single_layers: int = 2) -> dict:
    """The components of a tiny FluxPipeline, each built under its own fixed seed."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tokenizer = _clip_tokenizer()
    tokenizer_2 = _t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=CLIP_MAX_LENGTH, projection_dim=TEXT_DIM,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )).eval()
    torch.manual_seed(seed + 1)
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=TEXT_DIM, d_ff=64, d_kv=8, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
    )).eval()
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, layers_per_block=1, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16), sample_size=IMAGE_SIZE, use_quant_conv=False,
        use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159,
    ).eval()
    torch.manual_seed(seed + 3)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=16, num_attention_heads=8, joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM,
        guidance_embeds=True, axes_dims_rope=(4, 6, 6),
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return dict(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)


def build_pipeline(seed: int = 0, num_layers: int = 2, num_single_layers: int = 2):
    """A tiny random ``FluxPipeline`` (fp32, CPU)."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline(**build_components(seed, num_layers, num_single_layers))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_pipeline(pipe, folder: str) -> None:
    """Write a pipeline folder ``FluxPipeline.from_pretrained`` loads, named like real FLUX folders."""
    pipe.save_pretrained(folder, safe_serialization=True)
    index_path = os.path.join(folder, "model_index.json")
    with open(index_path, encoding="utf-8") as f:
        index = json.load(f)
    # transformers 5 records the T5 tokenizer as T5Tokenizer; hub FLUX folders say T5TokenizerFast.
    index["tokenizer_2"] = ["transformers", "T5TokenizerFast"]
    with open(index_path, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2, sort_keys=True)
        f.write("\n")
