"""Deformable DETR's model pieces against independent formulas."""
import math

import pytest
import torch

from detrkit import presets
from detrkit.build import build_model
from detrkit.config import ConfigError, TransformerConfig
from detrkit.deformable_attention import MSDeformAttn
from detrkit.deformable_transformer import encoder_reference_points, refine_boxes, valid_ratios


def test_sampling_offsets_start_on_a_ring_growing_with_the_point_index():
    attn = MSDeformAttn(d_model=64, n_levels=3, n_heads=8, n_points=4)
    bias = attn.sampling_offsets.bias.view(8, 3, 4, 2)
    for h in range(8):
        angle = 2 * math.pi * h / 8
        direction = torch.tensor([math.cos(angle), math.sin(angle)])
        direction = direction / direction.abs().max()  # onto the square of side 2
        for lvl in range(3):
            for k in range(4):
                torch.testing.assert_close(bias[h, lvl, k], direction * (k + 1), atol=1e-6, rtol=1e-6)
    assert not attn.sampling_offsets.weight.any() and not attn.attention_weights.weight.any()
    assert not attn.attention_weights.bias.any()  # equal weights over levels x points at the start


def test_valid_ratios_and_reference_points_ignore_padding():
    # a 6x8 (h x w) image alone, and the same image padded to 10x12 inside a batch
    mask = torch.zeros(2, 10, 12, dtype=torch.bool)
    mask[0, 6:, :] = True
    mask[0, :, 8:] = True
    ratios = valid_ratios(mask)
    torch.testing.assert_close(ratios[0], torch.tensor([8 / 12, 6 / 10]))
    torch.testing.assert_close(ratios[1], torch.tensor([1.0, 1.0]))
    shapes = [(10, 12), (5, 6)]
    level_ratios = torch.stack([ratios, ratios], 1)
    padded = encoder_reference_points(shapes, level_ratios)  # (B, S, L, 2), normalised to the padded maps
    alone = encoder_reference_points([(6, 8), (3, 4)], torch.ones(1, 2, 2))
    # in pixels of each level, the valid tokens of the padded image sample where the image alone does
    for lvl_token, (H, W) in enumerate(shapes):
        start = 0 if lvl_token == 0 else 120
        rows, cols = (6, 8) if lvl_token == 0 else (3, 4)
        idx = torch.tensor([start + y * W + x for y in range(rows) for x in range(cols)])
        alone_start = 0 if lvl_token == 0 else 48
        for lvl, (h, w) in enumerate(shapes):
            vh, vw = (6, 8) if lvl == 0 else (3, 4)
            px_padded = padded[0, idx, lvl] * torch.tensor([w, h])
            px_alone = alone[0, alone_start:alone_start + rows * cols, lvl] * torch.tensor([vw, vh])
            torch.testing.assert_close(px_padded, px_alone)


def test_refinement_moves_in_inverse_sigmoid_space():
    ref = torch.tensor([[0.3, 0.6, 0.2, 0.1]])
    delta = torch.tensor([[0.5, -0.5, 1.0, 0.0]])
    expected = torch.sigmoid(torch.logit(ref) + delta)
    torch.testing.assert_close(refine_boxes(delta, ref), expected)
    point = ref[:, :2]
    expected = torch.sigmoid(torch.cat([torch.logit(point) + delta[:, :2], delta[:, 2:]], -1))
    torch.testing.assert_close(refine_boxes(delta, point), expected)


def _cfg(name):
    cfg = presets.preset(name)
    cfg.model.num_classes, cfg.model.num_queries = 3, 10
    cfg.model.transformer = TransformerConfig(d_model=64, nheads=4, num_encoder_layers=1, num_decoder_layers=2,
                                              dim_feedforward=64, dropout=0.0)
    return cfg


@pytest.mark.parametrize("name", ["deformable_detr_small", "deformable_detr_small_refine",
                                  "deformable_detr_small_two_stage", "deformable_detr_r50_single_scale"])
def test_variants_have_the_paper_structure(name):
    cfg = _cfg(name)
    cfg.model.backbone.name, cfg.model.backbone.norm = "resnet18", "bn"
    model = build_model(cfg).eval()
    levels = cfg.model.num_feature_levels
    assert len(model.input_proj) == levels and model.transformer.level_embed.shape == (levels, 64)
    if levels == 4:  # C3-C5 then one stride-2 conv on C5
        assert model.backbone.strides == [8, 16, 32] and model.input_proj[3][0].stride == (2, 2)
    heads = {id(h) for h in model.class_embed}
    assert len(heads) == (1 if not cfg.model.with_box_refine else len(model.class_embed))
    assert (model.transformer.decoder.bbox_embed is not None) == cfg.model.with_box_refine
    with torch.no_grad():
        out = model(torch.randn(1, 3, 96, 128), torch.zeros(1, 96, 128, dtype=torch.bool))
    assert out["pred_logits"].shape == (1, 10, 3) and out["pred_boxes"].shape == (1, 10, 4)
    assert ("enc_outputs" in out) == cfg.model.two_stage
    # the box heads' (w, h) bias: -2 (small boxes) only where a layer starts from a point, 0 where from a box
    size_bias = [h.layers[-1].bias[2:].tolist() for h in model.bbox_embed]
    first = [0.0, 0.0] if cfg.model.two_stage else [-2.0, -2.0]
    assert size_bias[0] == first and all(b == [0.0, 0.0] for b in size_bias[1:]) or not cfg.model.with_box_refine
    # the focal prior: every class starts near probability 0.01
    assert abs(torch.sigmoid(model.class_embed[0].bias).mean().item() - 0.01) < 1e-4


def test_two_stage_needs_refinement():
    cfg = _cfg("deformable_detr_small_two_stage")
    cfg.model.with_box_refine = False
    with pytest.raises(ConfigError, match="model.two_stage"):
        build_model(cfg)
