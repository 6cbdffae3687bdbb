"""Typed model configuration (pydantic v2).

Every class forbids unknown keys (a typo is an error naming the key) and constrains numeric ranges,
so ``params.yaml`` is validated once at stage start. All fields have defaults suited to the small
CPU default (``resnet_tiny`` backbone), so ``ModelConfig()`` builds a working FCN.

Naming follows the project convention: CFNet's K is ``acf.mixtures``, H is ``acf.heads``; MCIBI's
m0 is ``mcibi.momentum``, p is ``mcibi.momentum_power``, alpha/beta weight L_W and L_M (Eq 19).
"""

from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

__all__ = ["BackboneConfig", "MCIBIConfig", "ACFConfig", "ModelConfig"]


class BackboneConfig(BaseModel):
    """Dilated ResNet backbone (output stride 8 by default).

    ``resnet18/50/101``: the standard ResNets with stages 3 and 4 dilated 2 and 4 (OS 8), optional
    deep 3x3 stem (ResNet-v1c). ``resnet_tiny``: the same family (bottleneck blocks, 4 stages,
    OS 8) but one block per stage, base width 8 and no stage dilation, so it is fast on CPU and its
    theoretical receptive field stays small (see :func:`ctxseg.models.receptive_field`).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: Literal["resnet_tiny", "resnet18", "resnet50", "resnet101"] = "resnet_tiny"
    deep_stem: bool = False
    pretrained: Optional[str] = Field(
        default=None,
        description="local ImageNet checkpoint (torchvision, OpenMMLab v1c or timm deep-stem key layout), read "
        "with torch.load(weights_only=True); relative to the folder of params.yaml. Every backbone tensor must "
        "load or training refuses to start. model.pt does not need it",
    )
    output_stride: Literal[8, 16, 32] = 8
    width: Optional[int] = Field(
        default=None, ge=4, le=256, description="base planes of stage 1; None = family default"
    )
    depths: Optional[List[int]] = Field(
        default=None, min_length=4, max_length=4, description="blocks per stage; None = family default"
    )
    dilations: Optional[List[int]] = Field(
        default=None,
        min_length=2,
        max_length=2,
        description="extra dilation multipliers of stages 3 and 4 at OS 8; None = family default "
        "((2, 4) for resnet18/50/101, (1, 1) for resnet_tiny)",
    )

    # where this block sits in params.yaml ("models.<name>.backbone"), for error messages; set by
    # ctxseg.config.Params. Not a field: not dumped, not compared (see __eq__).
    _origin: str = PrivateAttr(default="model.backbone")

    @property
    def origin(self) -> str:
        return self._origin

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BackboneConfig):
            return NotImplemented
        return self.model_dump() == other.model_dump()

    @model_validator(mode="after")
    def _check(self) -> "BackboneConfig":
        if self.depths is not None and any(d < 1 for d in self.depths):
            raise ValueError(f"backbone.depths must be >= 1 per stage, got {self.depths}")
        if self.dilations is not None and any(d < 1 for d in self.dilations):
            raise ValueError(f"backbone.dilations must be >= 1, got {self.dilations}")
        return self


class MCIBIConfig(BaseModel):
    """MCIBI (Jin et al., ICCV 2021) knobs: memory (Eq 6-10), DCA (Eq 11-14), fusion (Eq 4), loss (Eq 16-19)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    momentum: float = Field(default=0.9, ge=0.0, le=1.0, description="m0 of Eq 7")
    momentum_power: float = Field(default=0.9, ge=0.0, description="p of Eq 7")
    alpha: float = Field(default=0.4, ge=0.0, description="weight of L_W (Eq 16, 19)")
    beta: float = Field(default=1.0, ge=0.0, description="weight of L_M (Eq 17, 19)")
    fusion: Literal["add", "weighted_add", "concat"] = "concat"
    init: Literal["random", "mean", "clustering"] = "random"
    update: Literal["cosine", "mean"] = "cosine"
    rcl: bool = True
    channels: Optional[int] = Field(
        default=None, ge=2, description="C: width of R, memory rows and F; None = model.channels"
    )
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0, description="dropout in H1")
    update_chunk_pixels: int = Field(
        default=1 << 18, ge=1024,
        description="label-size pixels per chunk of the memory update (Eq 8-10); peak extra memory "
        "~ 300 bytes x chunk, independent of C",
    )

    @model_validator(mode="after")
    def _check(self) -> "MCIBIConfig":
        if self.channels is not None and self.channels % 2:
            raise ValueError(
                f"mcibi.channels={self.channels} must be even (DCA projects to C/2, Eq 13)"
            )
        return self


