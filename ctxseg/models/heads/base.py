"""The context-head contract and its registry.

The segmentor (:mod:`ctxseg.models.segmentor`) is one fixed composition (MCIBI Fig 2)::

    backbone -> aux head (stage 3) -> A_wi (optional, ctxseg.models.context) -> context head -> logits

and never asks which context head it holds. A context head is everything after the backbone and the
within-image module: its own input features (e.g. R, MCIBI Eq 3), its context aggregation, the fusion
and the final classifier. It owns its losses and its state (MCIBI's memory with its Eq 7 schedule).

A head implements:

``features(x, c_wi=None, *, count=False) -> (F, extras)``
    ``x`` is the stage-4 feature map, ``c_wi`` the within-image context A_wi(x) or None. ``F`` is the
    input of the final classifier (the feature space of ``ctxseg.inference.ClassifierInput`` and of
    :meth:`class_prototypes`); ``extras`` holds the intermediates its losses / state updates need
    (tensors, may require grad). ``count=True`` computes the model's mathematics only, skipping work
    an implementation adds for speed (e.g. zero-padding head dims for fused attention kernels): the
    FLOP counter (``ctxseg.models.complexity``) uses it. The result is the same either way.
``forward(x, c_wi=None) -> dict``
    ``{"logits": classifier(F) at feature resolution, **extras}`` (provided by the base class).
``on_step(outputs, targets, progress) -> dict[str, Tensor]``
    State updates of one training step (no gradient), called after the forward and *before*
    :meth:`losses`; returns 0-dim scalars to log (e.g. ``memory_momentum``).
``losses(outputs, targets, progress) -> dict[str, LossTerm]``
    The head's own loss terms (the segmentor adds L_O and the auxiliary loss): the objective gets
    ``weight * value`` of each, and ``value`` (unweighted) is logged under its name.
``replicated_buffers()`` / ``class_prototypes()``
    State that must be identical on every DDP rank (``{}`` by default) and dataset-level class
    representations ``[K, C]`` in the space of F (None by default).
``rf_branches()`` / ``rf_post()``
    Local conv chains from x to the fusion, and the chain after it, for the receptive field.
``prepare_measurement()``
    Fill state a training run would have filled (e.g. memory rows), for complexity / latency runs.

Class-level hooks: ``channels(cfg)`` (width of C_wi and of the head, so A_wi can be built to
match), ``check_config(cfg)`` (cross-field checks, run by ``ModelConfig`` validation) and
``prototypes_in_state(state)`` (class prototypes from a bare state dict).

A new head is one file::

    @register_head("mine", config=MineConfig)      # MineConfig: a pydantic model of its options
    class MineHead(ContextHead):
        ...

and is selected with ``model.context: mine``; its options go under ``model.head_options.mine``
(the built-in heads keep their own blocks ``model.mcibi`` / ``model.acf``).
"""

from __future__ import annotations

import difflib
import logging
from typing import TYPE_CHECKING, Any, ClassVar, Dict, List, NamedTuple, Optional, Tuple, Type

import torch
import torch.nn as nn
from pydantic import BaseModel

if TYPE_CHECKING:  # pragma: no cover
    from ..config import ModelConfig

logger = logging.getLogger(__name__)

__all__ = ["ContextHead", "LossTerm", "register_head", "get_head", "head_names", "HEADS"]

# names the segmentor itself puts in the output dict; a head may not return terms under them
RESERVED = ("logits", "loss", "loss_o", "loss_aux")


class LossTerm(NamedTuple):
    """One named loss term: the objective gets ``weight * value``; ``value`` is logged unweighted."""

    value: torch.Tensor
    weight: float


