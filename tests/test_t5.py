"""Encoder-decoder proof: a tiny T5 through the same contract (tests/packages/t5_adapter).

Two block groups; the decoder's first block receives encoder_hidden_states; the position biases
that T5's first block of each stack computes and hands on are variable inputs, rebuilt by the
adapter (block_outputs keeps block 0's biases in the replay state, replay_inputs passes them on).
"""
from blockquant import api
from blockquant.kit.testing import AdapterKit, example_folder


class TestT5Kit(AdapterKit):
    adapter = "t5"


def _captured(**settings):
    run = api.prepare(example_folder("t5"), "t5", api.make_settings(nsamples=2, seqlen=16, device="cpu", **settings))
    api.capture_inputs(run)
    return run


def test_two_groups_with_cross_attention_inputs_rebuilt_not_cached():
    run = _captured()
    assert [[b.ref.name for b in chain] for chain in run.groups] == [
        ["encoder.block.0", "encoder.block.1", "encoder.block.2"],
        ["decoder.block.0", "decoder.block.1", "decoder.block.2"]]
    encoder, decoder = run.stores
    enc_kwargs, dec_kwargs = encoder.sample_inputs(0, {}, "fp").kwargs, decoder.sample_inputs(0, {}, "fp").kwargs
    assert enc_kwargs.get("encoder_hidden_states") is None
    assert dec_kwargs["encoder_hidden_states"].shape == (1, 16, 64)      # the encoder's output, per sample
    assert dec_kwargs["position_bias"] is None                            # block 0 computes it
    assert encoder.per_block == {} and decoder.per_block == {}            # rebuilt: nothing cached per block


def test_verify_passes_when_rebuilt_and_when_cached():
    settings = dict(nsamples=2, seqlen=16, device="cpu")
    rebuilt = api.verify(example_folder("t5"), "t5", **settings)
    assert rebuilt.ok and len(rebuilt.blocks) == 6, rebuilt.render()
    cached = api.verify(example_folder("t5"), "t5", variable_inputs="cache", **settings)
    assert cached.ok, cached.render()
    run = _captured(variable_inputs="cache")
    assert run.stores[1].nbytes()["per_block"] > 0   # the fallback holds every block's biases


def test_quantize_end_to_end_quantizes_both_stacks(tmp_path):
    result = api.quantize(example_folder("t5"), "t5", output_dir=str(tmp_path / "out"), nsamples=2, seqlen=16,
                          iters=2, group_size=32, device="cpu")
    from blockquant import load_quantized

    model = load_quantized(result.output_dir)
    qnames = {n for n, m in model.named_modules() if type(m).__name__ == "QuantLinear"}
    assert any(n.startswith("encoder.block.2.") for n in qnames) and any(n.startswith("decoder.block.2.layer.1.") for n in qnames)
