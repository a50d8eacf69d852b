import pytest
import torch
from torch import nn

from detrkit.backbone import Backbone, FrozenBatchNorm2d, _prepared, conv_norm, load_backbone_weights, resnet
from detrkit.config import BackboneConfig, ConfigError
from detrkit.errors import CheckpointError

# torchvision's parameter counts, fc (1000 classes) included.
TORCHVISION_PARAMS = {"resnet18": 11_689_512, "resnet34": 21_797_672,
                      "resnet50": 25_557_032, "resnet101": 44_549_160}
DEPTHS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3),
          "resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}


def torchvision_keys(name: str) -> set[str]:
    """The torchvision state-dict keys of a ResNet, without fc and num_batches_tracked."""
    def bn(prefix):
        return [f"{prefix}.{s}" for s in ("weight", "bias", "running_mean", "running_var")]

    bottleneck = name in ("resnet50", "resnet101")
    convs = (1, 2, 3) if bottleneck else (1, 2)
    keys = ["conv1.weight", *bn("bn1")]
    for i, n in enumerate(DEPTHS[name], start=1):
        for j in range(n):
            for c in convs:
                keys += [f"layer{i}.{j}.conv{c}.weight", *bn(f"layer{i}.{j}.bn{c}")]
            if j == 0 and (i > 1 or bottleneck):
                keys += [f"layer{i}.{j}.downsample.0.weight", *bn(f"layer{i}.{j}.downsample.1")]
    return set(keys)


def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            n = m.weight.numel()
            m.weight.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)


