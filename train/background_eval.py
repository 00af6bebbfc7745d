"""``python -m train.background_eval``: Abs-Grad-SAM measured on ShapesWorld against the img2img frontier (issue 15).

    python -m train.background_eval                          # every row, 100 references
    python -m train.background_eval --rows img2img_0.9 ags --references 20    # a quick look

References: object-free ShapesWorld scenes (:func:`jaxdiff.shapesworld.make_reference_scene`, split
"background"; the kind cycles through the five backgrounds, so 100 references give 20 of each). Prompt: the
scene's single-object caption naming colour, shape and the reference's background. Every row uses the same
img2img noise per reference (:func:`sample.shapesworld_eval.caption_noise`), the model's sampler, 30 steps,
guidance 7.5. Rows:

* ``img2img_S``: plain img2img at strength S (0.3 ... 1.0): the frontier;
* ``ags``: Abs-Grad-SAM at strength 0.9 (exact scores, abs), ``ags_1.0`` at strength 1.0;
* ``ags_relu``: ReLU instead of abs; ``ags_random``: the released code's random-projection cotangents;
* ``ags_nodilate``: no mask dilation; ``ags_noise``: the released code's pure-noise start.

Metrics: background PSNR against the reference outside the generated object's judge mask (dilated 2 px,
:func:`jaxdiff.shapesworld.background_psnr`); subject present: the judge finds exactly one object with the
caption's colour and shape; the ceiling: the reference's own VAE round trip over the same regions. Batches are
cached under ``--out`` (a killed run resumes); the table goes between the ``background`` markers of
``--results`` and a plot (subject present vs background PSNR) and a picture triple into ``--figures``.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

MARK_START, MARK_END = "<!-- background:start -->", "<!-- background:end -->"
STRENGTHS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
AGS_ROWS = {   # row -> (strength, BackgroundRequest fields)
    "ags": (0.9, {}),
    "ags_1.0": (1.0, {}),
    "ags_relu": (0.9, {"variant": "relu"}),
    "ags_random": (0.9, {"cotangent": "random"}),
    "ags_nodilate": (0.9, {"dilation": 0}),
    "ags_noise": (0.9, {"start": "noise"}),
}
ROWS = tuple(f"img2img_{s}" for s in STRENGTHS) + tuple(AGS_ROWS)
TITLES = {**{f"img2img_{s}": f"img2img, strength {s}" for s in STRENGTHS},
          "ags": "Abs-Grad-SAM (exact, abs), strength 0.9", "ags_1.0": "Abs-Grad-SAM (exact, abs), strength 1.0",
          "ags_relu": "Abs-Grad-SAM, ReLU (released code's rectifier)",
          "ags_random": "Abs-Grad-SAM, random projections (released code's cotangents)",
          "ags_nodilate": "Abs-Grad-SAM, no mask dilation", "ags_noise": "Abs-Grad-SAM, pure-noise start (released code)"}


def references(n: int):
    from jaxdiff.shapesworld import make_reference_scene
    return [make_reference_scene(i) for i in range(n)]


def subject_present(checks: dict) -> bool:
    return all(checks[k]["passed"] for k in ("count", "colour", "shape"))


def run_batch(model, row: str, scenes, args) -> tuple[dict, np.ndarray]:
    from jaxdiff.shapesworld import background_psnr, background_region
    from sample.background import BackgroundRequest, background_run
    from sample.pipeline import generate
    from sample.shapesworld_eval import caption_noise, judge_images
    from sample.spec import SampleSpec

    prompts = [s.caption for s in scenes]
    refs = np.stack([s.image for s in scenes])
    strength, fields = (float(row.split("_")[1]), None) if row.startswith("img2img") else AGS_ROWS[row]
    spec = SampleSpec(steps=args.steps, guidance=args.guidance, strength=strength)
    noise = caption_noise(model, spec, args.seed, [s.index for s in scenes])
    steering, record = None, None
    if fields is not None:
        steering, record = background_run(model, prompts, spec, BackgroundRequest(**fields), refs, args.seed, noise)
    t0 = time.perf_counter()
    res = generate(model, prompts, spec=spec, seed=args.seed, init_latents=noise, init_image=refs, edits=steering)
    seconds = time.perf_counter() - t0
    _, judged = judge_images(res.images, prompts)
    round_trip = vae_round_trip(model, refs, args.seed)
    images = []
    for k, (img, j) in enumerate(zip(res.images, judged)):
        region = background_region(img, refs[k])
        images.append({"index": scenes[k].index, "caption": prompts[k], "subject": subject_present(j["checks"]),
                       "background_kind": j["checks"]["background"]["passed"],
                       "psnr": background_psnr(img, refs[k], region=region),
                       "ceiling": background_psnr(round_trip[k], refs[k], region=region)})
    fractions = None
    if record is not None:
        m, r = np.asarray(res.aux["hooks"]["background"]["mask"]), np.asarray(res.aux["hooks"]["background"]["replaced"])
        fractions = float(np.mean([m[s, b].mean() for b in range(m.shape[1]) for s in np.flatnonzero(r[:, b])]))
    return {"row": row, "seconds": seconds, "compiled": res.timings.get("compiled"), "images": images,
            "subject_fraction": fractions, "settings": record}, res.images


def vae_round_trip(model, images: np.ndarray, seed: int) -> np.ndarray:
    """decode(encode(images)) with img2img's posterior draw: the best any latent-space method can keep."""
    import jax.numpy as jnp

    from jaxdiff.vae import uint8_to_signed
    from sample.background import encode_reference
    from sample.model_fns import latents_to_unit, unit_to_uint8
    from sample.pipeline import start_draws
    from sample.spec import latent_shape

    vae = model.configs["vae"]
    h, w, c = latent_shape(model, *images.shape[1:3])
    _, vae_noise, _ = start_draws(seed, (len(images), h, w, c), (len(images), h, w, vae.latent_channels))
    z = encode_reference(model.params["vae"], np.asarray(uint8_to_signed(images)), vae_noise, config=vae)
    return np.asarray(unit_to_uint8(latents_to_unit(model.params["vae"], jnp.asarray(z), vae)))


