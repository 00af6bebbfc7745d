"""Scene sampling: (split, scene index) -> a rendered :class:`Scene` with its complete ground truth.

Every scene is a pure function of ``(WorldParams.seed, split, index)``: its random stream is
``np.random.default_rng([seed, SPLITS[split], index])`` (a numpy SeedSequence over the three integers), so a
dataset is reproducible, any shard can be generated independently, and splits never share a stream.

Two caption regimes:

* ``make_scene(i, "train")``: the training distribution of :class:`WorldParams`, with its failure
  parameters (skewed colour when unnamed, relation rarely named, background named half the time);
* ``make_eval_scene(i)`` / ``eval_captions(n)``: held-out evaluation captions (split "eval") that name every
  attribute: colour and shape of every object, the background, and the relation of every 2-object scene.
  Scene kinds cycle through 1 object, the four relations, and 3 objects, so n = 240 gives 40 of each.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jaxdiff.shapesworld.backgrounds import render_background
from jaxdiff.shapesworld.captions import CaptionSpec, ObjectPhrase, format_caption
from jaxdiff.shapesworld.params import (BACKGROUNDS, COLOURS, PALETTE, RELATION_LABELS, SHAPES, SIZES, SPLITS,
                                        WORLD, WorldParams)
from jaxdiff.shapesworld.render import composite, coverage, shape_box
from jaxdiff.shapesworld.spatial import geneval_direction

EVAL_KINDS = ("single",) + RELATION_LABELS + ("triple",)
# Relation label -> (axis of the GenEval direction it reads, sign): x = 0, y = 1; y grows downwards.
_AXIS_SIGN = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}


@dataclass(frozen=True, eq=False)
class ObjectTruth:
    """One drawn object. ``box`` is the geometric (x0, y0, x1, y1), ``centre`` its centre, ``mask`` the
    pixels with coverage >= 0.5 (see :mod:`render`)."""
    shape: str
    colour: str
    size: str
    centre: tuple[float, float]
    box: tuple[float, float, float, float]
    mask: np.ndarray


@dataclass(frozen=True, eq=False)
class Scene:
    """A rendered scene and its ground truth. ``relation`` is the GenEval label of objects[0] (A) relative
    to objects[1] (B) for 2-object scenes (None otherwise); ``spec`` is what the caption names."""
    index: int
    split: str
    image: np.ndarray                 # (H, W, 3) uint8
    objects: tuple[ObjectTruth, ...]
    background: str
    relation: str | None
    spec: CaptionSpec

    @property
    def caption(self) -> str:
        return format_caption(self.spec)

    @property
    def named(self) -> dict:
        """Which attributes the caption names (see :attr:`CaptionSpec.named`)."""
        return self.spec.named

    @property
    def full_spec(self) -> CaptionSpec:
        """The caption naming everything true of the scene (used to check the judge)."""
        return CaptionSpec(tuple(ObjectPhrase(o.colour, o.shape) for o in self.objects), self.relation,
                           self.background)

    @property
    def full_caption(self) -> str:
        return format_caption(self.full_spec)


def scene_rng(index: int, split: str, params: WorldParams = WORLD) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    if int(index) < 0:
        raise ValueError(f"scene index must be >= 0, got {index}")
    return np.random.default_rng([params.seed, SPLITS[split], int(index)])


def _gap(a, b) -> float:
    """Separation of two boxes: the largest of the four edge gaps (negative when they overlap)."""
    return max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])


def _relation_ok(box_a, box_b, relation: str, params: WorldParams) -> bool:
    d = geneval_direction(box_a, box_b)
    if d is None:
        return False
    axis, sign = _AXIS_SIGN[relation]
    return sign * d[axis] >= params.rel_min and abs(d[1 - axis]) < params.rel_max_other


def place(rng: np.random.Generator, sizes_px, relation: str | None, params: WorldParams = WORLD):
    """Rejection-sample continuous centres: inside the image by ``border``, boxes ``min_gap`` apart, and for
    a relation, GenEval's direction clearly on that relation only (see WorldParams)."""
    lo = [params.border + s / 2 for s in sizes_px]
    hi = [params.image_size - params.border - s / 2 for s in sizes_px]
    for _ in range(10_000):
        centres = [tuple(rng.uniform(lo[i], hi[i], 2)) for i in range(len(sizes_px))]
        boxes = [shape_box(c, s) for c, s in zip(centres, sizes_px)]
        if any(_gap(boxes[i], boxes[j]) < params.min_gap
               for i in range(len(boxes)) for j in range(i + 1, len(boxes))):
            continue
        if relation is not None and not _relation_ok(boxes[0], boxes[1], relation, params):
            continue
        return centres
    raise RuntimeError(f"could not place objects of sizes {sizes_px} with relation {relation!r}")


