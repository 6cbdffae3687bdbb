"""CFNet context head (Zhang et al., CVPR 2019, §2-3, Fig 3), as the authors' released code builds it
(PyTorch-Encoding ``encoding/models/sseg/atten.py``: ``ATTENHead``, ``GlobalPooling``).

    X = ConvBNReLU3x3(stage 4)                       the head's input feature (the code's ``conv5``)
    F = concat[GP(X), ACF(X)] [, C_wi]               the code's ``ConcurrentModule([GlobalPooling, ACF])``
    logits = Conv1x1(Dropout(F))                     the code's ``conv6``

* ACF(X) = BN(Conv1x1(Z)) + X with the default ``acf.output: authors`` (:mod:`ctxseg.models.acf`), so F
  keeps each pixel's own feature; ``acf.output: z_only`` feeds Z alone (the earlier reading of Fig 3).
* GP(X): global average pooling -> 1x1 conv -> BN -> ReLU, broadcast (:class:`ctxseg.models.acf.GlobalPool`).
* C_wi joins the concatenation when the framework has a within-image module (PSPNet, DeepLabV3,
  OCRNet); CFNet itself has none.
* Not taken from the code: ``ATTEN``'s default ``with_enc=True`` adds EncNet's context-encoding module
  (and its SE loss) after the concatenation; the paper's CFNet has no such module, so ctxseg omits it.

Every width follows the head width C = ``model.channels`` (the code's ``in_channels // 4``): the ACF
module has d_model = C, H heads of d_k = (C/H) K query/key channels and C/H value channels.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..acf import ACF, GlobalPool, check_acf_widths
from ..config import ACFConfig
from ..layers import ConvBNReLU, modules_of
from .base import ContextHead, register_head

__all__ = ["ACFHead"]


@register_head("acf", config=ACFConfig)
class ACFHead(ContextHead):
    @classmethod
    def check_config(cls, cfg) -> None:
        check_acf_widths(cfg.channels, cfg.acf.heads, cfg.acf.mixtures)

    def __init__(self, cfg, in_channels: int, num_classes: int, *, ignore_index: int = 255,
                 with_wi: bool = False) -> None:
        super().__init__(cfg, in_channels, num_classes, ignore_index=ignore_index, with_wi=with_wi)
        a: ACFConfig = cfg.acf
        width = self.width
        self.bottleneck = ConvBNReLU(in_channels, width, 3)  # X (the code's conv5)
        self.acf = ACF(width, a.heads, a.mixtures, a.dropout, a.phi, a.scale, a.output)
        self.global_pool = GlobalPool(width, width) if a.global_pool else None
        classifier_in = width * (1 + int(a.global_pool) + int(with_wi))
        self.classifier = nn.Sequential(nn.Dropout(cfg.dropout), nn.Conv2d(classifier_in, num_classes, 1))

    def features(self, x: torch.Tensor, c_wi: Optional[torch.Tensor] = None, *,
                 count: bool = False) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        r = self.bottleneck(x)
        parts = [] if self.global_pool is None else [self.global_pool(r)]
        parts.append(self.acf(r, pad_head_dims=not count))
        if c_wi is not None:
            parts.append(c_wi)
        return (torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]), {}

    def rf_branches(self) -> List[List[nn.Module]]:
        return [modules_of(self.bottleneck) + self.acf.rf_path()]
