"""What LIP and CIHP share: the 20 human-parsing classes, labels already train ids."""
from __future__ import annotations

from ctxseg.data.decoders import StrictLutDecoder, identity_lut
from ctxseg.data.types import LabelDecoder

CLASSES = [
    "background", "hat", "hair", "glove", "sunglasses", "upper-clothes", "dress", "coat", "socks",
    "pants", "jumpsuits", "scarf", "skirt", "face", "left-arm", "right-arm", "left-leg",
    "right-leg", "left-shoe", "right-shoe",
]


def human_decoder(name: str) -> LabelDecoder:
    return StrictLutDecoder(identity_lut(20), "identity (0..19)", f"{name} ids are 0..19 (255 = ignore)")
