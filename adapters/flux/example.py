"""A tiny random FluxPipeline built offline: CLIP and T5 encoders with tokenizers written out from the default
prompts' words (no trainer, so no tie-breaking), a tiny VAE, the flow-matching scheduler and a 2+2-block FLUX
transformer of width 128 (every linear layer quantizes at W4A16 g128).  Same seed, byte-identical folders."""
from __future__ import annotations

import json
import os
import re

import torch

from blockquant.data.corpus import image_prompts
from blockquant.model.model_io import read_json

# Sizes that fit together: transformer in_channels = 4 x VAE latent channels (2x2 packing),
# joint_attention_dim = T5 width, pooled_projection_dim = CLIP width, sum(axes_dims_rope) = head dim.
TEXT_DIM, LATENT_CHANNELS, IMAGE_SIZE, CLIP_MAX_LENGTH = 32, 16, 64, 77
WORDS = sorted({w for p in image_prompts() for w in re.findall(r"[a-z]+", p.lower())})


def _tokenizers():
    """CLIP: byte-level BPE merging each prompt word left to right; T5: Unigram over the words and characters."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer, T5Tokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(["<|startoftext|>", "<|endoftext|>"] + alphabet + [c + "</w>" for c in alphabet])}
    merges = {}
    for word in WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        for i in range(1, len(pieces)):
            merges["".join(pieces[:i]), pieces[i]] = None
            vocab.setdefault("".join(pieces[:i + 1]), len(vocab))
    clip = CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=CLIP_MAX_LENGTH)
    chars = sorted({c for p in image_prompts() for c in p.lower() if not c.isspace()})
    t5 = T5Tokenizer(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
                     + [("\u2581" + w, -1.0) for w in WORDS] + [(c, -10.0) for c in chars], extra_ids=0)
    return clip, t5


def build_pipeline(seed: int = 0, num_layers: int = 2, num_single_layers: int = 2):
    """A tiny random ``FluxPipeline`` (fp32, CPU), each component built under its own fixed seed."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tokenizer, tokenizer_2 = _tokenizers()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=CLIP_MAX_LENGTH, projection_dim=TEXT_DIM,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    torch.manual_seed(seed + 1)
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=TEXT_DIM, d_ff=64, d_kv=8, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1))
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, layers_per_block=1, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16), sample_size=IMAGE_SIZE, use_quant_conv=False,
        use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)
    torch.manual_seed(seed + 3)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=16, num_attention_heads=8, joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM,
        guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2.eval(), tokenizer_2=tokenizer_2, transformer=transformer.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_pipeline(pipe, folder: str) -> None:
    """Write a folder ``FluxPipeline.from_pretrained`` loads, named like real FLUX folders."""
    pipe.save_pretrained(folder, safe_serialization=True)
    path = os.path.join(folder, "model_index.json")
    index = read_json(path)
    index["tokenizer_2"] = ["transformers", "T5TokenizerFast"]   # transformers 5 writes T5Tokenizer; hub folders say Fast
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
