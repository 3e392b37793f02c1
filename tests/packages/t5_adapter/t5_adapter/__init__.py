"""A T5 (``T5ForConditionalGeneration``) adapter: the encoder-decoder proof of the hook contract.

- Two block groups: ``encoder.block`` and ``decoder.block``.  The decoder group is captured from
  the same calibration forward, so its first block's kwargs hold ``encoder_hidden_states`` (the fp
  encoder's output, per sample) and the masks; the decoder is calibrated on fp encoder outputs.
- Position bias: T5's first block of each stack computes the relative position bias (plus the
  mask) and the stack hands it to every later block (``position_bias``; in the decoder also
  ``encoder_decoder_position_bias`` for cross-attention).  Block 0 receives None, the others a
  tensor: a variable input.  Decision: rebuild, not cache.  ``block_outputs`` keeps the biases
  block 0 returns in the replay stream's ``cached.state`` (one tensor per sample and stream, O(samples)
  RAM, computed by T5's own code) and ``replay_inputs`` hands them to the later blocks.  Caching
  them per block (``--variable_inputs cache``) also works, at O(blocks x samples) RAM.
- Loading: ``patch_model`` points both stacks' ``embed_tokens`` at ``shared`` (the checkpoint holds
  ``shared.weight`` only).
- Calibration: the engine's text samples as encoder input, and the same text shifted right as
  decoder input (teacher forcing).
"""
from __future__ import annotations


from blockquant import AdapterInfo, ExampleModel, hookimpl

BIAS_KEYS = ("position_bias", "encoder_decoder_position_bias")


@hookimpl
def adapter_info():
    return AdapterInfo(name="t5", description="T5 encoder-decoder (test/proof adapter)", model_types=("t5",),
                       architectures=("T5ForConditionalGeneration",), requires={"transformers": ">=5.5.4,<6"})


@hookimpl
def fixed_attrs(model):
    # wo stays in full precision, as transformers keeps it (T5's _keep_in_fp32_modules; its forward
    # also reads wo.weight.dtype, which a packed QuantLinear does not have).
    return {"block_groups": [["encoder.block"], ["decoder.block"]], "rebuilt_keys": BIAS_KEYS,
            "fp_layers": (r".*\.DenseReluDense\.wo$",)}


@hookimpl
def patch_model(model):
    # The checkpoint holds the embedding once, as shared.weight (the stacks' copies are tied to it):
    # make both stacks use the shared module itself so it streams in once.  Idempotent.
    for stack in (model.encoder, model.decoder):
        if stack.embed_tokens is not model.shared:
            stack.embed_tokens = model.shared


@hookimpl
def calibration_batches(model, source, settings):
    from blockquant.data.calibration_data import default_calibration_batches

    batches = []
    for sample in default_calibration_batches(model, source, settings):
        ids = sample["input_ids"]
        batches.append(dict(sample, decoder_input_ids=model._shift_right(ids)))
    return batches


@hookimpl
def block_outputs(block, index, output, inputs, cached):
    hidden, self_bias, cross_bias = output
    if index.position == 0:
        cached.state["position_bias"] = self_bias
        if cross_bias is not None:
            cached.state["encoder_decoder_position_bias"] = cross_bias
    return {"hidden_states": hidden}


@hookimpl
def replay_inputs(block, index, cached):
    if index.position == 0:
        return None
    needed = BIAS_KEYS if cached.kwargs.get("encoder_hidden_states") is not None else BIAS_KEYS[:1]
    missing = [k for k in needed if k not in cached.state]
    if missing:
        from blockquant.errors import AdapterError

        raise AdapterError(f"t5: {index.name} needs {missing[0]} from block 0 of its stack, which has not run "
                           "in this replay stream")
    return {k: cached.state[k] for k in needed}


def build_example(seed: int = 0) -> ExampleModel:
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from blockquant.data.tiny import tiny_tokenizer

    torch.manual_seed(seed)
    config = T5Config(vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_layers=3, num_decoder_layers=3, num_heads=4,
                      relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
                      decoder_start_token_id=2, pad_token_id=2, eos_token_id=1, tie_word_embeddings=False)
    model = T5ForConditionalGeneration(config).eval()
    tokenizer = tiny_tokenizer(512)

    return ExampleModel.of("tiny-t5", model, tokenizer)


@hookimpl
def example_model():
    return build_example()
