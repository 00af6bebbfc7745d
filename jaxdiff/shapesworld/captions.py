"""The ShapesWorld caption language: templates (spec -> text) and the exact parser (text -> spec).

Grammar (lower case, single spaces; a trailing full stop is ignored by the parser)::

    caption  := objects [" on " BACKGROUND]
    objects  := object                                   1 object
              | object " " RELATION " " object            2 objects, A RELATION B
              | object " and " object                     2 objects, relation not named
              | object ", " object " and " object         3 objects
    object   := ("a" | "an") [COLOUR " "] (SHAPE | "shape")

Examples: "a red circle to the left of a blue square on grass", "a green triangle above a yellow circle",
"a shape on sand" (neutral, attribute-free), "a circle", "an orange shape". RELATION is one of
"to the left of", "to the right of", "above", "below" (GenEval's prompt wording); the spec stores GenEval's
label ("left of", ...). ``format_caption`` and ``parse_caption`` are exact inverses on valid specs.
"""

from __future__ import annotations

from dataclasses import dataclass

from jaxdiff.shapesworld.params import BACKGROUNDS, COLOURS, RELATION_LABELS, RELATIONS, SHAPES

_PHRASE_OF_LABEL = {label: phrase for phrase, label in RELATIONS.items()}
NEUTRAL_CAPTIONS = tuple(f"a shape on {bg}" for bg in BACKGROUNDS)


class CaptionError(ValueError):
    """A caption outside the ShapesWorld language (unknown word, bad structure)."""


@dataclass(frozen=True)
class ObjectPhrase:
    """One object as a caption names it; ``None`` = attribute not named."""
    colour: str | None = None
    shape: str | None = None

    def __post_init__(self):
        if self.colour is not None and self.colour not in COLOURS:
            raise CaptionError(f"unknown colour word {self.colour!r}; known: {', '.join(COLOURS)}")
        if self.shape is not None and self.shape not in SHAPES:
            raise CaptionError(f"unknown shape word {self.shape!r}; known: {', '.join(SHAPES)} (or 'shape')")


@dataclass(frozen=True)
class CaptionSpec:
    """What a caption asks for. ``relation`` (GenEval label) relates objects[0] (A) to objects[1] (B)."""
    objects: tuple[ObjectPhrase, ...]
    relation: str | None = None
    background: str | None = None

    def __post_init__(self):
        if not 1 <= len(self.objects) <= 3:
            raise CaptionError(f"a caption names 1 to 3 objects, got {len(self.objects)}")
        if self.relation is not None:
            if self.relation not in RELATION_LABELS:
                raise CaptionError(f"unknown relation {self.relation!r}; known: {', '.join(RELATION_LABELS)}")
            if len(self.objects) != 2:
                raise CaptionError("a relation needs exactly 2 objects")
        if self.background is not None and self.background not in BACKGROUNDS:
            raise CaptionError(f"unknown background word {self.background!r}; known: {', '.join(BACKGROUNDS)}")

    @property
    def named(self) -> dict:
        """Which attributes the caption names: per-object colour/shape flags, relation, background."""
        return {"colour": tuple(o.colour is not None for o in self.objects),
                "shape": tuple(o.shape is not None for o in self.objects),
                "relation": self.relation is not None, "background": self.background is not None}


def _object_text(o: ObjectPhrase) -> str:
    words = ([o.colour] if o.colour else []) + [o.shape or "shape"]
    article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article] + words)


def format_caption(spec: CaptionSpec) -> str:
    """The template text of a caption spec (see the module grammar)."""
    objs = [_object_text(o) for o in spec.objects]
    if spec.relation is not None:
        text = f"{objs[0]} {_PHRASE_OF_LABEL[spec.relation]} {objs[1]}"
    elif len(objs) == 1:
        text = objs[0]
    else:
        text = ", ".join(objs[:-1]) + " and " + objs[-1]
    return text + (f" on {spec.background}" if spec.background else "")


def _parse_object(text: str, caption: str) -> ObjectPhrase:
    words = text.split()
    if not words or words[0] not in ("a", "an"):
        raise CaptionError(f"object phrase {text!r} must start with 'a' or 'an' (in {caption!r})")
    words = words[1:]
    if len(words) == 1:
        colour, noun = None, words[0]
    elif len(words) == 2:
        colour, noun = words
        if colour not in COLOURS:
            raise CaptionError(f"unknown colour word {colour!r} in {caption!r}; known: {', '.join(COLOURS)}")
    else:
        raise CaptionError(f"object phrase {text!r} must be 'a [colour] shape-noun' (in {caption!r})")
    if noun not in SHAPES and noun != "shape":
        raise CaptionError(f"unknown shape word {noun!r} in {caption!r}; known: {', '.join(SHAPES)} (or 'shape')")
    return ObjectPhrase(colour, None if noun == "shape" else noun)


def parse_caption(caption: str) -> CaptionSpec:
    """Text -> :class:`CaptionSpec`; raises :class:`CaptionError` naming the offending word or structure."""
    if not isinstance(caption, str):
        raise CaptionError(f"caption must be a str, got {type(caption).__name__}")
    text = " ".join(caption.lower().strip().rstrip(".").split())
    background = None
    if " on " in text:
        text, background = text.rsplit(" on ", 1)
        if background not in BACKGROUNDS:
            raise CaptionError(f"unknown background word {background!r} in {caption!r}; "
                               f"known: {', '.join(BACKGROUNDS)}")
    for phrase, label in RELATIONS.items():
        if f" {phrase} " in text:
            a, b = text.split(f" {phrase} ", 1)
            return CaptionSpec((_parse_object(a, caption), _parse_object(b, caption)), label, background)
    if " and " in text:
        head, last = text.rsplit(" and ", 1)
        parts = head.split(", ") + [last]
    else:
        parts = [text]
    if len(parts) > 3:
        raise CaptionError(f"a caption names 1 to 3 objects, got {len(parts)} in {caption!r}")
    return CaptionSpec(tuple(_parse_object(p, caption) for p in parts), None, background)
