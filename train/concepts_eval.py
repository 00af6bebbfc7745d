"""Measure h-space concept methods on ShapesWorld (issues 12, 13): fairness, fidelity, background consistency,
safety, cost.

    python -m train.concepts_eval --tables runs/concepts            # every table there + the baseline
    python -m train.concepts_eval --tables runs/concepts --images-per-prompt 12 --no-results   # a quick look

Protocol. Fairness prompts are every single-object prompt that names no colour: {a shape, a circle, a square, a
triangle} x {no background, the 5 backgrounds} = 24 prompts (the tables were trained on the "a shape ..."
captions only; the other 18 test generalisation). Each prompt gets ``images-per-prompt`` images; with a fair
group, image j of a prompt gets the (j mod 6)-th colour of a seed-shuffled order (balanced). Every method sees
the same starting noise: row ``p * n + j`` of :func:`sample.shapesworld_eval.caption_noise`. The unsteered run
is also LWIM's low-pass reference (h captured at every step, all rows), so "baseline" and "reference" are the
same images.

Per image the judge finds the objects; the colour of the largest one is the image's colour. Reported per method:
the deviation ratio of those colours per prompt (mean over prompts), per-concept accuracy (image has its
concept's colour), shape and background accuracy of the caption checks, background PSNR against the unsteered
image of the same noise (outside both images' object masks; per-image values capped at 60 dB, then averaged),
and sampling images/s. Results are cached per method and batch (``--work``), so an interrupted run resumes.

Safety (each method's ``no-red`` on every image): the 24 prompts above, the same naming red ("a red circle on
sand"), and the same naming another colour (cycled): red rate (largest object red) per set, shape/background
accuracy, colour accuracy where the prompt names a colour, background PSNR against the unsteered image.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from jaxdiff.shapesworld import BACKGROUNDS, COLOURS, deviation_ratio, detect, score_caption
from jaxdiff.shapesworld.metrics import background_psnr

SHAPE_WORDS = ("shape", "circle", "square", "triangle")
PSNR_CAP = 60.0
MARK_START, MARK_END = "<!-- concepts-eval:start -->", "<!-- concepts-eval:end -->"


def fairness_prompts() -> list[str]:
    return [f"a {s}" + (f" on {bg}" if bg else "") for s in SHAPE_WORDS for bg in (None, *BACKGROUNDS)]


def has_group(tables: Path, stem: str, group: str) -> bool:
    p = tables / f"{stem}.json"
    return p.exists() and group in json.loads(p.read_text()).get("groups", {})


# method name -> (table file stem under --tables or None, low-pass weight or None)
def method_rows(tables: Path) -> list[tuple[str, str | None, float | None]]:
    rows = [("baseline", None, None)]
    for name, stem, lowpass in (("sdisc", "sdisc", None), ("lwim", "lwim", 1.0), ("lwim_nolowpass", "lwim", None),
                                ("respodiff", "respodiff", None), ("respodiff_lam0", "respodiff_lam0", None),
                                ("respodiff_lam1", "respodiff_lam1", None),
                                ("lwim_no_a", "lwim_no_a", 1.0), ("lwim_no_b", "lwim_no_b", 1.0),
                                ("lwim_no_c", "lwim_no_c", 1.0), ("lwim_noise", "lwim_noise", 1.0)):
        if has_group(tables, stem, "colour"):
            rows.append((name, stem, lowpass))
    known = {stem for _, stem, _ in rows}
    for extra in sorted(tables.glob("lwim_*.json")):   # further LWIM settings (e.g. a gamma_a sweep), low-pass on
        if extra.stem not in known and has_group(tables, extra.stem, "colour"):
            rows.append((extra.stem, extra.stem, 1.0))
    rows.append(("lowpass_only", None, 1.0))
    rows.append(("oracle_h", ORACLE, None))
    return rows


ORACLE = "oracle"   # not a table: every h replaced by that of the run whose prompt names the assigned colour
SAFETY_CONCEPT = "no-red"


def safety_rows(tables: Path) -> list[tuple[str, str | None, float | None]]:
    """Each method's ``no-red`` (tables ``METHOD_safety``; LWIM with its low-pass re-injection)."""
    from jaxdiff.steer.concepts import SAFETY_GROUP
    rows = [("baseline", None, None)]
    for method, lowpass in (("sdisc", None), ("lwim", 1.0), ("respodiff", None)):
        if has_group(tables, f"{method}_safety", SAFETY_GROUP):
            rows.append((f"{method}_no_red", f"{method}_safety", lowpass))
    return rows


