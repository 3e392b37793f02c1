"""The engine on the generic adapter: replay equivalence, capture stops early, compact store."""
import pytest

from blockquant import api


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_replay_equivalence_through_verify(tiny_folder, kind):
    report = api.verify(tiny_folder(kind), adapter="generic", nsamples=3, seqlen=48)
    assert report.ok, report.render()
    assert len(report.blocks) == 4 and report.max_error <= 1e-5
    assert report.samples == 3


def test_capture_stops_after_last_needed_block_and_stores_compactly(tiny_folder):
    settings = api.make_settings(nsamples=6, seqlen=32)
    run = api.prepare(tiny_folder("llama"), "generic", settings)
    model = run.model
    calls = {"norm": 0, "lm_head": 0, "blocks": [0] * len(model.model.layers)}
    model.model.norm.register_forward_hook(lambda *a: calls.__setitem__("norm", calls["norm"] + 1))
    model.lm_head.register_forward_hook(lambda *a: calls.__setitem__("lm_head", calls["lm_head"] + 1))
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_hook(lambda *a, i=i: calls["blocks"].__setitem__(i, calls["blocks"][i] + 1))
    api.capture_inputs(run)
    # nothing after the blocks ever runs; each block ran at most once (the detection forward on sample 0)
    assert calls["norm"] == 0 and calls["lm_head"] == 0
    assert max(calls["blocks"]) <= 1
    store = run.stores[0]
    assert len(store) == 6
    assert all(set(s) == {"hidden_states"} and s["hidden_states"].shape == (1, 32, 64) for s in store.streams)
    assert "position_embeddings" in store.shared          # identical for every sample: stored once
    assert all(not s for s in store.per_sample)
    sizes = store.nbytes()
    assert sizes["streams"] == 6 * 32 * 64 * 4
    assert sizes["shared"] < sizes["streams"] / 6          # once, not per sample
    assert sizes["per_block"] == 0


def test_per_block_cache_policy_grows_with_blocks(tiny_folder):
    def per_block(layers):
        settings = api.make_settings(nsamples=2, seqlen=16, variable_inputs="cache")
        run = api.prepare(tiny_folder("llama", layers), "generic", settings)
        api.capture_inputs(run)
        return run.stores[0].nbytes()

    # standard LMs have no block-varying inputs: nothing is cached per block even under "cache"
    assert per_block(2)["per_block"] == 0 and per_block(4)["per_block"] == 0


def test_rtn_and_autoround_quantize_every_linear(tiny_folder, tmp_path):
    result = api.quantize(tiny_folder("llama"), adapter="generic", iters=3, nsamples=4, seqlen=32, batch_size=2,
                          group_size=32, output_dir=str(tmp_path / "out"))
    report = result.report
    assert len(report.blocks) == 4 and len(report.quantized_layers) == 28
    assert all(b.best_loss is not None and b.best_loss <= b.first_loss for b in report.blocks)
    assert "model.layers.[0-3].mlp.down_proj" in report.render()
    assert report.peak_ram_bytes > 50 * 2 ** 20


def test_group_size_that_does_not_divide_keeps_layer_in_fp(tiny_folder, tmp_path):
    result = api.quantize(tiny_folder("llama", 2, 96), adapter="generic", iters=0, nsamples=2, seqlen=16,
                          group_size=64, output_dir=str(tmp_path / "out"))
    kept = result.report.fp_layers
    assert kept and all("not divisible by group_size 64" in r for r in kept.values())
    assert "model.layers.0.self_attn.q_proj" in kept          # in_features 96
    assert "model.layers.0.mlp.down_proj" not in kept         # in_features 192 = 3 x 64
    assert "model.layers.0.mlp.down_proj" in result.report.quantized_layers