def summarise(batches: list[dict]) -> dict:
    imgs = [im for b in batches for im in b["images"]]
    psnr = np.asarray([im["psnr"] for im in imgs], np.float64)
    ceiling = np.asarray([im["ceiling"] for im in imgs], np.float64)
    timed = [b for b in batches if not b.get("compiled")] or batches
    fr = [b["subject_fraction"] for b in batches if b.get("subject_fraction") is not None]
    return {"n": len(imgs), "subject": float(np.mean([im["subject"] for im in imgs])),
            "background_kind": float(np.mean([im["background_kind"] for im in imgs])),
            "psnr": float(np.mean(np.minimum(psnr, 99.0))), "psnr_median": float(np.median(psnr)),
            "ceiling": float(np.mean(np.minimum(ceiling, 99.0))),
            "s_per_image": sum(b["seconds"] for b in timed) / sum(len(b["images"]) for b in timed),
            "subject_fraction": float(np.mean(fr)) if fr else None}


def table(summaries: dict) -> str:
    head = ("| row | images | subject present | background PSNR (dB, mean / median) | VAE ceiling, same regions (dB) "
            "| background kind | latent elements kept as subject | s / image |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row, s in summaries.items():
        frac = "-" if s["subject_fraction"] is None else f"{100 * s['subject_fraction']:.0f}%"
        lines.append(f"| {TITLES[row]} | {s['n']} | {100 * s['subject']:.1f}% | {s['psnr']:.2f} / "
                     f"{s['psnr_median']:.2f} | {s['ceiling']:.2f} | {100 * s['background_kind']:.1f}% | {frac} | "
                     f"{s['s_per_image']:.2f} |")
    return "\n".join(lines)


def frontier_plot(summaries: dict, size=(560, 380)) -> np.ndarray:
    """Subject present (y) vs background PSNR (x), one labelled point per row; img2img points joined."""
    from PIL import Image, ImageDraw, ImageFont

    w, h = size
    left, right, top, bottom = 50, 20, 24, 40
    canvas = Image.new("RGB", size, "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    xs = [s["psnr"] for s in summaries.values()]
    lo, hi = np.floor(min(xs)) - 1, np.ceil(max(xs)) + 1
    px = lambda v: left + (v - lo) / (hi - lo) * (w - left - right)     # noqa: E731
    py = lambda v: h - bottom - v * (h - top - bottom)                 # noqa: E731
    draw.rectangle((left, top, w - right, h - bottom), outline="black")
    for v in (0.0, 0.5, 1.0):
        draw.text((8, py(v) - 6), f"{100 * v:.0f}%", fill="black", font=font)
    for v in (lo, (lo + hi) / 2, hi):
        draw.text((px(v) - 10, h - bottom + 6), f"{v:.0f}", fill="black", font=font)
    draw.text((w // 2 - 70, h - 16), "background PSNR (dB)", fill="black", font=font)
    draw.text((left, 6), "subject present vs background kept (ShapesWorld)", fill="black", font=font)
    frontier = [(px(s["psnr"]), py(s["subject"])) for r, s in summaries.items() if r.startswith("img2img")]
    if len(frontier) > 1:
        draw.line(frontier, fill=(150, 150, 150), width=1)
    for row, s in summaries.items():
        x, y = px(s["psnr"]), py(s["subject"])
        colour = (120, 120, 120) if row.startswith("img2img") else (200, 40, 40)
        draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=colour)
        label = row.replace("img2img_", "") if row.startswith("img2img") else row
        draw.text((x + 6, y - 6), label, fill=colour, font=font)
    return np.asarray(canvas)


def run(args) -> dict:
    import jax

    from sample.cli import load_model
    from sample.outputs import save_png, write_json_atomic
    from train.shapesworld_baseline import labelled_grid, publish

    t0 = time.perf_counter()
    model = load_model(args.model, "float32")
    scenes = references(args.references)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = (lambda m: print(f"[background_eval] {m}", flush=True))
    results, firsts = {}, {}
    for row in args.rows:
        results[row] = []
        for lo in range(0, len(scenes), args.batch):
            chunk = scenes[lo:lo + args.batch]
            path = out / row / f"{lo:04d}.json"
            if path.exists():
                results[row].append(json.loads(path.read_text()))
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            batch, images = run_batch(model, row, chunk, args)
            if lo == 0:
                np.save(out / row / "first_batch_images.npy", images)
            write_json_atomic(path, batch)
            results[row].append(batch)
            s = summarise(results[row])
            log(f"{row}: {s['n']} images, subject {100 * s['subject']:.1f}%, PSNR {s['psnr']:.2f} dB, "
                f"{batch['seconds'] / len(chunk):.2f} s/image")
        first = out / row / "first_batch_images.npy"
        if first.exists():
            firsts[row] = np.load(first)
    summaries = {row: summarise(b) for row, b in results.items() if b}
    block = [MARK_START, "",
             f"Measured {time.strftime('%Y-%m-%d')} by `python -m train.background_eval` ({platform.machine()} "
             f"{jax.default_backend()}, {jax.device_count()} device(s)): embedded ShapesWorld model, "
             f"{len(scenes)} object-free reference backgrounds ({len(scenes) // 5} per kind), the single-object "
             f"caption of each, seed {args.seed}, {args.steps} steps, guidance {args.guidance}, the same img2img "
             "noise in every row. PSNR outside the generated object's judge mask (dilated 2 px; identical "
             "regions counted as 99 dB in the mean).", "", table(summaries), ""]
    fig = Path(args.figures) if args.figures else None
    if fig is not None and summaries:
        fig.mkdir(parents=True, exist_ok=True)
        save_png(fig / "background_frontier.png", frontier_plot(summaries))
        block += [f"![subject present vs background PSNR]({fig.as_posix()}/background_frontier.png)", ""]
        trio = [r for r in ("img2img_0.9", "ags") if r in firsts]
        if len(trio) == 2:
            k = min(6, len(firsts["ags"]))
            refs = np.stack([s.image for s in scenes[:k]])
            save_png(fig / "background_triple.png",
                     labelled_grid([refs, firsts["img2img_0.9"][:k], firsts["ags"][:k]],
                                   [s.caption for s in scenes[:k]], list(range(k))))
            block += [f"![reference / img2img 0.9 / Abs-Grad-SAM 0.9, same noise]({fig.as_posix()}/"
                      "background_triple.png)", ""]
    block.append(MARK_END)
    text = "\n".join(block)
    publish(text, out, {"settings": vars(args), "seconds": time.perf_counter() - t0, "summaries": summaries},
            args.results, (MARK_START, MARK_END), log)
    return summaries


def main(argv=None) -> int:
    from train.shapesworld_baseline import method_eval_parser

    ap = method_eval_parser("python -m train.background_eval", __doc__, ROWS, "runs/background/eval")
    ap.add_argument("--references", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--figures", default="train/figures")
    run(ap.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
