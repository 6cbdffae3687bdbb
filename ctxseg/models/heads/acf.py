"""CFNet context head (Zhang et al., CVPR 2019, §2-3, Fig 3): ACF with its global-pooling branch.

R = 3x3 ConvBNReLU of stage 4 (the head's input feature map X of §3). Two output paths
(``acf.output``):

* ``paper`` (default, Fig 3 and §3): Z = ACF(R) (Eq 1-3, no projection, no residual) is concatenated
  with the upsampled global-pooling feature GP(R) (global average pooling -> 1x1 conv, §2.2)
  [and C_wi when the framework has a within-image module, which the paper does not]; the
  concatenation is fed to the last convolution, the classifier (Dropout2d -> 1x1 conv). F has
  ``acf.channels + channels`` (+ ``channels`` with C_wi) channels.
* ``residual_fusion`` (ctxseg's earlier variant, not the paper's): ACF returns R + proj(Z), which is
  concatenated with R again, GP(R) [and C_wi] and fused by a ConvBNReLU (``fusion_kernel``) before
  the classifier. It adds a 1x1 projection, a second copy of R and the fusion conv, and (with the
  3x3 fusion) 16 px of local receptive field.
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
        self.output = a.output
        residual = a.output == "residual_fusion"
        self.bottleneck = ConvBNReLU(in_channels, width, 3)  # R
        self.acf = ACF(width, a.channels, a.heads, a.mixtures, a.dropout, a.phi, a.scale, residual=residual)
        self.global_pool = GlobalPool(width, width) if a.global_pool else None
        if residual:
            self.fusion = Fusion("concat", 2 + int(a.global_pool) + int(with_wi), width, cfg.fusion_kernel)
            classifier_in = width
        else:
            self.fusion = None
            classifier_in = a.channels + width * (int(a.global_pool) + int(with_wi))
        self.classifier = nn.Sequential(nn.Dropout2d(cfg.dropout), nn.Conv2d(classifier_in, num_classes, 1))

    def features(self, x: torch.Tensor, c_wi: Optional[torch.Tensor] = None, *,
                 count: bool = False) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        r = self.bottleneck(x)
        z = self.acf(r, pad_head_dims=not count)  # Z (paper) or R + proj(Z) (residual_fusion)
        parts = [r, z] if self.fusion is not None else [z]
        if self.global_pool is not None:
            parts.append(self.global_pool(r))  # GP feature, broadcast ("upsampled") to every position
        if c_wi is not None:
            parts.append(c_wi)
        if self.fusion is not None:
            return self.fusion(parts), {}
        return (torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]), {}

    def rf_branches(self) -> List[List[nn.Module]]:
        return [modules_of(self.bottleneck) + self.acf.rf_path()]

    def rf_post(self) -> List[nn.Module]:
        return (self.fusion.rf_path() if self.fusion is not None else []) + modules_of(self.classifier)
