"""Query recollection: group counts, group isolation, supervision, and unchanged inference."""
import json

import pytest
import torch

import detrkit
from detrkit import presets
from detrkit.build import build_criterion, build_model
from detrkit.cli import main
from detrkit.config import ConfigError, TransformerConfig
from detrkit.deformable_transformer import DeformableTransformerDecoderLayer
from detrkit.recollection import (group_counts, parameter_counts, recurrent_config, run_stages, sources,
                                  to_recurrent)
from detrkit.transformer import TransformerDecoderLayer


def test_group_counts_of_the_paper():
    assert group_counts(6, "recurrent") == [1, 2, 4, 8, 16, 32, 32]  # + the last stage on its own output
    assert group_counts(1, "none", recurrent_steps=6) == [1] * 6
    assert group_counts(6, "dqr") == [1, 2, 4, 8, 16, 32]
    assert group_counts(6, "sqr") == [1, 2, 3, 5, 8, 13]
    assert group_counts(6, "none") == [1] * 6


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 9])
def test_group_counts_follow_the_rule_at_any_depth(depth):
    # independent recurrences: DQR doubles, SQR is Fibonacci (1, 2, 3, 5, ...)
    dqr = [2 ** i for i in range(depth)]
    fib = [1, 2]
    while len(fib) < depth:
        fib.append(fib[-1] + fib[-2])
    assert group_counts(depth, "dqr") == dqr
    assert group_counts(depth, "sqr") == fib[:depth]


def test_sources_newest_first_so_group_zero_is_the_baseline_path():
    assert sources(4, "sqr", 6) == [3, 2]
    assert sources(4, "dqr", 6) == [3, 2, 1, 0]
    assert sources(1, "sqr", 6) == [0]
    assert sources(7, "recurrent", 6) == [6]
    with pytest.raises(ValueError, match="model.recollection"):
        sources(1, "xqr", 6)


def test_run_stages_feeds_each_stage_the_recollected_groups():
    seen = []

    def stage(i, state, g):
        seen.append((i, state[0].shape[1], g))
        return (state[0] + 1,)  # each stage adds one, so a group's value says how many stages it passed

    stages = run_stages(stage, (torch.zeros(1, 2, 1),), 4, "sqr")
    assert [g for _, _, g in seen] == [1, 2, 3, 5] and [n for _, n, _ in seen] == [2, 4, 6, 10]
    # stage 3 sees stage 2's two groups (depths 2, 1) then stage 1's one group (depth 1)
    depths = torch.cat([part[0] for part in stages[2].inputs], 1)[0, ::2, 0].tolist()
    assert depths == [2, 1, 1]


def test_run_stages_runs_groups_of_different_shapes_in_separate_calls():
    # one-stage refinement: the initial queries carry 2-d points, every stage's outputs 4-d boxes
    calls = []

    def stage(i, state, g):
        calls.append((i, state[1].shape[-1], g))
        boxes = torch.cat([state[1][..., :2], state[1][..., :2]], -1) if state[1].shape[-1] == 2 else state[1]
        return state[0] + 1, boxes + 1

    initial = (torch.zeros(1, 2, 1), torch.zeros(1, 2, 2))
    stages = run_stages(stage, initial, 3, "dqr")
    # stage 2 gets stage 1's boxes and the initial points: two calls; stage 3 stage 2's 2 groups
    # and stage 1's 1 (boxes, one call) then the initial points (another call)
    assert calls == [(0, 2, 1), (1, 4, 1), (1, 2, 1), (2, 4, 3), (2, 2, 1)]
    assert [s.num_groups for s in stages] == [1, 2, 4]
    assert stages[2].outputs[0][0, ::2, 0].tolist() == [3, 2, 2, 1]
    assert stages[2].outputs[1].shape == (1, 8, 4)


def _perturb_one_group(layer_fn, num_groups=3, n=5, d=32):
    torch.manual_seed(0)
    tgt = torch.randn(2, num_groups * n, d)
    out = layer_fn(tgt, num_groups)
    changed = tgt.clone()
    changed[:, n:2 * n] += torch.randn(2, n, d)  # group 1 only
    out2 = layer_fn(changed, num_groups)
    for g in range(num_groups):
        same = torch.allclose(out[:, g * n:(g + 1) * n], out2[:, g * n:(g + 1) * n], atol=1e-6)
        assert same == (g != 1), f"group {g}"


def test_groups_do_not_attend_to_each_other_detr():
    layer = TransformerDecoderLayer(TransformerConfig(d_model=32, nheads=4, dim_feedforward=64, dropout=0.0)).eval()
    memory, pos = torch.randn(2, 12, 32), torch.randn(2, 12, 32)
    query_pos = torch.randn(2, 5, 32)
    _perturb_one_group(lambda t, g: layer(t, query_pos.repeat(1, g, 1), memory, None, pos, g))


