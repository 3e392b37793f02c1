"""AutoRound beats RTN: KL divergence of final logits to the fp model on held-out text."""
import pytest
import torch

from blockquant import api
from blockquant.data.corpus import stdlib_paragraphs


def heldout_ids(tokenizer, n=4, seqlen=64):
    ids = tokenizer("\n\n".join(stdlib_paragraphs("heldout")[:200]), return_tensors="pt").input_ids[0]
    return torch.stack([ids[i * seqlen:(i + 1) * seqlen] for i in range(n)])


def kl(fp_logits, q_logits):
    p = torch.log_softmax(fp_logits.double(), -1)
    q = torch.log_softmax(q_logits.double(), -1)
    return torch.nn.functional.kl_div(q, p, log_target=True, reduction="batchmean").item() / fp_logits.shape[1]


def quantized_logits(folder, ids, **settings):
    result = api.quantize(folder, adapter="generic", format="fake", keep_blocks=True, nsamples=16, seqlen=64,
                          batch_size=4, seed=0, **settings)
    with torch.no_grad():
        return result.model(input_ids=ids).logits


@pytest.mark.parametrize("bits,group_size,iters", [(4, 128, 60), (2, 64, 60)])
def test_autoround_beats_rtn(tiny_folder, bits, group_size, iters):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny_folder("qwen3", 2, 128)
    fp = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = heldout_ids(AutoTokenizer.from_pretrained(folder))
    with torch.no_grad():
        ref = fp(input_ids=ids).logits
    rtn = kl(ref, quantized_logits(folder, ids, bits=bits, group_size=group_size, iters=0))
    tuned = kl(ref, quantized_logits(folder, ids, bits=bits, group_size=group_size, iters=iters))
    print(f"W{bits} g{group_size}: KL rtn {rtn:.3e}  autoround {tuned:.3e}")
    assert tuned < 0.9 * rtn
