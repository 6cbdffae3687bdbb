"""Every framework x {none, MCIBI, ACF} builds from a config dict and trains; config validation; backbones."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from ctxseg.models import ModelConfig, build_segmentor, receptive_field
from ctxseg.models.acf import ACF
from ctxseg.models.backbones import build_backbone
from ctxseg.models.config import ACFConfig, BackboneConfig, MCIBIConfig

FRAMEWORKS = ["fcn", "pspnet", "deeplabv3", "ocrnet"]
CONTEXTS = ["none", "mcibi", "acf"]
NUM_CLASSES = 4
TINY = {"channels": 16, "aux_channels": 8, "ocr_key_channels": 8, "acf": {"heads": 2, "mixtures": 2},
        "backbone": {"name": "resnet_tiny", "width": 4}}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("context", CONTEXTS)
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_build_forward_backward(framework, context):
    model = build_segmentor({**TINY, "framework": framework, "context": context}, NUM_CLASSES)
    assert model.num_classes == NUM_CLASSES
    model.train()
    # one odd size with batch 1 (train mode must not need batch > 1), one even size with batch 2
    for b, h, w in [(1, 37, 45), (2, 48, 40)]:
        model.zero_grad(set_to_none=True)
        images = torch.randn(b, 3, h, w)
        targets = torch.randint(0, NUM_CLASSES, (b, h, w))
        targets[:, :3] = 255
        out = model(images, targets, 0.25)
        assert out["logits"].shape == (b, NUM_CLASSES, h, w)
        for key in ["loss", "loss_o", "loss_aux"]:
            assert out[key].dim() == 0 and torch.isfinite(out[key])
        assert not out["loss_o"].requires_grad and out["loss"].requires_grad
        out["loss"].backward()
        g = model.backbone.conv1.weight.grad
        assert g is not None and g.abs().sum() > 0, "gradient must reach the backbone stem"
        assert model.backbone.layer4[0].conv2.weight.grad.abs().sum() > 0
        if context == "mcibi":
            assert {"loss_w", "loss_m", "memory_momentum"} <= out.keys()
            mem = model.memory.memory
            assert not mem.requires_grad and mem.grad is None, "the memory takes no gradient"
            assert all(p is not mem for p in model.parameters())
            assert bool(model.memory.initialized.any())
            expected = out["loss_o"] + 0.4 * out["loss_aux"] + 0.4 * out["loss_w"] + 1.0 * out["loss_m"]
            assert torch.allclose(out["loss"].detach(), expected, atol=1e-5)  # Eq 19 + aux
        else:
            assert "loss_w" not in out
            assert torch.allclose(out["loss"].detach(), out["loss_o"] + 0.4 * out["loss_aux"], atol=1e-6)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 29, 31), torch.zeros(1, 29, 31, dtype=torch.long))
    assert set(out) == {"logits"} and out["logits"].shape == (1, NUM_CLASSES, 29, 31)


def test_memory_in_state_dict_and_roundtrip():
    model = build_segmentor({**TINY, "context": "mcibi"}, NUM_CLASSES).train()
    model(torch.randn(2, 3, 32, 32), torch.randint(0, NUM_CLASSES, (2, 32, 32)), 0.0)
    sd = model.state_dict()
    keys = [k for k in sd if k.endswith("memory")]
    assert keys == ["decode_head.memory.memory"]
    assert sd[keys[0]].abs().sum() > 0
    other = build_segmentor({**TINY, "context": "mcibi"}, NUM_CLASSES)
    other.load_state_dict(sd)
    assert torch.equal(other.memory.memory, model.memory.memory)
    assert torch.equal(other.memory.initialized, model.memory.initialized)


def test_eval_mode_does_not_update_memory():
    model = build_segmentor({**TINY, "context": "mcibi"}, NUM_CLASSES).eval()
    before = model.memory.memory.clone()
    model(torch.randn(1, 3, 32, 32), torch.randint(0, NUM_CLASSES, (1, 32, 32)))
    assert torch.equal(before, model.memory.memory)


def test_rcl_off_and_fusions():
    for fusion in ["add", "weighted_add", "concat"]:
        model = build_segmentor({**TINY, "framework": "pspnet", "context": "mcibi",
                                 "mcibi": {"fusion": fusion, "rcl": False}}, NUM_CLASSES).train()
        out = model(torch.randn(2, 3, 33, 33), torch.randint(0, NUM_CLASSES, (2, 33, 33)), 0.5)
        assert float(out["loss_m"]) == 0.0
        expected = out["loss_o"] + 0.4 * out["loss_aux"] + 0.4 * out["loss_w"]
        assert torch.allclose(out["loss"].detach(), expected, atol=1e-5)
        out["loss"].backward()


def test_all_ignored_batch_gives_zero_loss_with_graph():
    model = build_segmentor({**TINY, "context": "acf"}, NUM_CLASSES).train()
    out = model(torch.randn(1, 3, 32, 32), torch.full((1, 32, 32), 255), 0.0)
    assert float(out["loss"].detach()) == 0.0 and out["loss"].requires_grad


# ---------------------------------------------------------------- config
def test_config_defaults_and_dicts():
    cfg = ModelConfig()
    assert (cfg.framework, cfg.context, cfg.backbone.name) == ("fcn", "none", "resnet_tiny")
    assert cfg.aux_weight == 0.4
    m = cfg.mcibi
    assert (m.momentum, m.momentum_power, m.alpha, m.beta) == (0.9, 0.9, 0.4, 1.0)
    assert (m.fusion, m.init, m.update, m.rcl) == ("concat", "random", "cosine", True)
    assert ModelConfig.model_validate({"framework": "fcn"}) == cfg
    assert build_segmentor(ModelConfig(), 3).num_classes == 3


@pytest.mark.parametrize("bad, where", [
    ({"framwork": "fcn"}, "framwork"),
    ({"framework": "unet"}, "framework"),
    ({"mcibi": {"momentum": 1.5}}, "momentum"),
    ({"mcibi": {"fusion": "mul"}}, "fusion"),
    ({"mcibi": {"alpah": 0.4}}, "alpah"),
    ({"backbone": {"name": "resnet34"}}, "name"),
    ({"acf": {"heads": 0}}, "heads"),
    ({"dropout": 1.0}, "dropout"),
])
def test_config_rejects_typos_and_ranges(bad, where):
    with pytest.raises(ValidationError) as err:
        ModelConfig.model_validate(bad)
    assert where in str(err.value)


def test_bad_acf_heads_are_clear():
    """The ACF widths follow model.channels (the authors' code): channels must split into acf.heads heads."""
    with pytest.raises(ValidationError) as err:
        ModelConfig.model_validate({"context": "acf", "channels": 30, "acf": {"heads": 4, "mixtures": 2}})
    msg = str(err.value)
    assert "channels=30" in msg and "acf.heads=4" in msg and "multiple of 4" in msg
    with pytest.raises(ValidationError, match="extra"):  # the old width key is refused, not ignored
        ModelConfig.model_validate({"context": "acf", "acf": {"channels": 32}})
    with pytest.raises(ValueError, match="channels=12 .* not divisible by acf.heads=5"):
        ACF(12, heads=5, mixtures=4)
    ModelConfig.model_validate({"context": "acf", "channels": 24, "acf": {"heads": 3, "mixtures": 5}})  # accepted


def test_bad_mcibi_channels_are_clear():
    with pytest.raises(ValidationError, match="mcibi.channels=15"):
        MCIBIConfig(channels=15)
    with pytest.raises(ValueError, match="must be even"):
        build_segmentor({"context": "mcibi", "channels": 15}, 3)


# ---------------------------------------------------------------- backbones
@pytest.mark.parametrize("name, deep", [("resnet_tiny", False), ("resnet_tiny", True), ("resnet18", False),
                                        ("resnet50", True)])
def test_backbone_output_stride_8(name, deep):
    bb = build_backbone(BackboneConfig(name=name, deep_stem=deep, width=8 if name != "resnet_tiny" else None)).eval()
    with torch.no_grad():
        outs = bb(torch.randn(1, 3, 65, 63))
    assert len(outs) == 4
    assert [o.shape[1] for o in outs] == bb.out_channels
    assert outs[3].shape[-2:] == (9, 8)  # ceil(65/8), ceil(63/8): output stride 8
    assert outs[2].shape[-2:] == outs[3].shape[-2:]
    if name != "resnet_tiny":  # stages 3 and 4 dilated 2 and 4
        assert bb.layer3[-1].conv2.dilation == (2, 2) and bb.layer4[-1].conv2.dilation == (4, 4)
    assert hasattr(bb, "stem") == deep


def test_resnet101_depths():
    bb = build_backbone(BackboneConfig(name="resnet101", width=4))
    assert [len(getattr(bb, f"layer{i}")) for i in range(1, 5)] == [3, 4, 23, 3]
    assert bb.out_channels == [16, 32, 64, 128]


def test_pretrained_local_file_loads_whole_or_refuses(tmp_path):
    # the full layout matrix is in test_models_pretrained.py; here: a segmentor checkpoint's backbone loads,
    # extras are ignored, and a file missing one stage tensor is refused (it used to load with a warning)
    from ctxseg.models.backbones import PretrainedFileNotFoundError, PretrainedWeightsError

    src = build_backbone(BackboneConfig())
    state = {f"backbone.{k}": v.clone() + 1 for k, v in src.state_dict().items()}
    state["decode_head.extra.weight"] = torch.zeros(1)
    path = tmp_path / "w.pth"
    torch.save({"state_dict": state}, path)
    model = build_segmentor({"backbone": {"pretrained": str(path)}}, 3)
    assert torch.equal(model.backbone.layer1[0].conv2.weight, src.layer1[0].conv2.weight + 1)
    del state["backbone.layer4.0.conv3.weight"]
    torch.save({"state_dict": state}, path)
    with pytest.raises(PretrainedWeightsError, match="layer4.0.conv3.weight"):
        build_segmentor({"backbone": {"pretrained": str(path)}}, 3)
    with pytest.raises(PretrainedFileNotFoundError):
        build_segmentor({"backbone": {"pretrained": str(tmp_path / "nope.pth")}}, 3)


# ---------------------------------------------------------------- receptive field
def test_receptive_field_default_and_empirical():
    rf = receptive_field(ModelConfig())
    assert rf == 63
    assert receptive_field(build_segmentor(ModelConfig(), 2)) == rf
    assert receptive_field({"framework": "deeplabv3"}) > 500  # atrous 36 at stride 8
    # the 3x3 concat fusion of MCIBI adds 2 * 8 px; a 1x1 fusion keeps the base RF
    assert receptive_field({"context": "mcibi"}) == rf + 16
    assert receptive_field({"context": "mcibi", "fusion_kernel": 1}) == rf
    # CFNet's head has no fusion conv: concat -> the last (1x1) conv; the 1x1 Phi adds nothing
    assert receptive_field({"context": "acf"}) == rf
    assert receptive_field({"context": "acf", "acf": {"phi": "atrous"}}) == rf + 2 * 4 * 8  # 3x3 rate 4 at stride 8
    # empirical: the gradient of one central pre-upsampling logit w.r.t. the input covers <= rf pixels
    model = build_segmentor(ModelConfig(), 2).eval()
    for p in model.parameters():  # positive weights: no ReLU dead zones, so the support is the full RF
        p.data.abs_()
    x = (torch.rand(1, 3, 160, 160) + 0.1).requires_grad_()
    logits = model.decode_head(model.backbone(x)[3])["logits"]
    logits[0, 0, 10, 10].backward()
    rows = x.grad[0].abs().sum(0).sum(1).nonzero().squeeze(1)
    extent = int(rows.max() - rows.min() + 1)
    assert extent == rf


def test_autocast_bf16_training_step_keeps_memory_float32():
    model = build_segmentor({**TINY, "framework": "ocrnet", "context": "mcibi"}, NUM_CLASSES).train()
    x, y = torch.randn(2, 3, 33, 35), torch.randint(0, NUM_CLASSES, (2, 33, 35))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x, y, 0.0)
        out = model(x, y, 0.5)  # second step runs the Eq 6 update on initialised rows
    out["loss"].backward()
    assert model.memory.memory.dtype == torch.float32 and bool(torch.isfinite(model.memory.memory).all())


