"""Accuracy of the judge itself on rendered scenes with known ground truth (issue 5: >= 98% per attribute).

Two kinds of measurement per scene:

* **recognition**: the judge's detection against the ground truth. Each true object is matched to the
  detected object with the largest mask overlap. count: number of detected objects == true number (per
  scene); colour / shape / size: the matched object's label (per true object, unmatched = wrong);
  background: per scene; relation (2-object scenes): the GenEval relation set of the detected boxes equals
  the set of the true boxes.
* **caption checks**: ``score_caption`` on the scene's full true caption must pass each check ("accept"),
  and on a caption with exactly one attribute made false must fail that check ("reject"). Corruptions:
  one object's colour or shape replaced by another value, another background, and a *perpendicular*
  relation (a swapped "left of"/"right of" could be satisfied by swapping two identical-looking objects).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from jaxdiff.shapesworld.captions import CaptionSpec
from jaxdiff.shapesworld.judge import JUDGE, Detection, JudgeParams, detect, score_caption
from jaxdiff.shapesworld.params import BACKGROUNDS, COLOURS, SHAPES
from jaxdiff.shapesworld.spatial import geneval_relations
from jaxdiff.shapesworld.world import Scene

RECOGNITION = ("count", "colour", "shape", "size", "background", "relation")
CHECKS = ("count", "colour", "shape", "background", "relation")
_PERPENDICULAR = {"left of": ("above", "below"), "right of": ("above", "below"),
                  "above": ("left of", "right of"), "below": ("left of", "right of")}


@dataclass
class Tally:
    """name -> [correct, total]."""
    counts: dict = field(default_factory=dict)

    def add(self, name: str, ok: bool):
        c = self.counts.setdefault(name, [0, 0])
        c[0] += int(bool(ok))
        c[1] += 1

    def rate(self, name: str) -> float:
        c, n = self.counts.get(name, (0, 0))
        return c / n if n else float("nan")

    def cell(self, name: str, digits: int = 1) -> str:
        """``"97.5% (39/40)"`` for a markdown table, ``"-"`` when nothing was counted."""
        c, n = self.counts.get(name, (0, 0))
        return f"{100 * c / n:.{digits}f}% ({c}/{n})" if n else "-"


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def recognition(scene: Scene, det: Detection, tally: Tally) -> None:
    tally.add("count", len(det.objects) == len(scene.objects))
    matched = []
    for o in scene.objects:
        ious = [_iou(o.mask, d.mask) for d in det.objects]
        m = det.objects[int(np.argmax(ious))] if ious and max(ious) > 0 else None
        matched.append(m)
        for attr in ("colour", "shape", "size"):
            tally.add(attr, m is not None and getattr(m, attr) == getattr(o, attr))
    tally.add("background", det.background == scene.background)
    if scene.relation is not None:
        a, b = matched
        truth = geneval_relations(scene.objects[0].box, scene.objects[1].box)
        tally.add("relation", a is not None and b is not None and geneval_relations(a.box, b.box) == truth)


def corruptions(spec: CaptionSpec, rng: np.random.Generator) -> dict:
    """attribute -> a copy of ``spec`` with that one attribute made false."""
    out = {}
    i = int(rng.integers(len(spec.objects)))
    for attr, values in (("colour", COLOURS), ("shape", SHAPES)):
        objs = list(spec.objects)
        old = getattr(objs[i], attr)
        objs[i] = replace(objs[i], **{attr: str(rng.choice([v for v in values if v != old]))})
        out[attr] = replace(spec, objects=tuple(objs))
    out["background"] = replace(spec, background=str(rng.choice([b for b in BACKGROUNDS if b != spec.background])))
    if spec.relation is not None:
        out["relation"] = replace(spec, relation=str(rng.choice(_PERPENDICULAR[spec.relation])))
    return out


def caption_checks(scene: Scene, det: Detection, rng: np.random.Generator, tally: Tally,
                   params: JudgeParams = JUDGE) -> None:
    full = score_caption(None, scene.full_spec, params, detection=det)
    for name, check in full.checks.items():
        tally.add(f"accept {name}", check.passed)
    for name, spec in corruptions(scene.full_spec, rng).items():
        tally.add(f"reject {name}", not score_caption(None, spec, params, detection=det).checks[name].passed)


def measure(scenes, degrade_fn=None, params: JudgeParams = JUDGE, seed: int = 0) -> Tally:
    """Tally recognition and caption checks over ``scenes``; ``degrade_fn(image, rng)`` (e.g.
    :func:`imageops.degrade`) is applied to each image first when given."""
    tally = Tally()
    for scene in scenes:
        rng = np.random.default_rng([seed, scene.index])
        image = scene.image if degrade_fn is None else degrade_fn(scene.image, rng)
        det = detect(image, params)
        recognition(scene, det, tally)
        caption_checks(scene, det, rng, tally, params)
    return tally
