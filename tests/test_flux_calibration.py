"""FLUX calibration: prompt sources, the batch plan, and the two trajectory modes driving the real pipeline."""
import contextlib
import json

import pytest
import torch

pytest.importorskip("diffusers")

from blockquant.adapters import flux  # noqa: E402
from blockquant.adapters.flux import calibration as cal  # noqa: E402
from blockquant.adapters.flux.calibration import read_prompts  # noqa: E402
from blockquant.data.corpus import image_prompts  # noqa: E402
from blockquant.run.capture import StopForward  # noqa: E402
from blockquant.config import RunSettings  # noqa: E402
from blockquant.frame.contract import RunContext  # noqa: E402
from blockquant.model.model_io import LoadedModel  # noqa: E402
from blockquant.errors import DataError, UsageError  # noqa: E402
from blockquant.frame.options import parse_options  # noqa: E402


STEPS = 3


@pytest.fixture(scope="module")
def example():
    return flux.example_model()


def _ctx(example, options, **settings):
    """The run context the engine hands the flux hooks: settings, options, the transformer and its pipeline."""
    return RunContext(settings=RunSettings(**settings), options=options,
                      loaded=LoadedModel(model=example.model, pipeline=example.pipeline))


def test_prompt_sources(tmp_path):
    assert read_prompts(None) == image_prompts() and len(image_prompts()) >= 32
    assert read_prompts(["a cat ", "", "a dog"]) == ["a cat", "a dog"]
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\n\nsecond prompt\n")
    assert read_prompts(str(txt)) == ["first prompt", "second prompt"]
    tsv = tmp_path / "p.tsv"
    tsv.write_text("id\tcaption\n1\ta boat\n2\ta tree\n")
    assert read_prompts(str(tsv)) == ["a boat", "a tree"]
    bare = tmp_path / "bare.tsv"
    bare.write_text("a boat\t1\na tree\t2\n")
    assert read_prompts(str(bare)) == ["a boat", "a tree"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps(x) for x in ({"prompt": "x one"}, {"caption": "x two"}, "x three")))
    assert read_prompts(str(jsonl)) == ["x one", "x two", "x three"]


def test_prompt_source_errors(tmp_path, monkeypatch):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(DataError, match="holds no text"):
        read_prompts(str(empty))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        read_prompts(str(bad))
    with pytest.raises(DataError, match="folder"):
        read_prompts(str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="someone/captions: no such local file"):
        read_prompts("someone/captions")


def test_plan_cycles_prompts_with_distinct_seeds(example):
    from blockquant.data.calibration_data import CalibrationSource

    ctx = _ctx(example, flux.Options(num_inference_steps=STEPS), nsamples=5, seqlen=2048, seed=7)
    batches = flux.calibration_batches(CalibrationSource(spec=["one", "two"]), ctx)
    assert [b["prompt"] for b in batches] == ["one", "two", "one", "two", "one"]
    assert [b["seed"] for b in batches] == [7, 8, 9, 10, 11]
    b = batches[0]
    assert (b["height"], b["width"], b["mode"], b["max_sequence_length"]) == (64, 64, "denoise", 512)
    size = cal.predicted_cache_bytes(example.model, example.pipeline, batches)
    assert size["samples"] == 5 * STEPS and size["image_tokens"] == 16 and size["text_tokens"] == 512


def test_plan_rejects_bad_options(example):
    with pytest.raises(UsageError, match=r"option 'trajectory' of adapter 'flux': 'fast' is invalid"):
        parse_options(flux.Options, {"trajectory": "fast"}, "flux")
    with pytest.raises(UsageError, match="num_inference_steps must be a positive integer"):
        parse_options(flux.Options, {"num_inference_steps": "0"}, "flux")
    with pytest.raises(UsageError, match="divisible by 16"):
        cal.calibration_plan(_ctx(example, flux.Options(height=40), nsamples=1))


