"""Rendering one class instance: a shape mask with a texture, at a random position, scale and rotation, on a
``source`` or ``shifted`` background; vectorised over a batch, deterministic for a generator."""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from leanclip.synthetic.classes import COLOURS, ClassSpec, DOMAINS, DOMAIN_CODE


# ----------------------------------------------------------------------------------------------------------------------
# Rendering


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = np.arange(size, dtype=np.float32) + 0.5
    yy, xx = np.meshgrid(c, c, indexing="ij")
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


_SQ3 = math.sqrt(3.0)


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Shape of radius ~1 in its own frame (u right, v up)."""
    au, av = np.abs(u), np.abs(v)
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(au, av) <= 0.8
    if shape == "triangle":
        return (v >= -0.5) & (_SQ3 * au + v <= 1.0)
    if shape == "cross":
        return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))
    if shape == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.36)
    if shape == "star":
        r = np.sqrt(u * u + v * v)
        th = np.arctan2(v, u)
        return r <= 0.42 + 0.58 * np.abs(np.cos(2.5 * th)) ** 3
    if shape == "diamond":
        return au * 0.8 + av <= 1.0
    if shape == "hexagon":
        return (av <= 0.866) & (_SQ3 * au + av <= _SQ3)
    raise ValueError(f"unknown shape {shape!r}")


def _texture_mask(texture: str, u: np.ndarray, v: np.ndarray) -> np.ndarray | None:
    if texture == "plain":
        return None
    if texture == "striped":
        return (np.floor(u * 4.0) % 2) == 0
    if texture == "dotted":
        fu = u * 3.2 - np.round(u * 3.2)
        fv = v * 3.2 - np.round(v * 3.2)
        return fu * fu + fv * fv <= 0.07
    raise ValueError(f"unknown texture {texture!r}")


def check_domain(domain: str) -> str:
    if domain not in DOMAIN_CODE:
        raise ValueError(f"unknown domain {domain!r}; known: {', '.join(DOMAINS)}")
    return domain


def check_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 8:
        raise ValueError(f"size must be an int >= 8, got {size!r}")
    return int(size)


def draw_batch(spec: ClassSpec, rng: np.random.Generator, n: int, size: int, domain: str):
    """n images of one class -> (uint8 n×3×H×W, list of meta dicts). All randomness from `rng`, in a fixed order.

    Channel-first float32 work on n×H×W planes (the 3-channel arrays are built once, by the composite)."""
    f32 = np.float32
    yy, xx = _grid(size)
    col3 = (n, 1, 1)
    # geometry
    cxy = rng.uniform(0.3, 0.7, (n, 2))
    rel_r = rng.uniform(0.2, 0.32, n)
    th = rng.uniform(0, 2 * math.pi, n)
    fg = np.clip(np.asarray(COLOURS[spec.colour], f32) + rng.normal(0, 10, (n, 3)), 0, 255).astype(f32)
    inv_r = (1.0 / (rel_r * size)).astype(f32).reshape(col3)
    c = np.cos(th).astype(f32).reshape(col3)
    s = np.sin(th).astype(f32).reshape(col3)
    dx = (xx - (cxy[:, 0] * size).astype(f32).reshape(col3)) * inv_r
    dy = ((cxy[:, 1] * size).astype(f32).reshape(col3) - yy) * inv_r  # v axis points up
    u = c * dx + s * dy
    v = c * dy - s * dx
    mask = _shape_mask(spec.shape, u, v)
    tex = _texture_mask(spec.texture, u, v)
    shade = None if tex is None else np.where(tex, f32(0.35), f32(1.0))
    # background: per-channel offset + one shared plane (source) or pattern × per-channel amplitude (shifted)
    if domain == "source":
        base = (rng.uniform(25, 75, (n, 1)) + rng.normal(0, 8, (n, 3))).astype(f32)
        g = rng.uniform(-30, 30, (n, 2)).astype(f32) / f32(size)
        plane = g[:, 0].reshape(col3) * (yy - size / 2) + g[:, 1].reshape(col3) * (xx - size / 2)
        plane += rng.standard_normal((n, size, size), dtype=f32) * f32(3.0)
        amp = np.ones((n, 3), f32)
    else:
        base = rng.uniform(130, 215, (n, 3)).astype(f32)
        period = rng.uniform(3.0, 9.0, col3).astype(f32)
        checker = rng.random(n) < 0.5
        a = rng.uniform(0, math.pi, col3).astype(f32)
        amp = rng.uniform(12, 30, (n, 3)).astype(f32)
        inv_p = 1.0 / period
        plane = np.empty((n, size, size), f32)
        ck, st = checker, ~checker  # checkerboard or oblique stripes, each computed only where used
        plane[ck] = np.floor(yy * inv_p[ck]) + np.floor(xx * inv_p[ck])
        plane[st] = np.floor((np.cos(a[st]) * xx + np.sin(a[st]) * yy) * inv_p[st])
        plane %= 2
        plane *= 2
        plane -= 1
    img = np.empty((n, 3, size, size), f32)
    for ch in range(3):
        bg = plane * amp[:, ch].reshape(col3) + base[:, ch].reshape(col3)
        fgc = fg[:, ch].reshape(col3)
        np.copyto(img[:, ch], np.where(mask, fgc if shade is None else fgc * shade, bg))
    if domain == "shifted":  # global colour jitter (contrast about the mean, brightness, channel gain) + noise
        mean = img.mean(axis=(1, 2, 3)).astype(f32).reshape(n, 1, 1, 1)
        contrast = rng.uniform(0.7, 1.3, (n, 1, 1, 1)).astype(f32)
        bright = rng.uniform(0.75, 1.2, (n, 1, 1, 1)).astype(f32)
        gain = rng.uniform(0.88, 1.12, (n, 3, 1, 1)).astype(f32)
        img *= contrast * gain
        img += (mean * (bright - contrast)) * gain
        img += rng.standard_normal(img.shape, dtype=f32) * f32(10.0)
    img += f32(0.5)
    out = np.clip(img, 0, 255, out=img).astype(np.uint8)
    metas = [
        dict(cx=float(cxy[i, 0]), cy=float(cxy[i, 1]), radius=float(rel_r[i]), angle=float(th[i]), domain=domain)
        for i in range(n)
    ]
    return out, metas


def _draw(spec: ClassSpec, rng: np.random.Generator, size: int, domain: str) -> tuple[np.ndarray, dict]:
    """One image, uint8 H×W×3."""
    imgs, metas = draw_batch(spec, rng, 1, size, domain)
    return np.ascontiguousarray(imgs[0].transpose(1, 2, 0)), metas[0]


def _as_rng(rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise TypeError(f"rng must be a numpy Generator or an int seed, got {type(rng).__name__}")


def render(spec: ClassSpec, rng: np.random.Generator | int, size: int = 64, domain: str = "source") -> np.ndarray:
    """One image of class `spec` as uint8 H×W×3 (H = W = size). `rng`: a numpy Generator (advanced) or an int seed."""
    return _draw(spec, _as_rng(rng), check_size(size), check_domain(domain))[0]


def render_with_meta(spec: ClassSpec, rng, size: int = 64, domain: str = "source") -> tuple[np.ndarray, dict]:
    """`render` plus its geometry: cx, cy, radius (fractions of the size), angle (rad), domain."""
    return _draw(spec, _as_rng(rng), check_size(size), check_domain(domain))
