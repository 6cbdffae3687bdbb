"""Small shared building blocks and receptive-field bookkeeping."""

from __future__ import annotations

from typing import Iterable, List, Tuple

import torch.nn as nn

__all__ = ["ConvBNReLU", "conv_path_rf"]


class ConvBNReLU(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d -> ReLU.

    ``norm=False`` gives Conv2d (bias) -> ReLU; used on globally pooled 1x1 maps so that a training
    forward with batch size 1 works (BatchNorm over a single value per channel is undefined).
    """

    def __init__(self, cin: int, cout: int, kernel: int = 1, dilation: int = 1, stride: int = 1,
                 norm: bool = True) -> None:
        pad = dilation * (kernel - 1) // 2
        layers: List[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, pad, dilation=dilation, bias=not norm)]
        if norm:
            layers.append(nn.BatchNorm2d(cout))
        layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


def _kernel_stride_dilation(m: nn.Module) -> Tuple[int, int, int]:
    if isinstance(m, nn.Conv2d):
        return m.kernel_size[0], m.stride[0], m.dilation[0]
    if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
        k = m.kernel_size if isinstance(m.kernel_size, int) else m.kernel_size[0]
        s = m.stride if isinstance(m.stride, int) else m.stride[0]
        d = getattr(m, "dilation", 1)
        d = d if isinstance(d, int) else d[0]
        return k, s, d
    return 1, 1, 1


def conv_path_rf(path: Iterable[nn.Module], rf: int = 1, jump: int = 1) -> Tuple[int, int]:
    """Fold a sequential chain of convs / pools into (receptive field, jump) in input pixels.

    Standard recurrence: with effective kernel k_eff = d(k-1)+1, r <- r + (k_eff-1)*j, j <- j*s.
    """
    for m in path:
        k, s, d = _kernel_stride_dilation(m)
        rf += (d * (k - 1)) * jump
        jump *= s
    return rf, jump


def modules_of(*items: nn.Module) -> List[nn.Module]:
    """Flatten modules into the list of their conv / pool leaves in registration order."""
    out: List[nn.Module] = []
    for it in items:
        for m in it.modules():
            if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
                out.append(m)
    return out
