"""Segmentor composition (MCIBI Fig 2): backbone -> aux head -> A_wi -> context head -> logits.

* backbone: dilated ResNet, four stage outputs (:mod:`ctxseg.models.backbones`);
* aux head: FCN head on stage 3 (auxiliary loss; its logits are also the soft object regions of an
  A_wi module that declares ``needs_soft_regions``);
* A_wi: the framework's within-image context module (:mod:`ctxseg.models.context`), or none;
* context head: the registered head named by ``model.context`` (:mod:`ctxseg.models.heads`). It maps
  (stage 4, C_wi) to logits through its classifier, owns its losses and its state.

The segmentor never asks which head it holds: in a training forward it adds L_O (Eq 18, the CE of the
upsampled logits) and the weighted auxiliary CE, calls the head's ``on_step`` (state updates, e.g.
the memory, Eq 6-10) and then its ``losses`` (e.g. Eq 16-17), and merges them (Eq 19 + aux).
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbones import build_backbone
from .config import ModelConfig
from .context import FCNHead, WithinImageContext, build_context
from .heads import ContextHead, LossTerm, get_head
from .heads.base import RESERVED
from .layers import conv_path_rf
from .losses import segmentation_ce
from .memory import FeatureMemory

logger = logging.getLogger(__name__)

__all__ = ["Segmentor", "build_decoder", "build_segmentor", "receptive_field"]


def build_decoder(cfg: ModelConfig, in_channels: int, num_classes: int,
                  ignore_index: int = 255) -> Tuple[Optional[WithinImageContext], ContextHead]:
    """A_wi (or None) and the context head of ``cfg``, A_wi built at the head's width."""
    head_cls = get_head(cfg.context)
    width = head_cls.channels(cfg)
    context_module = build_context(cfg.framework, in_channels, width, bins=cfg.ppm_bins, rates=cfg.aspp_rates,
                                   key_channels=cfg.ocr_key_channels)
    head = head_cls(cfg, in_channels, num_classes, ignore_index=ignore_index, with_wi=context_module is not None)
    return context_module, head


def within_image(context_module: Optional[WithinImageContext], x: torch.Tensor,
                 soft_regions: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """C_wi = A_wi(x[, soft object regions]) (MCIBI Eq 3), None without a within-image module."""
    if context_module is None:
        return None
    return context_module(x, soft_regions if context_module.needs_soft_regions else None)


class Segmentor(nn.Module):
    """forward(images, targets=None, progress=0.0) -> {"logits", ["loss", "loss_o", "loss_aux", ...]}

    The output contract (``/work/notes/CONTRACTS.md``): always ``"logits"`` [B, K, H, W] at input size;
    in a training forward with targets also ``"loss"`` (the objective, with grad) and 0-dim detached
    tensors to log: ``loss_o``, ``loss_aux`` and the head's own terms (unweighted), and the head's
    ``on_step`` scalars. ``model.decode_head`` is the context head; ``model.context_module`` is A_wi.
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
        # registration order (context_module, then the head's modules) keeps the parameter order of
        # the earlier layout, where A_wi lived inside decode_head: optimiser states still match
        self.context_module, self.decode_head = build_decoder(cfg, c4, num_classes, ignore_index)
        self._register_load_state_dict_pre_hook(_legacy_keys)

    @property
    def memory(self) -> FeatureMemory:
        """The head's feature memory, for heads that have one (MCIBI); AttributeError otherwise."""
        mem = getattr(self.decode_head, "memory", None)
        if not isinstance(mem, FeatureMemory):
            raise AttributeError(f"model has no memory (context={self.context_type!r})")
        return mem

    def replicated_buffers(self) -> Dict[str, torch.Tensor]:
        """State that must be identical on every DDP rank (e.g. {"memory": M}); {} if none."""
        return self.decode_head.replicated_buffers()

    def class_prototypes(self) -> Optional[torch.Tensor]:
        """Dataset-level class representations [K, C] in the classifier-input space, or None."""
        return self.decode_head.class_prototypes()

    def forward(self, images: torch.Tensor, targets: Optional[torch.Tensor] = None,
                progress: float = 0.0) -> Dict[str, torch.Tensor]:
        size = images.shape[-2:]
        feats = self.backbone(images)
        train_loss = self.training and targets is not None
        needs_regions = self.context_module is not None and self.context_module.needs_soft_regions
        aux_logits = self.aux_head(feats[2]) if (train_loss or needs_regions) else None
        c_wi = within_image(self.context_module, feats[3], aux_logits)
        head_out = self.decode_head(feats[3], c_wi)
        out: Dict[str, torch.Tensor] = {
            "logits": F.interpolate(head_out["logits"], size=size, mode="bilinear", align_corners=False)
        }
        if not train_loss:
            return out

        targets = targets.long()
        terms: Dict[str, LossTerm] = {
            "loss_o": LossTerm(segmentation_ce(out["logits"], targets, self.ignore_index), 1.0),  # L_O, Eq 18
            "loss_aux": LossTerm(segmentation_ce(aux_logits, targets, self.ignore_index), self.aux_weight),
        }
        logged = self.decode_head.on_step(head_out, targets, progress)  # state first (no grad)
        head_terms = self.decode_head.losses(head_out, targets, progress)
        for name in list(head_terms) + list(logged):
            if name in RESERVED or name in terms or (name in head_terms and name in logged):
                raise ValueError(f"context head {self.context_type!r} returned the reserved or duplicate "
                                 f"output name {name!r}")
        terms.update(head_terms)
        total = None
        for term in terms.values():
            part = term.value if term.weight == 1.0 else term.weight * term.value
            total = part if total is None else total + part
        for name, term in terms.items():
            out[name] = term.value.detach()
        for name, value in logged.items():
            out[name] = value.detach()
        out["loss"] = total  # Eq 19 + aux
        return out

    def receptive_field(self) -> int:
        rf, jump = conv_path_rf(self.backbone.rf_path())
        branches = list(self.decode_head.rf_branches())
        if self.context_module is not None:
            branches += self.context_module.rf_branches()
        best = max(conv_path_rf(b, rf, jump)[0] for b in branches)
        return conv_path_rf(self.decode_head.rf_post(), best, jump)[0]


def _legacy_keys(state_dict, prefix, *args) -> None:
    """Checkpoints of the earlier layout kept A_wi under ``decode_head.context_module.``."""
    old = prefix + "decode_head.context_module."
    for key in [k for k in state_dict if k.startswith(old)]:
        state_dict[prefix + "context_module." + key[len(old):]] = state_dict.pop(key)


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
    branch of A_wi / the context head and the head's post-fusion chain, folded with
    r <- r + d(k-1)*j, j <- j*s.

    Global branches (image pooling, PPM bins, object / dataset-level / co-occurrent attention, the
    memory) are excluded: they see the whole image, so this number is the reach of purely local
    evidence. The final bilinear upsampling is not counted. DDP-wrapped models are unwrapped via
    ``.module``.
    """
    if isinstance(cfg_or_model, nn.Module):
        model = getattr(cfg_or_model, "module", cfg_or_model)
    else:
        model = build_segmentor(cfg_or_model, num_classes=2)
    return int(model.receptive_field())
