"""Within-image context modules A_wi (MCIBI Eq 3: C_wi = A_wi(R)): PPM, ASPP, OCR, plus the FCN head.

Each module (a :class:`WithinImageContext`) maps the stage-4 feature map to ``channels``, declares
``needs_soft_regions`` (True: ``forward(x, soft_regions)`` needs the stage-3 auxiliary logits, as
OCRNet's soft object regions; the segmentor then computes them at inference too) and exposes
``rf_branches()``: the local conv chains from its input to its output (global pooling / attention
branches excluded, they see the whole image), used by :func:`ctxseg.models.receptive_field`.

Globally pooled 1x1 branches use Conv(bias)+ReLU without BatchNorm so a training forward with batch
size 1 is well defined (see :class:`ctxseg.models.layers.ConvBNReLU`).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import ConvBNReLU, modules_of

__all__ = ["FCNHead", "WithinImageContext", "PPM", "ASPP", "OCR", "build_context"]


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class FCNHead(nn.Module):
    """FCN head: 3x3 ConvBNReLU -> Dropout2d -> 1x1 classifier. Used as the stage-3 auxiliary head."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.conv = ConvBNReLU(in_channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.cls = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls(self.dropout(self.conv(x)))

    def rf_path(self) -> List[nn.Module]:
        return modules_of(self.conv, self.cls)


class WithinImageContext(nn.Module):
    """Base of the A_wi modules: ``forward(x, soft_regions=None) -> C_wi`` [B, channels, h, w]."""

    needs_soft_regions: bool = False

    def rf_branches(self) -> List[List[nn.Module]]:
        raise NotImplementedError


class PPM(WithinImageContext):
    """PSPNet pyramid pooling module (bins 1/2/3/6), concatenated with the input, 3x3 bottleneck."""

    def __init__(self, in_channels: int, channels: int, bins: Sequence[int] = (1, 2, 3, 6)) -> None:
        super().__init__()
        self.bins = tuple(bins)
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), ConvBNReLU(in_channels, channels, 1, norm=b > 1))
            for b in self.bins
        )
        self.bottleneck = ConvBNReLU(in_channels + len(self.bins) * channels, channels, 3)

    def forward(self, x: torch.Tensor, soft_regions: Optional[torch.Tensor] = None) -> torch.Tensor:
        size = x.shape[-2:]
        outs = [x] + [_resize(stage(x), size) for stage in self.stages]
        return self.bottleneck(torch.cat(outs, dim=1))

    def rf_branches(self) -> List[List[nn.Module]]:
        # identity branch -> bottleneck; pooled branches are image-wide for bin 1
        return [modules_of(self.bottleneck)]


class ASPP(WithinImageContext):
    """DeepLabV3 ASPP: 1x1 conv, 3x3 convs at ``rates`` (12/24/36 at OS 8), image pooling; 1x1 projection
    of the concatenation (as in the DeepLabV3 paper)."""

    def __init__(self, in_channels: int, channels: int, rates: Sequence[int] = (12, 24, 36)) -> None:
        super().__init__()
        self.rates = tuple(rates)
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvBNReLU(in_channels, channels, 1, norm=False))
        self.branches = nn.ModuleList(
            [ConvBNReLU(in_channels, channels, 1)]
            + [ConvBNReLU(in_channels, channels, 3, dilation=r) for r in self.rates]
        )
        self.project = ConvBNReLU((len(self.rates) + 2) * channels, channels, 1)

    def forward(self, x: torch.Tensor, soft_regions: Optional[torch.Tensor] = None) -> torch.Tensor:
        size = x.shape[-2:]
        outs = [self.image_pool(x).expand(-1, -1, *size)] + [b(x) for b in self.branches]
        return self.project(torch.cat(outs, dim=1))

    def rf_branches(self) -> List[List[nn.Module]]:
        return [modules_of(b, self.project) for b in self.branches]


class OCR(WithinImageContext):
    """OCRNet object-contextual representations.

    Soft object regions (the stage-3 auxiliary logits) weight the pixels into one representation per
    class (spatial gather); every pixel then attends over these K object representations (object
    attention, computed with SDPA), and the object context is fused with the pixel features.
    """

    needs_soft_regions = True

    def __init__(self, in_channels: int, channels: int, key_channels: int) -> None:
        super().__init__()
        self.key_channels = key_channels
        self.bottleneck = ConvBNReLU(in_channels, channels, 3)
        self.f_pixel = nn.Sequential(ConvBNReLU(channels, key_channels, 1), ConvBNReLU(key_channels, key_channels, 1))
        self.f_object = nn.Sequential(ConvBNReLU(channels, key_channels, 1), ConvBNReLU(key_channels, key_channels, 1))
        self.f_down = ConvBNReLU(channels, key_channels, 1)
        self.f_up = ConvBNReLU(key_channels, channels, 1)
        self.fuse = ConvBNReLU(2 * channels, channels, 1)

    def forward(self, x: torch.Tensor, soft_regions: Optional[torch.Tensor] = None) -> torch.Tensor:
        if soft_regions is None:
            raise ValueError("OCR needs soft object regions (the auxiliary head logits)")
        feats = self.bottleneck(x)
        b, c, h, w = feats.shape
        soft_regions = _resize(soft_regions, (h, w))
        probs = torch.softmax(soft_regions.flatten(2), dim=2)  # [B, K, N], softmax over pixels
        proxy = torch.bmm(probs, feats.flatten(2).transpose(1, 2))  # [B, K, C] object regions
        proxy = proxy.transpose(1, 2).unsqueeze(-1)  # [B, C, K, 1]
        q = self.f_pixel(feats).flatten(2).transpose(1, 2).unsqueeze(1)  # [B, 1, N, Ck]
        k = self.f_object(proxy).flatten(2).transpose(1, 2).unsqueeze(1)  # [B, 1, K, Ck]
        v = self.f_down(proxy).flatten(2).transpose(1, 2).unsqueeze(1)
        ctx = F.scaled_dot_product_attention(q, k, v, scale=self.key_channels ** -0.5)
        ctx = ctx.squeeze(1).transpose(1, 2).reshape(b, self.key_channels, h, w)
        return self.fuse(torch.cat([self.f_up(ctx), feats], dim=1))

    def rf_branches(self) -> List[List[nn.Module]]:
        return [modules_of(self.bottleneck, self.f_pixel, self.f_up, self.fuse)]


def build_context(framework: str, in_channels: int, channels: int, *, bins=(1, 2, 3, 6),
                  rates=(12, 24, 36), key_channels: int = 32) -> Optional[WithinImageContext]:
    """A_wi for ``framework``: None for FCN, else PPM / ASPP / OCR producing ``channels`` maps."""
    if framework == "fcn":
        return None
    if framework == "pspnet":
        return PPM(in_channels, channels, bins)
    if framework == "deeplabv3":
        return ASPP(in_channels, channels, rates)
    if framework == "ocrnet":
        return OCR(in_channels, channels, key_channels)
    raise ValueError(f"model.framework must be one of fcn, pspnet, deeplabv3, ocrnet; got {framework!r}")
