"""optim8.layers.StableEmbedding: LayerNorm output, Xavier init, 32-bit optimizer state."""

import io

import pytest
import torch

import optim8
from optim8.layers import StableEmbedding


def test_forward_is_layer_norm_of_lookup():
    emb = StableEmbedding(1000, 48, padding_idx=0)
    assert torch.equal(emb.weight[0], torch.zeros(48))
    bound = (6 / (1000 + 48)) ** 0.5  # Xavier-uniform
    assert emb.weight.abs().max() <= bound
    ids = torch.randint(0, 1000, (3, 7))
    out = emb(ids)
    expected = torch.nn.functional.layer_norm(emb.weight[ids], (48,), emb.norm.weight, emb.norm.bias)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_output_dtype(dtype):
    emb = StableEmbedding(300, 32, dtype=dtype)
    ids = torch.randint(0, 300, (5,))
    out = emb(ids)
    assert out.dtype == dtype
    # normalized in fp32, rounded once to the weight's dtype
    ref = torch.nn.functional.layer_norm(emb.weight.float()[ids], (32,), emb.norm.weight.float(), emb.norm.bias.float())
    assert torch.equal(out, ref.to(dtype))


def test_weight_gets_32bit_state_and_trains():
    emb = StableEmbedding(1000, 32)
    head = torch.nn.Linear(32, 1000)
    opt = optim8.AdamW8bit(list(emb.parameters()) + list(head.parameters()), lr=1e-2)
    ids = torch.randint(0, 1000, (64,))
    first = None
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(head(emb(ids)), ids)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first
    assert opt.state[emb.weight]["exp_avg"].dtype == torch.float32  # 32000 elements, yet 32-bit
    assert opt.state[head.weight]["exp_avg"].dtype == torch.uint8


def test_mark_survives_assign_load_and_sparse_is_refused():
    emb = StableEmbedding(100, 8)
    buf = io.BytesIO()
    torch.save(emb.state_dict(), buf)
    buf.seek(0)
    emb.load_state_dict(torch.load(buf, weights_only=True), assign=True)
    assert getattr(emb.weight, "_optim8_bits") == 32
    with pytest.raises(ValueError, match="sparse"):
        StableEmbedding(10, 4, sparse=True)
