"""CFNet context head (Zhang et al., CVPR 2019, §3, Fig 3): ACF with its global-pooling branch.

R = 3x3 ConvBNReLU of stage 4; F = conv(concat[R, ACF(R), GP(R)[, C_wi]]) with the concat fusion
(``fusion_kernel``), O = cls(F), cls = Dropout2d -> 1x1 conv. The ACF module (Eq 1-3, mixture of
softmaxes) lives in :mod:`ctxseg.models.acf`.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..acf import ACF, GlobalPool
from ..config import ACFConfig
from ..dca import Fusion
from ..layers import ConvBNReLU, modules_of
from .base import ContextHead, register_head

__all__ = ["ACFHead"]


@register_head("acf", config=ACFConfig)
class ACFHead(ContextHead):
    def __init__(self, cfg, in_channels: int, num_classes: int, *, ignore_index: int = 255,
                 with_wi: bool = False) -> None:
        super().__init__(cfg, in_channels, num_classes, ignore_index=ignore_index, with_wi=with_wi)
        a: ACFConfig = cfg.acf
        width = self.width
        self.bottleneck = ConvBNReLU(in_channels, width, 3)  # R
        self.acf = ACF(width, a.channels, a.heads, a.mixtures, a.dropout, a.phi, a.scale)
        self.global_pool = GlobalPool(width, width) if a.global_pool else None
        self.fusion = Fusion("concat", 2 + int(a.global_pool) + int(with_wi), width, cfg.fusion_kernel)
        self.classifier = nn.Sequential(nn.Dropout2d(cfg.dropout), nn.Conv2d(width, num_classes, 1))

    def features(self, x: torch.Tensor, c_wi: Optional[torch.Tensor] = None, *,
                 count: bool = False) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        r = self.bottleneck(x)
        parts = [r, self.acf(r, pad_head_dims=not count)]
        if self.global_pool is not None:
            parts.append(self.global_pool(r))
        if c_wi is not None:
            parts.append(c_wi)
        return self.fusion(parts), {}

    def rf_branches(self) -> List[List[nn.Module]]:
        return [modules_of(self.bottleneck) + self.acf.rf_path()]

    def rf_post(self) -> List[nn.Module]:
        return self.fusion.rf_path() + modules_of(self.classifier)
