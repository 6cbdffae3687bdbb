"""ImageNet-pretrained backbones (MCIBI §4.1, CFNet §4.1): each common key layout loads completely, or the file
is refused with a list; model.pt never needs the file again; the path is absolute before Ray workers start.

The real checkpoints cannot be downloaded here, so each test builds a state dict from ctxseg's own ResNet-50
structure (base width 8: every key of the real resnet50, small tensors) and renames it into the layout.
"""
from __future__ import annotations

import logging

import pytest
import torch
import yaml

from ctxseg.checkpoint import load_model, read_model_file, write_model_file
from ctxseg.config import load_params, params_to_dict, parse_params
from ctxseg.errors import UserError
from ctxseg.models import BackboneConfig, build_segmentor
from ctxseg.models.backbones import (PretrainedFileNotFoundError, PretrainedWeightsError, build_backbone,
                                     detect_layout, load_pretrained)

LOGGER = "ctxseg.models.backbones"
SMALL = {"name": "resnet50", "width": 8}  # the real resnet50 key set (3/4/6/3 bottlenecks), 1/8 of the width
TIMM_STEM = {"stem.0.": "conv1.0.", "stem.1.": "conv1.1.", "stem.3.": "conv1.3.", "stem.4.": "conv1.4.",
             "stem.6.": "conv1.6.", "stem.7.": "bn1."}


def source(deep_stem: bool, seed: int = 0, **cfg) -> dict:
    """A state dict in ctxseg's names with a distinct random value in every tensor (BN statistics included)."""
    g = torch.Generator().manual_seed(seed)
    state = build_backbone(BackboneConfig(**{**SMALL, **cfg}, deep_stem=deep_stem)).state_dict()
    out = {}
    for k, v in state.items():
        if k.endswith("num_batches_tracked"):
            out[k] = torch.randint(1, 10_000, (), generator=g)
        elif k.endswith("running_var"):
            out[k] = torch.rand(v.shape, generator=g) + 0.5
        else:
            out[k] = torch.randn(v.shape, generator=g)
    return out


def rename(state: dict, table: dict) -> dict:
    out = {}
    for k, v in state.items():
        for old, new in table.items():
            if k.startswith(old):
                k = new + k[len(old):]
                break
        out[k] = v
    return out


def to_avg_down(state: dict) -> dict:
    """ResNet-D shortcut names (timm resnet50d, OpenMMLab ResNetV1d): downsample = (AvgPool, conv, bn)."""
    out = {}
    for k, v in state.items():
        if ".downsample.1." in k:
            k = k.replace(".downsample.1.", ".downsample.2.")
        elif ".downsample.0." in k:
            k = k.replace(".downsample.0.", ".downsample.1.")
        out[k] = v
    return out


def with_classifier(state: dict) -> dict:
    return {**state, "fc.weight": torch.randn(1000, 256), "fc.bias": torch.randn(1000)}


def assert_every_tensor_taken(model: torch.nn.Module, expected: dict) -> None:
    got = model.state_dict()
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert torch.equal(got[k], v.to(got[k].dtype)), k


# the layouts, each as (file payload, deep_stem of the model, layout the loader must report)
def torchvision_file(src):
    return with_classifier(src)


def torchvision_no_counters(src):  # torchvision's own resnet50 files hold no num_batches_tracked
    return with_classifier({k: v for k, v in src.items() if not k.endswith("num_batches_tracked")})


def mmcv_v1c_file(src):
    return {"meta": {"epoch": 100, "mmcv_version": "1.3.0", "CLASSES": None}, "state_dict": with_classifier(src)}


def mmseg_segmentor_file(src):  # a whole segmentor checkpoint: weights under backbone., plus its heads
    weights = {f"backbone.{k}": v for k, v in src.items()}
    weights["decode_head.conv_seg.weight"] = torch.randn(150, 512, 1, 1)
    weights["auxiliary_head.conv_seg.bias"] = torch.randn(150)
    return {"meta": {"iter": 80000}, "state_dict": weights}


def timm_deep_file(src):
    return with_classifier(rename(src, TIMM_STEM))


def timm_resnet_d_file(src):
    return with_classifier(to_avg_down(rename(src, TIMM_STEM)))


