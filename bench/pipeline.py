"""Full pipeline benchmark: text encode + N DDIM steps (classifier-free guidance) + VAE decode, jaxdiff's
``sample.pipeline.generate`` vs diffusers' ``StableDiffusionPipeline`` on the same weights, each framework in
its own subprocess.

    python -m bench.pipeline [--batch 1] [--steps 2 10] [--repeats 5] [--json out.json]

The model is the demo's small SD1-shaped model (``sample.demo.random_demo_model``: random weights, a small
CLIP-BPE vocabulary), exported once as a diffusers folder; diffusers loads that folder, jaxdiff loads it
through the real converter (``weights_convert.pipeline.load_any``). Both start from the same initial latents
and prompts, so their final images agree (decoded, in [0, 1]; reported as max-abs / std). ``--config sd15``
uses SD1.5-shaped components with random weights (and the demo's small vocabulary); ``--dtype bfloat16`` runs
both in bf16 where PyTorch has a CUDA GPU (the GPU suite, :mod:`bench.gpu_suite`).

Reported per framework: end-to-end seconds per call (median after warm-up) at two step counts; denoising
it/s from their difference, ``(N2 - N1) / (t(N2) - t(N1))``, which cancels text encoding, VAE decode and call
overhead; images/s at the larger step count; compile time (first call minus a warm call; jaxdiff compiles one
program per step count, measured cold and from a persistent compilation cache in a second process); peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import measure
from bench.inputs import compare

PACKAGES = ("jax", "jaxlib", "torch", "diffusers", "transformers", "numpy")
PROMPT = "a red circle above a blue square on grass"
GUIDANCE = 7.5


def prepare_model(folder: Path, config: str = "tiny", seed: int = 0) -> None:
    """Random weights with the demo's small vocabulary, written as a diffusers pipeline folder: ``tiny`` is the
    demo model, ``sd15`` the SD1.5 preset's UNet, VAE and text encoder (vocabulary size aside)."""
    from sample.demo import random_demo_model
    from weights_convert.export import export_diffusers_folder
    from weights_convert.single_file import read_preset

    configs = None
    if config == "sd15":
        configs = {c: dict(read_preset("sd15")[c]) for c in ("unet", "vae", "text_encoder")}
    export_diffusers_folder(random_demo_model(folder.parent / f"demo_src_{config}", seed, configs), folder)


def initial_latents(unet_config: dict, batch: int, seed: int = 0) -> np.ndarray:
    """(B, h, w, 4) NHWC unit-variance noise, the same for both frameworks."""
    n = unet_config["sample_size"]
    return np.random.default_rng(seed).standard_normal((batch, n, n, unet_config["in_channels"]), dtype=np.float32)


def run_jax_child(folder: Path, batch: int, steps: int, repeats: int, warmup: int, cache_dir: str | None,
                  save_output: str | None, dtype: str = "float32") -> dict:
    measure.use_persistent_compilation_cache(cache_dir)
    from sample.pipeline import SampleSpec, generate
    from weights_convert.pipeline import load_any

    t0 = time.perf_counter()
    model = load_any(folder)
    load_s = time.perf_counter() - t0
    peak_load = measure.peak_rss_bytes()
    measure.reset_peak_rss()
    spec = SampleSpec(steps=steps, guidance=GUIDANCE, scheduler="ddim", dtype=dtype)
    noise = initial_latents(model.config_dicts["unet"], batch)

    def call():
        return generate(model, [PROMPT] * batch, spec=spec, seed=0, init_latents=noise)

    t0 = time.perf_counter()
    first = call()
    first_s = time.perf_counter() - t0
    times = measure.time_calls(call, repeats, warmup)
    if save_output:
        np.save(save_output, np.asarray(first.images, np.float32) / 255.0)
    res = {"framework": "jaxdiff", "dtype": dtype, "steps": steps, "batch": batch, "load_s": load_s, "first_call_s": first_s,
           "first_call_timings": first.timings, "peak_rss_load": peak_load, "peak_rss_run": measure.peak_rss_bytes(),
           **measure.summarize(times)}
    res["compile_s"] = first_s - res["median_s"]
    return res


