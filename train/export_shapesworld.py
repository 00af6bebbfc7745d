"""Export the trained ShapesWorld model (EMA weights) as a diffusers folder, and pick its default sampler.

    python -m train.export_shapesworld --workdir runs/shapesworld --dst jaxdiff/assets/shapesworld
    python -m train.export_shapesworld --choose-scheduler-of EXPORT     # re-pick the sampler of an export

writes ``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/`` (config.json + safetensors),
``tokenizer/`` (CLIP-BPE vocab.json + merges.txt), ``scheduler/scheduler_config.json`` and
``shapesworld_training.json`` (provenance: plan, scaling factor, sampler comparison). Weights are stored as
float32 safetensors, exactly the trained EMA values: 5.91M parameters = 23.7 MB, inside the 25 MB package
budget (checked; the export fails rather than exceed it). ``--dtype float16`` halves that, but transformers 5
then loads the text encoder in float16 (it keeps a checkpoint's dtype unless ``torch_dtype`` is given) while
diffusers upcasts the UNet/VAE to float32, so a plain ``StableDiffusionPipeline.from_pretrained`` fails on
mixed dtypes; our converter upcasts everything to float32 either way.

Sampler choice (``--scheduler auto``): each candidate of :data:`SCHEDULER_CANDIDATES` samples the same
held-out captions (:func:`jaxdiff.shapesworld.eval_captions`) with the same seeds at ``steps`` steps and the
sampling CLI's default guidance; the judge scores count/colour/shape/background; the best mean accuracy wins
and becomes ``scheduler_config.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from jaxdiff.checkpoint import StableDiffusionModel, atomic_folder, config_from_dict
from train import architecture, unet_stage, vae_stage
from train.config import PLANS, Plan

# steps_offset stays 1 everywhere: only "leading" spacing reads it, and diffusers' StableDiffusionPipeline
# rewrites any other value to 1 (with a deprecation warning) when it loads the folder.
SCHEDULER_CANDIDATES = {
    # SD1.5's own DDIM config (leading spacing + steps_offset 1: 30 steps start at t = 958)
    "ddim_leading": dict(architecture.SCHEDULER),
    # trailing spacing starts at t = 999, the training step closest to pure noise (Lin et al. 2024, sec. 3.3)
    "ddim_trailing": dict(architecture.SCHEDULER, timestep_spacing="trailing"),
    # Euler (Karras et al. 2022, Algorithm 1 without churn) on evenly spaced timesteps 999 .. 0
    "euler": {**{k: v for k, v in architecture.SCHEDULER.items() if k not in ("clip_sample", "set_alpha_to_one")},
              "_class_name": "EulerDiscreteScheduler", "timestep_spacing": "linspace"},
}
ATTRIBUTES = ("count", "colour", "shape", "background")
MAX_BYTES = 25 * 10 ** 6


def build_model(plan: Plan, workdir: str | Path, scheduler: dict | None = None) -> StableDiffusionModel:
    """The trained model (EMA weights) from a finished training ``workdir``."""
    workdir = Path(workdir)
    text_dict = json.loads((workdir / "text_encoder.json").read_text())
    meta = json.loads((workdir / "latents" / "meta.json").read_text())
    dicts = {"unet": dict(plan.models["unet"]), "vae": dict(plan.models["vae"], scaling_factor=meta["scaling_factor"]),
             "text_encoder": text_dict}
    params = {"vae": vae_stage.trained_params(plan, workdir), **unet_stage.trained_params(plan, workdir, text_dict)}
    configs = {n: config_from_dict(n, d) for n, d in dicts.items()}
    return StableDiffusionModel(configs, params, dicts, dict(scheduler or plan.scheduler),
                                {"tokenizer": str(workdir / "tokenizer")})


def judge_scores(model: StableDiffusionModel, captions: list[str], seeds: tuple[int, ...], steps: int) -> dict:
    """Per-attribute judge accuracy of ``model``'s samples (one image per caption and seed)."""
    from sample.shapesworld_eval import Tally, judge_images, sample_captions
    from sample.spec import SampleSpec

    tally = Tally()
    for seed in seeds:
        judge_images(sample_captions(model, captions, seed, spec=SampleSpec(steps=steps)), captions, tally)
    return {a: tally.rate(a) for a in ATTRIBUTES if a in tally.counts}


def with_scheduler(model: StableDiffusionModel, name: str) -> StableDiffusionModel:
    """``model`` with the sampler ``name`` of :data:`SCHEDULER_CANDIDATES`."""
    return dataclasses.replace(model, scheduler_config=SCHEDULER_CANDIDATES[name])


