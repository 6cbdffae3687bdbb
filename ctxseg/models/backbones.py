"""Dilated ResNet backbones (output stride 8), shared by MCIBI and CFNet.

Both papers use a ResNet whose stages 3 and 4 replace striding by dilation 2 and 4, so the last
feature map is at 1/8 of the input (output stride 8), optionally with the deep 3x3 stem of
ResNet-v1c (three 3x3 convs instead of one 7x7). The forward returns all four stage outputs.

Parameter names follow torchvision / mmcv (``conv1``, ``bn1``, ``layerN.i.convJ``, ``downsample``;
deep stem: ``stem.0 ... stem.8``) so ImageNet checkpoints in those layouts load by name.

``resnet_tiny`` is the CPU default: bottleneck blocks, one per stage, base width 8 (stage widths
32/64/128/256), a single 3x3 stride-2 stem conv, no max-pool (stage 1 strides instead) and no
extra dilation in stages 3-4, so its receptive field stays well below the image size.
"""

from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn

from .config import BackboneConfig

logger = logging.getLogger(__name__)

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "build_backbone", "load_pretrained", "ARCHS"]


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


def load_pretrained(model: nn.Module, path: Union[str, os.PathLike]) -> Tuple[List[str], List[str]]:
    """Load a local checkpoint by parameter name (``torch.load(weights_only=True)``).

    Accepts a bare state dict or one nested under ``state_dict`` / ``model``; strips ``module.``
    and ``backbone.`` prefixes; drops a classifier ``fc.*``; skips tensors whose shape differs.
    Missing and unexpected keys are logged (warning) and returned. Nothing is fetched from a hub.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"backbone.pretrained: no such file {path!r}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    cleaned: Dict[str, torch.Tensor] = {}
    for k, v in state.items():
        for prefix in ("module.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if k.startswith("fc."):
            continue
        cleaned[k] = v
    own = model.state_dict()
    mismatched = [k for k, v in cleaned.items() if k in own and own[k].shape != v.shape]
    for k in mismatched:
        logger.warning("pretrained %s: shape %s in file, %s in model; skipped",
                       k, tuple(cleaned[k].shape), tuple(own[k].shape))
        del cleaned[k]
    result = model.load_state_dict(cleaned, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    unexpected = list(result.unexpected_keys)
    logger.info("loaded backbone weights from %s (%d tensors)", path, len(cleaned))
    if missing:
        logger.warning("pretrained %s: %d missing keys: %s", path, len(missing), missing[:20])
    if unexpected:
        logger.warning("pretrained %s: %d unexpected keys: %s", path, len(unexpected), unexpected[:20])
    return missing, unexpected + mismatched


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
        load_pretrained(model, cfg.pretrained)
    return model
