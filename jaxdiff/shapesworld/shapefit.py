"""Shape classification by a moment-matched template fit on the coverage (alpha) map.

A binary mask of a 12 px shape at a sub-pixel position is ragged by a pixel (edge pixels at ~50% coverage
fall either way), which makes mask-box fill ratios ambiguous (a digitised circle can fill 0.9 of its box, a
ragged square 0.8). The coverage estimate alpha (see :mod:`segment`) keeps the sub-pixel information, so:

1. zeroth and first moments of alpha give the area A and centroid (cx, cy);
2. for each candidate shape, its box side follows from A (circle: A = pi s^2 / 4, square: A = s^2,
   triangle: A = s^2 / 2) and its box centre from the centroid (circle and square: the centroid; the
   apex-up triangle's centroid lies s/6 below its box centre);
3. that template is rendered with the world's own anti-aliased rasteriser, also Gaussian-blurred at each
   sigma in ``BLUR_SIGMAS`` (an unknown blur is part of the fit: blurred squares have round corners, and a
   sharp circle would otherwise fit them better than a sharp square), and compared with alpha by the sum of
   squared differences; the shape with the smallest error over all sigmas wins.

Blur moves alpha mass outwards but conserves A and the centroid, so the fit is stable under the mild
degradation used to anticipate generated images. The fitted box is in the same continuous coordinates as
the ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jaxdiff.shapesworld.imageops import gaussian_blur
from jaxdiff.shapesworld.params import SHAPES
from jaxdiff.shapesworld.render import coverage, shape_box

AREA_FRACTION = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}     # area / side^2
CENTROID_BELOW_CENTRE = {"circle": 0.0, "square": 0.0, "triangle": 1.0 / 6.0}   # x side
BLUR_SIGMAS = (0.0, 0.5, 0.8, 1.1, 1.5)                                      # px


@dataclass(frozen=True)
class ShapeFit:
    shape: str
    size: float                                   # fitted box side, px
    centre: tuple[float, float]                   # fitted box centre (x, y)
    box: tuple[float, float, float, float]
    errors: dict                                  # shape -> min over blur of sum of squared alpha differences / area


def fit_shape(alpha: np.ndarray, supersample: int = 4) -> ShapeFit:
    """Fit circle / square / triangle templates to a coverage map (H, W) in [0, 1] (see module doc)."""
    h, w = alpha.shape
    if h != w:
        raise ValueError(f"square coverage maps only, got {alpha.shape}")
    area = float(alpha.sum())
    if area <= 0:
        raise ValueError("empty coverage map")
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    cx, cy = float((alpha * xs).sum() / area), float((alpha * ys).sum() / area)
    fits = {}
    for shape in SHAPES:
        side = float(np.sqrt(area / AREA_FRACTION[shape]))
        centre = (cx, cy - CENTROID_BELOW_CENTRE[shape] * side)
        template = coverage(shape, centre, side, h, supersample)
        err = min(float(((alpha - (gaussian_blur(template, sg) if sg else template)) ** 2).sum())
                  for sg in BLUR_SIGMAS)
        fits[shape] = (err / area, side, centre)
    best = min(fits, key=lambda s: fits[s][0])
    _, side, centre = fits[best]
    return ShapeFit(best, side, centre, shape_box(centre, side), {s: f[0] for s, f in fits.items()})
