"""Dilated ResNet backbones (output stride 8), shared by MCIBI and CFNet.

Both papers use a ResNet whose stages 3 and 4 replace striding by dilation 2 and 4, so the last
feature map is at 1/8 of the input (output stride 8), optionally with the deep 3x3 stem of
ResNet-v1c (three 3x3 convs instead of one 7x7). The forward returns all four stage outputs.

Parameter names follow torchvision / mmcv (``conv1``, ``bn1``, ``layerN.i.convJ``, ``downsample``;
deep stem: ``stem.0 ... stem.8``). Both papers fine-tune ImageNet-pretrained dilated ResNets (MCIBI §4.1,
CFNet §4.1): :func:`load_pretrained` reads a local checkpoint in the torchvision, OpenMMLab v1c or timm
deep-stem layout (:data:`LAYOUTS`), renames it onto this ResNet and loads every backbone tensor, or refuses
the file with a list of what is missing, mis-shaped or surplus and what matched.

``resnet_tiny`` is the CPU default: bottleneck blocks, one per stage, base width 8 (stage widths
32/64/128/256), a single 3x3 stride-2 stem conv, no max-pool (stage 1 strides instead) and no
extra dilation in stages 3-4, so its receptive field stays well below the image size.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn

from ..errors import UserError
from .config import BackboneConfig

logger = logging.getLogger(__name__)

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "build_backbone", "load_pretrained", "read_pretrained",
           "detect_layout", "to_ctxseg_names", "PretrainedLoad", "PretrainedWeightsError",
           "PretrainedFileNotFoundError", "LAYOUTS", "ARCHS"]


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.dilation = dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet-v1.5 bottleneck (stride on the 3x3 conv)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.dilation = dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


# name -> (block, depths, base width, stem width, single-conv stem kernel, use max-pool, (dil3, dil4))
ARCHS: Dict[str, Tuple[Type[nn.Module], Tuple[int, int, int, int], int, int, int, bool, Tuple[int, int]]] = {
    "resnet_tiny": (Bottleneck, (1, 1, 1, 1), 8, 16, 3, False, (1, 1)),
    "resnet18": (BasicBlock, (2, 2, 2, 2), 64, 64, 7, True, (2, 4)),
    "resnet50": (Bottleneck, (3, 4, 6, 3), 64, 64, 7, True, (2, 4)),
    "resnet101": (Bottleneck, (3, 4, 23, 3), 64, 64, 7, True, (2, 4)),
}


class ResNet(nn.Module):
    """Dilated ResNet returning the four stage outputs ``[c1, c2, c3, c4]``.

    With ``output_stride=8`` stages 3 and 4 keep stride 1 and use dilation ``dilations`` (2 and 4
    for the standard nets); with 16 only stage 4 is dilated (by ``dilations[0]``); 32 is the plain
    classification ResNet. Within a dilated stage the first block uses half the stage dilation
    (1 in stage 3, 2 in stage 4: torchvision's ``replace_stride_with_dilation`` convention).
    """

    def __init__(self, block: Type[nn.Module], depths: Sequence[int], width: int = 64,
                 stem_width: int = 64, stem_kernel: int = 7, deep_stem: bool = False,
                 maxpool: bool = True, output_stride: int = 8,
                 dilations: Tuple[int, int] = (2, 4), in_channels: int = 3) -> None:
        super().__init__()
        self.deep_stem = deep_stem
        if deep_stem:
            half = max(stem_width // 2, 1)
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, half, 3, 2, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
                nn.Conv2d(half, half, 3, 1, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
                nn.Conv2d(half, stem_width, 3, 1, 1, bias=False), nn.BatchNorm2d(stem_width), nn.ReLU(inplace=True),
            )
        else:
            self.conv1 = nn.Conv2d(in_channels, stem_width, stem_kernel, 2, stem_kernel // 2, bias=False)
            self.bn1 = nn.BatchNorm2d(stem_width)
            self.relu = nn.ReLU(inplace=True)
        self.use_maxpool = maxpool
        self.maxpool = nn.MaxPool2d(3, 2, 1) if maxpool else nn.Identity()

        if output_stride == 8:
            strides, dils = (1, 2, 1, 1), (1, 1, dilations[0], dilations[1])
        elif output_stride == 16:
            strides, dils = (1, 2, 2, 1), (1, 1, 1, dilations[0])
        elif output_stride == 32:
            strides, dils = (1, 2, 2, 2), (1, 1, 1, 1)
        else:
            raise ValueError(f"backbone.output_stride must be 8, 16 or 32, got {output_stride}")
        if not maxpool:  # stage 1 takes over the max-pool's stride
            strides = (2,) + strides[1:]
        self.strides, self.dilations = strides, dils

        self.inplanes = stem_width
        self.out_channels: List[int] = []
        for i, (depth, s, d) in enumerate(zip(depths, strides, dils)):
            layer = self._make_layer(block, width * 2 ** i, depth, s, d)
            self.add_module(f"layer{i + 1}", layer)
            self.out_channels.append(width * 2 ** i * block.expansion)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block: Type[nn.Module], planes: int, depth: int, stride: int,
                    dilation: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        first_dil = max(dilation // 2, 1)
        layers = [block(self.inplanes, planes, stride, first_dil, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, 1, dilation) for _ in range(1, depth)]
        return nn.Sequential(*layers)

    def rf_path(self) -> List[nn.Module]:
        """Convs / pools along the main (non-shortcut) path, in order, for receptive-field folding."""
        path: List[nn.Module] = []
        if self.deep_stem:
            path += [m for m in self.stem if isinstance(m, nn.Conv2d)]
        else:
            path.append(self.conv1)
        if self.use_maxpool:
            path.append(self.maxpool)
        for i in range(1, 5):
            for blk in getattr(self, f"layer{i}"):
                path += [getattr(blk, n) for n in ("conv1", "conv2", "conv3") if hasattr(blk, n)]
        return path

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        if self.deep_stem:
            x = self.stem(x)
        else:
            x = self.relu(self.bn1(self.conv1(x)))
        x = self.maxpool(x)
        outs = []
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            outs.append(x)
        return outs


class PretrainedWeightsError(UserError):
    """A ``backbone.pretrained`` file cannot initialise the configured backbone. The message names the key,
    the file, the layout found, every missing / mis-shaped / surplus tensor, and what did match."""


class PretrainedFileNotFoundError(PretrainedWeightsError, FileNotFoundError):
    """The ``backbone.pretrained`` file does not exist."""


# Key layouts of ImageNet ResNet checkpoints that map onto this ResNet. The stages (``layerN.i.convJ``,
# ``bnJ``, ``downsample``) are named alike in all of them; the stems differ.
LAYOUTS: Dict[str, str] = {
    "torchvision": "single-conv stem `conv1`/`bn1` (torchvision resnet50/101, timm resnet50, OpenMMLab ResNet v1b)",
    "openmmlab_v1c": "deep stem `stem.0`...`stem.7` (OpenMMLab resnet50_v1c/101_v1c, ResNetV1d)",
    "timm_deep": "deep stem `conv1.0`...`conv1.6` + `bn1` (timm resnet50c/resnet50d-style)",
    "unknown": "no stem found (none of `conv1.weight`, `stem.0.weight`, `conv1.0.weight`)",
}

# timm's deep stem: conv1 = Sequential(conv, bn, act, conv, bn, act, conv) and bn1 the last BN
# (timm/models/resnet.py, stem_type='deep'); ours is one Sequential of 3 x (conv, bn, act).
_TIMM_DEEP_STEM = (("conv1.0.", "stem.0."), ("conv1.1.", "stem.1."), ("conv1.3.", "stem.3."),
                   ("conv1.4.", "stem.4."), ("conv1.6.", "stem.6."), ("bn1.", "stem.7."))
_BACKBONE_KEY = re.compile(r"^(stem|conv1|bn1|layer[1-4])\.")
_AVG_DOWN = re.compile(r"^(layer[1-4]\.\d+\.downsample)\.([12])\.(.+)$")
_SHOW = 12  # keys listed per problem in an error message


@dataclasses.dataclass
class PretrainedLoad:
    """What :func:`load_pretrained` took: the layout found, the backbone tensors loaded (ctxseg names) and
    the file's tensors left unused (classifier, other heads, counters)."""

    path: str
    layout: str
    loaded: List[str]
    ignored: List[str]
    notes: List[str]


def _stem_of(model: "ResNet") -> str:
    if model.deep_stem:
        return "deep 3x3 stem (model.backbone.deep_stem: true)"
    k = model.conv1.kernel_size[0]
    return f"single {k}x{k}-conv stem (model.backbone.deep_stem: false)"


def _part(key: str) -> str:
    m = re.match(r"(layer[1-4])\.", key)
    return m.group(1) if m else "stem"


def _listing(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:_SHOW])
    return shown + (f", ... ({len(keys) - _SHOW} more)" if len(keys) > _SHOW else "")