class ContextHead(nn.Module):
    """Base class of context heads (see the module docstring for the contract).

    Subclasses set ``self.classifier`` (the final 1x1 classifier, whose input is F) and implement
    :meth:`features`; everything else has a neutral default.
    """

    name: ClassVar[str] = ""
    config: ClassVar[Optional[Type[BaseModel]]] = None
    classifier: nn.Module

    def __init__(self, cfg: "ModelConfig", in_channels: int, num_classes: int, *, ignore_index: int = 255,
                 with_wi: bool = False) -> None:
        super().__init__()
        self.num_classes, self.ignore_index, self.with_wi = num_classes, ignore_index, with_wi
        self.width = type(self).channels(cfg)

    # ------------------------------------------------------------------ class-level hooks
    @classmethod
    def options(cls, cfg: "ModelConfig") -> Optional[BaseModel]:
        """This head's options in ``cfg`` (its own block, or ``head_options[name]``), validated."""
        return cfg.head_config(cls.name)

    @classmethod
    def channels(cls, cfg: "ModelConfig") -> int:
        """Width of the head's features and of C_wi (A_wi is built to match)."""
        return cfg.channels

    @classmethod
    def check_config(cls, cfg: "ModelConfig") -> None:
        """Cross-field checks of ``cfg`` for this head; raise ValueError naming the keys."""

    @classmethod
    def prototypes_in_state(cls, state: Dict[str, Any], prefix: str = "decode_head.") -> Optional[torch.Tensor]:
        """Class prototypes from a segmentor state dict (``prefix`` = the head's key prefix), or None."""
        return None

    # ------------------------------------------------------------------ forward
    def features(self, x: torch.Tensor, c_wi: Optional[torch.Tensor] = None, *,
                 count: bool = False) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, c_wi: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        feats, extras = self.features(x, c_wi)
        return {"logits": self.classifier(feats), **extras}

    # ------------------------------------------------------------------ training
    def on_step(self, outputs: Dict[str, torch.Tensor], targets: torch.Tensor,
                progress: float) -> Dict[str, torch.Tensor]:
        return {}

    def losses(self, outputs: Dict[str, torch.Tensor], targets: torch.Tensor,
               progress: float) -> Dict[str, LossTerm]:
        return {}

    # ------------------------------------------------------------------ state
    def replicated_buffers(self) -> Dict[str, torch.Tensor]:
        return {}

    def class_prototypes(self) -> Optional[torch.Tensor]:
        return None

    def prepare_measurement(self) -> None:
        """Nothing to fill by default."""

    def feature_parameters(self) -> List[nn.Parameter]:
        """The parameters of the path to F, i.e. all but the final classifier's (complexity counts)."""
        skip = {id(p) for p in self.classifier.parameters()}
        return [p for p in self.parameters() if id(p) not in skip]

    # ------------------------------------------------------------------ receptive field
    def rf_branches(self) -> List[List[nn.Module]]:
        return []

    def rf_post(self) -> List[nn.Module]:
        from ..layers import modules_of

        return modules_of(self.classifier)


HEADS: Dict[str, Type[ContextHead]] = {}


def register_head(name: str, *, config: Optional[Type[BaseModel]] = None):
    """Class decorator: register a :class:`ContextHead` under ``name`` (the value of ``model.context``).

    ``config`` is the pydantic model of the head's options. A built-in head whose options have a block
    of their own in :class:`ctxseg.models.ModelConfig` (``mcibi``, ``acf``) gets that block; any other
    head reads ``model.head_options.<name>``, validated by ``config``. Registering a different class
    under a taken name is an error (re-registering the same class, e.g. on a module reload, is not).
    """
    from ..config import ModelConfig

    if not name or not name.replace("_", "").isalnum() or name != name.lower():
        raise ValueError(f"context head name must be lower-case letters, digits and '_', got {name!r}")

    def decorate(cls: Type[ContextHead]) -> Type[ContextHead]:
        if not (isinstance(cls, type) and issubclass(cls, ContextHead)):
            raise TypeError(f"@register_head({name!r}) needs a ContextHead subclass, got {cls!r}")
        field = ModelConfig.model_fields.get(name)
        if field is not None and (config is None or field.annotation is not config):
            raise ValueError(f"context head name {name!r} clashes with the model config key model.{name}")
        old = HEADS.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"context head {name!r} is already registered by {old.__module__}.{old.__qualname__}")
        cls.name, cls.config = name, config
        HEADS[name] = cls
        return cls

    return decorate


def head_names() -> List[str]:
    return list(HEADS)


def get_head(name: str) -> Type[ContextHead]:
    """The head class registered under ``name``; ValueError naming the registered ones otherwise."""
    try:
        return HEADS[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), list(HEADS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"model.context={name!r} is not a registered context head (registered: "
                         f"{', '.join(HEADS)}).{hint}") from None
