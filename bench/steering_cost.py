"""What steering costs: one guided DDIM run (text encoding + N steps + VAE decode) plain and with each kind of
steering, same model, prompts and noise, in one process.

    python -m bench.steering_cost --model shapesworld --batch 8 --steps 50
    python -m bench.steering_cost --model sd15 --batch 8 --steps 50 --dtype bfloat16     # GPU-sized
    python -m bench.steering_cost --model tiny --batch 2 --steps 3 --variants plain capture hedit

Variants (each one compiled program, timed after a warm-up call, median of ``--repeats``):

* ``plain``: no steering;
* ``capture``: every cross-attention map captured (head mean, conditional rows, summed over steps: what
  ``--heatmap`` records);
* ``hedit``: one constant h-space delta on the conditional rows (a concept vector at scale 1);
* ``concepts``: a 4-concept table with per-image weights (``--fair``-style one-hot rows; random vectors of the
  model's h shape: the cost does not depend on the values);
* ``ags``: Abs-Grad-SAM background keeping (img2img at strength 0.9 from a random reference, exact saliency of
  one subject word at the default site, three replacement steps);
* ``l2s``: Learn-to-Steer's test-time optimisation with the classifier shipped for the ShapesWorld model (only
  ``--model shapesworld``: no classifier exists for another site layout).

Models: ``shapesworld`` (the embedded model), ``tiny`` (the demo's small SD1-shaped model, random weights) and
``sd15`` (SD1.5-shaped, random weights; both with the demo's vocabulary). Reported: seconds per call and per
image, and the overhead over ``plain`` (for ``ags`` over a plain img2img run of the same strength). Benchmarks
are scripts, never tests.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import measure

VARIANTS = ("plain", "capture", "hedit", "concepts", "ags", "l2s")
PROMPT = "a red circle to the left of a blue square on grass"
STRENGTH = 0.9


def load(name: str, dtype: str, workdir: Path):
    """The benchmark model: the embedded ShapesWorld model, or a random demo-vocabulary model."""
    from sample.cli import load_model
    if name == "shapesworld":
        return load_model(None, dtype)
    from bench.pipeline import prepare_model
    folder = workdir / f"{name}_pipeline"
    if not (folder / "model_index.json").is_file():
        prepare_model(folder, name)
    return load_model(str(folder), dtype)


def variant_call(variant: str, model, spec, prompts: list[str], noise: np.ndarray):
    """A no-argument callable running one steered generation (blocking), and the plain call it compares to."""
    from jaxdiff.steer.concepts import ConceptTable, concept_steering, h_shape_of
    from jaxdiff.unet import attn_sites
    from sample.loop import StepCaptureSpec
    from sample.pipeline import generate
    from sample.spec import latent_shape, output_size

    b = len(prompts)
    hw = latent_shape(model, *output_size(model, spec, None))[:2]

    def run(**kw):
        return lambda: generate(model, prompts, spec=spec, seed=0, **kw)

    if variant == "plain":
        return run(init_latents=noise)
    if variant == "capture":
        sites = tuple(s for s in attn_sites(model.configs["unet"]) if s.kind == "cross")
        return run(init_latents=noise, capture=StepCaptureSpec.of(sites, mode="mean", reduce="sum", cond_only=True))
    if variant in ("hedit", "concepts"):
        h = h_shape_of(model.params["unet"], model.configs["unet"], hw)
        n = 1 if variant == "hedit" else 4
        rng = np.random.default_rng(0)
        table = ConceptTable(vectors=rng.standard_normal((n, *h)).astype(np.float32), names=tuple(
            f"c{i}" for i in range(n)), method="bench", kind="spatial", h_shape=h)
        weights = np.ones((b, 1), np.float32) if n == 1 else np.eye(n, dtype=np.float32)[np.arange(b) % n]
        return run(init_latents=noise, edits=concept_steering(table, weights, guided=spec.guided))
    if variant == "ags":
        from sample.background import BackgroundRequest, background_run
        reference = random_reference(model, spec)
        steering, _ = background_run(model, prompts, spec, BackgroundRequest(subjects=("circle",)), reference, 0,
                                     noise=noise)
        return lambda: generate(model, prompts, spec=spec, seed=0, init_image=reference, init_latents=noise,
                                edits=steering)
    if variant == "l2s":
        from sample.relations import RelationRequest, relation_run
        steering, _ = relation_run(model, prompts, spec, RelationRequest())
        return run(init_latents=noise, edits=steering)
    raise ValueError(f"unknown variant {variant!r}")


def random_reference(model, spec) -> np.ndarray:
    """A (1, H, W, 3) uint8 noise image of the run's size (the cost does not depend on its content)."""
    from sample.spec import output_size
    h, w = output_size(model, spec, None)
    return np.random.default_rng(1).integers(0, 256, (1, h, w, 3), dtype=np.uint8)


