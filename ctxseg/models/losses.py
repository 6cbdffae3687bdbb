"""Losses (MCIBI §3.5, Eq 16-19) and the auxiliary FCN loss.

L = L_O + aux_weight * L_aux + alpha * L_W + beta * L_M   (Eq 19 plus the stage-3 auxiliary loss)

* L_O (Eq 18): cross entropy of the final prediction O.
* L_W (Eq 16): cross entropy of H1's class scores (the logits of W, Eq 11).
* L_M (Eq 17): cross entropy of H2 applied to the memory rows M_k with target k (RCL, Eq 15).

Pixel logits are upsampled bilinearly (align_corners=False) to the label size before the loss;
label ``ignore_index`` (255) is ignored.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["segmentation_ce", "memory_ce"]


def segmentation_ce(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255,
                    weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean pixel cross entropy (Eq 16 / 18) of ``logits`` [B,K,h,w] upsampled to ``target`` [B,H,W].

    Returns an exact zero that still depends on ``logits`` when every pixel is ignored, so the
    autograd graph (and DDP's gradient hooks) see the same parameters on every rank.
    """
    if logits.shape[-2:] != target.shape[-2:]:
        logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
    target = target.long()
    if not bool((target != ignore_index).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index)


def memory_ce(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Eq 17: cross entropy of H2(M_k) [n, K] against the class ids ``classes`` [n] of those rows."""
    if classes.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits, classes.long())