def _drive(example, mode, images=None):
    """Run one calibration prompt with the capture stop hook; count block completions, record inputs."""
    tr = example.model
    chain = list(tr.transformer_blocks) + list(tr.single_transformer_blocks)
    done = [0] * len(chain)
    inputs = []
    before = set(vars(tr))
    handles = [b.register_forward_hook(lambda m, a, o, i=i: done.__setitem__(i, done[i] + 1)) for i, b in enumerate(chain)]
    handles.append(tr.register_forward_pre_hook(lambda m, a, k: inputs.append(k["hidden_states"].clone()), with_kwargs=True))
    ctx = _ctx(example, flux.Options(num_inference_steps=STEPS, trajectory=mode), nsamples=1, seqlen=16, images=images)
    cal.install_stop_hook(ctx, lambda module, fn: handles.append(module.register_forward_pre_hook(fn, with_kwargs=True)))
    batch = cal.calibration_plan(ctx)[0]
    try:
        with torch.no_grad(), contextlib.suppress(StopForward):
            cal.run_pipeline(ctx, batch)
    finally:
        for h in handles:
            h.remove()
    # the run leaves nothing behind: no run state in the stash, no attribute on the model (but diffusers' own)
    assert ctx.stash.get(cal.RUN) is None and "forward" not in vars(tr) and set(vars(tr)) - before <= {"_diffusers_hook"}
    return done, inputs


def test_denoise_runs_the_real_trajectory_and_stops_at_the_last_step(example):
    done, inputs = _drive(example, "denoise")
    # block 0 runs at every step; the rest at every step but the last, whose output nothing needs
    assert done == [STEPS] + [STEPS - 1] * (len(done) - 1)
    assert len(inputs) == STEPS


def test_capture_only_never_runs_past_the_first_block_and_follows_the_forward_process(example):
    done, inputs = _drive(example, "capture_only")
    assert done == [STEPS] + [0] * (len(done) - 1)
    sigmas = example.pipeline.scheduler.sigmas
    noise = inputs[0]
    assert sigmas[0] == 1.0
    for k in range(1, STEPS):   # x0 = 0 without images: latents are the noise scaled to the step's sigma
        torch.testing.assert_close(inputs[k], sigmas[k] * noise, rtol=1e-5, atol=1e-6)


def test_capture_only_with_images_interpolates_towards_the_image_latent(example, tmp_path):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (80, 72), "white")
    ImageDraw.Draw(image).ellipse((10, 10, 60, 60), fill="red")
    image.save(tmp_path / "disc.png")
    done, inputs = _drive(example, "capture_only", images=str(tmp_path))
    assert done[0] == STEPS and sum(done[1:]) == 0
    sigmas = example.pipeline.scheduler.sigmas
    noise = inputs[0]
    x0 = [(inputs[k] - sigmas[k] * noise) / (1 - sigmas[k]) for k in range(1, STEPS)]
    assert x0[0].abs().max() > 0.1          # a real image latent, not zero
    torch.testing.assert_close(x0[1], x0[0], rtol=1e-4, atol=1e-4)


def test_a_run_keeps_accelerate_hooks_on_the_transformer(example):
    """run_pipeline wraps forward only for its duration, restoring a dispatched model's hook wrapper."""
    from accelerate import dispatch_model
    from accelerate.hooks import remove_hook_from_submodules

    tr = example.model
    dispatch_model(tr, device_map={"": "cpu"}, force_hooks=True)
    try:
        wrapped = vars(tr)["forward"]
        ctx = _ctx(example, flux.Options(num_inference_steps=2), nsamples=1, seqlen=16)
        with torch.no_grad():
            cal.run_pipeline(ctx, cal.calibration_plan(ctx)[0])
        assert vars(tr)["forward"] is wrapped
    finally:
        remove_hook_from_submodules(tr)
    assert not hasattr(tr, "_hf_hook")
