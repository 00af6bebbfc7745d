"""Learn-to-Steer prompt parsing (methods.md §4.4, §9): relation synonyms, ShapesWorld captions, GenEval /
T2I-CompBench-style prompts, the explicit --relation flag and the prompt-word check. Pure Python, fast."""

from __future__ import annotations

import dataclasses

import pytest

from jaxdiff.shapesworld import RELATION_LABELS, SHAPES, CaptionSpec, ObjectPhrase, format_caption
from jaxdiff.steer.relation_prompts import (RELATION_CLASSES, SPATIAL, SYNONYMS, RelationError, Triplet,
                                            check_words_in_prompt, normalise_relation, parse_relation_flag,
                                            parse_relations, require_relations)


def test_classes():
    assert RELATION_CLASSES == ("left of", "right of", "above", "below", "is")
    assert SPATIAL == ("left of", "right of", "above", "below")
    assert SPATIAL == RELATION_LABELS  # ShapesWorld's labels are GenEval's: one vocabulary
    assert issubclass(RelationError, ValueError)


def test_triplet_is_frozen_and_checked():
    t = Triplet("dog", "left of", "cat")
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.subject = "cat"
    with pytest.raises(RelationError, match="unknown relation class"):
        Triplet("dog", "to the left of", "cat")
    with pytest.raises(RelationError, match="subject"):
        Triplet(" ", "above", "cat")


SYNONYM_TABLE = {
    "left of": ["left of", "to the left of", "on the left of", "on the left side of", "at the left of",
                "to the left side of"],
    "right of": ["right of", "to the right of", "on the right of", "on the right side of", "at the right of",
                 "to the right side of"],
    "above": ["above", "over", "on top of", "on the top of", "atop"],
    "below": ["below", "under", "underneath", "beneath", "on the bottom of", "at the bottom of"],
    "is": ["is"],
}


@pytest.mark.parametrize("label,phrase", [(label, p) for label, ps in SYNONYM_TABLE.items() for p in ps])
def test_normalise_relation(label, phrase):
    assert normalise_relation(phrase) == label
    assert normalise_relation(f"  {phrase.upper()} ") == label  # case and spacing do not matter
    assert SYNONYMS[phrase] == label


@pytest.mark.parametrize("bad", ["next to", "near", "left", "on the left", "", "behind"])
def test_normalise_relation_unknown(bad):
    with pytest.raises(RelationError, match="unknown relation") as e:
        normalise_relation(bad)
    message = str(e.value)
    assert "\n" not in message and "'to the left of'" in message and "'beneath'" in message


def test_normalise_relation_not_a_string():
    with pytest.raises(RelationError, match="str"):
        normalise_relation(None)


# ShapesWorld captions: the exact caption parser decides; the object words are the shape nouns.
@pytest.mark.parametrize("relation", RELATION_LABELS)
def test_shapesworld_captions_all_relations(relation):
    spec = CaptionSpec((ObjectPhrase("red", "circle"), ObjectPhrase("blue", "square")), relation, "grass")
    caption = format_caption(spec)
    assert parse_relations(caption) == (Triplet("circle", relation, "square"),)
    assert parse_relations(caption.capitalize() + ".") == (Triplet("circle", relation, "square"),)


def test_shapesworld_unnamed_shape_is_shape():
    assert parse_relations("a green shape above a triangle") == (Triplet("shape", "above", "triangle"),)
    assert parse_relations("a circle below an orange shape on sand") == (Triplet("circle", "below", "shape"),)
    assert parse_relations("a shape to the right of a shape") == (Triplet("shape", "right of", "shape"),)


@pytest.mark.parametrize("caption", ["a shape on sand", "a red circle", "a circle and a square",
                                     "a red circle, a blue square and a green triangle on grass"])
def test_shapesworld_without_relation(caption):
    assert parse_relations(caption) == ()


@pytest.mark.parametrize("shape", SHAPES)
def test_shapesworld_words_are_in_caption(shape):
    caption = f"a {shape} to the left of a shape on grass"
    (t,) = parse_relations(caption)
    check_words_in_prompt(t, caption)


GENEVAL = [
    ("a photo of a dog to the left of a teddy bear", [("dog", "left of", "teddy bear")]),
    ("a photo of a teddy bear to the right of a dog", [("teddy bear", "right of", "dog")]),
    ("a bench on the left of a cup", [("bench", "left of", "cup")]),
    ("a cat on top of a car", [("cat", "above", "car")]),
    ("a cup under a table", [("cup", "below", "table")]),
    ("a red apple beneath a green umbrella on a beach", [("apple", "below", "umbrella")]),
    ("an image of a hot dog above a dining table", [("hot dog", "above", "dining table")]),
    ("a picture of a stop sign below a traffic light", [("stop sign", "below", "traffic light")]),
    ("A photo of a cell phone to the right of a wine glass.", [("cell phone", "right of", "wine glass")]),
    ("a fire hydrant on the right side of a parking meter in a street", [("fire hydrant", "right of",
                                                                          "parking meter")]),
    ("the dog is sitting to the left of the cat", [("dog", "left of", "cat")]),
    ("a bird flying over a lake at sunset", [("bird", "above", "lake")]),
    ("a dog on grass to the right of a cat with a hat", [("dog", "right of", "cat")]),
    ("a lamp atop a small wooden desk near a window", [("lamp", "above", "desk")]),
    ("a ball underneath a chair next to a sofa", [("ball", "below", "chair")]),
    ("a vase on the top of a bookshelf", [("vase", "above", "bookshelf")]),
    ("a shoe at the bottom of a staircase", [("shoe", "below", "staircase")]),
    ("a fox to the left side of a tree", [("fox", "left of", "tree")]),
    ("a teddy bear at the left of a potted plant", [("teddy bear", "left of", "potted plant")]),
    ("in a kitchen a cup to the left of a plate", [("cup", "left of", "plate")]),
    ("two dogs to the left of a sofa", [("dogs", "left of", "sofa")]),
]