def run_torch_child(folder: Path, batch: int, steps: int, repeats: int, warmup: int, save_output: str | None,
                    threads: int | None = None, dtype: str = "float32") -> dict:
    """diffusers' pipeline with decoding to numpy images (as jaxdiff returns uint8 images): on a CUDA GPU in
    ``dtype`` when torch sees one, else float32 on the CPU."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    cuda = torch.cuda.is_available()
    torch.set_num_threads(threads or os.cpu_count())
    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False,
                                                   feature_extractor=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if cuda:
        pipe = pipe.to("cuda", getattr(torch, dtype))
    load_s = time.perf_counter() - t0
    peak_load = measure.peak_rss_bytes()
    measure.reset_peak_rss()
    noise = torch.from_numpy(np.transpose(initial_latents(dict(pipe.unet.config), batch), (0, 3, 1, 2)).copy())
    noise = noise.to(pipe.device, pipe.unet.dtype)

    def call():
        return pipe([PROMPT] * batch, num_inference_steps=steps, guidance_scale=GUIDANCE, latents=noise,
                    output_type="np")

    with torch.inference_mode():
        t0 = time.perf_counter()
        first = call()
        first_s = time.perf_counter() - t0
        times = measure.time_calls(call, repeats, warmup)
    if save_output:
        np.save(save_output, np.asarray(first.images, np.float32))
    res = {"framework": "diffusers-torch", "dtype": dtype if cuda else "float32", "steps": steps, "batch": batch, "load_s": load_s, "first_call_s": first_s,
           "threads": torch.get_num_threads(), "peak_rss_load": peak_load,
           "peak_rss_run": measure.peak_rss_bytes(), **measure.summarize(times)}
    res["compile_s"] = None   # eager: nothing to compile
    return res


def summarize_framework(rows: list[dict], batch: int) -> dict:
    """Two step counts of one framework -> denoising it/s, images/s, compile time."""
    lo, hi = sorted(rows, key=lambda r: r["steps"])
    return {"framework": hi["framework"], "batch": batch, "steps": (lo["steps"], hi["steps"]),
            "seconds": (lo["median_s"], hi["median_s"]),
            "denoise_it_per_s": (hi["steps"] - lo["steps"]) / (hi["median_s"] - lo["median_s"]),
            "images_per_s": batch / hi["median_s"], "compile_s": hi.get("compile_s"),
            "compile_cached_s": hi.get("compile_cached_s"), "peak_rss_run": max(r["peak_rss_run"] for r in rows),
            "load": [r["load_before"] for r in rows] + [r["load_after"] for r in rows]}


def format_table(summaries: list[dict]) -> str:
    head = ("| framework | batch | s/call at N1, N2 steps | denoising it/s | images/s | compile s (cold / cached) "
            "| peak RSS GiB | load range |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in summaries:
        cold, cached = s.get("compile_s"), s.get("compile_cached_s")
        lines.append(f"| {s['framework']} | {s['batch']} | {s['seconds'][0]:.3f} ({s['steps'][0]}), "
                     f"{s['seconds'][1]:.3f} ({s['steps'][1]}) | {s['denoise_it_per_s']:.1f} | "
                     f"{s['images_per_s']:.2f} | {'-' if cold is None else f'{cold:.1f}'} / "
                     f"{'-' if cached is None else f'{cached:.1f}'}"
                     f" | {s['peak_rss_run'] / measure.GiB:.2f} | {min(s['load']):.2f}-{max(s['load']):.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny", choices=["tiny", "sd15"],
                    help="tiny: the demo model; sd15: SD1.5-shaped UNet/VAE/text encoder, random weights")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="weights (PyTorch uses it only on a CUDA GPU)")
    ap.add_argument("--batch", type=int, default=1, help="prompts per call (the UNet sees 2x with guidance)")
    ap.add_argument("--steps", nargs=2, type=int, default=[2, 10], help="two step counts N1 < N2")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "jaxdiff-bench"))
    ap.add_argument("--json")
    ap.add_argument("--single-run", action="store_true", help="no second, cache-served jaxdiff compile")
    ap.add_argument("--load-threshold", type=float, default=1.2)
    ap.add_argument("--max-wait", type=float, default=600.0)
    ap.add_argument("--timeout", type=float, default=1200.0)
    ap.add_argument("--torch-threads", type=int, help="torch.set_num_threads (default: the number of cores)")
    ap.add_argument("--child", choices=["jax", "torch"], help=argparse.SUPPRESS)
    ap.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", help=argparse.SUPPRESS)
    ap.add_argument("--save-output", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.prepare:
        prepare_model(Path(args.model), args.config)
        measure.emit_result({"prepared": args.model})
        return 0
    if args.child:
        steps = args.steps[0]
        if args.child == "jax":
            res = run_jax_child(Path(args.model), args.batch, steps, args.repeats, args.warmup, args.cache_dir,
                                args.save_output, args.dtype)
        else:
            res = run_torch_child(Path(args.model), args.batch, steps, args.repeats, args.warmup, args.save_output,
                                  args.torch_threads, args.dtype)
        measure.emit_result(res)
        return 0

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    folder = workdir / f"{args.config}_pipeline"
    py = measure.this_python()
    if not (folder / "model_index.json").is_file():
        res = measure.run_child([py, "-m", "bench.pipeline", "--prepare", "--config", args.config,
                                 "--model", str(folder)], args.timeout, log=log)
        if "error" in res:
            raise SystemExit(f"preparing the {args.config} model failed: {res}")
    info = measure.machine_info(PACKAGES)
    common = ["--model", str(folder), "--batch", str(args.batch), "--repeats", str(args.repeats),
              "--warmup", str(args.warmup), "--dtype", args.dtype]
    rows: dict[str, list[dict]] = {"jaxdiff": [], "diffusers-torch": []}
    outputs = {}
    for steps in sorted(args.steps):
        for fw in ("jax", "torch"):
            out = str(workdir / f"pipeline_b{args.batch}_{steps}_{fw}.npy")
            outputs[(fw, steps)] = out
            cmd = [py, "-m", "bench.pipeline", "--child", fw, "--steps", str(steps), str(steps),
                   "--save-output", out, *common]
            if fw == "torch" and args.torch_threads:
                cmd += ["--torch-threads", str(args.torch_threads)]
            cache = tempfile.mkdtemp(prefix="jaxdiff-pcc-", dir=workdir) if fw == "jax" else None
            before = measure.wait_for_quiet(args.load_threshold, args.max_wait, log=log)
            res = measure.run_child(cmd + (["--cache-dir", cache] if cache else []), args.timeout, log=log)
            res.update(load_before=before, load_after=measure.loadavg())
            if "error" in res:
                raise SystemExit(f"{fw} child failed: {res}")
            if cache and not args.single_run:   # a second process compiles the same program from the cache
                again = measure.run_child(cmd + ["--cache-dir", cache], args.timeout, log=log)
                res["compile_cached_s"] = again.get("compile_s")
            rows["jaxdiff" if fw == "jax" else "diffusers-torch"].append(res)
    summaries = [summarize_framework(r, args.batch) for r in rows.values()]
    n2 = max(args.steps)
    agreement = compare(np.load(outputs[("jax", n2)]), np.load(outputs[("torch", n2)]))
    table = format_table(summaries)
    print(table)
    print(f"final images after {n2} steps ([0, 1]), jaxdiff vs diffusers: max-abs {agreement['max_abs']:.2e} "
          f"(std {agreement['ref_std']:.3f})")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "argv": sys.argv, "rows": rows,
                                               "summaries": summaries, "agreement": agreement}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