class ACFConfig(BaseModel):
    """CFNet (Zhang et al., CVPR 2019) aggregated co-occurrent feature module and its head.

    Widths follow the head width ``model.channels`` (C), as in the authors' code: per head, C/H value
    channels and (C/H) K query/key channels, so ``model.channels`` must be divisible by ``acf.heads``.
    The paper's best setting is K = 2 mixtures, H = 4 heads (Table 3) with the atrous-rate-4 Phi
    (§4.2); ``presets/`` use it. The CPU default keeps H = 2 and the 1x1 Phi: at the default 64
    channels H = 4 leaves 16 channels per softmax, and a 3x3 atrous Phi costs 9x the 1x1 on a backbone
    whose receptive field is small.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    mixtures: int = Field(default=2, ge=1, le=64, description="K: softmaxes in the mixture (the paper's best: 2)")
    heads: int = Field(default=2, ge=1, le=64, description="H: attention heads (the paper's best: 4); divides model.channels")
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0, description="dropout on co-occurrent probs")
    global_pool: bool = Field(default=True, description="the global-pooling branch of CFNet Fig 3")
    phi: Literal["conv1x1", "atrous"] = Field(
        default="conv1x1",
        description="Phi_t = Phi_c: the authors' 'conv' transform (1x1 conv, CPU default) or their 'dffn', "
        "the paper's atrous Phi (3x3 dilation 4 -> BN -> ReLU -> 1x1, CFNet §4.2)",
    )
    output: Literal["authors", "z_only"] = Field(
        default="authors",
        description="'authors' (CFNet code's ACFModule): BN(Conv1x1(Z)) + X, concatenated with GP; "
        "'z_only' (the earlier reading of Fig 3): Z alone, concatenated with GP",
    )
    scale: Literal["sqrt", "none"] = Field(
        default="sqrt", description="divide dot products by sqrt(d_k) of the head ('sqrt') or not ('none')"
    )


class ModelConfig(BaseModel):
    """Whole segmentor: framework (A_wi) x context head x backbone.

    ``context`` names a registered context head (:mod:`ctxseg.models.heads`: ``none``, ``mcibi``,
    ``acf``, or one an extension registers). The built-in heads read their options from their own
    blocks (``mcibi``, ``acf``); any other head from ``head_options.<name>``, validated by the
    pydantic model it registered. Cross-field checks of a head run here too
    (``ContextHead.check_config``), so a bad combination fails when params are loaded.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    framework: Literal["fcn", "pspnet", "deeplabv3", "ocrnet"] = "fcn"
    context: str = Field(
        default="none",
        description="registered context head: `none` (no context), `mcibi` (MCIBI), `acf` (CFNet), or a "
        "head registered with `ctxseg.models.heads.register_head`",
    )
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    channels: int = Field(default=64, ge=2, description="decode head width")
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0, description="dropout before classifiers")
    aux_weight: float = Field(default=0.4, ge=0.0, description="weight of the stage-3 FCN aux loss")
    aux_channels: int = Field(default=32, ge=1, description="aux head width")
    ppm_bins: List[int] = Field(default_factory=lambda: [1, 2, 3, 6], description="PSPNet bins")
    aspp_rates: List[int] = Field(default_factory=lambda: [12, 24, 36], description="ASPP atrous rates at OS 8")
    ocr_key_channels: int = Field(default=32, ge=1)
    fusion_kernel: Literal[1, 3] = Field(
        default=3,
        description="kernel of the concat-fusion conv (MCIBI Eq 4 concat, CFNet concat); 1 keeps the "
        "local receptive field of +MCIBI/+ACF equal to the base framework's",
    )
    mcibi: MCIBIConfig = Field(default_factory=MCIBIConfig)
    acf: ACFConfig = Field(default_factory=ACFConfig)
    head_options: Dict[str, Dict[str, Any]] = Field(
        default_factory=dict,
        description="options of registered context heads that have no block of their own, by head name "
        "(validated by the head's own config model)",
    )

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        from .heads import get_head  # the registry imports this module

        if not self.ppm_bins or any(b < 1 for b in self.ppm_bins):
            raise ValueError(f"ppm_bins must be positive, got {self.ppm_bins}")
        if not self.aspp_rates or any(r < 1 for r in self.aspp_rates):
            raise ValueError(f"aspp_rates must be positive, got {self.aspp_rates}")
        head = get_head(self.context)
        for name, raw in self.head_options.items():
            cls = get_head(name)
            if cls.config is None or name in type(self).model_fields:
                where = f"model.{name}" if name in type(self).model_fields else "nothing (it has no options)"
                raise ValueError(f"head_options.{name}: the {name!r} head takes its options from {where}")
            # stored back validated and as plain types, so model_dump() stays YAML-safe (dict mutated
            # in place: assigning the field would re-run this validator)
            self.head_options[name] = _validate_options(cls.config, raw, f"head_options.{name}")
        head.check_config(self)
        return self

    def head_config(self, name: str) -> Optional[BaseModel]:
        """Options of the context head ``name``: its own block, or ``head_options[name]`` validated by
        the head's config model (its defaults when absent); None for a head without options."""
        block = getattr(self, name, None) if name in type(self).model_fields else None
        if isinstance(block, BaseModel):
            return block
        from .heads import get_head

        cls = get_head(name)
        if cls.config is None:
            return None
        return cls.config.model_validate(self.head_options.get(name, {}))


def _validate_options(model: type, raw: Any, where: str) -> Dict[str, Any]:
    try:
        return model.model_validate(raw).model_dump(mode="json")
    except ValidationError as err:
        problems = "; ".join(f"{where}.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
        raise ValueError(problems) from None