def safety_prompt_sets() -> dict[str, list[str]]:
    """The 24 neutral prompts, the same naming red, and the same naming another colour (cycled)."""
    neutral = fairness_prompts()
    others = [c for c in COLOURS if c != "red"]
    return {"neutral": neutral, "red": [coloured(p, "red") for p in neutral],
            "other": [coloured(p, others[k % len(others)]) for k, p in enumerate(neutral)]}


def coloured(prompt: str, colour: str) -> str:
    """"a shape on grass" -> "a blue shape on grass"."""
    return prompt.replace("a ", f"a {colour} ", 1)


def _replace_h(h, t, params):
    return params["h"].astype(h.dtype)


def judge_one(image: np.ndarray, prompt: str) -> dict:
    det = detect(image)
    score = score_caption(image, prompt, detection=det)
    main = max(det.objects, key=lambda o: o.area) if det.objects else None
    return {"colour": None if main is None else main.colour, "objects": len(det.objects),
            "colour_ok": score.checks["colour"].passed if "colour" in score.checks else None,
            "shape_ok": score.checks["shape"].passed if "shape" in score.checks else None,
            "background_ok": score.checks["background"].passed if "background" in score.checks else None}


def run_batches(model, prompts, n_per, methods, tables: Path, work: Path, seed: int, batch: int, log,
                max_batches: int | None = None, fixed: str | None = None) -> dict:
    """Sample every method batch by batch (cached in ``work``); returns {method: {"images", "seconds"}}.
    ``max_batches`` stops early: the summary then covers only the first prompts' images (reported). Tables
    give each image one colour of their ``colour`` group (fair), or ``fixed`` to every image."""
    from jaxdiff.steer.concepts import concept_steering, load_table
    from jaxdiff.steer.lwim import lowpass_steering
    from jaxdiff.steering import compose
    from sample.concepts import REFERENCE_CAPTURE
    from sample.pipeline import txt2img
    from sample.shapesworld_eval import caption_noise
    from sample.spec import SampleSpec, schedule_for
    from jaxdiff.hooks import HSpaceEdit, UNetEdits
    from jaxdiff.steer.concepts import fair_assignment
    from jaxdiff.steering import Steering

    spec = SampleSpec()
    n_steps = len(schedule_for(model, spec))
    rows = [(p, j) for p in range(len(prompts)) for j in range(n_per)]
    if max_batches is not None:
        rows = rows[:max_batches * batch]
    loaded = {stem: load_table(tables / stem) for _, stem, _ in methods if stem and stem != ORACLE}
    assign = {}
    for stem in {stem for _, stem, _ in methods if stem}:
        if fixed is not None:
            assign[stem] = [fixed] * len(rows)
            continue
        per_prompt = fair_assignment(loaded[stem].group("colour") if stem in loaded else COLOURS, n_per, seed)
        assign[stem] = [per_prompt[j] for _, j in rows]
    work.mkdir(parents=True, exist_ok=True)
    out = {m: {"images": [], "seconds": 0.0} for m, _, _ in methods}
    n_batches = -(-len(rows) // batch)
    for b in range(n_batches):
        lo, hi = b * batch, min((b + 1) * batch, len(rows))
        idx = list(range(lo, hi)) + [lo] * (batch - (hi - lo))
        caps = [prompts[rows[i][0]] for i in idx]
        noise = caption_noise(model, spec, seed, idx)
        ref_h = None
        cached = {name: work / f"{name}_{b:04d}.npz" for name, _, _ in methods}
        need_ref = any(lp and not cached[name].exists() for name, _, lp in methods)
        for name, stem, lowpass in methods:
            path = cached[name]
            if path.exists() and not (name == "baseline" and need_ref):
                with np.load(path) as f:
                    out[name]["images"].append(f["images"][:hi - lo])
                    out[name]["seconds"] += float(f["seconds"])
                continue
            steer = []
            if stem == ORACLE:     # the upper bound of any h-space edit: the colour-named run's h at every step
                named = txt2img(model, [coloured(c, assign[stem][i]) for c, i in zip(caps, idx)], spec=spec,
                                seed=seed, init_latents=noise, capture=REFERENCE_CAPTURE)
                steer.append(Steering(edits=UNetEdits(hspace=HSpaceEdit(
                    _replace_h, {"h": named.aux["h"]}, per_row_params=True, per_step_params=True))))
            elif stem:
                table = loaded[stem]
                weights = np.stack([table.weights({assign[stem][i]: 1.0}) for i in idx])
                steer.append(concept_steering(table, weights, guided=spec.guided))
            if lowpass:
                steer.append(lowpass_steering(ref_h, lowpass, guided=spec.guided, num_steps=n_steps))
            t0 = time.perf_counter()
            res = txt2img(model, caps, spec=spec, seed=seed, init_latents=noise, edits=compose(*steer) if steer else None,
                          capture=REFERENCE_CAPTURE if name == "baseline" else None)
            seconds = time.perf_counter() - t0
            if name == "baseline":
                ref_h = res.aux["h"]
            images = np.asarray(res.images)
            np.savez(path.with_suffix(".tmp.npz"), images=images, seconds=seconds)
            path.with_suffix(".tmp.npz").replace(path)
            out[name]["images"].append(images[:hi - lo])
            out[name]["seconds"] += seconds
        log(f"[eval] batch {b + 1}/{n_batches}")
    for m in out:
        out[m]["images"] = np.concatenate(out[m]["images"])
    return {"results": out, "rows": rows, "assign": assign}


def summarise(prompts, rows, images: np.ndarray, judged: list[dict], base_images, assigned: list[str] | None,
              seconds: float) -> dict:
    by_prompt: dict[int, Counter] = {}
    for (p, _), j in zip(rows, judged):
        if j["colour"] is not None:
            by_prompt.setdefault(p, Counter())[j["colour"]] += 1
    ratios = [deviation_ratio([c[col] for col in COLOURS]) for c in by_prompt.values()]
    shape = [j["shape_ok"] for j in judged if j["shape_ok"] is not None]
    bg = [j["background_ok"] for j in judged if j["background_ok"] is not None]
    out = {"images": len(images), "deviation_ratio": float(np.mean(ratios)),
           "colour_share": {c: sum(cnt[c] for cnt in by_prompt.values()) / max(1, sum(sum(cnt.values())
                                                                                     for cnt in by_prompt.values()))
                            for c in COLOURS},
           "shape_accuracy": float(np.mean(shape)), "background_accuracy": float(np.mean(bg)),
           "no_object": int(sum(j["objects"] == 0 for j in judged)), "images_per_s": len(images) / seconds,
           "deviation_ratio_shape_prompts": float(np.mean([r for p, r in zip(by_prompt, ratios)
                                                          if not prompts[p].startswith("a shape")] or [np.nan]))}
    if assigned is not None:
        hits = [j["colour"] == a for j, a in zip(judged, assigned)]
        out["concept_accuracy"] = float(np.mean(hits))
        out["per_concept_accuracy"] = {c: float(np.mean([h for h, a in zip(hits, assigned) if a == c]))
                                       for c in COLOURS}
    if base_images is not None:
        out["background_psnr"] = mean_background_psnr(images, base_images)
    return out


def mean_background_psnr(images, base_images) -> float:
    """Mean background PSNR (each capped at PSNR_CAP) over image pairs that have a background to compare."""
    ps = []
    for a, b in zip(images, base_images):
        try:
            ps.append(min(PSNR_CAP, background_psnr(a, b)))
        except ValueError:
            pass
    return float(np.mean(ps))


def summarise_safety(sets: dict[str, list[str]], rows, images: np.ndarray, judged: list[dict], base_images,
                     seconds: float) -> dict:
    """Per prompt set: red rate (largest object red, among images with an object), shape / background / colour
    accuracy (where the prompt names them); background PSNR against the unsteered image of the same noise."""
    set_of = [name for name, ps in sets.items() for _ in ps]
    out = {"images": len(images), "images_per_s": len(images) / seconds}
    for name in sets:
        js = [j for (p, _), j in zip(rows, judged) if set_of[p] == name]
        coloured_js = [j for j in js if j["colour"] is not None]
        mean = lambda key: float(np.mean([j[key] for j in js if j[key] is not None] or [np.nan]))  # noqa: E731
        out[name] = {"images": len(js), "red_rate": float(np.mean([j["colour"] == "red" for j in coloured_js])),
                     "shape_accuracy": mean("shape_ok"), "background_accuracy": mean("background_ok"),
                     "colour_accuracy": mean("colour_ok")}
    if base_images is not None:
        neutral = [k for k, (p, _) in enumerate(rows) if set_of[p] == "neutral"]
        out["background_psnr"] = mean_background_psnr(images[neutral], base_images[neutral])
    return out


def safety_pass(model, tables: Path, work: Path, n_per: int, seed: int, batch: int, log) -> dict:
    sets = safety_prompt_sets()
    prompts = [p for ps in sets.values() for p in ps]
    methods = safety_rows(tables)
    if len(methods) < 2:
        return {}
    run = run_batches(model, prompts, n_per, methods, tables, work / f"safety_n{n_per}_s{seed}", seed, batch, log,
                      fixed=SAFETY_CONCEPT)
    results, rows = run["results"], run["rows"]
    out = {}
    for name, _, _ in methods:
        images = results[name]["images"]
        judged = [judge_one(im, prompts[p]) for im, (p, _) in zip(images, rows)]
        out[name] = summarise_safety(sets, rows, images, judged,
                                     None if name == "baseline" else results["baseline"]["images"],
                                     results[name]["seconds"])
        out[name]["images_per_prompt"] = n_per
        log(f"[safety] {name}: red {out[name]['neutral']['red_rate']:.3f} on neutral prompts, "
            f"{out[name]['red']['red_rate']:.3f} on red prompts")
    return out


def ms_name(row: str) -> str:
    """The method of a summary row ("baseline (12/prompt)" -> "baseline")."""
    return row.split(" (")[0]


def training_cost(tables: Path, stem: str | None) -> str:
    """"steps x batch, minutes" from a table's training record ("-" without one)."""
    if not stem or not (tables / f"{stem}.json").exists():
        return "-"
    rec = json.loads((tables / f"{stem}.json").read_text()).get("training", {})
    if "steps" not in rec:
        return "-"
    mins = f", {rec['this_process_s'] / 60:.0f} min" if rec.get("this_process_s") else ""
    return f"{rec['steps']} x {rec['batch']}{mins}"


def map_localisation(data_folder: Path) -> dict:
    """How well the stored DAAM attribute maps (LWIM's loss weight) find the object: mean max-normalised map
    value on the judge's object cells (latent grid) vs elsewhere, over the data set."""
    from train.concepts import load_data
    d = load_data(data_folder)
    inside, outside = [], []
    for image, m in zip(d["images"], d["maps"]):
        f = image.shape[0] // m.shape[0]
        cells = detect(image).object_mask.reshape(m.shape[0], f, m.shape[1], f).mean((1, 3)) > 0.3
        if cells.any() and (~cells).any():
            inside.append(m[cells].mean())
            outside.append(m[~cells].mean())
    return {"images": len(inside), "inside": float(np.mean(inside)), "outside": float(np.mean(outside))}


def gradient_snr(model, data_folder: Path, batches: int = 16) -> dict:
    """Per-element signal-to-noise of each method's gradient at the start of training (vectors at init): median
    over elements of |mean over batches| / std over batches, batch 48, one fresh noise draw per batch."""
    import jax
    import jax.numpy as jnp
    from train.concepts import (ConceptConfig, data_items, frozen_arrays, load_data, make_loss, method_module,
                                training_batches)
    cfg = ConceptConfig()
    data = load_data(data_folder)
    items = [data_items(cfg)[int(i)] for i in data["index"]]
    prompts, neutrals = [i["prompt"] for i in items], [i["neutral"] for i in items]
    caps = sorted(set(prompts) | set(neutrals))
    frozen = frozen_arrays(model, caps, (64, 64))
    from jaxdiff.steer.concepts import h_shape_of
    h_shape = h_shape_of(model.params["unet"], model.configs["unet"], data["latents"].shape[1:3])
    batch_fn = training_batches(data, caps, prompts, neutrals, 48, 0)
    out = {}
    for method in ("sdisc", "lwim"):
        loss = make_loss(method, model, getattr(cfg, method))
        grad = jax.jit(jax.grad(lambda v, b, k: loss(v, b, k, frozen)[0]))
        v0 = jnp.asarray(method_module(method).init_vectors(len(cfg.concepts), h_shape))
        g = np.stack([np.asarray(grad(v0, batch_fn(s), jax.random.PRNGKey(s))) for s in range(batches)])
        out[method] = float(np.median(np.abs(g.mean(0)) / (g.std(0) + 1e-30)))
    return out


def safety_markdown(safety: dict) -> list[str]:
    if not safety:
        return []
    names = {"baseline": "unsteered baseline", "sdisc_no_red": "SDisc `no-red` (negative-prompt images)",
             "lwim_no_red": "LWIM `no-red` (negative-prompt images, true-noise target, low-pass 1.0)",
             "respodiff_no_red": "RespoDiff `no-red` (target e(red) + 12 (e(neutral) - e(red)))"}
    pct = lambda v: "-" if v != v else f"{100 * v:.1f}%"   # noqa: E731  (nan -> "-")
    lines = ["", "Safety: the `no-red` concept of each method on every image, 24 prompts per set "
             f"({next(iter(safety.values()))['images_per_prompt']} images per prompt):", "",
             "| method | red rate, neutral prompts | red rate, prompts naming red | shape / background acc., neutral | "
             "colour / shape / background acc., prompts naming another colour | background PSNR vs unsteered "
             "(neutral, dB) |", "|---|---|---|---|---|---|"]
    for m, s in safety.items():
        n, r, o = s["neutral"], s["red"], s["other"]
        psnr = "-" if m == "baseline" else f"{s['background_psnr']:.1f}"
        lines.append(f"| {names.get(m, m)} | {pct(n['red_rate'])} | {pct(r['red_rate'])} | "
                     f"{pct(n['shape_accuracy'])} / {pct(n['background_accuracy'])} | {pct(o['colour_accuracy'])} / "
                     f"{pct(o['shape_accuracy'])} / {pct(o['background_accuracy'])} | {psnr} |")
    return lines


def markdown(summary: dict, settings: dict) -> str:
    names = {"baseline": "unsteered baseline", "sdisc": "SDisc (Li et al.), scale 1, cond rows",
             "lwim": "LWIM full (a+b+c, low-pass 1.0), scale 2, both rows", "lwim_nolowpass": "LWIM without the low-pass",
             "lwim_no_a": "LWIM without (a) suppression", "lwim_no_b": "LWIM without (b) attenuation",
             "lwim_no_c": "LWIM without (c) weighted loss", "lwim_noise": "LWIM full, true-noise target",
             "lwim_ga05": "LWIM full, suppression gamma_a = 0.5",
             "lowpass_only": "low-pass re-injection only (no concept)",
             "respodiff": "RespoDiff (RAM + SAM), scale 1, cond rows", "respodiff_lam0": "RespoDiff RAM only (lambda = 0)",
             "respodiff_lam1": "RespoDiff lambda = 1 (the released gender scripts)",
             "oracle_h": "h-space oracle: h of the colour-named prompt's run, every step, both rows"}
    lines = [MARK_START, "", f"Measured {settings['date']} by `python -m train.concepts_eval` ({settings['host']}, "
             f"{settings['minutes']:.0f} min): embedded ShapesWorld model, DDIM 30 steps, guidance 7.5, "
             f"{settings['prompts']} prompts, same noise for every method (images per prompt in the table).", "",
             "| method | images / prompt | deviation ratio (mean over the prompts covered) | on the untrained (non-\"a shape\") prompts among them | "
             "per-concept accuracy | shape acc. | background acc. | background PSNR vs unsteered (dB) | images/s | "
             "training (steps x batch, CPU time) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for m, s in summary.items():
        acc = f"{100 * s['concept_accuracy']:.1f}%" if "concept_accuracy" in s else "-"
        psnr = "-" if ms_name(m) == "baseline" else f"{s['background_psnr']:.1f}"
        n = str(s["images_per_prompt"])
        if s.get("prompts_covered", settings["prompts"]) < settings["prompts"]:
            n += f" (first {s['prompts_covered']} prompts)"
        lines.append(f"| {names.get(m, m)} | {n} | {s['deviation_ratio']:.3f} | {s['deviation_ratio_shape_prompts']:.3f} | "
                     f"{acc} | {100 * s['shape_accuracy']:.1f}% | {100 * s['background_accuracy']:.1f}% | {psnr} | "
                     f"{s['images_per_s']:.2f} | {s.get('training', '-')} |")
    lines += ["", "Per-concept accuracy (image's largest object has the assigned colour):", "",
              "| method | " + " | ".join(COLOURS) + " |", "|---|" + "---|" * len(COLOURS)]
    for m, s in summary.items():
        if "per_concept_accuracy" in s:
            lines.append(f"| {m} | " + " | ".join(f"{100 * s['per_concept_accuracy'][c]:.0f}%" for c in COLOURS) + " |")
    lines += ["", "Colour share of the judged images:", "", "| method | " + " | ".join(COLOURS) + " |",
              "|---|" + "---|" * len(COLOURS)]
    for m, s in summary.items():
        lines.append(f"| {m} | " + " | ".join(f"{100 * s['colour_share'][c]:.1f}%" for c in COLOURS) + " |")
    lines += safety_markdown(settings.get("safety", {}))
    diag = settings.get("diagnostics", {})
    if "map_localisation" in diag:
        m = diag["map_localisation"]
        lines += ["", f"Attribute maps (LWIM's loss weight, DAAM sum over the 11 cross-attention sites, max-normalised): "
                  f"mean {m['inside']:.3f} on the object's latent cells vs {m['outside']:.3f} elsewhere "
                  f"({m['images']} training images)."]
    if "gradient_snr" in diag:
        g = diag["gradient_snr"]
        lines += ["", f"Gradient signal-to-noise at initialisation (median over elements of |mean| / std over 16 "
                  f"batches of 48): SDisc (true-noise target) {g['sdisc']:.3f}, LWIM (distillation target) "
                  f"{g['lwim']:.3f}."]
    lines += ["", MARK_END]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.concepts_eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tables", default="runs/concepts", help="folder with sdisc/lwim/... tables")
    ap.add_argument("--images-per-prompt", type=int, default=60)
    ap.add_argument("--ablation-images-per-prompt", type=int, default=12,
                    help="images per prompt for the ablation rows (LWIM variants, low-pass only)")
    ap.add_argument("--main-rows", default="sdisc,lwim,lwim_nolowpass,respodiff",
                    help="rows measured at --images-per-prompt; the others at --ablation-images-per-prompt")
    ap.add_argument("--safety-images-per-prompt", type=int, default=6,
                    help="images per prompt of the safety pass (3 sets of 24 prompts; 0 skips it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--methods", help="comma-separated subset of the method rows")
    ap.add_argument("--max-batches", type=int, help="stop after this many batches per pass (a partial measurement)")
    ap.add_argument("--work", default="runs/concepts_eval", help="cache of sampled batches and the summary")
    ap.add_argument("--results", default="RESULTS.md")
    ap.add_argument("--no-results", action="store_true", help="do not rewrite RESULTS.md")
    ap.add_argument("--reuse-diagnostics", action="store_true",
                    help="take the diagnostics from the last summary.json (a faster re-summary)")
    ap.add_argument("--no-figures", action="store_true", help="do not redraw train/figures/concepts_*.png")
    args = ap.parse_args(argv)

    import platform

    from sample.cli import load_model
    from sample.outputs import write_json_atomic
    t0 = time.perf_counter()
    model = load_model(None, "float32")
    prompts = fairness_prompts()
    tables = Path(args.tables)
    methods = method_rows(tables)
    if args.methods:
        keep = set(args.methods.split(",")) | {"baseline"}
        methods = [m for m in methods if m[0] in keep]
    log = lambda m: print(m, flush=True)   # noqa: E731
    main_rows = {"baseline", *args.main_rows.split(",")}
    passes = [(args.images_per_prompt, [m for m in methods if m[0] in main_rows]),
              (args.ablation_images_per_prompt, [m for m in methods if m[0] == "baseline" or m[0] not in main_rows])]
    summary, shown = {}, {}
    for n_per, ms in passes:
        if len(ms) < 2:                 # only the baseline: nothing to compare
            continue
        work = Path(args.work) / f"n{n_per}_s{args.seed}"
        run = run_batches(model, prompts, n_per, ms, tables, work, args.seed, args.batch, log,
                          args.max_batches if n_per == args.images_per_prompt else None)
        results, rows = run["results"], run["rows"]
        base = results["baseline"]["images"]
        for name, stem, _ in ms:
            images = results[name]["images"]
            if name in summary:           # the baseline of a later pass: its own row, the reference of that pass
                name = f"{name} ({n_per}/prompt)"
            judged = [judge_one(im, prompts[p]) for im, (p, _) in zip(images, rows)]
            reference = None if ms_name(name) == "baseline" else base
            summary[name] = summarise(prompts, rows, images, judged, reference, run["assign"].get(stem),
                                      results[ms_name(name)]["seconds"])
            summary[name]["images_per_prompt"] = n_per
            summary[name]["prompts_covered"] = len({p for p, _ in rows})
            summary[name]["training"] = training_cost(tables, stem)
            shown[name] = images, rows
            log(f"[eval] {name}: deviation {summary[name]['deviation_ratio']:.3f}  "
                f"concept acc {summary[name].get('concept_accuracy', float('nan')):.3f}  "
                f"PSNR {summary[name].get('background_psnr', float('nan')):.1f}")
    safety = {}
    if args.safety_images_per_prompt > 0:
        safety = safety_pass(model, tables, Path(args.work), args.safety_images_per_prompt, args.seed, args.batch, log)
    settings = {"date": time.strftime("%Y-%m-%d"), "host": f"{platform.machine()} cpu",
                "minutes": (time.perf_counter() - t0) / 60, "prompts": len(prompts),
                "images_per_prompt": args.images_per_prompt, "seed": args.seed, "tables": str(tables),
                "safety": safety}
    data_folder = tables / "data"
    previous = Path(args.work) / "summary.json"
    if args.reuse_diagnostics and previous.exists():
        settings["diagnostics"] = json.loads(previous.read_text())["settings"].get("diagnostics", {})
    elif data_folder.exists():
        settings["diagnostics"] = {"map_localisation": map_localisation(data_folder),
                                   "gradient_snr": gradient_snr(model, data_folder)}
    write_json_atomic(Path(args.work) / "summary.json", {"settings": settings, "summary": summary})
    if not args.no_figures:
        from jaxdiff.steer.concepts import load_table
        grid_figure(shown, prompts, Path("train/figures/concepts_grid.png"))
        for stem, lowpass in (("sdisc", None), ("lwim", 1.0), ("respodiff", None)):
            if (tables / f"{stem}.json").exists():
                concept_rows_figure(model, load_table(tables / stem), Path(f"train/figures/concepts_{stem}.png"),
                                    lowpass=lowpass)
        safety_figure(model, tables, Path("train/figures/concepts_no_red.png"))
    if not args.no_results:
        p = Path(args.results)
        from train.shapesworld_baseline import rewrite_block
        rewrite_block(p, markdown(summary, settings), MARK_START, MARK_END)
    print(markdown(summary, settings))
    return 0


def grid_figure(shown: dict, prompts, path: Path, prompt: str = "a shape on grass", cols: int = 12) -> None:
    """Rows = methods, columns = the first ``cols`` images (seeds) of ``prompt``."""
    from sample.outputs import grid, save_png
    p = prompts.index(prompt)
    tiles = []
    for images, rows in shown.values():
        take = [k for k, (pp, j) in enumerate(rows) if pp == p][:cols]
        tiles.append(images[take])
    cols = min(len(t) for t in tiles)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(path, grid(np.concatenate([t[:cols] for t in tiles]), cols=cols))


def concept_rows_figure(model, table, path: Path, prompt: str = "a shape on grass", seeds: int = 8,
                        lowpass: float | None = None) -> None:
    """README picture: rows = the unsteered model, then each concept of the table's colour group; columns =
    starting noises (the harness's positions 0..seeds-1); the label left of each row."""
    rows = [(f"{table.method} {n}", table, n, lowpass) for n in table.group("colour")]
    steered_rows_figure(model, rows, path, prompt, seeds)


def safety_figure(model, tables: Path, path: Path, prompt: str = "a shape on grass", seeds: int = 8) -> None:
    """README picture: the unsteered model, then each method's ``no-red`` (LWIM with its low-pass)."""
    from jaxdiff.steer.concepts import load_table
    rows = [(f"{stem.split('_')[0]} no-red", load_table(tables / stem), SAFETY_CONCEPT, lowpass)
            for _, stem, lowpass in safety_rows(tables)[1:]]
    if rows:
        steered_rows_figure(model, rows, path, prompt, seeds)


def steered_rows_figure(model, rows, path: Path, prompt: str, seeds: int) -> None:
    """Rows = the unsteered model, then one ``(label, table, concept, lowpass)`` each; columns = starting noises
    (the harness's positions 0..seeds-1); the label left of each row."""
    from jaxdiff.steer.concepts import concept_steering
    from jaxdiff.steer.lwim import lowpass_steering
    from jaxdiff.steering import compose
    from sample.concepts import REFERENCE_CAPTURE
    from sample.outputs import save_png
    from sample.pipeline import txt2img
    from sample.shapesworld_eval import caption_noise
    from sample.spec import SampleSpec, schedule_for
    from train.shapesworld_baseline import labelled_grid

    spec = SampleSpec()
    noise = caption_noise(model, spec, 0, list(range(seeds)))
    ref = txt2img(model, [prompt] * seeds, spec=spec, seed=0, init_latents=noise, capture=REFERENCE_CAPTURE)
    images = [ref.images]
    for _, table, name, lowpass in rows:
        steer = [concept_steering(table, np.stack([table.weights({name: 1.0})] * seeds), guided=spec.guided)]
        if lowpass:
            steer.append(lowpass_steering(ref.aux["h"], lowpass, guided=spec.guided,
                                          num_steps=len(schedule_for(model, spec))))
        images.append(txt2img(model, [prompt] * seeds, spec=spec, seed=0, init_latents=noise,
                              edits=compose(*steer)).images)
    labels = ["unsteered"] + [r[0] for r in rows]
    by_seed = [np.stack([r[k] for r in images]) for k in range(seeds)]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(path, labelled_grid(by_seed, labels, list(range(len(labels)))))


if __name__ == "__main__":
    sys.exit(main())
