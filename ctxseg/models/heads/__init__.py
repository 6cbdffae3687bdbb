"""Context heads: the contract (:mod:`.base`), its registry, and the built-in heads.

``none`` (:mod:`.plain`), ``mcibi`` (:mod:`.mcibi`, MCIBI ICCV 2021) and ``acf`` (:mod:`.acf`, CFNet
CVPR 2019) register themselves on import. A new head is one module with a ``@register_head`` class;
import it before building a config that names it.
"""

from .base import HEADS, ContextHead, LossTerm, get_head, head_names, register_head
from . import plain, mcibi, acf  # noqa: F401,E402  (registration)

__all__ = ["ContextHead", "LossTerm", "register_head", "get_head", "head_names", "HEADS"]
