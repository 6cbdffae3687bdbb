"""Segmentor composition (MCIBI Fig 2): backbone -> A_wi -> A_bi -> F -> classifier, + stage-3 aux head.

``context="none"``  : logits = cls(C_wi)            (FCN: C_wi = R = 3x3 conv of stage 4)
``context="mcibi"`` : R = 3x3 conv(stage 4); W-logits = H1(R); C_bi = DCA(R, W, M) (Eq 11-14);
                      F = Fusion(R, C_bi[, C_wi]) (Eq 4); O = H2(F); memory update (Eq 6-10) and
                      RCL L_M = CE(H2(M), k) (Eq 15/17) in the training forward.
``context="acf"``   : R = 3x3 conv(stage 4); F = conv(concat[R, ACF(R), GP(R)[, C_wi]]); O = cls(F)
                      (CFNet = FCN + ACF + GP, Fig 3).

OCRNet uses the stage-3 auxiliary logits as its soft object regions (as in OCRNet with ResNet).

RCL and batch norm (Eq 15/17): H2 (1x1 ConvBNReLU -> Dropout -> 1x1 classifier) is applied to the
memory rows as a [K, C, 1, 1] batch. Running it through the BN module in train mode would normalise
the K rows with their own statistics and fold memory statistics into the running mean/var used at
test time. We instead run H2 on the memory through a functional path whose BN uses the *running*
statistics (``F.batch_norm(training=False)``): the running stats are untouched, the conv weights
and BN affine parameters still receive the L_M gradient, and a memory row is normalised exactly
as a pixel is at inference time.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from .acf import ACF, GlobalPool
from .backbones import build_backbone
from .config import ModelConfig
from .context import FCNHead, build_context
from .dca import DCA, Fusion
from .layers import ConvBNReLU, conv_path_rf, modules_of
from .losses import memory_ce, segmentation_ce
from .memory import FeatureMemory, poly_momentum

logger = logging.getLogger(__name__)

__all__ = ["Segmentor", "DecodeHead", "ClassifierH2", "build_segmentor", "receptive_field"]


class ClassifierH2(nn.Sequential):
    """H2 of MCIBI: 1x1 ConvBNReLU -> Dropout2d -> 1x1 conv to classes.

    ``forward_frozen_bn`` runs the same layers with every BN in running-stats mode (see module doc).
    """

    def __init__(self, channels: int, num_classes: int, dropout: float) -> None:
        super().__init__(ConvBNReLU(channels, channels, 1), nn.Dropout2d(dropout), nn.Conv2d(channels, num_classes, 1))

    def forward_frozen_bn(self, x: torch.Tensor) -> torch.Tensor:
        def run(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
            if isinstance(mod, _BatchNorm):
                return F.batch_norm(x, mod.running_mean, mod.running_var, mod.weight, mod.bias,
                                    training=False, momentum=0.0, eps=mod.eps)
            if isinstance(mod, nn.Sequential):
                for sub in mod:
                    x = run(sub, x)
                return x
            return mod(x)

        return run(self, x)


class DecodeHead(nn.Module):
    """Everything after the backbone except the auxiliary head: A_wi, A_bi (DCA or ACF), F, classifier.

    ``forward(c4, aux_logits) -> (logits at feature resolution, R, W-logits or None)``.
    """

    def __init__(self, cfg: ModelConfig, in_channels: int, num_classes: int, ignore_index: int = 255) -> None:
        super().__init__()
        self.context_type = cfg.context
        width = cfg.channels
        if cfg.context == "mcibi" and cfg.mcibi.channels is not None:
            width = cfg.mcibi.channels
        if cfg.context == "mcibi" and width % 2:
            raise ValueError(f"MCIBI channels (model.channels / mcibi.channels) must be even, got {width}")
        self.width = width
        self.context_module = build_context(
            cfg.framework, in_channels, width, bins=cfg.ppm_bins, rates=cfg.aspp_rates,
            key_channels=cfg.ocr_key_channels,
        )
        has_wi = self.context_module is not None
        # R: 3x3 conv of stage 4 (FCN's head conv; MCIBI's and CFNet's input features)
        self.bottleneck = (
            ConvBNReLU(in_channels, width, 3) if (cfg.framework == "fcn" or cfg.context != "none") else None
        )
        if cfg.context == "mcibi":
            m = cfg.mcibi
            self.decoder_stage1 = nn.Sequential(  # H1 (Eq 11)
                ConvBNReLU(width, width, 1), nn.Dropout2d(m.dropout), nn.Conv2d(width, num_classes, 1)
            )
            self.memory = FeatureMemory(num_classes, width, init=m.init, update=m.update,
                                        ignore_index=ignore_index, chunk_pixels=m.update_chunk_pixels)
            self.dca = DCA(width)
            self.fusion = Fusion(m.fusion, 3 if has_wi else 2, width, cfg.fusion_kernel)
            self.classifier = ClassifierH2(width, num_classes, cfg.dropout)  # H2
        elif cfg.context == "acf":
            a = cfg.acf
            self.acf = ACF(width, a.channels, a.heads, a.mixtures, a.dropout, a.phi, a.scale)
            self.global_pool = GlobalPool(width, width) if a.global_pool else None
            self.fusion = Fusion("concat", 2 + int(a.global_pool) + int(has_wi), width, cfg.fusion_kernel)
            self.classifier = nn.Sequential(nn.Dropout2d(cfg.dropout), nn.Conv2d(width, num_classes, 1))
        else:
            self.classifier = nn.Sequential(nn.Dropout2d(cfg.dropout), nn.Conv2d(width, num_classes, 1))

    def forward(self, c4: torch.Tensor, aux_logits: Optional[torch.Tensor] = None):
        c_wi = self.context_module(c4, aux_logits) if self.context_module is not None else None
        r = w_logits = None
        if self.context_type == "mcibi":
            r = self.bottleneck(c4)  # R
            w_logits = self.decoder_stage1(r)  # H1(R), Eq 11
            # the memory is cloned: the in-place Eq 6 update later in this step must not touch
            # the tensor saved for backward
            c_bi = self.dca(r, w_logits, self.memory.memory.clone())  # Eq 11-14
            parts = [r, c_bi] + ([c_wi] if c_wi is not None else [])
            logits = self.classifier(self.fusion(parts))  # O = H2(F(R, C_bi, C_wi)), Eq 4
        elif self.context_type == "acf":
            r = self.bottleneck(c4)
            parts = [r, self.acf(r)]
            if self.global_pool is not None:
                parts.append(self.global_pool(r))
            if c_wi is not None:
                parts.append(c_wi)
            logits = self.classifier(self.fusion(parts))
        else:
            logits = self.classifier(self.bottleneck(c4) if c_wi is None else c_wi)
        return logits, r, w_logits

    def memory_loss(self) -> torch.Tensor:
        """RCL (Eq 15/17): H2 classifies the initialised memory rows; BN in running-stats mode."""
        mem = self.memory.memory.clone()
        rows = self.memory.initialized.nonzero().squeeze(1)
        preds = self.classifier.forward_frozen_bn(mem[:, :, None, None]).flatten(1)  # [K, K]
        return memory_ce(preds.index_select(0, rows), rows)

    def rf_branches(self) -> List[List[nn.Module]]:
        """Local conv chains from stage 4 to the fused feature map (global branches excluded)."""
        branches: List[List[nn.Module]] = []
        if self.bottleneck is not None:
            r = modules_of(self.bottleneck)
            if self.context_type == "mcibi":
                r = r + modules_of(self.dca.query, self.dca.out)
            elif self.context_type == "acf":
                r = r + self.acf.rf_path()
            branches.append(r)
        if self.context_module is not None:
            branches += self.context_module.rf_branches()
        return branches

    def rf_post(self) -> List[nn.Module]:
        post: List[nn.Module] = []
        if self.context_type in ("mcibi", "acf"):
            post += self.fusion.rf_path()
        return post + modules_of(self.classifier)


class Segmentor(nn.Module):
    """forward(images, targets=None, progress=0.0) -> {"logits", ["loss", "loss_o", "loss_aux", ...]}

    ``model.memory`` (MCIBI only) is the :class:`FeatureMemory`; its buffer appears in
    ``state_dict()`` as ``decode_head.memory.memory``.
    """

    def __init__(self, cfg: ModelConfig, num_classes: int, ignore_index: int = 255) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.cfg = cfg
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.framework, self.context_type = cfg.framework, cfg.context
        self.aux_weight = cfg.aux_weight
        self.backbone = build_backbone(cfg.backbone)
        c3, c4 = self.backbone.out_channels[2], self.backbone.out_channels[3]
        self.aux_head = FCNHead(c3, cfg.aux_channels, num_classes, cfg.dropout)
        self.decode_head = DecodeHead(cfg, c4, num_classes, ignore_index)

    @property
    def memory(self) -> FeatureMemory:
        if self.context_type != "mcibi":
            raise AttributeError(f"model has no memory (context={self.context_type!r})")
        return self.decode_head.memory

    def forward(self, images: torch.Tensor, targets: Optional[torch.Tensor] = None,
                progress: float = 0.0) -> Dict[str, torch.Tensor]:
        size = images.shape[-2:]
        feats = self.backbone(images)
        train_loss = self.training and targets is not None
        aux_logits = self.aux_head(feats[2]) if (train_loss or self.framework == "ocrnet") else None
        logits, r, w_logits = self.decode_head(feats[3], aux_logits)
        out: Dict[str, torch.Tensor] = {
            "logits": F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        }
        if not train_loss:
            return out

        targets = targets.long()
        loss_o = segmentation_ce(out["logits"], targets, self.ignore_index)  # L_O, Eq 18
        loss_aux = segmentation_ce(aux_logits, targets, self.ignore_index)
        total = loss_o + self.aux_weight * loss_aux
        out["loss_o"], out["loss_aux"] = loss_o.detach(), loss_aux.detach()
        if self.context_type == "mcibi":
            m = self.cfg.mcibi
            momentum = poly_momentum(progress, m.momentum, m.momentum_power)  # Eq 7
            self.decode_head.memory.update(r, targets, momentum)  # Eq 6, 8-10 (no grad, in place, DDP-exact)
            loss_w = segmentation_ce(w_logits, targets, self.ignore_index)  # L_W, Eq 16
            total = total + m.alpha * loss_w
            out["loss_w"] = loss_w.detach()
            if m.rcl:
                loss_m = self.decode_head.memory_loss()  # L_M, Eq 15/17
                total = total + m.beta * loss_m
                out["loss_m"] = loss_m.detach()
            else:
                out["loss_m"] = torch.zeros((), device=logits.device)
            out["memory_momentum"] = torch.tensor(momentum, device=logits.device)
        out["loss"] = total  # Eq 19 + aux
        return out

    def receptive_field(self) -> int:
        rf, jump = conv_path_rf(self.backbone.rf_path())
        best = max(conv_path_rf(b, rf, jump)[0] for b in self.decode_head.rf_branches())
        return conv_path_rf(self.decode_head.rf_post(), best, jump)[0]


def build_segmentor(cfg: Union[ModelConfig, dict, None], num_classes: int, ignore_index: int = 255) -> Segmentor:
    """Build the segmentor described by ``cfg`` (a :class:`ModelConfig` or a plain dict)."""
    if cfg is None:
        cfg = ModelConfig()
    elif not isinstance(cfg, ModelConfig):
        cfg = ModelConfig.model_validate(cfg)
    model = Segmentor(cfg, num_classes, ignore_index)
    logger.info("built %s+%s on %s: %.2fM params", cfg.framework, cfg.context, cfg.backbone.name,
                sum(p.numel() for p in model.parameters()) / 1e6)
    return model


def receptive_field(cfg_or_model: Union[ModelConfig, dict, nn.Module, None] = None) -> int:
    """Theoretical receptive field (input pixels) of the local conv path: backbone main path
    (stem, pools, every block's convs; shortcuts are shorter) followed by the longest *local*
    branch of the decode head and its classifier, folded with r <- r + d(k-1)*j, j <- j*s.

    Global branches (image pooling, PPM bins, OCR/DCA/ACF attention, the memory) are excluded:
    they see the whole image, so this number is the reach of purely local evidence. The final
    bilinear upsampling is not counted. DDP-wrapped models are unwrapped via ``.module``.
    """
    if isinstance(cfg_or_model, nn.Module):
        model = getattr(cfg_or_model, "module", cfg_or_model)
    else:
        model = build_segmentor(cfg_or_model, num_classes=2)
    return int(model.receptive_field())
