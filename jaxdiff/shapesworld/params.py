"""ShapesWorld vocabulary and the frozen world parameters (issue 5, part 1).

Everything a scene can contain is named here: shapes, colours (flat RGB), sizes, background kinds and the
relation phrases. :class:`WorldParams` fixes the *failure parameters* of the training distribution (issue 5:
"Fix these parameters before training, publish them with the results, and never re-tune them afterwards").
Its defaults were chosen before any model was trained and are the published values; change them only by
creating a new, separately named world.

Colour choice: six saturated rainbow colours, far apart in CIELAB from each other (min pairwise distance
41 Delta-E 1976, blue-purple; the next closest pairs are the rainbow neighbours at 45-46) and from the muted
background textures (>= ~40 Delta-E from every texture pixel, checked in the tests), so
the judge can find objects by colour distance alone. Background base colours are desaturated and mid-tone.
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGE_SIZE = 64

SHAPES = ("circle", "square", "triangle")

# Flat object colours (sRGB uint8). Order matters only for display; the judge uses nearest-in-CIELAB.
PALETTE = {
    "red": (220, 40, 40),
    "orange": (245, 140, 25),
    "yellow": (240, 215, 40),
    "green": (30, 180, 50),
    "blue": (30, 90, 220),
    "purple": (165, 45, 185),
}
COLOURS = tuple(PALETTE)

# Box extent in pixels (width = height for every shape) of the two sizes.
SIZES = {"small": 12.0, "large": 20.0}

BACKGROUNDS = ("grass", "sky", "sand", "water", "brick")

# Caption phrase -> GenEval relation label (GenEval's `relative_position` returns "left of", "right of",
# "above", "below"; captions use the GenEval prompt wording "to the left of" / "to the right of").
RELATIONS = {"to the left of": "left of", "to the right of": "right of", "above": "above", "below": "below"}
RELATION_LABELS = tuple(RELATIONS.values())

# Dataset splits: the split code is mixed into every scene's seed, so splits never share a random stream.
SPLITS = {"train": 0, "eval": 1, "judge": 2, "prototype": 3, "test": 4, "background": 5}


@dataclass(frozen=True)
class WorldParams:
    """The training distribution of ShapesWorld. Frozen: these values are published with the results.

    Failure parameters (the miniature of what the steering methods fix):

    * (a) **bias**: when a caption omits an object's colour, the colour is drawn from ``unnamed_colour_probs``
      (red 0.50, the other five colours 0.10 each), not uniformly. A model trained on this world therefore
      draws red for "a shape on grass" about half the time: deviation ratio (max_c |p_c - 1/6|) / (1 - 1/6)
      = (0.5 - 1/6) / (5/6) = 0.40 at the data level (uniform would be 0). Named colours are uniform.
    * (b) **spatial**: every 2-object scene is laid out in one clear relation (uniform over the four), but
      the caption names it only with probability ``p_name_relation`` = 0.25; otherwise the caption reads
      "a red circle and a blue square" (object order in the caption = A then B, as in the relation).
    * (c) **background**: named with probability ``p_name_background`` = 0.5; the kind itself is uniform.

    Other choices (not failure parameters, fixed alongside): 1/2/3 objects with probabilities
    0.35/0.45/0.20; shape uniform and named with probability 0.8 ("a red shape" otherwise); colour named
    with probability 0.7; size uniform over small/large and never named in captions.
    """

    seed: int = 20261125                       # world seed, mixed with (split, scene index)
    image_size: int = IMAGE_SIZE
    n_objects_probs: tuple[float, ...] = (0.35, 0.45, 0.20)          # P(1), P(2), P(3) objects
    p_name_colour: float = 0.7                                       # per object
    p_name_shape: float = 0.8                                        # per object
    # (a) bias: colour distribution when the caption omits it, in COLOURS order
    # (red, orange, yellow, green, blue, purple).
    unnamed_colour_probs: tuple[float, ...] = (0.50, 0.10, 0.10, 0.10, 0.10, 0.10)
    p_name_relation: float = 0.25                                    # (b) spatial, 2-object scenes
    p_name_background: float = 0.5                                   # (c) background naming
    # Layout: objects stay `border` px inside the image, boxes are >= `min_gap` px apart (so blur never
    # merges two objects), and a 2-object relation is placed with GenEval direction component >= `rel_min`
    # on its axis and < `rel_max_other` on the other (GenEval's threshold is 0.5: the margins make the
    # relation exclusive and robust to a pixel of box error).
    border: float = 2.0
    min_gap: float = 4.0
    rel_min: float = 0.6
    rel_max_other: float = 0.4
    supersample: int = 4                                             # anti-aliasing: 4x4 samples / pixel

    def __post_init__(self):
        for name in ("n_objects_probs", "unnamed_colour_probs"):
            p = getattr(self, name)
            if abs(sum(p) - 1.0) > 1e-9 or min(p) < 0:
                raise ValueError(f"WorldParams.{name} must be a probability vector, got {p}")
        if len(self.unnamed_colour_probs) != len(COLOURS):
            raise ValueError(f"unnamed_colour_probs needs {len(COLOURS)} entries ({', '.join(COLOURS)})")
        if len(self.n_objects_probs) != 3:
            raise ValueError("n_objects_probs gives P(1), P(2), P(3) objects")


WORLD = WorldParams()
