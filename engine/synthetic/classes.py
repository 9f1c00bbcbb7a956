"""The vocabulary of the procedural data (shapes, colours, textures, domains) and its classes: ``ClassSpec``
(a colour, texture, shape triple and its name) and ``make_classes``."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring", "star", "diamond", "hexagon")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 175, 60),
    "blue": (45, 90, 235),
    "yellow": (240, 220, 40),
    "purple": (145, 60, 205),
    "orange": (250, 140, 20),
    "white": (240, 240, 240),
    "cyan": (40, 210, 225),
    "pink": (250, 135, 195),
    "brown": (140, 85, 40),
}
TEXTURES: tuple[str, ...] = ("plain", "striped", "dotted")
DOMAINS: tuple[str, ...] = ("source", "shifted")
DOMAIN_CODE = {d: i for i, d in enumerate(DOMAINS)}
SPLIT_CODE = {"classification": 0, "train": 1, "val": 2, "test": 3, "folder": 4, "captions": 5}


@dataclass(frozen=True)
class ClassSpec:
    shape: str
    colour: str
    texture: str = "plain"

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; known: {', '.join(SHAPES)}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; known: {', '.join(COLOURS)}")
        if self.texture not in TEXTURES:
            raise ValueError(f"unknown texture {self.texture!r}; known: {', '.join(TEXTURES)}")

    @property
    def name(self) -> str:
        """"red striped triangle"; plain texture is omitted: "red triangle"."""
        parts = [self.colour] + ([self.texture] if self.texture != "plain" else []) + [self.shape]
        return " ".join(parts)

    @property
    def folder(self) -> str:
        return self.name.replace(" ", "_")


def make_classes(
    n_classes: int,
    seed: int = 0,
    *,
    shapes: Sequence[str] = SHAPES,
    colours: Sequence[str] = tuple(COLOURS),
    textures: Sequence[str] = TEXTURES,
) -> list[ClassSpec]:
    """`n_classes` distinct (shape, colour, texture) classes, a seeded random draw from the product, in draw order
    (so a CoOp base/new split of them mixes attributes). ValueError when more are asked than the product holds."""
    combos = [ClassSpec(s, c, t) for s in shapes for c in colours for t in textures]
    if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 1:
        raise ValueError(f"n_classes must be a positive int, got {n_classes!r}")
    if n_classes > len(combos):
        raise ValueError(f"n_classes={n_classes} > {len(combos)} available shape×colour×texture combinations")
    order = np.random.default_rng([int(seed) & 0xFFFFFFFFFFFF, 7919]).permutation(len(combos))[:n_classes]
    return [combos[i] for i in order]