def torchvision_layout(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as torchvision saves it: with fc and num_batches_tracked."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for m_name, m in model.named_modules():
        if isinstance(m, FrozenBatchNorm2d):
            state[f"{m_name}.num_batches_tracked"] = torch.tensor(100)
    state["fc.weight"] = torch.randn(1000, 512)
    state["fc.bias"] = torch.randn(1000)
    return state


@pytest.fixture(scope="module")
def r18_checkpoint(tmp_path_factory):
    """A resnet18 with non-trivial BN statistics, saved in torchvision layout as .pth and .safetensors."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = resnet("resnet18").eval()
    randomize_bn(model)
    state = torchvision_layout(model)
    folder = tmp_path_factory.mktemp("weights")
    torch.save(state, folder / "r18.pth")
    save_file(state, str(folder / "r18.safetensors"))
    return model, folder


@pytest.mark.parametrize("name", list(TORCHVISION_PARAMS))
def test_state_dict_matches_torchvision(name):
    with torch.device("meta"):
        model = resnet(name)
    state = model.state_dict()
    assert set(state) == torchvision_keys(name)
    # torchvision counts BN weight/bias as parameters; here they are (frozen) buffers.
    n = sum(v.numel() for k, v in state.items() if "running_" not in k)
    fc = 512 * (4 if name in ("resnet50", "resnet101") else 1) * 1000 + 1000
    assert n + fc == TORCHVISION_PARAMS[name]


def test_key_shapes():
    with torch.device("meta"):
        r50, r18 = resnet("resnet50"), resnet("resnet18")
    s50, s18 = r50.state_dict(), r18.state_dict()
    assert s50["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert s50["layer3.5.bn3.running_var"].shape == (1024,)
    assert s50["layer4.2.conv3.weight"].shape == (2048, 512, 1, 1)
    assert s50["layer2.0.conv2.weight"].shape == (128, 128, 3, 3)
    assert s18["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert s18["conv1.weight"].shape == (64, 3, 7, 7)
    # v1.5: the stride sits on the 3x3 conv, not on the first 1x1.
    assert r50.layer2[0].conv1.stride == (1, 1) and r50.layer2[0].conv2.stride == (2, 2)


def test_unknown_backbone_name():
    with pytest.raises(ConfigError, match="resnet42"):
        resnet("resnet42")


def test_frozen_batchnorm_equals_batchnorm_eval():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(8, eps=1e-5)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.normal_()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.2, 3.0)
    bn.eval()
    frozen = FrozenBatchNorm2d(8)
    frozen.load_state_dict(bn.state_dict())  # carries num_batches_tracked
    assert not list(frozen.parameters())
    x = torch.randn(2, 8, 5, 6)
    torch.testing.assert_close(frozen(x), bn(x), atol=1e-6, rtol=1e-6)
    frozen.train()
    torch.testing.assert_close(frozen(x), bn(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("norm_kind, layout", [("frozen", torch.contiguous_format), ("frozen", torch.channels_last),
                                               ("trainable", torch.channels_last)])
def test_prepared_conv_weights_follow_every_change_of_the_weights(norm_kind, layout):
    # the folded weights (frozen BN, or trainable BN in eval mode) are kept between calls that need
    # no gradient: they must never go stale
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, padding=1, bias=False)
    norm = FrozenBatchNorm2d(8) if norm_kind == "frozen" else nn.BatchNorm2d(8).eval()
    norm.running_var.uniform_(0.5, 2.0)
    norm.bias.data.normal_()
    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=layout)

    def check():
        with torch.no_grad():
            torch.testing.assert_close(conv_norm(conv, norm, x), norm(conv(x)))
            # the premise: the second call is served from the cache
            assert _prepared(conv, norm, layout == torch.channels_last)[0] \
                is _prepared(conv, norm, layout == torch.channels_last)[0]

    check()
    with torch.no_grad():
        conv.weight.mul_(2)  # an in-place update
    check()
    norm.running_mean.add_(1.0)
    check()
    conv.load_state_dict({"weight": torch.randn_like(conv.weight)})
    check()
    # fused AdamW updates in place without moving the weight's version counter
    conv.weight.grad = torch.randn_like(conv.weight)
    version = conv.weight._version
    torch.optim.AdamW(conv.parameters(), lr=0.1, fused=True).step()
    assert conv.weight._version == version  # (if torch starts counting, this test can say so)
    check()
    conv.weight.grad = None
    if norm_kind == "trainable":  # its affine parameters are stepped too
        norm.weight.grad = torch.randn_like(norm.weight)
        torch.optim.AdamW([norm.weight], lr=0.1, fused=True).step()
        check()
        norm.train()  # batch statistics: not folded
        torch.testing.assert_close(conv_norm(conv, norm, x), nn.functional.batch_norm(
            conv(x), None, None, norm.weight, norm.bias, training=True))
        norm.eval()
        check()  # the running statistics moved in that call
    conv.weight.data = conv.weight.data.double()  # a move to another dtype: new storage
    with torch.no_grad():
        norm.double()
        torch.testing.assert_close(conv_norm(conv, norm, x.double()), norm(conv(x.double())))
    # after a no-grad call, a training call still gets gradients into the weight
    conv.float(), norm.float()
    with torch.no_grad():
        conv_norm(conv, norm, x)
    conv_norm(conv, norm, x).sum().backward()
    expected = torch.autograd.grad(norm(conv(x)).sum(), conv.weight)[0]
    torch.testing.assert_close(conv.weight.grad, expected)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_round_trip(r18_checkpoint, suffix):
    ref, folder = r18_checkpoint
    x = torch.randn(1, 3, 64, 64)
    torch.manual_seed(1)
    model = resnet("resnet18").eval()
    with torch.no_grad():
        expected = ref(x)["layer4"]
        assert not torch.equal(model(x)["layer4"], expected)
        load_backbone_weights(model, folder / f"r18{suffix}")
        assert torch.equal(model(x)["layer4"], expected)


def test_backbone_loads_cfg_weights(r18_checkpoint):
    ref, folder = r18_checkpoint
    backbone = Backbone(BackboneConfig(name="resnet18", weights=str(folder / "r18.pth")))
    for k, v in ref.state_dict().items():
        assert torch.equal(backbone.body.state_dict()[k], v), k
    # loaded into the layout the convolutions run in
    convs = [m for m in backbone.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 20 and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)


EXPECTED_CHANNELS = {"resnet18": [128, 256, 512], "resnet34": [128, 256, 512],
                     "resnet50": [512, 1024, 2048], "resnet101": [512, 1024, 2048]}


@pytest.mark.parametrize("name", list(EXPECTED_CHANNELS))
@pytest.mark.parametrize("dilation", [False, True])
def test_channels_and_strides(name, dilation):
    cfg = BackboneConfig(name=name, dilation=dilation)
    with torch.device("meta"):
        backbone = Backbone(cfg, return_layers=("layer2", "layer3", "layer4"))
        out = backbone(torch.zeros(2, 3, 64, 96), torch.zeros(2, 64, 96, dtype=torch.bool))
    strides = [8, 16, 16] if dilation else [8, 16, 32]
    assert backbone.num_channels == EXPECTED_CHANNELS[name]
    assert backbone.strides == strides
    for (feat, mask), c, s in zip(out, EXPECTED_CHANNELS[name], strides):
        assert feat.shape == (2, c, 64 // s, 96 // s)
        assert mask.shape == (2, 64 // s, 96 // s) and mask.dtype == torch.bool


def test_dc5_keeps_parameter_shapes():
    with torch.device("meta"):
        plain, dc5 = resnet("resnet50"), resnet("resnet50", (False, False, True))
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in dc5.state_dict().items()}
    # torchvision's rule: the first block of the dilated stage keeps the previous dilation.
    assert dc5.layer4[0].conv2.stride == (1, 1) and dc5.layer4[0].conv2.dilation == (1, 1)
    assert dc5.layer4[1].conv2.dilation == (2, 2)
    assert dc5.layer4[0].downsample[0].stride == (1, 1)


def test_freezing_rule():
    with torch.device("meta"):
        trained = Backbone(BackboneConfig(name="resnet18"))
        frozen = Backbone(BackboneConfig(name="resnet18", train=False))
    for name, p in trained.body.named_parameters():
        assert p.requires_grad == name.startswith(("layer2.", "layer3.", "layer4.")), name
    assert any(p.requires_grad for p in trained.parameters())
    assert not any(p.requires_grad for p in frozen.parameters())


def test_from_scratch_norm_and_frozen_parts():
    with torch.device("meta"):
        scratch = Backbone(BackboneConfig(name="resnet18", norm="bn", frozen=[]))
        no_stem = Backbone(BackboneConfig(name="resnet18", frozen=["stem"]))
    assert isinstance(scratch.body.bn1, nn.BatchNorm2d) and isinstance(scratch.body.layer3[1].bn2, nn.BatchNorm2d)
    assert all(p.requires_grad for p in scratch.parameters())
    # torchvision's BatchNorm state-dict names are kept, so pretrained weights still load
    assert "layer1.0.bn1.running_var" in scratch.body.state_dict()
    for name, p in no_stem.body.named_parameters():
        assert p.requires_grad == (not name.startswith("conv1.")), name
    with pytest.raises(ConfigError, match="model.backbone.frozen"):
        Backbone(BackboneConfig(name="resnet18", frozen=["layer5"]))
    with pytest.raises(ConfigError, match="model.backbone.norm"):
        Backbone(BackboneConfig(name="resnet18", norm="group"))


def test_torchvision_weights_load_into_a_trainable_batchnorm_backbone(tmp_path):
    torch.manual_seed(0)
    source = resnet("resnet18", norm="bn")
    for m in source.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.num_batches_tracked.fill_(7)
    path = tmp_path / "resnet18.pth"
    torch.save({**source.state_dict(), "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}, path)
    backbone = Backbone(BackboneConfig(name="resnet18", norm="bn", frozen=[], weights=str(path)))
    for k, v in source.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(backbone.body.state_dict()[k], v), k


def test_masks_downsampled():
    torch.manual_seed(0)
    backbone = Backbone(BackboneConfig(name="resnet18", dilation=True),
                        return_layers=("layer2", "layer3", "layer4")).eval()
    images = torch.randn(2, 3, 64, 96)
    mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    mask[1, 40:, :] = True
    mask[1, :, 56:] = True
    with torch.no_grad():
        out = backbone(images, mask)
    for (feat, m), s in zip(out, backbone.strides):
        assert feat.shape[-2:] == (64 // s, 96 // s)
        assert torch.equal(m, mask[:, ::s, ::s])  # nearest: the top-left pixel of each cell
        assert not m[0].any() and m[1].any() and not m[1].all()


def test_error_wrong_depth(r18_checkpoint, tmp_path):
    _, folder = r18_checkpoint
    path = folder / "r18.pth"
    with torch.device("meta"):
        body = resnet("resnet50")
    with pytest.raises(CheckpointError) as e:
        load_backbone_weights(body, path)
    msg = str(e.value)
    assert str(path) in msg
    assert "missing keys" in msg and "layer1.0.conv3.weight" in msg
    assert "layer1.0.conv1.weight file (64, 64, 3, 3) vs model (64, 64, 1, 1)" in msg


def test_error_renamed_keys(r18_checkpoint, tmp_path):
    ref, _ = r18_checkpoint
    state = torchvision_layout(ref)
    state["layer1.0.norm1.weight"] = state.pop("layer1.0.bn1.weight")
    path = tmp_path / "renamed.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as e:
        load_backbone_weights(resnet("resnet18"), path)
    msg = str(e.value)
    assert str(path) in msg
    assert "missing keys (1): layer1.0.bn1.weight" in msg
    assert "unexpected keys (1): layer1.0.norm1.weight" in msg


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_error_truncated_file(r18_checkpoint, tmp_path, suffix):
    _, folder = r18_checkpoint
    data = (folder / f"r18{suffix}").read_bytes()
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(data[: len(data) // 2])
    model = resnet("resnet18")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="cannot read") as e:
        load_backbone_weights(model, path)
    assert str(path) in str(e.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_error_missing_file(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError, match="not found") as e:
        load_backbone_weights(nn.Module(), path)
    assert str(path) in str(e.value)
