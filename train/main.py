"""``python -m train``: the whole ShapesWorld training pipeline, resumable by re-running the same command.

    python -m train --workdir runs/shapesworld [--plan cpu] [--export jaxdiff/assets/shapesworld]

Stages (each skipped when already complete in ``--workdir``; a killed stage resumes from its latest checkpoint):

1. ``tokenizer/`` + ``text_encoder.json``: the caption vocabulary and the completed text-encoder config;
2. ``vae/``: AutoencoderKL training (:mod:`train.vae_stage`), then ``vae_reconstruction.json``: the judge's
   accuracy on the VAE's reconstructions of held-out scenes (the ceiling for the diffusion model);
3. ``latents/``: the encoded training set and the measured ``scaling_factor`` (:mod:`train.data`);
4. ``unet/``: UNet + text encoder training (:mod:`train.unet_stage`);
5. the diffusers export of the EMA weights to ``--export`` (:mod:`train.export_shapesworld`), unless
   ``--no-export``.

Data parallelism: every local device is used (batch sharded over a 1-D mesh) when there are several and they
divide the batch; on a CPU-only machine that is one device unless XLA is told otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from train import architecture, data, unet_stage, vae_stage
from train.config import PLANS, Plan


def prepare_text(plan: Plan, workdir: Path) -> dict:
    """Write the tokenizer folder and the completed text-encoder config (deterministic; rewritten each run)."""
    text = architecture.write_tokenizer(workdir / "tokenizer", plan.models["text_encoder"])
    (workdir / "text_encoder.json").write_text(json.dumps(text, indent=2))
    return text


def run_pipeline(plan: Plan, workdir: str | Path, export_to: str | Path | None, *, scheduler: str = "auto",
                 mesh=None) -> None:
    from jaxdiff.tokenizer import load_tokenizer
    from sample.sharding import resolve_mesh

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"[train] plan {plan.name!r} in {workdir.absolute()}", flush=True)
    text = prepare_text(plan, workdir)
    vae_stage.train(plan, workdir, mesh=resolve_mesh(mesh, plan.vae.loop.batch))
    vae_params = vae_stage.trained_params(plan, workdir)
    report_path = workdir / "vae_reconstruction.json"
    if not report_path.is_file():
        report = vae_stage.reconstruction_report(vae_params, vae_stage.vae_config(plan))
        report_path.write_text(json.dumps(report, indent=2))
        print(f"[vae] reconstructions of {report['scenes']} eval scenes: PSNR {report['psnr']:.2f} dB, judge "
              + "  ".join(f"{k} {v:.3f}" for k, v in report["judge_accuracy"].items()), flush=True)
    folder = data.encode_dataset(workdir / "latents", vae_params,
                                 vae_stage.vae_config(plan), load_tokenizer(workdir / "tokenizer"),
                                 plan.unet.dataset_size, chunk=plan.encode_batch,
                                 max_tokens=architecture.MAX_TOKENS)
    dataset = data.load_dataset(folder)
    print(f"[latents] {len(dataset)} scenes, scaling_factor {dataset.scaling_factor:.5f}", flush=True)
    unet_stage.train(plan, workdir, text, dataset, mesh=resolve_mesh(mesh, plan.unet.loop.batch))
    if export_to is not None:
        from train.export_shapesworld import export
        export(plan, workdir, export_to, scheduler=scheduler)
    print(f"[train] done in {(time.perf_counter() - t0) / 60:.1f} min (this process)", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="runs/shapesworld", help="checkpoints, latents, tokenizer")
    ap.add_argument("--plan", default="cpu", choices=sorted(PLANS))
    ap.add_argument("--export", default="jaxdiff/assets/shapesworld", help="diffusers folder to write at the end")
    ap.add_argument("--no-export", action="store_true")
    ap.add_argument("--scheduler", default="auto", help="default sampler of the export: auto (judge picks) or one of "
                    "train.export_shapesworld.SCHEDULER_CANDIDATES")
    args = ap.parse_args(argv)
    run_pipeline(PLANS[args.plan], args.workdir, None if args.no_export else args.export, scheduler=args.scheduler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