def render_scene(rng, content, params: WorldParams = WORLD):
    """Place and draw ``content`` = (shapes, colours, sizes, background, relation) -> (image, objects)."""
    shapes, colours, sizes, background, relation = content
    sizes_px = [SIZES[s] for s in sizes]
    centres = place(rng, sizes_px, relation, params)
    bg = render_background(background, rng, params.image_size)
    covs = [coverage(sh, c, s, params.image_size, params.supersample) for sh, c, s in zip(shapes, centres, sizes_px)]
    image = composite(bg, [(cov, PALETTE[col]) for cov, col in zip(covs, colours)])
    objects = tuple(ObjectTruth(sh, col, sz, (float(c[0]), float(c[1])), shape_box(c, s), cov >= 0.5)
                    for sh, col, sz, c, s, cov in zip(shapes, colours, sizes, centres, sizes_px, covs))
    return image, objects


def _choice(rng, options, p=None):
    return options[int(rng.choice(len(options), p=p))]


def make_scene(index: int, split: str = "train", params: WorldParams = WORLD) -> Scene:
    """Scene ``index`` of ``split`` from the training distribution (captions follow WorldParams)."""
    rng = scene_rng(index, split, params)
    n = 1 + int(rng.choice(3, p=params.n_objects_probs))
    shapes, colours, sizes, phrases = [], [], [], []
    for _ in range(n):
        shape = _choice(rng, SHAPES)
        size = _choice(rng, tuple(SIZES))
        name_colour = bool(rng.random() < params.p_name_colour)
        colour = _choice(rng, COLOURS) if name_colour else _choice(rng, COLOURS, params.unnamed_colour_probs)
        name_shape = bool(rng.random() < params.p_name_shape)
        shapes.append(shape), colours.append(colour), sizes.append(size)
        phrases.append(ObjectPhrase(colour if name_colour else None, shape if name_shape else None))
    background = _choice(rng, BACKGROUNDS)
    name_background = bool(rng.random() < params.p_name_background)
    relation = _choice(rng, RELATION_LABELS) if n == 2 else None
    name_relation = bool(rng.random() < params.p_name_relation)
    image, objects = render_scene(rng, (shapes, colours, sizes, background, relation), params)
    spec = CaptionSpec(tuple(phrases), relation if name_relation else None,
                       background if name_background else None)
    return Scene(index, split, image, objects, background, relation, spec)


def make_eval_scene(index: int, params: WorldParams = WORLD, split: str = "eval") -> Scene:
    """Held-out scene whose caption names every attribute; kind = EVAL_KINDS[index % 6]. Objects in one
    scene have distinct (colour, shape) phrases so every caption object is identifiable."""
    rng = scene_rng(index, split, params)
    kind = EVAL_KINDS[index % len(EVAL_KINDS)]
    n = {"single": 1, "triple": 3}.get(kind, 2)
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    chosen = [pairs[i] for i in rng.choice(len(pairs), size=n, replace=False)]
    sizes = [_choice(rng, tuple(SIZES)) for _ in range(n)]
    background = _choice(rng, BACKGROUNDS)
    relation = kind if kind in RELATION_LABELS else None
    colours, shapes = [c for c, _ in chosen], [s for _, s in chosen]
    image, objects = render_scene(rng, (shapes, colours, sizes, background, relation), params)
    spec = CaptionSpec(tuple(ObjectPhrase(c, s) for c, s in chosen), relation, background)
    return Scene(index, split, image, objects, background, relation, spec)


def make_reference_scene(index: int, params: WorldParams = WORLD, split: str = "background") -> Scene:
    """An object-free scene (a reference background for Abs-Grad-SAM, issue 15): the background kind cycles
    through BACKGROUNDS (index % 5), its texture is drawn from the scene's stream. ``objects`` is empty; the
    caption names one random (colour, shape) on that background: the subject to draw into it."""
    rng = scene_rng(index, split, params)
    background = BACKGROUNDS[index % len(BACKGROUNDS)]
    colour, shape = _choice(rng, COLOURS), _choice(rng, SHAPES)
    image = composite(render_background(background, rng, params.image_size), [])
    return Scene(index, split, image, (), background, None, CaptionSpec((ObjectPhrase(colour, shape),), None,
                                                                       background))


def eval_captions(n: int = 240, params: WorldParams = WORLD) -> list[str]:
    """The held-out evaluation captions (all attributes named; n // 6 per relation)."""
    return [make_eval_scene(i, params).caption for i in range(n)]
