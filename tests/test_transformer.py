"""DETR's multi-head attention against the plain float64 formula, in float32, under CPU autocast and
with bfloat16 weights."""
import pytest
import torch

from detrkit.transformer import MultiheadAttention


def reference(attn: MultiheadAttention, query, key, value, key_padding_mask) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per head in float64, masked keys left out."""
    w = attn.in_proj_weight.double().chunk(3)
    b = attn.in_proj_bias.double().chunk(3)
    heads = attn.nheads
    q, k, v = ((x.double() @ wi.T + bi).unflatten(-1, (heads, -1)).transpose(1, 2)
               for x, wi, bi in zip((query, key, value), w, b))
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)
    return out @ attn.out_proj.weight.double().T + attn.out_proj.bias.double()


@pytest.fixture
def inputs():
    torch.manual_seed(0)
    attn = MultiheadAttention(32, 4).eval()
    torch.nn.init.normal_(attn.out_proj.bias)
    query, key = torch.randn(2, 7, 32), torch.randn(2, 11, 32)
    value = torch.randn(2, 11, 32)
    mask = torch.zeros(2, 11, dtype=torch.bool)
    mask[1, 8:] = True
    return attn, query, key, value, mask


def test_matches_the_float64_formula(inputs):
    attn, *args = inputs
    torch.testing.assert_close(attn(*args).double(), reference(attn, *args), rtol=1e-5, atol=1e-5)


def test_bfloat16_on_cpu(inputs):
    attn, query, key, value, mask = inputs
    expected = reference(attn, query, key, value, mask)
    query.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(query, key, value, mask)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected, rtol=0.05, atol=0.05)
    out.float().sum().backward()
    assert query.grad is not None and query.grad.isfinite().all()
    # a model cast to bfloat16 as a whole: attention runs in float32 inside, the output is bfloat16
    out = attn.bfloat16()(query.detach().bfloat16(), key.bfloat16(), value.bfloat16(), mask)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected, rtol=0.05, atol=0.1)