def test_groups_do_not_attend_to_each_other_deformable():
    layer = DeformableTransformerDecoderLayer(32, 64, 0.0, n_levels=2, n_heads=4, n_points=2).eval()
    shapes = torch.tensor([[4, 4], [2, 2]])
    starts = torch.tensor([0, 16])
    memory = torch.randn(2, 20, 32)
    mask = torch.zeros(2, 20, dtype=torch.bool)
    query_pos = torch.randn(2, 5, 32)
    ref = torch.rand(2, 5, 2, 2)
    _perturb_one_group(lambda t, g: layer(t, query_pos.repeat(1, g, 1), ref.repeat(1, g, 1, 1), memory,
                                          shapes, starts, mask, g))


def _tiny(preset_name: str, recollection: str):
    cfg = presets.preset(preset_name)
    cfg.model.num_classes = 3
    cfg.model.recollection = recollection
    cfg.model.num_queries = 6
    cfg.model.transformer = TransformerConfig(d_model=64, nheads=4, num_encoder_layers=1,
                                              num_decoder_layers=4, dim_feedforward=64, dropout=0.0)
    return cfg


def _batch():
    torch.manual_seed(1)
    images = torch.randn(2, 3, 64, 80)
    mask = torch.zeros(2, 64, 80, dtype=torch.bool)
    mask[1, :, 64:] = True
    targets = [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[.3, .3, .2, .2], [.6, .6, .3, .4]]),
                "image_id": torch.tensor(1)},
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[.5, .5, .2, .2]]), "image_id": torch.tensor(2)}]
    return images, mask, targets


@pytest.mark.parametrize("preset_name", ["detr_small", "deformable_detr_small", "deformable_detr_small_refine",
                                         "deformable_detr_small_two_stage"])
@pytest.mark.parametrize("mode", ["sqr", "dqr", "recurrent"])
def test_every_group_is_matched_and_supervised_on_its_own(preset_name, mode):
    cfg = _tiny(preset_name, mode)
    torch.manual_seed(0)
    model, criterion = build_model(cfg).train(), build_criterion(cfg)
    images, mask, targets = _batch()
    out = model(images, mask)
    expected_groups = sum(group_counts(4, mode))
    assert 1 + len(out["aux_outputs"]) == expected_groups
    calls = []
    match = criterion.matcher.forward
    criterion.matcher.forward = lambda o, t: calls.append(1) or match(o, t)
    losses = criterion(out, targets)
    encoder = 1 if "enc_outputs" in out else 0  # two-stage: the encoder's proposals are matched too
    assert len(calls) == expected_groups + encoder
    assert sum(k.startswith("loss_giou") for k in losses) == expected_groups + encoder
    losses["loss"].backward()


@pytest.mark.parametrize("preset_name", ["detr_small", "deformable_detr_small_refine", "deformable_detr_small_two_stage"])
def test_group_zero_follows_the_baseline_path_in_training(preset_name):
    torch.manual_seed(0)
    sqr = build_model(_tiny(preset_name, "dqr")).train()  # dropout is 0: training is deterministic
    with torch.no_grad():  # move the zero-initialised box heads, so every stage changes the boxes
        for p in sqr.parameters():
            p.add_(0.05 * torch.randn_like(p))
    base = build_model(_tiny(preset_name, "none")).train()
    base.load_state_dict(sqr.state_dict())
    images, mask, _ = _batch()
    a, b = sqr(images, mask), base(images, mask)
    n = b["pred_boxes"].shape[1]
    assert a["pred_boxes"].shape[1] == n  # the last stage's newest group; the others are aux outputs
    torch.testing.assert_close(a["pred_boxes"], b["pred_boxes"])
    # stage 2's groups: stage 1's output (the baseline's first aux output) and the initial queries
    stage2 = [o for o in a["aux_outputs"]][1:3]
    torch.testing.assert_close(stage2[0]["pred_boxes"], b["aux_outputs"][1]["pred_boxes"])
    assert not torch.allclose(stage2[1]["pred_boxes"], stage2[0]["pred_boxes"])


@pytest.mark.parametrize("preset_name", ["detr_small", "deformable_detr_small_refine", "deformable_detr_small_two_stage"])
def test_inference_of_a_recollection_model_is_the_baseline(preset_name):
    torch.manual_seed(0)
    sqr = build_model(_tiny(preset_name, "sqr")).eval()
    base = build_model(_tiny(preset_name, "none")).eval()
    base.load_state_dict(sqr.state_dict())  # same parameters: recollection adds none
    images, mask, _ = _batch()
    with torch.no_grad():
        a, b = sqr(images, mask), base(images, mask)
    assert a["pred_logits"].shape == (2, 6, a["pred_logits"].shape[-1]) and len(a["aux_outputs"]) == 3
    torch.testing.assert_close(a["pred_logits"], b["pred_logits"], rtol=0, atol=0)
    torch.testing.assert_close(a["pred_boxes"], b["pred_boxes"], rtol=0, atol=0)


