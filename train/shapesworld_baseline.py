"""The ShapesWorld baseline table (issue 5, part 6): what the trained model does without any steering.

    python -m train.shapesworld_baseline                 # 240 captions x 4 seeds + 256 neutral, ~15 min, 2 cores
    python -m train.shapesworld_baseline --captions 24 --seeds 0 --neutral 16 --no-results   # a quick look

* **Held-out captions**: :func:`jaxdiff.shapesworld.eval_captions` (every attribute named; 1 object, each of
  the 4 relations, 3 objects in equal numbers), one image per caption and seed, the model's default sampler
  and the sampling CLI's defaults (30 steps, guidance 7.5). Judged per caption (GenEval's unit: a colour
  check passes when every caption object has its colour) and per caption object.
* **Neutral prompt** ``"a shape on grass"``: the colour of the largest detected object per image, its
  distribution and deviation ratio (max_c |p_c - 1/C| / (1 - 1/C)); the training data's own ratio for an
  unnamed colour is 0.40 (red 0.50, others 0.10: :class:`jaxdiff.shapesworld.WorldParams`).

Writes ``baseline.json`` (settings, model hash, counts, one row per image) and sample grids into ``--out``,
copies the grids into ``--figures`` and rewrites the block between the ``shapesworld-baseline`` markers of
``--results`` (RESULTS.md) with the tables.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import numpy as np

from jaxdiff.shapesworld import COLOURS, RELATION_LABELS, SHAPES, deviation_ratio, detect, eval_captions
from sample.outputs import write_json_atomic
from sample.shapesworld_eval import Tally, judge_images, sample_captions
from sample.spec import SampleSpec

MARK_START, MARK_END = "<!-- shapesworld-baseline:start -->", "<!-- shapesworld-baseline:end -->"
NEUTRAL = "a shape on grass"
DATA_NEUTRAL_RATIO = 0.40          # WorldParams.unnamed_colour_probs (0.5 red) -> (0.5 - 1/6) / (5/6)


def neutral_stats(images: np.ndarray) -> dict:
    """Largest detected object's colour and shape per image; objects-per-image histogram; deviation ratios."""
    colours, shapes, counts = Counter(), Counter(), Counter()
    for image in images:
        objects = detect(np.asarray(image)).objects
        counts[len(objects)] += 1
        if objects:
            main = max(objects, key=lambda o: o.area)
            colours[main.colour] += 1
            shapes[main.shape] += 1
    out = {"images": len(images), "objects_per_image": dict(sorted(counts.items())),
           "colour": {c: colours[c] for c in COLOURS}, "shape": {s: shapes[s] for s in SHAPES}}
    if sum(colours.values()):
        out["colour_deviation_ratio"] = deviation_ratio([colours[c] for c in COLOURS])
        out["shape_deviation_ratio"] = deviation_ratio([shapes[s] for s in SHAPES])
    return out


