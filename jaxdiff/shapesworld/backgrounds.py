"""Procedural background textures: grass, sky, sand, water, brick.

Design rules (issue 5: backgrounds must be distinguishable, and objects segmentable against them):

* each kind has a distinct, desaturated mean colour (pairwise >= ~30 Delta-E apart), far from every object
  colour, so the kind is readable from the mean colour alone;
* textures are low contrast (a few Delta-E of variation; brick mortar is the strongest, still > 40 Delta-E
  from any object colour) and differ in their high-frequency structure, a second cue for the judge:
  grass = vertical blades (energy across x), water = horizontal waves (energy across y), sand = fine
  isotropic grain + diagonal ripples, sky = smooth gradient + soft clouds (almost no high frequencies),
  brick = a staggered grid of 1 px mortar lines;
* every texture is a deterministic function of the numpy Generator it is given.
"""

from __future__ import annotations

import numpy as np

from jaxdiff.shapesworld.imageops import gaussian_blur
from jaxdiff.shapesworld.params import BACKGROUNDS

BASE_COLOURS = {
    "grass": (100, 130, 80),
    "sky": (165, 195, 225),
    "sand": (205, 185, 145),
    "water": (60, 105, 135),
    "brick": (150, 85, 70),
}
MORTAR = (170, 150, 135)


def _unit_noise(rng: np.random.Generator, size: int, sigma_y: float, sigma_x: float) -> np.ndarray:
    """Gaussian white noise blurred anisotropically and rescaled to zero mean, unit std."""
    n = gaussian_blur(rng.standard_normal((size, size)), sigma_y, sigma_x)
    return (n - n.mean()) / (n.std() + 1e-12)


def _with(base, *layers) -> np.ndarray:
    """base colour + sum of (scalar field (H, W), per-channel amplitude) layers -> (H, W, 3) float."""
    out = np.asarray(base, np.float64)[None, None, :]
    for field_, amp in layers:
        out = out + field_[..., None] * np.asarray(amp, np.float64)
    return out


def grass(rng: np.random.Generator, size: int) -> np.ndarray:
    blades = _unit_noise(rng, size, 3.0, 0.5)                  # elongated vertically
    grain = rng.standard_normal((size, size))
    return _with(BASE_COLOURS["grass"], (blades, (7, 10, 5)), (grain, (2, 2, 2)))


def sky(rng: np.random.Generator, size: int) -> np.ndarray:
    y = np.linspace(-0.5, 0.5, size)[:, None] * np.ones((1, size))
    clouds = np.maximum(_unit_noise(rng, size, 6.0, 8.0), 0.0)   # soft bright patches
    grain = rng.standard_normal((size, size))
    return _with(BASE_COLOURS["sky"], (y, (16, 12, 6)), (clouds, (12, 9, 5)), (grain, (1, 1, 1)))


def sand(rng: np.random.Generator, size: int) -> np.ndarray:
    grain = _unit_noise(rng, size, 0.6, 0.6)
    theta = rng.uniform(np.pi / 6, np.pi / 3)
    phase = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    ripples = np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / 7.0 + phase)
    return _with(BASE_COLOURS["sand"], (grain, (8, 7, 6)), (ripples, (4, 4, 3)))


def water(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    phase, wobble = rng.uniform(0, 2 * np.pi, 2)
    waves = np.sin(2 * np.pi * yy / 5.0 + phase + 1.5 * np.sin(2 * np.pi * xx / 23.0 + wobble))
    streaks = _unit_noise(rng, size, 0.6, 5.0)                 # elongated horizontally
    return _with(BASE_COLOURS["water"], (waves, (5, 7, 8)), (streaks, (4, 5, 6)))


def brick(rng: np.random.Generator, size: int, brick_h: int = 8, brick_w: int = 16) -> np.ndarray:
    oy, ox = rng.integers(0, brick_h), rng.integers(0, brick_w)
    yy, xx = np.mgrid[0:size, 0:size]
    row = (yy + oy) // brick_h
    xs = xx + ox + (row % 2) * (brick_w // 2)                  # running bond: odd rows shifted half a brick
    col = xs // brick_w
    mortar = ((yy + oy) % brick_h == 0) | (xs % brick_w == 0)
    # one colour jitter per brick (indexed by its row/column), plus fine grain
    jitter = rng.standard_normal((row.max() + 1, col.max() + 1))[row, col]
    img = _with(BASE_COLOURS["brick"], (jitter, (6, 4, 3)), (rng.standard_normal((size, size)), (3, 2, 2)))
    img[mortar] = np.asarray(MORTAR, np.float64) + rng.standard_normal((int(mortar.sum()), 1)) * 3
    return img


TEXTURES = {"grass": grass, "sky": sky, "sand": sand, "water": water, "brick": brick}
assert tuple(TEXTURES) == BACKGROUNDS


def render_background(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float64 texture in [0, 255] of the named kind."""
    if kind not in TEXTURES:
        raise ValueError(f"unknown background kind {kind!r}; known: {', '.join(BACKGROUNDS)}")
    return np.clip(TEXTURES[kind](rng, size), 0, 255)
