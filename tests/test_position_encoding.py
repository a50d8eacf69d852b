import math

import pytest
import torch

from detrkit.config import ConfigError
from detrkit.position_encoding import PositionEmbeddingLearned, PositionEmbeddingSine, build_position_encoding


def sine_reference(mask, num_pos_feats, temperature=10000, normalize=True, scale=2 * math.pi, offset=0.0):
    """DETR's sine encoding written out pixel by pixel in float64."""
    b, h, w = mask.shape
    valid = (~mask).tolist()
    out = torch.zeros(b, 2 * num_pos_feats, h, w, dtype=torch.float64)
    for n in range(b):
        for i in range(h):
            for j in range(w):
                y = sum(valid[n][r][j] for r in range(i + 1))
                x = sum(valid[n][i][c] for c in range(j + 1))
                if normalize:
                    y = (y + offset) / (sum(valid[n][r][j] for r in range(h)) + 1e-6) * scale
                    x = (x + offset) / (sum(valid[n][i][c] for c in range(w)) + 1e-6) * scale
                for k in range(num_pos_feats):
                    freq = temperature ** (2 * (k // 2) / num_pos_feats)
                    fn = math.sin if k % 2 == 0 else math.cos
                    out[n, k, i, j] = fn(y / freq)
                    out[n, num_pos_feats + k, i, j] = fn(x / freq)
    return out


def padded_mask():
    """Two images in a 5x7 batch: a full one and a 3x4 one padded bottom/right."""
    mask = torch.zeros(2, 5, 7, dtype=torch.bool)
    mask[1, 3:, :] = True
    mask[1, :, 4:] = True
    return mask


@pytest.mark.parametrize("normalize,offset", [(True, 0.0), (True, -0.5), (False, 0.0)])
def test_sine_matches_reference(normalize, offset):
    mask = padded_mask()
    enc = PositionEmbeddingSine(num_pos_feats=8, normalize=normalize, offset=offset)
    out = enc(mask)
    assert out.shape == (2, 16, 5, 7) and out.dtype == torch.float32
    ref = sine_reference(mask, 8, normalize=normalize, offset=offset)
    valid = ~mask[:, None].expand_as(out)  # Deformable DETR's offset gives huge values under padding
    torch.testing.assert_close(out.double()[valid], ref[valid], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("offset", [0.0, -0.5])
def test_sine_padding_invariant(offset):
    enc = PositionEmbeddingSine(num_pos_feats=16, offset=offset)
    alone = enc(torch.zeros(1, 3, 4, dtype=torch.bool))
    batched = enc(padded_mask())
    torch.testing.assert_close(batched[1:, :, :3, :4], alone, atol=1e-6, rtol=1e-6)
    # The normalised encoding depends on the image size, so the full image differs.
    assert not torch.allclose(batched[:1, :, :3, :4], alone)


def test_sine_odd_feats_rejected():
    with pytest.raises(ValueError):
        PositionEmbeddingSine(num_pos_feats=7)


def test_learned_encoding():
    torch.manual_seed(0)
    enc = PositionEmbeddingLearned(num_pos_feats=4, max_size=10)
    assert set(dict(enc.named_parameters())) == {"row_embed.weight", "col_embed.weight"}
    mask = padded_mask()
    out = enc(mask)
    assert out.shape == (2, 8, 5, 7)
    for i in range(5):
        for j in range(7):
            expected = torch.cat([enc.col_embed.weight[j], enc.row_embed.weight[i]])
            assert torch.equal(out[1, :, i, j], expected)
    alone = enc(torch.zeros(1, 3, 4, dtype=torch.bool))
    assert torch.equal(out[1:, :, :3, :4], alone)
    out.sum().backward()
    assert enc.row_embed.weight.grad[:5].ne(0).all() and enc.row_embed.weight.grad[5:].eq(0).all()


def test_learned_too_large():
    enc = PositionEmbeddingLearned(num_pos_feats=4, max_size=6)
    with pytest.raises(ValueError, match="max_size 6"):
        enc(torch.zeros(1, 3, 7, dtype=torch.bool))


def test_build_position_encoding():
    mask = padded_mask()
    sine = build_position_encoding("sine", 32)
    assert isinstance(sine, PositionEmbeddingSine) and sine(mask).shape == (2, 32, 5, 7)
    deformable = build_position_encoding("sine", 32, offset=-0.5)
    assert deformable.offset == -0.5
    learned = build_position_encoding("learned", 32)
    assert isinstance(learned, PositionEmbeddingLearned) and learned(mask).shape == (2, 32, 5, 7)
    with pytest.raises(ConfigError, match="position_embedding"):
        build_position_encoding("rotary", 32)
    with pytest.raises(ConfigError, match="d_model"):
        build_position_encoding("sine", 30)
