"""ctxseg model zoo: dilated ResNets, FCN / PSPNet / DeepLabV3 / OCRNet x context heads {none, MCIBI, CFNet-ACF}.

Public API (contract)::

    from ctxseg.models import ModelConfig, build_segmentor, receptive_field
    model = build_segmentor(ModelConfig(framework="fcn", context="mcibi"), num_classes=19)
    out = model(images, targets, progress)   # {"logits", "loss", "loss_o", "loss_aux", ...}
    model.replicated_buffers()               # {"memory": M} for MCIBI, {} otherwise
    model.class_prototypes()                 # M [K, C] for MCIBI, None otherwise

A new context head is one module: subclass :class:`ContextHead` and decorate it with
``@register_head("name")`` (see :mod:`ctxseg.models.heads.base`).

``receptive_field(ModelConfig())`` is 63 px for the default resnet_tiny FCN (see its docstring).
"""

from .config import ACFConfig, BackboneConfig, MCIBIConfig, ModelConfig
from .heads import ContextHead, LossTerm, get_head, head_names, register_head
from .memory import FeatureMemory, poly_momentum
from .segmentor import Segmentor, build_segmentor, receptive_field

__all__ = [
    "ModelConfig",
    "BackboneConfig",
    "MCIBIConfig",
    "ACFConfig",
    "Segmentor",
    "ContextHead",
    "LossTerm",
    "register_head",
    "get_head",
    "head_names",
    "FeatureMemory",
    "poly_momentum",
    "build_segmentor",
    "receptive_field",
]
