"""ctxseg model zoo: dilated ResNets, FCN / PSPNet / DeepLabV3 / OCRNet x {none, MCIBI, CFNet-ACF}.

Public API (contract)::

    from ctxseg.models import ModelConfig, build_segmentor, receptive_field
    model = build_segmentor(ModelConfig(framework="fcn", context="mcibi"), num_classes=19)
    out = model(images, targets, progress)   # {"logits", "loss", "loss_o", "loss_aux", ...}

``receptive_field(ModelConfig())`` is 63 px for the default resnet_tiny FCN (see its docstring).
"""

from .config import ACFConfig, BackboneConfig, MCIBIConfig, ModelConfig
from .memory import FeatureMemory, poly_momentum
from .segmentor import Segmentor, build_segmentor, receptive_field

__all__ = [
    "ModelConfig",
    "BackboneConfig",
    "MCIBIConfig",
    "ACFConfig",
    "Segmentor",
    "FeatureMemory",
    "poly_momentum",
    "build_segmentor",
    "receptive_field",
]