def read_pretrained(path: Union[str, os.PathLike], key: str = "model.backbone.pretrained"
                    ) -> Tuple[Dict[str, torch.Tensor], List[str], List[str]]:
    """The tensors of a checkpoint file, unwrapped: ``(state, ignored, wrappers)``.

    Accepts a bare state dict or one nested under ``state_dict`` (OpenMMLab, beside a ``meta`` entry) or
    ``model``; strips a DDP ``module.`` prefix; from a segmentor checkpoint (keys under ``backbone.``)
    keeps the backbone's tensors and lists the rest (decode heads ...) as ignored.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise PretrainedFileNotFoundError(
            f"{key}: no such file {path!r}. Point it at a local ImageNet checkpoint (a relative path is taken "
            "from the folder of params.yaml), or set it to null to start from random weights.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # not a torch file, truncated, or a pickle holding code objects
        raise PretrainedWeightsError(
            f"{key} = {path}: cannot be read with torch.load(weights_only=True) ({err}). If you trust the file, "
            "re-save its state dict alone: torch.save(torch.load(f, weights_only=False)['state_dict'], out)."
        ) from None
    wrappers: List[str] = []
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            wrappers.append(wrapper)
            state = state[wrapper]
    if not isinstance(state, dict):
        raise PretrainedWeightsError(f"{key} = {path}: holds a {type(state).__name__}, not a state dict")
    ignored = [str(k) for k, v in state.items() if not isinstance(v, torch.Tensor)]
    tensors = {str(k).removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if any(k.startswith("backbone.") for k in tensors):  # a segmentor checkpoint: its backbone only
        ignored += [k for k in tensors if not k.startswith("backbone.")]
        tensors = {k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")}
    return tensors, ignored, wrappers


def detect_layout(keys) -> str:
    """Which :data:`LAYOUTS` entry a set of (unwrapped) keys follows, by its stem."""
    keys = set(keys)
    if "stem.0.weight" in keys:
        return "openmmlab_v1c"
    if "conv1.0.weight" in keys:
        return "timm_deep"
    if "conv1.weight" in keys:
        return "torchvision"
    return "unknown"


def to_ctxseg_names(state: Dict[str, torch.Tensor], layout: str) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Rename a checkpoint's tensors to this ResNet's names; return them and notes for the log.

    timm's deep stem moves onto ``stem.*``. A ResNet-D shortcut (timm resnet50d, OpenMMLab ResNetV1d:
    ``downsample = (AvgPool, conv, bn)``, so its tensors sit at ``downsample.1`` / ``.2``) moves onto our
    ``downsample.0`` / ``.1``; ours has no average pool there, which the notes say.
    """
    out: Dict[str, torch.Tensor] = {}
    notes: List[str] = []
    avg_down = {m.group(1) for k in state for m in [_AVG_DOWN.match(k)] if m and m.group(2) == "2"}
    for k, v in state.items():
        if layout == "timm_deep":
            for old, new in _TIMM_DEEP_STEM:
                if k.startswith(old):
                    k = new + k[len(old):]
                    break
        m = _AVG_DOWN.match(k)
        if m and m.group(1) in avg_down:
            k = f"{m.group(1)}.{int(m.group(2)) - 1}.{m.group(3)}"
        out[k] = v
    if avg_down:
        notes.append(f"ResNet-D shortcuts ({len(avg_down)}: avg-pool + 1x1 conv, as in timm resnet50d / OpenMMLab "
                     "ResNetV1d): their conv and BN load into ctxseg's strided 1x1 shortcut, which has no avg-pool; "
                     "the shortcut features differ until fine-tuned")
    return out, notes