def plain_img2img(model, spec, prompts, noise):
    from sample.pipeline import generate
    reference = random_reference(model, spec)
    return lambda: generate(model, prompts, spec=spec, seed=0, init_image=reference, init_latents=noise)


def time_variant(call, repeats: int) -> dict:
    import jax
    t0 = time.perf_counter()
    jax.block_until_ready(call().images)
    first = time.perf_counter() - t0
    times = measure.time_calls(lambda: jax.block_until_ready(call().images), repeats, warmup=0)
    return {"first_call_s": first, **measure.summarize(times)}


def run_bench(model_name: str, batch: int, steps: int, dtype: str, variants: list[str], repeats: int,
              workdir: Path, log) -> dict:
    import jax

    from sample.pipeline import SampleSpec
    from sample.spec import latent_shape, output_size

    model = load(model_name, dtype, workdir)
    spec = SampleSpec(steps=steps, guidance=7.5, scheduler="ddim", dtype=dtype, strength=STRENGTH)
    prompts = [PROMPT] * batch
    shape = (batch, *latent_shape(model, *output_size(model, spec, None)))
    noise = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    rows = {}
    for v in variants:
        if v == "l2s" and model_name != "shapesworld":
            rows[v] = {"skipped": "no Learn-to-Steer classifier for this model's site layout"}
            continue
        log(f"  {model_name} {v}: compiling + {repeats} timed calls")
        rows[v] = time_variant(variant_call(v, model, spec, prompts, noise), repeats)
        if v == "ags":
            rows["img2img"] = time_variant(plain_img2img(model, spec, prompts, noise), repeats)
    for v, r in rows.items():
        if "median_s" not in r:
            continue
        r["s_per_image"] = r["median_s"] / batch
        base = rows.get("img2img" if v == "ags" else "plain")
        if base and "median_s" in base and v not in ("plain", "img2img"):
            r["overhead"] = r["median_s"] / base["median_s"] - 1.0
    return {"model": model_name, "batch": batch, "steps": steps, "dtype": dtype, "backend": jax.default_backend(),
            "device": jax.devices()[0].device_kind, "rows": rows}


def format_table(res: dict) -> str:
    lines = [f"{res['model']}, batch {res['batch']}, {res['steps']} steps, {res['dtype']}, {res['device']}:", "",
             "| steering | s / call (min-max) | s / image | overhead vs plain | first call s |", "|---|---|---|---|---|"]
    for v, r in res["rows"].items():
        if "median_s" not in r:
            lines.append(f"| {v} | {r.get('skipped', r.get('error'))} | | | |")
            continue
        over = f"{100 * r['overhead']:+.1f}%" if "overhead" in r else "-"
        lines.append(f"| {v} | {r['median_s']:.3f} ({r['min_s']:.3f}-{r['max_s']:.3f}) | {r['s_per_image']:.3f} | "
                     f"{over} | {r['first_call_s']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.steering_cost", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapesworld", choices=["shapesworld", "tiny", "sd15"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "jaxdiff-bench"))
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    res = run_bench(args.model, args.batch, args.steps, args.dtype, args.variants, args.repeats, workdir, log)
    print(format_table(res))
    measure.emit_result(res)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
