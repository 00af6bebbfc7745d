"""GenEval's relative-position rule (Ghosh et al. 2023, github djghosh13/geneval,
``evaluation/evaluate_images.py::relative_position``; restated in ../shared/docs/methods.md §4.5).

For boxes (x0, y0, x1, y1) in image coordinates (y down) of objects A and B:

* offset = centre(A) - centre(B);
* each component is shrunk towards 0 by ``threshold`` x (dimension of A + dimension of B) along that axis
  (widths for x, heights for y) and clipped at 0, keeping its sign (GenEval's ``POSITION_THRESHOLD`` = 0.1);
* if both shrunk components are below 1e-3 in magnitude, no relation holds;
* direction = shrunk offset / ||offset|| (the norm of the *unshrunk* offset, as GenEval does);
* dx < -0.5 -> "left of", dx > 0.5 -> "right of", dy < -0.5 -> "above", dy > 0.5 -> "below".

The result is a set (a diagonal placement can satisfy two relations); GenEval counts "A rel B" correct when
rel is in the set. The ShapesWorld sampler places 2-object scenes so that exactly one relation holds.
"""

from __future__ import annotations

import numpy as np

POSITION_THRESHOLD = 0.1     # GenEval default option `position_threshold`
DIRECTION_THRESHOLD = 0.5    # GenEval's hard-coded direction cut


def geneval_direction(box_a, box_b, threshold: float = POSITION_THRESHOLD) -> np.ndarray | None:
    """GenEval's normalised, shrunk direction (dx, dy) of A relative to B, or None when the shrunk offset
    vanishes (|component| < 1e-3 on both axes)."""
    a, b = np.asarray(box_a, np.float64), np.asarray(box_b, np.float64)
    if a.shape != (4,) or b.shape != (4,):
        raise ValueError(f"boxes must be (x0, y0, x1, y1), got shapes {a.shape} and {b.shape}")
    centre_a, centre_b = (a[:2] + a[2:]) / 2, (b[:2] + b[2:]) / 2
    dims = np.abs(a[2:] - a[:2]) + np.abs(b[2:] - b[:2])
    offset = centre_a - centre_b
    shrunk = np.maximum(np.abs(offset) - threshold * dims, 0.0) * np.sign(offset)
    if np.all(np.abs(shrunk) < 1e-3):
        return None
    return shrunk / np.linalg.norm(offset)


def geneval_relations(box_a, box_b, threshold: float = POSITION_THRESHOLD) -> frozenset[str]:
    """The set of GenEval relation labels that hold for A relative to B."""
    d = geneval_direction(box_a, box_b, threshold)
    if d is None:
        return frozenset()
    dx, dy = d
    rels = set()
    if dx < -DIRECTION_THRESHOLD:
        rels.add("left of")
    if dx > DIRECTION_THRESHOLD:
        rels.add("right of")
    if dy < -DIRECTION_THRESHOLD:
        rels.add("above")
    if dy > DIRECTION_THRESHOLD:
        rels.add("below")
    return frozenset(rels)
