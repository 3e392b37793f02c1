"""The blockquant test kit on the LLaVA adapter, plus what is specific to it: image calibration."""
import torch

from blockquant import api
from blockquant.kit.testing import AdapterKit, example_folder


class TestLlavaKit(AdapterKit):
    adapter = "llava"


def test_calibration_batches_carry_images():
    run = api.prepare(example_folder("llava"), "llava", api.make_settings(nsamples=2, seqlen=16, device="cpu"))
    api.capture_inputs(run)
    assert len(run.batches) == 2
    for batch in run.batches:
        assert batch["pixel_values"].shape == (1, 3, 32, 32)
        assert int((batch["input_ids"] == run.loaded.processor.image_token_id).sum()) == 17
    # the captured first-block hidden states include the 17 image positions
    assert run.stores[0].streams[0]["hidden_states"].shape[1] >= 17
    assert [b.ref.path for b in run.groups[0]] == ["model.language_model.layers"] * 4
    assert torch.isfinite(run.stores[0].streams[0]["hidden_states"]).all()
