"""ALBEF's RandAugment, the one LilT trains with: N random operations from a list without colour changes, each
applied with probability 1/2 at magnitude M of 10 (ALBEF's ``RandomAugment(2, 7, isPIL=True, augs=[...])``).

torchvision's ``RandAugment`` draws from a list that also changes colour (``Color``, ``Contrast``, ``Posterize``,
``Solarize``), which would contradict captions naming colours; ALBEF's list keeps the photometric operations that
leave hue alone (auto-contrast, equalise, brightness, sharpness) and the geometric ones. Magnitudes follow ALBEF's
level-to-argument maps: enhancement factor 0.1 + 1.8 M/10, shear 0.3 M/10, translation 10 M/10 pixels, rotation
30 M/10 degrees, the last three with a random sign; geometric operations fill with grey (128). Randomness comes from
torch's global RNG, like the rest of ``leanclip.data.clip_transform``.
"""
from __future__ import annotations

import math

import torch

ALBEF_OPS = ("Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX",
             "TranslateY", "Rotate")
MAX_LEVEL = 10.0
FILL = [128.0, 128.0, 128.0]


def _signed(value: float) -> float:
    return value if torch.rand(()) < 0.5 else -value


def _apply(img: torch.Tensor, op: str, level: float) -> torch.Tensor:
    """One of :data:`ALBEF_OPS` on a uint8 CHW image at ``level`` (0 to 10)."""
    from torchvision.transforms.v2 import functional as F

    m = level / MAX_LEVEL
    if op == "Identity":
        return img
    if op == "AutoContrast":
        return F.autocontrast(img)
    if op == "Equalize":
        return F.equalize(img)
    if op in ("Brightness", "Sharpness"):
        factor = 0.1 + 1.8 * m
        return F.adjust_brightness(img, factor) if op == "Brightness" else F.adjust_sharpness(img, factor)
    if op in ("ShearX", "ShearY"):
        angle = math.degrees(math.atan(_signed(0.3 * m)))
        shear = [angle, 0.0] if op == "ShearX" else [0.0, angle]
        return F.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, fill=FILL)
    if op in ("TranslateX", "TranslateY"):
        pixels = _signed(10.0 * m)
        shift = [pixels, 0.0] if op == "TranslateX" else [0.0, pixels]
        return F.affine(img, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0], fill=FILL)
    if op == "Rotate":
        return F.rotate(img, _signed(30.0 * m), fill=FILL)
    raise ValueError(f"unknown operation {op!r}; ALBEF's: {', '.join(ALBEF_OPS)}")


class AlbefRandAugment(torch.nn.Module):
    """``n`` operations drawn with replacement from ``ops`` (default :data:`ALBEF_OPS`), each applied with
    probability 1/2 at magnitude ``m`` (0 to 10), on a uint8 CHW image (``torchvision.tv_tensors.Image``)."""

    def __init__(self, n: int = 2, m: float = 7.0, ops=ALBEF_OPS):
        super().__init__()
        if not (isinstance(n, int) and n >= 0) or not 0 <= m <= MAX_LEVEL:
            raise ValueError(f"AlbefRandAugment: n must be an int >= 0 and m in [0, 10], got n={n!r}, m={m!r}")
        unknown = [o for o in ops if o not in ALBEF_OPS]
        if unknown or not ops:
            raise ValueError(f"AlbefRandAugment: unknown operations {unknown}; ALBEF's: {', '.join(ALBEF_OPS)}")
        self.n, self.m, self.ops = n, float(m), tuple(ops)

    def forward(self, img):
        for i in torch.randint(len(self.ops), (self.n,)).tolist():
            if torch.rand(()) < 0.5:
                img = _apply(img, self.ops[i], self.m)
        return img

    def extra_repr(self) -> str:
        return f"n={self.n}, m={self.m:g}, ops={list(self.ops)}"
