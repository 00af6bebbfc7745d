"""Prompt -> (subject, relation, object) triplets: which words' attention maps Learn-to-Steer's relation
classifier compares, and which relation class its loss targets.

Learn-to-Steer (Yiflach, Atzmon & Chechik, "Data-Driven Loss Functions for Inference-Time Optimization in
Text-to-Image", WACV 2026) parses each prompt into (obj1, rel, obj2) triplets and normalises relation synonyms
to its class names (methods.md §4.4). The reference does this with a spaCy pipeline; this module uses a few
explicit rules instead (methods.md §9), in pure Python:

* a ShapesWorld caption (:func:`jaxdiff.shapesworld.captions.parse_caption`) gives its one relation exactly, with
  the shape nouns as object words ("shape" where the caption leaves the shape unnamed);
* any other prompt is read GenEval / T2I-CompBench style::

      [a photo of] [a|an|the] [adjectives] NOUN RELATION [a|an|the] [adjectives] NOUN [context, e.g. "on grass"]

  with several such clauses joined by " and " or ","; relation phrases are matched longest first ("on the left
  of" before "left of"); a noun phrase's word is its last word, or its last two words when they form a known
  two-word COCO noun ("teddy bear", "hot dog", ...).

Relation classes are GenEval's labels for the four spatial relations plus the paper's attribute class "is";
prompts never yield "is" here ("a red circle" is not a relation), only an explicit ``--relation`` flag can.
Non-directional phrases ("next to", "near", "on the left" without an object) are not relations here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from jaxdiff.shapesworld.captions import CaptionError, parse_caption

RELATION_CLASSES = ("left of", "right of", "above", "below", "is")
SPATIAL = RELATION_CLASSES[:4]


class RelationError(ValueError):
    """A relation phrase, flag or prompt this module cannot turn into a triplet."""


@dataclass(frozen=True)
class Triplet:
    """``subject relation object``; subject/object are the prompt words whose attention maps are used (one word
    or a multi-word noun such as "teddy bear"); relation is one of :data:`RELATION_CLASSES`."""
    subject: str
    relation: str
    object: str

    def __post_init__(self):
        if self.relation not in RELATION_CLASSES:
            raise RelationError(f"unknown relation class {self.relation!r}; known: {', '.join(RELATION_CLASSES)}")
        for role in ("subject", "object"):
            value = getattr(self, role)
            if not isinstance(value, str) or not value.strip():
                raise RelationError(f"triplet {role} must be a non-empty word, got {value!r}")


def _synonyms() -> dict[str, str]:
    table = {label: label for label in RELATION_CLASSES}
    for side in ("left", "right"):
        for form in ("{} of", "to the {} of", "on the {} of", "on the {} side of", "at the {} of",
                     "to the {} side of", "at the {} side of"):
            table[form.format(side)] = f"{side} of"
    for phrase in ("over", "on top of", "on the top of", "atop", "at the top of"):
        table[phrase] = "above"
    for phrase in ("under", "underneath", "beneath", "on the bottom of", "at the bottom of"):
        table[phrase] = "below"
    return table


SYNONYMS: dict[str, str] = _synonyms()
"""Relation phrase -> class label (the labels themselves included)."""

_PHRASES = {tuple(phrase.split()): label for phrase, label in SYNONYMS.items() if label != "is"}
_LONGEST = max(len(words) for words in _PHRASES)

TWO_WORD_NOUNS = frozenset({
    "teddy bear", "hot dog", "traffic light", "fire hydrant", "stop sign", "parking meter", "baseball bat",
    "baseball glove", "tennis racket", "wine glass", "cell phone", "potted plant", "dining table", "sports ball",
    "hair drier"})
"""Two-word COCO class names kept whole as a noun (their last word alone would name a different thing)."""

_PREFIXES = (("a", "photo", "of"), ("a", "photograph", "of"), ("an", "image", "of"), ("a", "picture", "of"))
_ARTICLES = frozenset({"a", "an", "the"})
# Words that end a noun phrase: trailing context ("on grass", "in a room", "with a hat") and clause joints.
_CONTEXT = frozenset({"on", "in", "at", "with", "near", "next"})
_OBJECT_STOPS = _CONTEXT | {"and", ",", "that", "which", "who", "while", "where", "by", "beside", "behind",
                            "inside", "from"}
# Verbs and adverbs that sit between a noun and the relation ("the dog is sitting left of ..."); dropped from
# the end of a noun phrase.
_FILLERS = frozenset({
    "is", "are", "was", "were", "be", "being", "sits", "sit", "sitting", "stands", "stand", "standing", "placed",
    "located", "positioned", "lies", "lying", "hangs", "hanging", "floats", "floating", "flies", "flying", "rests",
    "resting", "perched", "parked", "appears", "seen", "shown", "visible", "directly", "just", "slightly"})


def _clean(text: str) -> str:
    return " ".join(text.lower().replace("_", " ").split())


def normalise_relation(text: str) -> str:
    """A relation phrase ("to the left of", "on top of", "beneath", ...) -> its class in :data:`RELATION_CLASSES`.
    Raises :class:`RelationError` listing the known phrases."""
    if not isinstance(text, str):
        raise RelationError(f"relation must be a str, got {type(text).__name__}")
    phrase = _clean(text)
    if phrase not in SYNONYMS:
        raise RelationError(f"unknown relation {text!r}; known: {', '.join(repr(p) for p in SYNONYMS)}")
    return SYNONYMS[phrase]


def parse_relation_flag(text: str) -> Triplet:
    """The CLI's explicit form ``"dog,left of,teddy bear"`` -> :class:`Triplet` (fields stripped, lower case,
    relation normalised)."""
    form = "expected 'SUBJECT,RELATION,OBJECT', e.g. 'dog,left of,teddy bear'"
    if not isinstance(text, str):
        raise RelationError(f"relation flag must be a str, got {type(text).__name__}; {form}")
    fields = [" ".join(f.lower().split()) for f in text.split(",")]
    if len(fields) != 3 or not all(fields):
        raise RelationError(f"bad relation {text!r}: {form}")
    subject, relation, obj = fields
    return Triplet(subject, normalise_relation(relation), obj)


def _words(prompt: str) -> list[str]:
    """Lower-case words and commas (";" and ":" count as commas); other punctuation dropped."""
    return re.findall(r"\w[\w'\-]*|,", prompt.lower().replace(";", ",").replace(":", ","))


def _head_noun(words: list[str]) -> str | None:
    """The word of a noun phrase whose attention map is used: the last word (after trailing fillers), or a known
    two-word noun whole. ``None`` when nothing noun-like is left."""
    words = list(words)
    while words and (words[-1] in _FILLERS or words[-1] in _ARTICLES):
        words.pop()
    if not words:
        return None
    if len(words) >= 2 and f"{words[-2]} {words[-1]}" in TWO_WORD_NOUNS:
        return f"{words[-2]} {words[-1]}"
    return words[-1]


def _subject_phrase(words: list[str]) -> list[str]:
    """The subject noun phrase of the words before a relation: up to the first context word ("a dog on grass"
    -> "a dog"); when that leaves nothing ("in a kitchen a cup"), the words after the last context word."""
    chunks, chunk = [], []
    for word in words:
        if word in _CONTEXT:
            chunks.append(chunk)
            chunk = []
        else:
            chunk.append(word)
    chunks.append(chunk)
    return chunks[0] if _head_noun(chunks[0]) else chunks[-1]


def _match_relation(words: list[str], i: int) -> tuple[int, str] | None:
    """The longest relation phrase starting at ``words[i]``: (length, label), or ``None``."""
    for n in range(min(_LONGEST, len(words) - i), 0, -1):
        label = _PHRASES.get(tuple(words[i:i + n]))
        if label is not None:
            return n, label
    return None


def _shapesworld(prompt: str) -> tuple[Triplet, ...] | None:
    """The triplet of a ShapesWorld caption (empty when it names no relation); ``None`` if not a caption."""
    try:
        spec = parse_caption(prompt)
    except CaptionError:
        return None
    if spec.relation is None:
        return ()
    a, b = spec.objects
    return (Triplet(a.shape or "shape", spec.relation, b.shape or "shape"),)


def parse_relations(prompt: str) -> tuple[Triplet, ...]:
    """The spatial relations a prompt names, in order (empty when none). See the module docstring for the rules;
    methods.md §4.4 for how Learn-to-Steer uses them (the loss cycles through the triplets)."""
    if not isinstance(prompt, str):
        raise RelationError(f"prompt must be a str, got {type(prompt).__name__}")
    caption = _shapesworld(prompt)
    if caption is not None:
        return caption
    words = _words(prompt)
    for prefix in _PREFIXES:
        if tuple(words[:len(prefix)]) == prefix:
            words = words[len(prefix):]
            break
    # Relation phrases, left to right, longest match at each position: (start, end, label).
    found, i = [], 0
    while i < len(words):
        match = _match_relation(words, i)
        if match is None:
            i += 1
        else:
            found.append((i, i + match[0], match[1]))
            i += match[0]
    triplets = []
    for k, (start, end, label) in enumerate(found):
        # Subject: the words since the last clause joint (or the previous relation phrase) before this one.
        left = found[k - 1][1] if k else 0
        for j in range(start - 1, left - 1, -1):
            if words[j] in ("and", ","):
                left = j + 1
                break
        subject = _head_noun(_subject_phrase(words[left:start]))
        # Object: the words after the phrase up to trailing context, a clause joint or the next relation phrase.
        right = found[k + 1][0] if k + 1 < len(found) else len(words)
        stop = next((j for j in range(end, right) if words[j] in _OBJECT_STOPS), right)
        obj = _head_noun(words[end:stop])
        if subject is not None and obj is not None:
            triplets.append(Triplet(subject, label, obj))
    return tuple(triplets)


def require_relations(prompt: str) -> tuple[Triplet, ...]:
    """:func:`parse_relations`, raising :class:`RelationError` when the prompt names no spatial relation."""
    triplets = parse_relations(prompt)
    if not triplets:
        raise RelationError(f"prompt has no spatial relation: {prompt!r}; name one ('a X to the left of a Y') "
                            "or give --relation 'X,left of,Y'")
    return triplets


def check_words_in_prompt(triplet: Triplet, prompt: str) -> None:
    """Raise :class:`RelationError` unless the triplet's subject and object are whole words (or word sequences)
    of the prompt: their attention maps come from the prompt's tokens."""
    words = [w for w in _words(prompt) if w != ","]
    for role in ("subject", "object"):
        target = _words(getattr(triplet, role))
        n = len(target)
        if not n or not any(words[i:i + n] == target for i in range(len(words) - n + 1)):
            raise RelationError(f"relation {role} {getattr(triplet, role)!r} is not a word of the prompt {prompt!r}; "
                                "name it in the prompt or change --relation")