def load_pretrained(model: "ResNet", path: Union[str, os.PathLike],
                    key: str = "model.backbone.pretrained") -> PretrainedLoad:
    """Initialise ``model`` from a local ImageNet checkpoint (``torch.load(weights_only=True)``), completely
    or not at all.

    Both papers fine-tune ImageNet-pretrained dilated ResNets (MCIBI §4.1, CFNet §4.1). The layout of the
    file (:data:`LAYOUTS`) is detected from its stem and logged; every tensor of the backbone -- stem and
    all four stages -- must be present with the model's shape, and the file's stem type (single conv or
    deep) must be the configured one, or :class:`PretrainedWeightsError` names the file, the layout,
    each missing / mis-shaped / surplus tensor and what matched, and nothing is loaded. Tensors outside
    the backbone (``fc.*``, a segmentor's heads) and BN ``num_batches_tracked`` counters absent from the
    file are fine; the unused ones are logged. Nothing is fetched from a hub.
    """
    path = os.fspath(path)
    state, ignored, wrappers = read_pretrained(path, key)
    layout = detect_layout(state)
    mapped, notes = to_ctxseg_names(state, layout)
    own = model.state_dict()

    taken: Dict[str, torch.Tensor] = {}
    missing, misshaped = [], []
    for k, t in own.items():
        if k not in mapped:
            if not k.endswith("num_batches_tracked"):
                missing.append(k)
        elif tuple(mapped[k].shape) != tuple(t.shape):
            misshaped.append(f"{k} {tuple(mapped[k].shape)} in the file, {tuple(t.shape)} in the model")
        else:
            taken[k] = mapped[k]
    surplus = [k for k in mapped if k not in own and _BACKBONE_KEY.match(k) and not k.endswith("num_batches_tracked")]
    ignored += [k for k in mapped if k not in own and k not in surplus]
    file_deep = layout in ("openmmlab_v1c", "timm_deep")
    stem_clash = layout != "unknown" and file_deep != model.deep_stem

    wrapped = f" (inside `{'`/`'.join(wrappers)}`)" if wrappers else ""
    if missing or misshaped or surplus or stem_clash:
        parts: Dict[str, List[int]] = {}
        for k in own:
            if not k.endswith("num_batches_tracked"):
                parts.setdefault(_part(k), [0, 0])[1] += 1
        for k in taken:
            if not k.endswith("num_batches_tracked"):
                parts[_part(k)][0] += 1
        lines = [f"{key} = {path}: the file does not fit the configured backbone "
                 f"({_stem_of(model)}, blocks per stage {[len(getattr(model, f'layer{i}')) for i in range(1, 5)]}, "
                 f"stage outputs {model.out_channels}); nothing was loaded.",
                 f"  layout found: {LAYOUTS[layout]}{wrapped}"]
        if stem_clash:
            want = "a deep-stem file (OpenMMLab *_v1c, timm resnet50c/d)" if model.deep_stem else \
                "a single-conv-stem file (torchvision resnet50/101)"
            lines.append(f"  stem: the file has a {'deep 3x3' if file_deep else 'single-conv'} stem, the model a "
                         f"{_stem_of(model)}: set model.backbone.deep_stem: {str(file_deep).lower()}, or use {want}")
        if missing:
            lines.append(f"  missing from the file ({len(missing)}): {_listing(missing)}")
        if misshaped:
            lines.append(f"  mis-shaped ({len(misshaped)}): {_listing(misshaped)}")
        if surplus:
            lines.append(f"  backbone tensors the model does not have ({len(surplus)}; another depth or width? "
                         f"check model.backbone.name / width / depths): {_listing(surplus)}")
        lines.append("  matched: " + ", ".join(f"{p} {a}/{b}" for p, (a, b) in parts.items()) + " tensors")
        raise PretrainedWeightsError("\n".join(lines))

    result = model.load_state_dict(taken, strict=False)
    assert all(k.endswith("num_batches_tracked") for k in result.missing_keys), result.missing_keys
    counts: Dict[str, int] = {}
    for k in taken:
        if not k.endswith("num_batches_tracked"):
            counts[_part(k)] = counts.get(_part(k), 0) + 1
    logger.info("%s: layout %s%s; loaded every backbone tensor (%s tensors)", path, LAYOUTS[layout], wrapped,
                ", ".join(f"{p} {n}" for p, n in counts.items()))
    if ignored:
        logger.info("%s: %d entries not used by the backbone: %s", path, len(ignored), _listing(ignored))
    for note in notes:
        logger.warning("%s: %s", path, note)
    return PretrainedLoad(path, layout, sorted(taken), ignored, notes)


def build_backbone(cfg: BackboneConfig) -> ResNet:
    """Build the backbone named in ``cfg`` and load ``cfg.pretrained`` if given."""
    block, depths, width, stem_width, stem_kernel, maxpool, dilations = ARCHS[cfg.name]
    if cfg.width is not None:
        stem_width = max(stem_width * cfg.width // width, 4)
        width = cfg.width
    model = ResNet(
        block,
        cfg.depths if cfg.depths is not None else depths,
        width=width,
        stem_width=stem_width,
        stem_kernel=stem_kernel,
        deep_stem=cfg.deep_stem,
        maxpool=maxpool,
        output_stride=cfg.output_stride,
        dilations=cfg.dilations if cfg.dilations is not None else dilations,
    )
    if cfg.pretrained:
        load_pretrained(model, cfg.pretrained, key=f"{cfg.origin}.pretrained")
    return model