LAYOUT_CASES = {
    "torchvision": (torchvision_file, False, "torchvision"),
    "torchvision_no_counters": (torchvision_no_counters, False, "torchvision"),
    "openmmlab_v1c": (mmcv_v1c_file, True, "openmmlab_v1c"),
    "openmmlab_segmentor": (mmseg_segmentor_file, True, "openmmlab_v1c"),
    "timm_resnet50c": (timm_deep_file, True, "timm_deep"),
    "timm_resnet50d": (timm_resnet_d_file, True, "timm_deep"),
}


@pytest.mark.parametrize("case", list(LAYOUT_CASES))
def test_each_layout_loads_every_backbone_tensor(case, tmp_path, caplog):
    make, deep, layout = LAYOUT_CASES[case]
    src = source(deep)
    path = tmp_path / f"{case}.pth"
    torch.save(make(src), path)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        model = build_segmentor({"backbone": {**SMALL, "deep_stem": deep, "pretrained": str(path)}}, 3)
    expected = src
    if case == "torchvision_no_counters":  # counters absent from the file keep the model's own (0)
        expected = {k: (torch.tensor(0) if k.endswith("num_batches_tracked") else v) for k, v in src.items()}
    assert_every_tensor_taken(model.backbone, expected)
    assert "loaded every backbone tensor" in caplog.text and f"layout {load_layout_text(layout)}" in caplog.text
    if case != "torchvision_no_counters":
        assert "not used by the backbone" in caplog.text  # fc / decode heads are reported, not loaded
    if case == "openmmlab_segmentor":
        assert "decode_head.conv_seg.weight" in caplog.text
    if case == "timm_resnet50d":
        assert "ResNet-D shortcuts" in caplog.text and "no avg-pool" in caplog.text


def load_layout_text(layout: str) -> str:
    from ctxseg.models.backbones import LAYOUTS

    return LAYOUTS[layout]


def test_layout_detection_by_stem():
    assert detect_layout(["conv1.weight", "bn1.weight", "layer1.0.conv1.weight"]) == "torchvision"
    assert detect_layout(["stem.0.weight", "stem.1.weight", "layer1.0.conv1.weight"]) == "openmmlab_v1c"
    assert detect_layout(["conv1.0.weight", "conv1.1.weight", "bn1.weight"]) == "timm_deep"
    assert detect_layout(["layer1.0.conv1.weight"]) == "unknown"


def test_file_missing_the_stem_is_refused_with_what_matched(tmp_path):
    src = source(False)
    path = tmp_path / "nostem.pth"
    torch.save({k: v for k, v in src.items() if not k.startswith(("conv1.", "bn1."))}, path)
    model = build_backbone(BackboneConfig(**SMALL))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PretrainedWeightsError) as info:
        load_pretrained(model, path)
    msg = str(info.value)
    assert isinstance(info.value, UserError)
    assert str(path) in msg and "model.backbone.pretrained" in msg and "nothing was loaded" in msg
    assert "layout found: no stem found" in msg
    assert "missing from the file (5): conv1.weight, bn1.weight, bn1.bias, bn1.running_mean, bn1.running_var" in msg
    assert "matched: stem 0/5, layer1 50/50, layer2 65/65, layer3 95/95, layer4 50/50 tensors" in msg
    for k, v in model.state_dict().items():  # and the model kept its own weights, all of them
        assert torch.equal(v, before[k]), k


def test_partial_stem_and_missing_stage_tensor_are_refused(tmp_path):
    src = torchvision_file(source(False))
    del src["bn1.running_var"], src["layer4.0.conv3.weight"]
    path = tmp_path / "partial.pth"
    torch.save(src, path)
    with pytest.raises(PretrainedWeightsError) as info:
        build_segmentor({"backbone": {**SMALL, "pretrained": str(path)}}, 3)
    msg = str(info.value)
    assert "missing from the file (2): bn1.running_var, layer4.0.conv3.weight" in msg
    assert "stem 4/5" in msg and "layer4 49/50" in msg and "layer1 50/50" in msg