def choose_scheduler(model: StableDiffusionModel, n_captions: int, seeds: tuple[int, ...], steps: int,
                     log=print) -> tuple[str, dict]:
    from jaxdiff.shapesworld import eval_captions

    captions = eval_captions(n_captions)
    results = {}
    for name in SCHEDULER_CANDIDATES:
        scores = judge_scores(with_scheduler(model, name), captions, seeds, steps)
        results[name] = dict(scores, mean=float(np.mean(list(scores.values()))))
        log(f"[export] {name}: " + "  ".join(f"{k} {v:.3f}" for k, v in results[name].items()))
    best = max(results, key=lambda n: results[n]["mean"])
    return best, results


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def write_folder(model: StableDiffusionModel, dst: str | Path, provenance: dict, dtype=np.float32) -> Path:
    """Write ``model`` and its ``shapesworld_training.json`` atomically into ``dst`` (replacing what was there)."""
    from weights_convert.export import export_diffusers_folder

    dst = Path(dst).absolute()
    with atomic_folder(dst) as tmp:
        export_diffusers_folder(model, tmp, dtype=dtype)
        (tmp / "shapesworld_training.json").write_text(json.dumps(provenance, indent=2))
        for path in [tmp, *tmp.rglob("*")]:      # mkdtemp / safetensors create owner-only files: a package
            path.chmod(0o755 if path.is_dir() else 0o644)   # asset must be world-readable
        size = folder_bytes(tmp)
        if size > MAX_BYTES:
            raise RuntimeError(f"export is {size / 1e6:.1f} MB, over the {MAX_BYTES / 1e6:.0f} MB package budget")
    return dst


def export(plan: Plan, workdir: str | Path, dst: str | Path, *, scheduler: str = "auto", dtype=np.float32,
           n_captions: int = 48, seeds: tuple[int, ...] = (0,), steps: int = 30, log=print) -> Path:
    """Write the diffusers folder atomically into ``dst`` (see module doc); returns ``dst``."""
    model = build_model(plan, workdir)
    comparison = None
    if scheduler == "auto":
        scheduler, comparison = choose_scheduler(model, n_captions, seeds, steps, log)
    warm = Path(workdir) / "warm_start.json"
    provenance = {"plan": plan.name, "workdir": str(workdir), "weights": "EMA", "dtype": np.dtype(dtype).name,
                  "warm_start": json.loads(warm.read_text()) if warm.is_file() else None,
                  "scaling_factor": model.config_dicts["vae"]["scaling_factor"], "scheduler": scheduler,
                  "scheduler_comparison": comparison, "comparison_steps": steps,
                  "comparison_captions": n_captions, "comparison_seeds": list(seeds)}
    dst = write_folder(with_scheduler(model, scheduler), dst, provenance, dtype)
    log(f"[export] wrote {dst} ({folder_bytes(dst) / 1e6:.1f} MB, scheduler {scheduler})")
    return dst


def choose_scheduler_of(folder: str | Path, *, n_captions: int = 48, seeds: tuple[int, ...] = (0,),
                        steps: int = 30, log=print) -> str:
    """Run the judge's sampler choice (:func:`choose_scheduler`, the same captions and seeds as :func:`export`'s
    ``--scheduler auto``) on an existing export ``folder`` made with a fixed sampler (e.g. on a lent GPU, where
    the comparison was skipped to save device time), and rewrite the folder with the winner; the weights are
    re-written unchanged (float32 round trip). Returns the winner's name."""
    from weights_convert.pipeline import load_any

    folder = Path(folder)
    provenance = json.loads((folder / "shapesworld_training.json").read_text())
    model = load_any(folder)
    name, comparison = choose_scheduler(model, n_captions, seeds, steps, log)
    provenance.update(scheduler=name, scheduler_comparison=comparison, comparison_steps=steps,
                      comparison_captions=n_captions, comparison_seeds=list(seeds))
    write_folder(with_scheduler(model, name), folder, provenance, np.dtype(provenance.get("dtype", "float32")))
    log(f"[export] {folder}: scheduler {name}")
    return name


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.export_shapesworld", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="runs/shapesworld")
    ap.add_argument("--dst", default="jaxdiff/assets/shapesworld")
    ap.add_argument("--plan", default="cpu", choices=sorted(PLANS))
    ap.add_argument("--scheduler", default="auto", choices=["auto", *SCHEDULER_CANDIDATES])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    ap.add_argument("--captions", type=int, default=48, help="held-out captions per sampler comparison")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--choose-scheduler-of", metavar="EXPORT", help="only run the judge's sampler choice on an "
                    "existing export and rewrite it with the winner (the other flags but --captions/--steps unused)")
    args = ap.parse_args(argv)
    if args.choose_scheduler_of:
        choose_scheduler_of(args.choose_scheduler_of, n_captions=args.captions, steps=args.steps)
        return 0
    export(PLANS[args.plan], args.workdir, args.dst, scheduler=args.scheduler, dtype=np.dtype(args.dtype),
           n_captions=args.captions, steps=args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
