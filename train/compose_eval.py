"""``python -m train.compose_eval``: every method in one sampling run, measured on ShapesWorld (issue 15, item 7).

    python -m train.compose_eval                     # 30 captions, every row
    python -m train.compose_eval --captions 10 --rows plain all

Captions: the held-out relation captions of the baseline table with the colours left unnamed ("a circle to the
left of a square on grass"); reference: an object-free ShapesWorld background of the caption's kind
(:func:`jaxdiff.shapesworld.make_reference_scene`). Every row is img2img from that reference at strength 0.9,
seed 0, 30 steps, guidance 7.5, on the same noise, built by the CLI's own flag handlers
(:func:`sample.cli.concept_settings`, :func:`sample.cli.relation_settings`, :func:`sample.cli.background_settings`):

* ``plain``: no steering;
* ``concepts``: ``--concepts sdisc --fair colour`` (one colour concept per image, balanced);
* ``l2s``: ``--steer-relations`` (the shipped classifier);
* ``ags``: ``--keep-background`` (subjects: both shapes);
* ``all``: the three together, composed in that order (concept edits, then the relation pre-step hook, then
  the background post-step hook).

Metrics: relation accuracy (GenEval's rule), the colour deviation ratio of the drawn objects (pooled over the
images; 0 = balanced over the five colours, 1 = one colour), background PSNR against the reference outside the
objects (judge masks dilated 2 px). Batches are cached under ``--out``; the table goes between the ``compose``
markers of ``--results``.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

MARK_START, MARK_END = "<!-- compose:start -->", "<!-- compose:end -->"
ROWS = ("plain", "concepts", "l2s", "ags", "all")
FLAGS = {"plain": {}, "concepts": {"concepts": "sdisc", "fair": "colour"}, "l2s": {"steer_relations": "shipped"},
         "ags": {"keep_background": True}}
FLAGS["all"] = {**FLAGS["concepts"], **FLAGS["l2s"], **FLAGS["ags"]}
TITLES = {"plain": "img2img 0.9, no steering", "concepts": "concepts (SDisc, --fair colour)",
          "l2s": "Learn-to-Steer", "ags": "Abs-Grad-SAM (--keep-background)",
          "all": "all three in one run"}


def items(n: int):
    """(caption without colours, reference scene) for the first ``n`` relation captions of the baseline."""
    from jaxdiff.shapesworld import BACKGROUNDS, CaptionSpec, ObjectPhrase, format_caption, make_reference_scene
    from train.relations_eval import relation_captions

    out, used = [], Counter()
    for _, caption in relation_captions()[:n]:
        from jaxdiff.shapesworld import parse_caption
        spec = parse_caption(caption)
        plain = CaptionSpec(tuple(ObjectPhrase(None, o.shape) for o in spec.objects), spec.relation,
                            spec.background)
        k = BACKGROUNDS.index(spec.background)
        ref = make_reference_scene(k + len(BACKGROUNDS) * used[k])
        used[k] += 1
        out.append((format_caption(plain), ref))
    return out


def run_batch(model, row: str, chunk, args) -> dict:
    from jaxdiff.shapesworld import background_psnr, detect, score_caption
    from sample.cli import background_settings, concept_settings, relation_settings
    from sample.concepts import concept_run
    from sample.shapesworld_eval import caption_noise
    from sample.spec import SampleSpec
    from sample.steering import compose

    prompts = [c for c, _ in chunk]
    refs = np.stack([r.image for _, r in chunk])
    spec = SampleSpec(steps=args.steps, guidance=args.guidance, strength=0.9)
    noise = caption_noise(model, spec, args.seed, [r.index for _, r in chunk])
    s = {"seed": args.seed, **FLAGS[row]}
    table, weights, per_image, _ = concept_settings(s, model, spec, len(prompts), refs.shape[1:3])
    relations, _ = relation_settings(s, model, spec, prompts, refs.shape[1:3])
    background, _ = background_settings(s, model, spec, prompts, refs, noise)
    extra = None if relations is None and background is None else compose(relations, background)
    t0 = time.perf_counter()
    res, _ = concept_run(model, prompts, spec=spec, seed=args.seed, table=table, weights=weights,
                         init_latents=noise, init_image=refs, extra=extra)
    seconds = time.perf_counter() - t0
    images = []
    for k, (img, (caption, ref)) in enumerate(zip(res.images, chunk)):
        det = detect(img)
        score = score_caption(img, caption, detection=det)
        images.append({"caption": caption, "relation": score.checks["relation"].passed,
                       "shapes": score.checks["shape"].passed, "colours": [o.colour for o in det.objects],
                       "psnr": background_psnr(img, ref.image),
                       "concepts": None if per_image is None else per_image[k]})
    return {"row": row, "seconds": seconds, "compiled": res.timings.get("compiled"), "images": images}


def summarise(batches: list[dict]) -> dict:
    from jaxdiff.shapesworld import COLOURS, deviation_ratio

    imgs = [im for b in batches for im in b["images"]]
    counts = Counter(c for im in imgs for c in im["colours"] if c is not None)
    timed = [b for b in batches if not b.get("compiled")] or batches
    return {"n": len(imgs), "relation": float(np.mean([im["relation"] for im in imgs])),
            "shapes": float(np.mean([im["shapes"] for im in imgs])),
            "deviation": deviation_ratio([counts[c] for c in COLOURS]),
            "colours": {c: counts[c] for c in COLOURS},
            "psnr": float(np.mean(np.minimum([im["psnr"] for im in imgs], 99.0))),
            "s_per_image": sum(b["seconds"] for b in timed) / sum(len(b["images"]) for b in timed)}


def table(summaries: dict) -> str:
    from jaxdiff.shapesworld import COLOURS

    lines = ["| row | images | relation accuracy | both shapes drawn | colour deviation ratio (objects: "
             + ", ".join(COLOURS) + ") | background PSNR (dB) | s / image |", "|---|---|---|---|---|---|---|"]
    for row, s in summaries.items():
        cols = "/".join(str(s["colours"][c]) for c in COLOURS)
        lines.append(f"| {TITLES[row]} | {s['n']} | {100 * s['relation']:.1f}% | {100 * s['shapes']:.1f}% | "
                     f"{s['deviation']:.3f} ({cols}) | {s['psnr']:.2f} | {s['s_per_image']:.2f} |")
    return "\n".join(lines)


def run(args) -> dict:
    import jax

    from sample.cli import load_model
    from sample.outputs import write_json_atomic
    from train.shapesworld_baseline import publish

    model = load_model(args.model, "float32")
    chosen = items(args.captions)
    out = Path(args.out)
    log = (lambda m: print(f"[compose_eval] {m}", flush=True))
    results = {}
    for row in args.rows:
        results[row] = []
        for lo in range(0, len(chosen), args.batch):
            path = out / row / f"{lo:04d}.json"
            if path.exists():
                results[row].append(json.loads(path.read_text()))
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            batch = run_batch(model, row, chosen[lo:lo + args.batch], args)
            write_json_atomic(path, batch)
            results[row].append(batch)
            s = summarise(results[row])
            log(f"{row}: {s['n']} images, relation {100 * s['relation']:.1f}%, deviation {s['deviation']:.3f}, "
                f"PSNR {s['psnr']:.2f} dB, {s['s_per_image']:.2f} s/image")
    summaries = {row: summarise(b) for row, b in results.items() if b}
    text = "\n".join([
        MARK_START, "",
        f"Measured {time.strftime('%Y-%m-%d')} by `python -m train.compose_eval` ({platform.machine()} "
        f"{jax.default_backend()}): embedded ShapesWorld model, {len(chosen)} relation captions without colours, "
        f"img2img from an object-free reference of the caption's background at strength 0.9, seed {args.seed}, "
        f"{args.steps} steps, guidance {args.guidance}, the same noise in every row.", "", table(summaries), "",
        MARK_END])
    publish(text, out, {"settings": vars(args), "summaries": summaries}, args.results, (MARK_START, MARK_END), log)
    return summaries


def main(argv=None) -> int:
    from train.shapesworld_baseline import method_eval_parser

    ap = method_eval_parser("python -m train.compose_eval", __doc__, ROWS, "runs/compose/eval")
    ap.add_argument("--captions", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=30)
    run(ap.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