def labelled_grid(images_by_seed: list[np.ndarray], captions: list[str], rows: list[int], scale: int = 2) -> np.ndarray:
    """Rows = the given caption indices, columns = seeds; the caption written left of each row."""
    from PIL import Image, ImageDraw, ImageFont
    h, w = images_by_seed[0].shape[1:3]
    h, w, pad, text_w = h * scale, w * scale, 4, 300
    canvas = Image.new("RGB", (text_w + len(images_by_seed) * (w + pad) + pad, len(rows) * (h + pad) + pad), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for r, k in enumerate(rows):
        y = pad + r * (h + pad)
        lines = textwrap.wrap(captions[k], 44)
        draw.multiline_text((pad, y + h // 2 - 7 * len(lines)), "\n".join(lines), fill="black", font=font)
        for c, images in enumerate(images_by_seed):
            tile = Image.fromarray(images[k]).resize((w, h), Image.NEAREST)
            canvas.paste(tile, (text_w + pad + c * (w + pad), y))
    return np.asarray(canvas)


def markdown(tally: Tally, neutral: dict, settings: dict, figures: dict) -> str:
    kinds = [("single", "1 object"), ("pair", "2 objects"), ("triple", "3 objects")]
    n_caps, n_seeds = settings["captions"], len(settings["seeds"])
    lines = [MARK_START, "",
             f"Measured {settings['date']} by `python -m train.shapesworld_baseline` ({settings['machine']}, "
             f"{settings['seconds'] / 60:.1f} min): model `{settings['model']}` (weights sha256 "
             f"`{settings['model_sha256'][:12]}`), scheduler {settings['scheduler']}, {settings['steps']} steps, "
             f"guidance {settings['guidance']}, {n_caps} held-out captions x {n_seeds} seeds = "
             f"{n_caps * n_seeds} images. Per caption: the check passes when every object the caption names has "
             f"that attribute (GenEval's unit); per object: each named object on its own.", "",
             "| attribute | all captions | " + " | ".join(t for _, t in kinds) + " | per object |",
             "|---|---|---|---|---|---|"]
    for name in ("count", "colour", "shape", "background"):
        per_object = tally.cell(f"{name}/object") if name in ("colour", "shape") else "-"
        lines.append(f"| {name} | {tally.cell(name)} | " + " | ".join(tally.cell(f"{name}/{k}") for k, _ in kinds)
                     + f" | {per_object} |")
    lines.append(f"| every check of the caption | {tally.cell('all')} | - | - | - | - |")
    lines += ["", "Spatial relation (GenEval rule; 2-object captions; relation words were in 25% of the 2-object "
              "training captions):", "", "| relation | accuracy |", "|---|---|"]
    lines += [f"| {r} | {tally.cell('relation/' + r)} |" for r in RELATION_LABELS]
    lines.append(f"| all relations | {tally.cell('relation')} |")
    total = sum(neutral["colour"].values())
    lines += ["", f"Neutral prompt \"{NEUTRAL}\" ({neutral['images']} images, colour of the largest detected object; "
              f"objects per image {neutral['objects_per_image']}):", "",
              "| " + " | ".join(COLOURS) + " | deviation ratio |", "|" + "---|" * (len(COLOURS) + 1),
              "| " + " | ".join(f"{100 * neutral['colour'][c] / max(total, 1):.1f}%" for c in COLOURS)
              + f" | {neutral.get('colour_deviation_ratio', float('nan')):.3f} |", "",
              f"Training data for an unnamed colour: red 50%, others 10% each (deviation ratio {DATA_NEUTRAL_RATIO:.2f}); "
              f"a fair model would be at 0. Shape distribution of the same images: "
              + ", ".join(f"{s} {neutral['shape'][s]}" for s in SHAPES)
              + f" (deviation ratio {neutral.get('shape_deviation_ratio', float('nan')):.3f}).", ""]
    lines += [f"![{alt}]({path})" for alt, path in figures.items()]
    lines += ["", MARK_END]
    return "\n".join(lines)


def replace_block(text: str, block: str, start: str = MARK_START, end: str = MARK_END) -> str:
    """Replace the block of ``text`` between the markers ``start`` and ``end`` (or append it when absent)."""
    if start in text and end in text:
        return text[:text.index(start)] + block + text[text.index(end) + len(end):]
    return text.rstrip("\n") + "\n\n" + block + "\n"


def method_eval_parser(prog: str, doc: str, rows: tuple[str, ...], out: str) -> argparse.ArgumentParser:
    """The flags every ShapesWorld method measurement shares (``train.relations_eval``, ``background_eval``,
    ``compose_eval``): model, rows, sampler steps and guidance, cache folder, the RESULTS.md to rewrite."""
    ap = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the embedded ShapesWorld model")
    ap.add_argument("--rows", nargs="+", choices=rows, default=list(rows))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--out", default=out, help="cached batches (a killed run resumes) and summary.json")
    ap.add_argument("--results", default="RESULTS.md")
    ap.add_argument("--no-results", dest="results", action="store_const", const=None)
    return ap


def publish(text: str, out: Path, summary: dict, results: str | None, marks: tuple[str, str], log) -> None:
    """Print a measurement's markdown block, write ``summary.json`` and rewrite the block in ``results``."""
    print(text)
    write_json_atomic(out / "summary.json", summary)
    if results:
        rewrite_block(results, text, *marks)
        log(f"rewrote the block {marks[0]} of {results}")


def rewrite_block(path, block: str, start: str = MARK_START, end: str = MARK_END) -> None:
    """Rewrite the block between ``start`` and ``end`` of the markdown file ``path`` (appended if absent)."""
    path = Path(path)
    path.write_text(replace_block(path.read_text() if path.exists() else "", block, start, end))


def run(args) -> dict:
    import platform

    import jax

    from sample.cli import load_model
    from sample.outputs import grid, save_png

    t0 = time.perf_counter()
    model = load_model(args.model, "float32")
    spec = SampleSpec(steps=args.steps, guidance=args.guidance, scheduler=args.scheduler)
    captions = eval_captions(args.captions)
    log = (lambda m: print(f"[baseline] {m}", flush=True))
    tally, rows, by_seed = Tally(), [], []
    for seed in args.seeds:
        images = sample_captions(model, captions, seed, spec=spec, batch=args.batch, log=log)
        _, seed_rows = judge_images(images, captions, tally)
        rows += [dict(r, seed=seed, index=k) for k, r in enumerate(seed_rows)]
        by_seed.append(images)
        log(f"seed {seed}: every-check pass rate so far {tally.rate('all'):.3f}")
    neutral_images = sample_captions(model, [NEUTRAL] * args.neutral, args.neutral_seed, spec=spec,
                                     batch=args.batch, log=log)
    neutral = neutral_stats(neutral_images)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_png(out / "baseline_grid.png", labelled_grid(by_seed, captions, list(range(min(12, len(captions))))))
    save_png(out / "neutral_grid.png", grid(neutral_images[:64], cols=16))
    settings = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {jax.default_backend()}, "
                f"{jax.device_count()} device(s)", "model": args.model or "embedded ShapesWorld",
                "model_sha256": model.manifest.get("source_sha256", "n/a"),
                "scheduler": args.scheduler or model.scheduler_config.get("_class_name", "?"),
                "timestep_spacing": model.scheduler_config.get("timestep_spacing"),
                "steps": args.steps, "guidance": args.guidance, "captions": args.captions, "seeds": list(args.seeds),
                "neutral": args.neutral, "neutral_seed": args.neutral_seed, "batch": args.batch,
                "seconds": time.perf_counter() - t0}
    report = {"settings": settings, "counts": tally.counts, "neutral": neutral, "images": rows}
    write_json_atomic(out / "baseline.json", report)
    figures = {}
    if args.figures:
        fig = Path(args.figures)
        fig.mkdir(parents=True, exist_ok=True)
        for name in ("baseline_grid.png", "neutral_grid.png"):
            shutil.copyfile(out / name, fig / f"shapesworld_{name}")
        figures = {"held-out captions (rows) x seeds (columns)": f"{fig.as_posix()}/shapesworld_baseline_grid.png",
                   f"neutral prompt '{NEUTRAL}'": f"{fig.as_posix()}/shapesworld_neutral_grid.png"}
    block = markdown(tally, neutral, settings, figures)
    print(block)
    if args.results:
        rewrite_block(args.results, block)
        log(f"rewrote the baseline block of {args.results}")
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.shapesworld_baseline", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the embedded ShapesWorld model")
    ap.add_argument("--captions", type=int, default=240, help="held-out captions (multiple of 6: equal kinds)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--scheduler", default=None, help="default: the model's own")
    ap.add_argument("--neutral", type=int, default=256, help=f"images of the neutral prompt {NEUTRAL!r}")
    ap.add_argument("--neutral-seed", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=80)
    ap.add_argument("--out", default="out/shapesworld_baseline")
    ap.add_argument("--figures", default="train/figures", help="copy the grids here ('' = do not)")
    ap.add_argument("--results", default="RESULTS.md", help="markdown file whose baseline block is rewritten")
    ap.add_argument("--no-results", dest="results", action="store_const", const=None)
    run(ap.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
