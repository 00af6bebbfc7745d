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

Warm start (a plan with ``warm_start``, e.g. ``cpu_continued``): ``--warm-start DIR`` names the finished run
of that plan; its ``tokenizer/``, ``text_encoder.json``, ``vae/``, ``vae_reconstruction.json`` and ``latents/``
(when the plan has the same number of scenes) are copied into ``--workdir`` (the VAE stage then finds itself
complete; a different VAE configuration is refused) and the UNet stage starts from its EMA weights. ``DIR``
may instead be that run's diffusers export (e.g. the shipped ``jaxdiff/assets/shapesworld``, which is what a
fresh machine has): its VAE is used as trained, the latents are encoded by it, and the UNet stage starts from its
weights (:func:`warm_start_from_export`).

Data parallelism: every local device is used (batch sharded over a 1-D mesh) when there are several and they
divide the batch; on a CPU-only machine that is one device unless XLA is told otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import jax
import numpy as np

from jaxdiff.checkpoint import config_from_dict
from train import architecture, data, loop, unet_stage, vae_stage
from train.config import PLANS, Plan


def prepare_text(plan: Plan, workdir: Path) -> dict:
    """Write the tokenizer folder and the completed text-encoder config (deterministic; rewritten each run)."""
    text = architecture.write_tokenizer(workdir / "tokenizer", plan.models["text_encoder"])
    (workdir / "text_encoder.json").write_text(json.dumps(text, indent=2))
    return text


class WarmStartError(ValueError):
    """A warm-start plan without its source run, or a source that is not a finished run of that plan."""


SHARED_WITH_WARM_START = ("tokenizer", "text_encoder.json", "vae", "vae_reconstruction.json", "latents")


def warm_start_from(plan: Plan, source: str | Path | None, workdir: Path, text: dict) -> tuple[dict | None, str | None]:
    """Copy the stages a warm start shares into ``workdir`` (those not there yet) and return the source's EMA
    ``{"unet", "text_encoder"}`` params and a tag naming them (plan, folder, sha256 of the weights)."""
    if plan.warm_start is None:
        if source is not None:
            raise WarmStartError(f"--warm-start given but plan {plan.name!r} does not continue another plan")
        return None, None
    if source is None:
        raise WarmStartError(f"plan {plan.name!r} continues a finished {plan.warm_start!r} run: pass "
                         f"--warm-start DIR (that run's --workdir, or its export)")
    source = Path(source)
    if (source / "model_index.json").is_file():
        params = warm_start_from_export(plan, source, workdir)
    else:
        for name in SHARED_WITH_WARM_START:
            src, dst = source / name, workdir / name
            if not src.exists() and name != "vae_reconstruction.json":        # (that report is recomputed)
                raise WarmStartError(f"--warm-start {source}: no {name} (not a finished {plan.warm_start!r} run)")
            if name == "latents" and data.dataset_size(src) != plan.unet.dataset_size:
                continue                                    # a different number of scenes: encoded afresh
            if src.exists() and not dst.exists():
                (shutil.copytree if src.is_dir() else shutil.copyfile)(src, dst)
        try:
            params = unet_stage.trained_params(PLANS[plan.warm_start], source, text)
        except RuntimeError as e:                                              # stage not finished
            raise WarmStartError(f"--warm-start {source}: {e}") from None
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        digest.update(np.ascontiguousarray(leaf).tobytes())
    return params, f"{plan.warm_start}:{source.absolute()}:{digest.hexdigest()[:16]}"


def warm_start_from_export(plan: Plan, source: Path, workdir: Path) -> dict:
    """The ``{"unet", "text_encoder"}`` params of ``source``, a diffusers folder exported by a finished run of
    ``plan.warm_start`` (:mod:`train.export_shapesworld`, e.g. the shipped ``jaxdiff/assets/shapesworld``).
    Its provenance must name that plan and its networks and vocabulary must be the plan's; its VAE folder is
    copied to ``workdir`` as the trained VAE (:data:`train.vae_stage.EXPORTED`) and the latents are encoded by it.
    """
    from weights_convert.pipeline import load_any

    provenance = source / "shapesworld_training.json"
    made_by = json.loads(provenance.read_text()).get("plan") if provenance.is_file() else None
    if made_by != plan.warm_start:
        raise WarmStartError(f"--warm-start {source}: an export of plan {made_by!r} (its shapesworld_training.json), "
                             f"but plan {plan.name!r} continues {plan.warm_start!r}")
    model = load_any(source)
    text = json.loads((workdir / "text_encoder.json").read_text())
    scaling = model.config_dicts["vae"].get("scaling_factor", 1.0)
    want = {"unet": plan.models["unet"], "text_encoder": text, "vae": dict(plan.models["vae"], scaling_factor=scaling)}
    for name, config in want.items():
        if config_from_dict(name, config) != model.configs[name]:
            raise WarmStartError(f"--warm-start {source}: its {name} is not plan {plan.name!r}'s {name} "
                                 f"(config.json differs from train.architecture)")
    for name in ("vocab.json", "merges.txt"):
        if (source / "tokenizer" / name).read_text() != (workdir / "tokenizer" / name).read_text():
            raise WarmStartError(f"--warm-start {source}: tokenizer/{name} is not the plan's vocabulary")
    if not (workdir / vae_stage.EXPORTED).exists():
        shutil.copytree(source / "vae", workdir / vae_stage.EXPORTED)
    return {"unet": model.params["unet"], "text_encoder": model.params["text_encoder"]}


def run_pipeline(plan: Plan, workdir: str | Path, export_to: str | Path | None, *, scheduler: str = "auto",
                 mesh=None, warm_start: str | Path | None = None) -> None:
    from jaxdiff.tokenizer import load_tokenizer
    from sample.sharding import resolve_mesh

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"[train] plan {plan.name!r} in {workdir.absolute()}", flush=True)
    text = prepare_text(plan, workdir)
    init, init_tag = warm_start_from(plan, warm_start, workdir, text)
    if init_tag is not None:
        (workdir / "warm_start.json").write_text(json.dumps({"plan": plan.warm_start, "from": init_tag}, indent=2))
        print(f"[train] warm start from {init_tag}", flush=True)
    if vae_stage.exported_vae(workdir) is not None:
        print(f"[vae] the warm-start export's VAE ({vae_stage.EXPORTED}/)", flush=True)
    else:
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
    unet_stage.train(plan, workdir, text, dataset, mesh=resolve_mesh(mesh, plan.unet.loop.batch), init=init,
                     init_tag=init_tag)
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
    ap.add_argument("--warm-start", metavar="DIR", help="the finished run a warm-start plan (e.g. cpu_continued) "
                    "continues")
    ap.add_argument("--scheduler", default="auto", help="default sampler of the export: auto (judge picks) or one of "
                    "train.export_shapesworld.SCHEDULER_CANDIDATES")
    args = ap.parse_args(argv)
    try:
        run_pipeline(PLANS[args.plan], args.workdir, None if args.no_export else args.export,
                     scheduler=args.scheduler, warm_start=args.warm_start)
    except (WarmStartError, loop.ResumeError, data.DatasetSizeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