def loop_last_layer(full: torch.nn.Module, steps: int) -> None:
    """Make ``full`` run its last decoder layer (and that layer's heads) ``steps`` times instead of
    all its layers, by hand: what the single-stage recurrent model must compute."""
    decoder = full.transformer.decoder
    last = len(decoder.layers) - 1
    decoder.layers = torch.nn.ModuleList([decoder.layers[last]] * steps)  # the same module T times
    if hasattr(decoder, "num_layers"):
        decoder.num_layers = steps
    if getattr(decoder, "bbox_embed", None) is not None:  # refinement heads: the last layer's, T times
        encoder = slice(last + 1, last + 2)  # two-stage: the encoder's heads follow the decoder's
        heads = [full.class_embed[last]] * steps + list(full.class_embed[encoder])
        boxes = [full.bbox_embed[last]] * steps + list(full.bbox_embed[encoder])
        full.class_embed, full.bbox_embed = torch.nn.ModuleList(heads), torch.nn.ModuleList(boxes)
        decoder.bbox_embed, decoder.class_embed = full.bbox_embed, full.class_embed


def assert_same_outputs(got: dict, expected: dict) -> None:
    torch.testing.assert_close(got["pred_logits"], expected["pred_logits"])
    torch.testing.assert_close(got["pred_boxes"], expected["pred_boxes"])
    assert len(got["aux_outputs"]) == len(expected["aux_outputs"])
    for a, b in zip(got["aux_outputs"], expected["aux_outputs"]):
        torch.testing.assert_close(a["pred_boxes"], b["pred_boxes"])


@pytest.mark.parametrize("preset_name", ["detr_small", "deformable_detr_small_refine", "deformable_detr_small_two_stage"])
def test_recurrent_model_runs_the_last_stage_t_times(preset_name):
    torch.manual_seed(0)
    cfg = _tiny(preset_name, "recurrent")
    full = build_model(cfg).eval()
    steps = 3
    one = build_model(recurrent_config(cfg, steps)).eval()
    one.load_state_dict(to_recurrent(full.state_dict(), 4))
    assert sum(p.numel() for p in one.parameters()) < sum(p.numel() for p in full.parameters())
    calls = []
    hook = full.transformer.decoder.layers[3].register_forward_hook(lambda m, i, o: calls.append(o))
    loop_last_layer(full, steps)
    images, mask, _ = _batch()
    with torch.no_grad():
        expected, got = full(images, mask), one(images, mask)
    hook.remove()
    assert len(calls) == steps and len(got["aux_outputs"]) == steps - 1
    assert_same_outputs(got, expected)


def test_recurrent_command_saves_the_last_stage_alone(tiny_root, tiny_overrides, tmp_path, capsys):
    run, single = tmp_path / "run", tmp_path / "single"
    assert main(["train", "--data", str(tiny_root), "--out", str(run), "--no-eval", *tiny_overrides,
                 "--recollection", "recurrent", "--set", "model.transformer.num_decoder_layers=2"]) == 0
    capsys.readouterr()
    assert main(["recurrent", str(run), "--out", str(single), "--steps", "4"]) == 0
    printed = capsys.readouterr().out
    trained, one = detrkit.load(run, "cpu"), detrkit.load(single, "cpu")
    assert len(one.model.transformer.decoder.layers) == 1 and one.cfg.model.recurrent_steps == 4
    (total, decoder), (one_total, one_decoder) = parameter_counts(trained.model), parameter_counts(one.model)
    assert one_total < total and total - one_total == decoder - one_decoder  # one decoder layer fewer
    assert all(f"{n:,}" in printed for n in (total, decoder, one_total, one_decoder)), printed

    loop_last_layer(trained.model, 4)
    images, mask, _ = _batch()
    with torch.no_grad():
        assert_same_outputs(one(images, mask), trained(images, mask))

    # The steps change at loading, without saving again; the trained run loads as the same model.
    assert main(["eval", "--checkpoint", str(single), "--data", str(tiny_root), "--per-stage",
                 "--recurrent-steps", "2"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1 + 2  # header, one row per step
    for checkpoint, name in ((single, "saved.json"), (run, "run.json")):
        assert main(["eval", "--checkpoint", str(checkpoint), "--data", str(tiny_root), "--recurrent-steps", "4",
                     "--json", str(tmp_path / name)]) == 0
    assert json.loads((tmp_path / "saved.json").read_text()) == json.loads((tmp_path / "run.json").read_text())
    capsys.readouterr()
    assert main(["recurrent", str(run), "--out", str(tmp_path / "zero"), "--steps", "0"]) == 2
    assert "at least 1" in capsys.readouterr().err


def test_recurrent_command_refuses_a_model_trained_otherwise(tiny_root, untrained_checkpoint, tmp_path, capsys):
    plain = untrained_checkpoint(presets.detr_small, tiny_root, tmp_path / "plain")
    for argv in (["recurrent", str(plain), "--out", str(tmp_path / "out")],
                 ["eval", "--checkpoint", str(plain), "--data", str(tiny_root), "--recurrent-steps", "2"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"detrkit {argv[0]}: error: {plain}: model.recollection is 'none'"), err
    assert not (tmp_path / "out").exists()
