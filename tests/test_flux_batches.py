"""FLUX's double- and single-stream blocks share one forward for a mini-batch of (prompt, step) samples.

Their kwargs include ``joint_attention_kwargs``, a dict every sample shares; replay copies plain dicts per
sample, so collation compares such dicts key by key (an empty one joins).  The tuning loss and the gradients
of the batched forward equal the sample-by-sample ones, on the flux adapter's example pipeline."""
import pytest

pytest.importorskip("diffusers")

from blockquant.adapters import flux  # noqa: E402
from tuning_step import assert_same, captured, loss_and_grads  # noqa: E402

SETTINGS = dict(nsamples=2, num_inference_steps=2, seqlen=16, device="cpu", seed=0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("flux") / "flux-tiny")
    flux.example_model().save(path)
    return path


@pytest.mark.parametrize("position", [0, 2])      # a double-stream block, a single-stream block
def test_flux_blocks_share_one_forward_with_the_sample_by_sample_loss_and_gradients(folder, position):
    run = captured(folder, "flux", **SETTINGS)
    n = len(run.stores[0])
    assert n == 4 and run.groups[0][position].ref.name.startswith(
        "transformer_blocks." if position < 2 else "single_transformer_blocks.")
    batched = loss_and_grads(run, False, position)
    alone = loss_and_grads(run, False, position, batch=1)
    assert_same(batched, alone, n, joined_by="collation")
