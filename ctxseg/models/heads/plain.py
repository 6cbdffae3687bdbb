"""The plain head (``context: none``): no context beyond the image.

``F = C_wi`` when a within-image module A_wi is present (PSPNet / DeepLabV3 / OCRNet), otherwise
``F = R``, the 3x3 ConvBNReLU of stage 4 (FCN's head conv); ``logits = cls(F)`` with
``cls = Dropout2d -> 1x1 conv``.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..layers import ConvBNReLU, modules_of
from .base import ContextHead, register_head

__all__ = ["PlainHead"]


@register_head("none")
class PlainHead(ContextHead):
    def __init__(self, cfg, in_channels: int, num_classes: int, *, ignore_index: int = 255,
                 with_wi: bool = False) -> None:
        super().__init__(cfg, in_channels, num_classes, ignore_index=ignore_index, with_wi=with_wi)
        # R (FCN's head conv) only when there is no C_wi to classify
        self.bottleneck = None if with_wi else ConvBNReLU(in_channels, self.width, 3)
        self.classifier = nn.Sequential(nn.Dropout2d(cfg.dropout), nn.Conv2d(self.width, num_classes, 1))

    def features(self, x: torch.Tensor, c_wi: Optional[torch.Tensor] = None, *,
                 count: bool = False) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        if self.bottleneck is None:
            if c_wi is None:
                raise ValueError("this head was built for a within-image module (with_wi=True) but got no C_wi")
            return c_wi, {}
        return self.bottleneck(x), {}

    def rf_branches(self) -> List[List[nn.Module]]:
        return [] if self.bottleneck is None else [modules_of(self.bottleneck)]
