"""MCIBI context head (Jin et al., ICCV 2021, §3, Fig 2): memory, DCA, fusion, H2 and RCL.

Forward (Eq 3-4, 11-14):

* R = 3x3 ConvBNReLU of stage 4 (the pixel representations);
* W-logits = H1(R) (Eq 11; H1 = 1x1 ConvBNReLU -> Dropout2d -> 1x1 classifier);
* C_bi = DCA(R, W, M) (Eq 11-14) with the feature memory M;
* F = Fusion(R, C_bi[, C_wi]) (Eq 4), O = H2(F) (H2 = 1x1 ConvBNReLU -> Dropout2d -> 1x1 classifier).

Training step (:meth:`MCIBIHead.on_step`, then :meth:`MCIBIHead.losses`):

* memory update Eq 6, 8-10 from R and the labels, momentum m_t of Eq 7 from the memory's own
  schedule (``mcibi.momentum`` m0, ``mcibi.momentum_power`` p; ``progress`` = t/T), logged as
  ``memory_momentum``;
* L_W = CE(H1(R), labels) (Eq 16, weight ``alpha``), L_M = CE(H2(M_k), k) (RCL, Eq 15/17, weight
  ``beta``) over the initialised rows, after this step's update. Eq 19: L = L_O + alpha L_W + beta L_M
  (L_O and the auxiliary loss are the segmentor's).

RCL and batch norm (Eq 15/17): H2 is applied to the memory rows as a [K, C, 1, 1] batch. Running it
through the BN module in train mode would normalise the K rows with their own statistics and fold
memory statistics into the running mean/var used at test time. We instead run H2 on the memory
through a functional path whose BN uses the *running* statistics (``F.batch_norm(training=False)``):
the running stats are untouched, the conv weights and BN affine parameters still receive the L_M
gradient, and a memory row is normalised exactly as a pixel is at inference time.

Differences from the authors' code (sssegmentation ``memorynet``), on purpose:

* RCL runs through H2 with BN in running statistics mode (above), on the initialised rows only,
  from the first step (no warm-up before L_M is switched on).
* The memory is initialised lazily, from the first batch that holds a class: a row is set the first
  time its class appears in a training batch (``mcibi.init``: one random pixel, the class mean, or
  online k-means; see :mod:`ctxseg.models.memory`), not from an offline pass over the training set.
* With a within-image module (PSPNet / DeepLabV3 / OCRNet + MCIBI) C_wi enters one concat fusion
  F(R, C_bi, C_wi) of Eq 4; the official code adds a further self-attention block between the
  within-image and the dataset-level context instead.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from ..config import MCIBIConfig
from ..dca import DCA, Fusion
from ..layers import ConvBNReLU, modules_of
from ..losses import memory_ce, segmentation_ce
from ..memory import FeatureMemory
from .base import ContextHead, LossTerm, register_head

__all__ = ["MCIBIHead", "ClassifierH2"]


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


@register_head("mcibi", config=MCIBIConfig)
class MCIBIHead(ContextHead):
    """R -> H1 -> DCA with the memory -> fusion -> H2; memory update (Eq 6-10) and L_W, L_M."""

    @classmethod
    def channels(cls, cfg) -> int:
        return cfg.mcibi.channels if cfg.mcibi.channels is not None else cfg.channels

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.mcibi.channels is None and cfg.channels % 2:
            raise ValueError(
                f"channels={cfg.channels} must be even with context=mcibi (DCA projects to C/2, Eq 13); "
                "or set mcibi.channels"
            )

    @classmethod
    def prototypes_in_state(cls, state: Dict[str, Any], prefix: str = "decode_head.") -> Optional[torch.Tensor]:
        value = state.get(prefix + "memory.memory")
        return value.detach().float().cpu() if torch.is_tensor(value) and value.ndim == 2 else None

    def __init__(self, cfg, in_channels: int, num_classes: int, *, ignore_index: int = 255,
                 with_wi: bool = False) -> None:
        super().__init__(cfg, in_channels, num_classes, ignore_index=ignore_index, with_wi=with_wi)
        m: MCIBIConfig = cfg.mcibi
        width = self.width
        if width % 2:
            raise ValueError(f"MCIBI channels (model.channels / mcibi.channels) must be even, got {width}")
        self.alpha, self.beta, self.rcl = m.alpha, m.beta, m.rcl
        self.bottleneck = ConvBNReLU(in_channels, width, 3)  # R
        self.decoder_stage1 = nn.Sequential(  # H1 (Eq 11)
            ConvBNReLU(width, width, 1), nn.Dropout2d(m.dropout), nn.Conv2d(width, num_classes, 1)
        )
        self.memory = FeatureMemory(num_classes, width, init=m.init, update=m.update, ignore_index=ignore_index,
                                    chunk_pixels=m.update_chunk_pixels, momentum=m.momentum,
                                    momentum_power=m.momentum_power)
        self.dca = DCA(width)
        self.fusion = Fusion(m.fusion, 3 if with_wi else 2, width, cfg.fusion_kernel)
        self.classifier = ClassifierH2(width, num_classes, cfg.dropout)  # H2

    def features(self, x: torch.Tensor, c_wi: Optional[torch.Tensor] = None, *,
                 count: bool = False) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        r = self.bottleneck(x)  # R
        w_logits = self.decoder_stage1(r)  # H1(R), Eq 11
        # the memory is cloned: the in-place Eq 6 update later in this step must not touch the
        # tensor saved for backward
        c_bi = self.dca(r, w_logits, self.memory.memory.clone())  # Eq 11-14
        parts = [r, c_bi] + ([c_wi] if c_wi is not None else [])
        return self.fusion(parts), {"r": r, "w_logits": w_logits}  # F(R, C_bi[, C_wi]), Eq 4

    def on_step(self, outputs, targets, progress) -> Dict[str, torch.Tensor]:
        momentum = self.memory.step(outputs["r"], targets, progress)  # Eq 6-10 with m_t of Eq 7
        return {"memory_momentum": torch.tensor(momentum, device=outputs["r"].device)}

    def losses(self, outputs, targets, progress) -> Dict[str, LossTerm]:
        loss_w = segmentation_ce(outputs["w_logits"], targets, self.ignore_index)  # L_W, Eq 16
        if self.rcl:
            loss_m = LossTerm(self.memory_loss(), self.beta)  # L_M, Eq 15/17
        else:
            loss_m = LossTerm(torch.zeros((), device=loss_w.device), 0.0)
        return {"loss_w": LossTerm(loss_w, self.alpha), "loss_m": loss_m}

    def memory_loss(self) -> torch.Tensor:
        """RCL (Eq 15/17): H2 classifies the initialised memory rows; BN in running-stats mode."""
        mem = self.memory.memory.clone()
        rows = self.memory.initialized.nonzero().squeeze(1)
        preds = self.classifier.forward_frozen_bn(mem[:, :, None, None]).flatten(1)  # [K, K]
        return memory_ce(preds.index_select(0, rows), rows)

    def replicated_buffers(self) -> Dict[str, torch.Tensor]:
        return {"memory": self.memory.memory}

    def class_prototypes(self) -> Optional[torch.Tensor]:
        return self.memory.memory.detach().float().cpu()

    def prepare_measurement(self) -> None:
        with torch.no_grad():
            self.memory.memory.normal_()
            self.memory.initialized.fill_(True)

    def rf_branches(self) -> List[List[nn.Module]]:
        return [modules_of(self.bottleneck, self.dca.query, self.dca.out)]

    def rf_post(self) -> List[nn.Module]:
        return self.fusion.rf_path() + modules_of(self.classifier)