@pytest.mark.parametrize("prompt,expected", GENEVAL)
def test_geneval_style_prompts(prompt, expected):
    got = parse_relations(prompt)
    assert got == tuple(Triplet(*t) for t in expected)
    for t in got:
        check_words_in_prompt(t, prompt)


def test_longest_relation_phrase_wins():
    # "on the left of" must not be read as the context word "on" followed by "the left of ..." (no such phrase),
    # nor "on the left side of" as "on the left" + "side of".
    assert parse_relations("a bench on the left of a cup")[0].relation == "left of"
    assert parse_relations("a bench on the left side of a cup") == (Triplet("bench", "left of", "cup"),)
    assert parse_relations("a bench on top of a cup") == (Triplet("bench", "above", "cup"),)


MULTI = [
    ("a dog to the left of a cat and a cat above a bird", [("dog", "left of", "cat"), ("cat", "above", "bird")]),
    ("a cup on the right of a plate, a fork below a knife",
     [("cup", "right of", "plate"), ("fork", "below", "knife")]),
    ("a photo of a hot dog under a teddy bear and a cat to the right of a traffic light on a table",
     [("hot dog", "below", "teddy bear"), ("cat", "right of", "traffic light")]),
    ("a dog left of a cat above a bird", [("dog", "left of", "cat"), ("cat", "above", "bird")]),
    ("a bird above a fish and a tree", [("bird", "above", "fish")]),
]


@pytest.mark.parametrize("prompt,expected", MULTI)
def test_multiple_relations_in_order(prompt, expected):
    assert parse_relations(prompt) == tuple(Triplet(*t) for t in expected)


NO_RELATION = ["a red circle", "a photo of a dog", "a dog next to a cat", "a dog near a cat on grass",
               "a dog on the left and a cat on the right", "a red apple and a green umbrella", "",
               "to the left of", "a cat sitting on a mat", "a photo of a car in a city"]


@pytest.mark.parametrize("prompt", NO_RELATION)
def test_no_relation(prompt):
    assert parse_relations(prompt) == ()
    with pytest.raises(RelationError, match="prompt has no spatial relation") as e:
        require_relations(prompt)
    message = str(e.value)
    assert "\n" not in message and repr(prompt) in message
    assert "'a X to the left of a Y'" in message and "--relation 'X,left of,Y'" in message


def test_require_relations_passes_through():
    prompt = "a dog to the left of a cat and a cat above a bird"
    assert require_relations(prompt) == parse_relations(prompt)
    assert require_relations("a red circle above a blue square") == (Triplet("circle", "above", "square"),)


def test_prompt_not_a_string():
    with pytest.raises(RelationError, match="str"):
        parse_relations(["a dog above a cat"])


@pytest.mark.parametrize("flag,expected", [
    ("dog,left of,teddy bear", ("dog", "left of", "teddy bear")),
    (" Dog , To the Left of ,  Teddy  Bear ", ("dog", "left of", "teddy bear")),
    ("cat,on top of,car", ("cat", "above", "car")),
    ("cup,beneath,table", ("cup", "below", "table")),
    ("apple,is,red", ("apple", "is", "red")),
])
def test_parse_relation_flag(flag, expected):
    assert parse_relation_flag(flag) == Triplet(*expected)


@pytest.mark.parametrize("flag", ["dog left of cat", "dog,left of", "dog,left of,cat,bird", ",left of,cat",
                                  "dog,,cat", "dog,left of, "])
def test_parse_relation_flag_bad_format(flag):
    with pytest.raises(RelationError, match="expected 'SUBJECT,RELATION,OBJECT'") as e:
        parse_relation_flag(flag)
    assert "\n" not in str(e.value)


def test_parse_relation_flag_bad_relation():
    with pytest.raises(RelationError, match="unknown relation 'next to'"):
        parse_relation_flag("dog,next to,cat")
    with pytest.raises(RelationError, match="str"):
        parse_relation_flag(None)


def test_check_words_in_prompt():
    prompt = "A photo of a dog to the left of a teddy bear."
    check_words_in_prompt(Triplet("dog", "left of", "teddy bear"), prompt)
    check_words_in_prompt(Triplet("teddy bear", "right of", "dog"), prompt)
    check_words_in_prompt(Triplet("bear", "right of", "dog"), prompt)  # a whole word of the prompt
    with pytest.raises(RelationError, match="object 'cat' is not a word of the prompt") as e:
        check_words_in_prompt(Triplet("dog", "left of", "cat"), prompt)
    assert "\n" not in str(e.value)
    with pytest.raises(RelationError, match="subject 'do' is not a word"):  # a part of a word is not enough
        check_words_in_prompt(Triplet("do", "left of", "dog"), prompt)
    with pytest.raises(RelationError, match="object 'bear teddy'"):  # word order matters
        check_words_in_prompt(Triplet("dog", "left of", "bear teddy"), prompt)
    with pytest.raises(RelationError, match="subject"):
        check_words_in_prompt(Triplet("?!", "left of", "dog"), prompt)


def test_flag_checked_against_prompt():
    prompt = "a dog playing with a teddy bear"
    assert parse_relations(prompt) == ()
    check_words_in_prompt(parse_relation_flag("dog,left of,teddy bear"), prompt)