def test_config_dump_is_plain_yaml_types():
    import yaml

    dumped = ModelConfig().model_dump()
    assert ModelConfig.model_validate(yaml.safe_load(yaml.safe_dump(dumped))) == ModelConfig()



@pytest.mark.parametrize("os_, framework", [(16, "ocrnet"), (32, "pspnet")])
def test_other_output_strides(os_, framework):
    cfg = {**TINY, "framework": framework, "context": "mcibi", "backbone": {"width": 4, "output_stride": os_}}
    model = build_segmentor(cfg, NUM_CLASSES).train()
    feats = model.backbone(torch.randn(1, 3, 64, 64))
    assert feats[3].shape[-1] == 64 // os_
    out = model(torch.randn(2, 3, 64, 64), torch.randint(0, NUM_CLASSES, (2, 64, 64)), 0.1)
    assert out["logits"].shape == (2, NUM_CLASSES, 64, 64)
    out["loss"].backward()


def test_build_segmentor_accepts_model_config_dict_and_none():
    for cfg in (ModelConfig(framework="pspnet"), {"framework": "pspnet"}):
        assert build_segmentor(cfg, 3).framework == "pspnet"
    assert build_segmentor(None, 3).framework == "fcn"
    with pytest.raises(ValueError, match="num_classes"):
        build_segmentor(ModelConfig(), 1)
