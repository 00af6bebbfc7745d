"""Measure the ShapesWorld judge's own accuracy and print RESULTS-ready markdown tables (issue 5, part 2).

    .venv/bin/python -m train.shapesworld_judge_accuracy            # 1000 + 1200 scenes, ~1-2 min on 2 cores
    .venv/bin/python -m train.shapesworld_judge_accuracy --n 200 --eval-n 240 --json out/judge.json

Scene sets (both held out: their seeds share no stream with the training split):

* "judge" split: the training distribution (1-3 objects, every 2-object scene in one relation);
* "eval" split: the evaluation-caption scenes (every attribute named; 1 object, each of the 4 relations,
  3 objects, in equal numbers).

Each image is judged as rendered ("clean") and after a mild degradation standing in for a generated image
("degraded": Gaussian blur sigma 0.7 px, Gaussian noise std 4/255, JPEG quality 85 with 4:2:0 chroma
subsampling; see ``jaxdiff.shapesworld.imageops.degrade``). See ``jaxdiff.shapesworld.accuracy`` for what
each row counts.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time

from jaxdiff.shapesworld.accuracy import CHECKS, RECOGNITION, Tally, measure
from jaxdiff.shapesworld.imageops import degrade
from jaxdiff.shapesworld.params import WORLD
from jaxdiff.shapesworld.world import make_eval_scene, make_scene

UNITS = {"count": "scene", "colour": "object", "shape": "object", "size": "object", "background": "scene",
         "relation": "2-object scene"}


def table(title: str, clean: Tally, degraded: Tally) -> str:
    rows = [f"**{title}**", "", "| measurement | attribute | unit | clean | degraded |", "|---|---|---|---|---|"]
    for name in RECOGNITION:
        rows.append(f"| recognition | {name} | {UNITS[name]} | {clean.cell(name, 2)} | {degraded.cell(name, 2)} |")
    for kind in ("accept", "reject"):
        for name in CHECKS:
            key = f"{kind} {name}"
            if key in clean.counts:
                rows.append(f"| caption check, {kind} | {name} | caption | {clean.cell(key, 2)} | "
                            f"{degraded.cell(key, 2)} |")
    return "\n".join(rows)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="held-out training-distribution scenes (split 'judge')")
    ap.add_argument("--eval-n", type=int, default=1200, help="evaluation-caption scenes (split 'eval')")
    ap.add_argument("--blur", type=float, default=0.7, help="degradation: Gaussian blur sigma, px")
    ap.add_argument("--noise", type=float, default=4.0, help="degradation: noise std in 0..255 units")
    ap.add_argument("--jpeg", type=int, default=85, help="degradation: JPEG quality (0 = no JPEG)")
    ap.add_argument("--json", help="also write the raw counts here")
    args = ap.parse_args(argv)
    deg = functools.partial(degrade, blur_sigma=args.blur, noise_std=args.noise, jpeg_quality=args.jpeg)
    sets = {f"Held-out training-distribution scenes (split judge, n={args.n})":
            [make_scene(i, "judge") for i in range(args.n)],
            f"Evaluation-caption scenes (split eval, n={args.eval_n})":
            [make_eval_scene(i) for i in range(args.eval_n)]}
    out, t0 = {}, time.time()
    print(f"Judge accuracy; degraded = blur sigma {args.blur} px + noise std {args.noise}/255 + JPEG q{args.jpeg}.")
    print(f"World: {dataclasses.asdict(WORLD)}\n")
    for title, scenes in sets.items():
        clean, degraded = measure(scenes), measure(scenes, deg)
        print(table(title, clean, degraded) + "\n")
        out[title] = {"clean": clean.counts, "degraded": degraded.counts}
    print(f"({time.time() - t0:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"degradation": {"blur": args.blur, "noise": args.noise, "jpeg": args.jpeg},
                       "world": dataclasses.asdict(WORLD), "results": out}, f, indent=1)
    return out


if __name__ == "__main__":
    main()