def test_misshaped_stage_is_refused(tmp_path):
    src = mmcv_v1c_file(source(True))
    src["state_dict"]["layer3.2.conv2.weight"] = torch.randn(32, 32, 1, 1)  # 3x3 expected
    path = tmp_path / "bad_shape.pth"
    torch.save(src, path)
    with pytest.raises(PretrainedWeightsError) as info:
        build_backbone(BackboneConfig(**SMALL, deep_stem=True, pretrained=str(path)))
    msg = str(info.value)
    assert "mis-shaped (1): layer3.2.conv2.weight (32, 32, 1, 1) in the file, (32, 32, 3, 3) in the model" in msg
    assert "layer3 94/95" in msg and "inside `state_dict`" in msg


@pytest.mark.parametrize("file_deep", [False, True])
def test_stem_type_must_match_the_configured_backbone(file_deep, tmp_path):
    src = source(file_deep)
    path = tmp_path / "stem.pth"
    torch.save(timm_deep_file(src) if file_deep else torchvision_file(src), path)
    with pytest.raises(PretrainedWeightsError) as info:
        build_backbone(BackboneConfig(**SMALL, deep_stem=not file_deep, pretrained=str(path)))
    msg = str(info.value)
    assert f"set model.backbone.deep_stem: {str(file_deep).lower()}" in msg
    assert "stem 0/" in msg and "layer1 50/50" in msg  # the stages did match


def test_deeper_network_is_refused(tmp_path):
    path = tmp_path / "r101.pth"
    torch.save(torchvision_file(source(False, name="resnet101")), path)  # layer3 has 23 blocks, not 6
    with pytest.raises(PretrainedWeightsError) as info:
        build_backbone(BackboneConfig(**SMALL, pretrained=str(path)))
    assert "backbone tensors the model does not have" in str(info.value) and "layer3.6.conv1.weight" in str(info.value)
    build_backbone(BackboneConfig(name="resnet101", width=8, pretrained=str(path)))  # the right depth loads


def test_model_file_is_self_contained(tmp_path):
    """Train-free: build from a pretrained file, write model.pt, delete the ImageNet file, load for inference."""
    pretrained = tmp_path / "imagenet.pth"
    torch.save(mmcv_v1c_file(source(True)), pretrained)
    cfg = {"backbone": {**SMALL, "deep_stem": True, "pretrained": str(pretrained)}}
    model = build_segmentor(cfg, 3).eval()
    model_file = tmp_path / "model.pt"
    write_model_file(model_file, weights=model.state_dict(), model_config=model.cfg.model_dump(mode="json"),
                     num_classes=3, model_name="m")
    pretrained.unlink()
    record = read_model_file(model_file)
    assert record.model_config["backbone"]["pretrained"] is None and record.pretrained_from == str(pretrained)
    loaded, _ = load_model(model_file)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x)["logits"], model(x)["logits"])
    with pytest.raises(PretrainedFileNotFoundError):  # while building from the config would need it
        build_segmentor(cfg, 3)


def test_params_path_made_absolute_and_missing_file_named_by_key(tmp_path, monkeypatch):
    weights = tmp_path / "weights"
    weights.mkdir()
    torch.save(torchvision_file(source(False)), weights / "r50.pth")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "model": {"backbone": SMALL},
        "models": {"good": {"backbone": {"pretrained": "weights/r50.pth"}},
                   "gone": {"backbone": {"pretrained": "weights/missing.pth"}},
                   "plain": {}}}))
    elsewhere = tmp_path / "worker_dir"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # as a Ray worker would be
    params = load_params(tmp_path / "params.yaml")
    assert params.models["good"].backbone.pretrained == str(weights / "r50.pth")
    assert params.models["plain"].backbone.pretrained is None
    # the driver, then a worker, which receives plain data: the path stays absolute and the key is still known
    for loaded in (params, parse_params(params_to_dict(params))):
        build_segmentor(loaded.model_config_of("good"), 3)
        with pytest.raises(PretrainedFileNotFoundError) as info:
            build_segmentor(loaded.model_config_of("gone"), 3)
        assert isinstance(info.value, UserError) and isinstance(info.value, FileNotFoundError)
        assert "models.gone.backbone.pretrained" in str(info.value)
        assert str(weights / "missing.pth") in str(info.value)
