"""The flux adapter through the engine: replay equivalence over denoising steps, the cache-size prediction,
quantize -> export -> reload -> generate, and the CLI on the example pipeline."""
import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from blockquant import api  # noqa: E402
from blockquant.adapters import flux  # noqa: E402
from blockquant.adapters.flux import calibration as cal  # noqa: E402
from blockquant import load_quantized_pipeline  # noqa: E402


STEPS = 3
SMALL = dict(nsamples=2, num_inference_steps=STEPS, seqlen=16, device="cpu", seed=0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("flux") / "flux-tiny")
    flux.example_model().save(path)
    return path


@pytest.mark.parametrize("mode", ["denoise", "capture_only"])
def test_replay_matches_the_transformer_over_denoising_steps(folder, mode):
    report = api.verify(folder, "flux", trajectory=mode, **SMALL)
    assert report.ok, report.render()
    assert report.samples == SMALL["nsamples"] * STEPS      # every step of every prompt is a sample
    names = [b.name for b in report.blocks]
    assert names == ["transformer_blocks.0", "transformer_blocks.1",
                     "single_transformer_blocks.0", "single_transformer_blocks.1"]
    assert report.max_error <= 1e-5
    assert not any(b.differing_kwargs for b in report.blocks)


def test_predicted_cache_size_is_what_capture_stores(folder):
    run = api.prepare(folder, "flux", api.make_settings(**SMALL))
    api.capture_inputs(run)
    store = run.stores[0]
    assert set(store.stream_keys) == {"hidden_states", "encoder_hidden_states"}
    assert set(store.shared) == {"image_rotary_emb", "joint_attention_kwargs"}     # once for all samples
    assert all(set(s) == {"temb"} for s in store.per_sample[1:])                    # timestep embedding per sample
    predicted = cal.predicted_cache_bytes(run.model, run.loaded.pipeline, run.batches)
    assert predicted["samples"] == len(store) == SMALL["nsamples"] * STEPS
    assert predicted["bytes"] == store.nbytes()["total"]


@pytest.fixture(scope="module")
def quantized(folder, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("flux-q") / "out")
    result = api.quantize(folder, "flux", iters=4, batch_size=2, output_dir=out, **SMALL)
    return result, out


def test_export_layout_is_a_pipeline_folder(quantized, folder):
    result, out = quantized
    assert result.report.blocks and len(result.report.blocks) == 4
    for rel in ("model_index.json", "scheduler/scheduler_config.json", "vae/diffusion_pytorch_model.safetensors",
                "text_encoder/model.safetensors", "text_encoder_2/model.safetensors", "tokenizer/tokenizer.json",
                "tokenizer_2/tokenizer.json", "transformer/diffusion_pytorch_model.safetensors"):
        assert os.path.isfile(os.path.join(out, rel)), rel
    with open(os.path.join(out, "transformer", "config.json")) as f:
        config = json.load(f)
    qcfg = config["quantization_config"]
    assert config["_class_name"] == "FluxTransformer2DModel"
    assert qcfg["quant_method"] == "auto-round" and qcfg["bits"] == 4
    assert qcfg["block_name_to_quantize"] == "transformer_blocks,single_transformer_blocks"
    with open(os.path.join(out, "vae", "diffusion_pytorch_model.safetensors"), "rb") as a, \
            open(os.path.join(folder, "vae", "diffusion_pytorch_model.safetensors"), "rb") as b:
        assert a.read() == b.read()


def test_reloaded_quantized_pipeline_generates_close_to_fp(quantized, folder):
    from diffusers import FluxPipeline

    _, out = quantized
    qpipe = load_quantized_pipeline(out)
    qlayers = sum(type(m).__name__ == "QuantLinear" for m in qpipe.transformer.modules())
    assert qlayers == 40                     # every linear layer of the 4 blocks
    fp = FluxPipeline.from_pretrained(folder)
    kw = dict(height=64, width=64, num_inference_steps=STEPS, max_sequence_length=16)
    image = qpipe("a lighthouse at night", generator=torch.Generator().manual_seed(1), **kw).images[0]
    assert image.size == (64, 64)
    q_lat = qpipe("a lighthouse at night", generator=torch.Generator().manual_seed(1), output_type="latent", **kw).images
    f_lat = fp("a lighthouse at night", generator=torch.Generator().manual_seed(1), output_type="latent", **kw).images
    rel = ((q_lat - f_lat).norm() / f_lat.norm()).item()
    assert 0 < rel < 0.02, rel               # measured about 0.004 (W4 g128, tiny random model)
    f_img = np.asarray(fp("a lighthouse at night", generator=torch.Generator().manual_seed(1), **kw).images[0], float)
    psnr = 10 * np.log10(255.0 ** 2 / max(((np.asarray(image, float) - f_img) ** 2).mean(), 1e-12))
    assert psnr > 35, psnr


def test_cli_quantizes_the_example_pipeline(tmp_path):
    from blockquant.frame.cli import main

    out = tmp_path / "cli-out"
    rc = main(["--adapter", "flux", "--nsamples", "1", "--set", "num_inference_steps=2", "--seqlen", "16",
               "--iters", "0", "--device", "cpu", "--output_dir", str(out)])
    assert rc == 0
    assert (out / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "model_index.json").is_file()
