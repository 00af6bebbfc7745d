"""``python -m sample``: text-to-image and image-to-image from the command line.

Writes one PNG per image, ``grid.png``, ``init_latents.npy`` (diffusers' (B, 4, H/8, W/8) layout) and
``run.json``, a sidecar with every setting, the model's hash and the seed: ``python -m sample --from-json
OUT/run.json --out OTHER`` regenerates the same pixels. ``--heatmap WORD`` adds a DAAM-style cross-attention
overlay of that prompt word per image. Flags are parsed in :func:`main` only; :func:`run` takes a plain dict.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

SETTINGS = ("model", "prompts", "negative_prompt", "scheduler", "steps", "guidance", "eta", "seed", "num_images",
            "height", "width", "dtype", "init_image", "strength", "init_latents", "heatmap", "concepts", "concept",
            "fair", "concept_scale", "concept_rows", "lowpass", "lowpass_row", "steer_relations", "relation",
            "relation_loss", "tto_steps", "tto_lr", "tto_iters", "keep_background", "subject", "replace_steps",
            "saliency_site", "saliency", "saliency_cotangent", "mask_per_position", "mask_blur", "mask_sigma",
            "mask_dilation", "background_start")
BACKGROUND_TUNING = ("subject", "replace_steps", "saliency_site", "saliency", "saliency_cotangent",
                     "mask_per_position", "mask_blur", "mask_sigma", "mask_dilation", "background_start")
SMALL_VOCABULARY = 10000   # a caption-language vocabulary (the embedded model's), where an unknown word is a typo


class CLIError(ValueError):
    """A bad command-line argument; printed as ``error: ...`` with exit status 2."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("JAXDIFF_CACHE_DIR", Path.home() / ".cache" / "jaxdiff" / "xla"))


def enable_compilation_cache(path: Path) -> None:
    """Persist compiled XLA programs, so a second run of the same shapes skips compilation."""
    import jax
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def read_prompts(prompts: list[str] | None, prompt_file: str | None) -> list[str]:
    out = list(prompts or [])
    if prompt_file:
        try:
            lines = Path(prompt_file).read_text().splitlines()
        except OSError as e:
            raise CLIError(f"cannot read --prompt-file {prompt_file}: {e.strerror}") from None
        out += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not out:
        raise CLIError("no prompt: give --prompt TEXT (repeatable) or --prompt-file FILE")
    return out


def read_image(path: str, height: int | None, width: int | None) -> np.ndarray:
    """An RGB uint8 (1, H, W, 3) array; resized (Lanczos) to ``height x width`` when both are given."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if height and width and im.size != (width, height):
                im = im.resize((width, height), Image.LANCZOS)
            return np.asarray(im, np.uint8)[None]
    except FileNotFoundError:
        raise CLIError(f"--init-image {path}: no such file") from None
    except (UnidentifiedImageError, OSError) as e:
        raise CLIError(f"--init-image {path}: not a readable image ({e})") from None


def read_init_latents(path: str, batch: int) -> np.ndarray:
    """A ``.npy`` of diffusers-layout latents (B, C, h, w) -> our NHWC (B, h, w, C)."""
    try:
        z = np.load(path)
    except (OSError, ValueError) as e:
        raise CLIError(f"--init-latents {path}: cannot read a .npy array ({e})") from None
    if z.ndim != 4 or z.shape[0] != batch:
        raise CLIError(f"--init-latents {path}: expected shape ({batch}, C, H/8, W/8) (diffusers layout, one row "
                       f"per image), got {z.shape}")
    return np.ascontiguousarray(np.transpose(z, (0, 2, 3, 1)), np.float32)


def load_model(path: str | None, dtype: str):
    """Any model ``weights_convert.pipeline.load_any`` reads; bf16 weights on request."""
    from weights_convert.convert import ConversionError
    from weights_convert.pipeline import load_any
    from weights_convert.readers import CheckpointError
    if path is None:                    # the embedded ShapesWorld model (jaxdiff/assets/shapesworld)
        from jaxdiff.shapesworld.model import MissingDefaultModel, default_model_dir
        try:
            path = str(default_model_dir())
        except MissingDefaultModel as e:
            raise CLIError(str(e)) from None
    if not Path(path).exists():
        raise CLIError(f"--model {path}: no such file or folder")
    import ml_dtypes
    try:  # cast while converting, leaf by leaf: the float32 weights are never all held beside the bf16 ones
        return load_any(path, dtype=ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)
    except (CheckpointError, ConversionError, ValueError) as e:
        raise CLIError(f"--model {path}: {e}") from None


def heatmap_capture(model):
    """Capture every cross-attention layer's head-mean map, summed over steps, conditional rows only."""
    from jaxdiff.unet import attn_sites
    from sample.loop import StepCaptureSpec
    sites = tuple(s for s in attn_sites(model.configs["unet"]) if s.kind == "cross")
    return StepCaptureSpec.of(sites, mode="mean", reduce="sum", cond_only=True)


def write_heatmaps(out: Path, tok, result, prompts_per_image: list[str], word: str) -> list[str]:
    """One overlay PNG per image from the step-summed cross-attention maps in ``result.aux``."""
    from jaxdiff.attention import maps_to_grid
    from sample.heatmap import overlay, word_heatmap, word_token_indices
    from sample.outputs import save_png
    _, h_img, w_img, _ = result.images.shape
    files = []
    for k, prompt in enumerate(prompts_per_image):
        idx = word_token_indices(tok, prompt, word)
        grids = []
        for probs in result.aux["attn"].values():          # (B, Q, K) summed over steps
            q = probs.shape[1]
            scale = int(round((h_img * w_img / q) ** 0.5))  # pixels per attention cell
            grids.append(np.asarray(maps_to_grid(probs[k:k + 1], h_img // scale, w_img // scale))[0])
        name = f"{k:03d}_heatmap_{word}.png"
        save_png(out / name, overlay(result.images[k], word_heatmap(grids, idx, h_img, w_img)))
        files.append(name)
    return files


def out_of_vocabulary(tok, prompt: str) -> list[str]:
    """Words of ``prompt`` that a small caption-language vocabulary has no whole token for (they would be spelled
    out letter by letter, which such a model never saw). Empty for real CLIP vocabularies."""
    vocab = tok.get_vocab()
    if len(vocab) >= SMALL_VOCABULARY:
        return []
    words = [w.strip(".,;:!?\"'").lower() for w in prompt.split()]
    return [w for w in words if w and f"{w}</w>" not in vocab]


def concept_settings(s: dict, model, spec, n_images: int, image_hw):
    """(table, (n_images, N) weights, per-image concept dicts, warnings) of the run's concept flags, or Nones."""
    from jaxdiff.steer.concepts import ConceptTableError
    from sample.concepts import ConceptRequest, check_table, parse_concept, resolve_table

    wants = s.get("concept") or s.get("fair") is not None or s.get("concept_scale") is not None
    if not s.get("concepts"):
        if wants:
            raise CLIError("--concept/--fair/--concept-scale need a concept table: --concepts PATH|NAME")
        return None, None, None, []
    try:
        table = resolve_table(s["concepts"])
        warnings = check_table(model, table, spec, image_hw)
        if s.get("concept_scale") is not None and not np.isfinite(s["concept_scale"]):
            raise ConceptTableError(f"--concept-scale {s['concept_scale']}: must be finite")
        request = ConceptRequest(concepts=tuple(parse_concept(c) for c in s.get("concept") or ()), fair=s.get("fair"))
        if not request.concepts and request.fair is None:
            raise ConceptTableError(f"--concepts {s['concepts']}: choose --concept NAME[=SCALE] (repeatable) or "
                                    f"--fair GROUP (groups: {', '.join(table.groups) or 'none'}; concepts: "
                                    f"{', '.join(table.names)})")
        weights, per_image = request.per_image(table, n_images, s["seed"])
    except ConceptTableError as e:
        raise CLIError(str(e)) from None
    return table, weights, per_image, warnings


def relation_settings(s: dict, model, spec, prompts: list[str], image_hw):
    """(Learn-to-Steer steering, its run.json record) of the run's relation flags, or (None, None)."""
    from sample.relations import RelationRequest

    tuning = [f"--{k.replace('_', '-')}" for k in ("relation", "tto_steps", "tto_lr", "tto_iters")
              if s.get(k) not in (None, [], ())]
    if s.get("relation_loss") not in (None, "learned"):
        tuning.append("--relation-loss")
    if not s.get("steer_relations"):
        if tuning:
            raise CLIError(f"{', '.join(tuning)} need --steer-relations [CLASSIFIER]")
        return None, None
    from sample.relations import relation_run
    request = RelationRequest(classifier=None if s["steer_relations"] == "shipped" else s["steer_relations"],
                              loss=s.get("relation_loss") or "learned", tto_steps=s.get("tto_steps"),
                              eta=s.get("tto_lr"), relations=tuple(s.get("relation") or ()),
                              **({} if s.get("tto_iters") is None else {"max_updates": s["tto_iters"]}))
    try:
        return relation_run(model, prompts, spec, request, image_hw)
    except ValueError as e:
        raise CLIError(str(e)) from None


def parse_steps(text: str | None) -> tuple[int, ...] | None:
    """``"5,18,28"`` -> (5, 18, 28); None stays None."""
    if text is None:
        return None
    try:
        return tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise CLIError(f"--replace-steps {text}: expected comma-separated step indices, e.g. 5,18,28") from None


def background_settings(s: dict, model, spec, prompts: list[str], init_image, init_latents):
    """(Abs-Grad-SAM steering, its run.json record) of the run's background flags, or (None, None)."""
    tuning = [f"--{k.replace('_', '-')}" for k in BACKGROUND_TUNING if s.get(k) not in (None, [], (), False)]
    if not s.get("keep_background"):
        if tuning:
            raise CLIError(f"{', '.join(tuning)} need --keep-background")
        return None, None
    if init_image is None:
        raise CLIError("--keep-background needs the reference image: --init-image PATH")
    from sample.background import BackgroundRequest, background_run
    request = BackgroundRequest(
        subjects=tuple(s.get("subject") or ()), replace_steps=parse_steps(s.get("replace_steps")),
        sites=tuple(s.get("saliency_site") or ()), variant=s.get("saliency") or "abs",
        cotangent=s.get("saliency_cotangent") or "exact", per_position=bool(s.get("mask_per_position")),
        **{k: s[f"mask_{k}"] for k in ("blur", "sigma", "dilation") if s.get(f"mask_{k}") is not None},
        start=s.get("background_start") or "reference")
    try:
        return background_run(model, prompts, spec, request, init_image, s["seed"], noise=init_latents)
    except ValueError as e:
        raise CLIError(str(e)) from None


def run(settings: dict, out: Path, *, cache: bool = True, quiet: bool = False) -> dict:
    """Generate from a settings dict (the ``run.json`` schema), write the files, return the sidecar."""
    import jax

    from sample.outputs import grid, save_png, write_json_atomic
    from sample.pipeline import SampleSpec, generate
    from sample.progress import ProgressBar

    s = dict(settings)
    if cache:
        enable_compilation_cache(default_cache_dir())
    if s["steps"] < 1:
        raise CLIError(f"--steps {s['steps']}: must be >= 1")
    if s["num_images"] < 1:
        raise CLIError(f"--num-images {s['num_images']}: must be >= 1")
    prompts = [p for p in s["prompts"] for _ in range(s["num_images"])]
    t0 = time.perf_counter()
    model = load_model(s["model"], s["dtype"])
    from sample.spec import vae_factor
    f = vae_factor(model)
    for k in ("height", "width"):
        if s.get(k) is not None and (s[k] <= 0 or s[k] % f):
            raise CLIError(f"--{k} {s[k]}: must be a positive multiple of {f} (this model's VAE downsamples by {f})")
    init_image = read_image(s["init_image"], s["height"], s["width"]) if s.get("init_image") else None
    init_latents = read_init_latents(s["init_latents"], len(prompts)) if s.get("init_latents") else None
    spec = SampleSpec(steps=s["steps"], guidance=s["guidance"], height=s["height"], width=s["width"],
                      scheduler=s["scheduler"], eta=s["eta"], dtype=s["dtype"], strength=s["strength"])
    capture = heatmap_capture(model) if s.get("heatmap") else None
    from jaxdiff.tokenizer import load_tokenizer
    tok = load_tokenizer(model.tokenizer_dirs["tokenizer"])
    for p in s["prompts"]:
        unknown = out_of_vocabulary(tok, p)
        if unknown:
            print(f"warning: {', '.join(repr(w) for w in unknown)} not in this model's vocabulary (prompt {p!r}); "
                  "it will be spelled out letter by letter", file=sys.stderr)
    table, weights, per_image, warnings = concept_settings(
        s, model, spec, len(prompts), None if init_image is None else init_image.shape[1:3])
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    if s.get("lowpass") is not None and (not np.isfinite(s["lowpass"])):
        raise CLIError(f"--lowpass {s['lowpass']}: must be a finite weight")
    if s.get("heatmap"):
        from sample.heatmap import word_token_indices
        for p in s["prompts"]:
            try:
                word_token_indices(tok, p, s["heatmap"])
            except ValueError as e:
                raise CLIError(str(e)) from None
    relations, relation_record = relation_settings(s, model, spec, prompts,
                                                   None if init_image is None else init_image.shape[1:3])
    background, background_record = background_settings(s, model, spec, prompts, init_image, init_latents)
    progress = None if quiet else ProgressBar()
    negatives = [s["negative_prompt"]] * len(prompts) if s["negative_prompt"] else None
    reference = None
    try:
        from sample.steering import compose
        extra = None if relations is None and background is None else compose(relations, background)
        if table is None and s.get("lowpass") is None and extra is None:
            result = generate(model, prompts, spec=spec, seed=s["seed"], negative_prompts=negatives,
                              init_latents=init_latents, init_image=init_image, capture=capture, progress=progress)
        else:
            from sample.concepts import concept_run
            result, reference = concept_run(
                model, prompts, spec=spec, seed=s["seed"], table=table, weights=weights,
                scale=s.get("concept_scale"), rows=s.get("concept_rows"), lowpass=s.get("lowpass"),
                lowpass_row=s.get("lowpass_row") or "uncond", negative_prompts=negatives,
                init_latents=init_latents, init_image=init_image, capture=capture, progress=progress,
                extra=extra)
    except ValueError as e:
        raise CLIError(str(e)) from None

    out.mkdir(parents=True, exist_ok=True)
    files = []
    for k, img in enumerate(result.images):
        files.append(f"{k:03d}.png")
        save_png(out / files[-1], img)
    save_png(out / "grid.png", grid(result.images))
    if reference is not None:
        save_png(out / "reference_grid.png", grid(reference.images))
    np.save(out / "init_latents.npy", np.transpose(np.asarray(result.init_latents), (0, 3, 1, 2)))
    heat_files = write_heatmaps(out, tok, result, prompts, s["heatmap"]) if s.get("heatmap") else []
    per_relation = None
    if relations is not None:
        from sample.relations import image_reports
        per_relation = image_reports(result.aux["hooks"]["relations"], relation_record)
    mask_files, per_mask = [], None
    if background is not None:
        from sample.background import write_mask_overlays
        mask_files, per_mask = write_mask_overlays(out, result.images, result.aux["hooks"])
    sidecar = {
        "settings": {k: s.get(k) for k in SETTINGS},
        "model_sha256": model.manifest.get("source_sha256"),
        "model_source": model.manifest.get("source", s["model"]),
        "images": [{"file": f, "prompt": p, "index": k, **({"concepts": per_image[k]} if per_image else {}),
                    **({"relations": per_relation[k]} if per_relation else {}),
                    **({"background": per_mask[k]} if per_mask else {})}
                   for k, (f, p) in enumerate(zip(files, prompts))],
        "relation_steering": relation_record,
        "background_keeping": background_record, "masks": mask_files,
        "concept_table": None if table is None else {
            "method": table.method, "kind": table.kind, "scale": table.scale if s.get("concept_scale") is None
            else s["concept_scale"], "rows": s.get("concept_rows") or table.rows,
            "model_sha256": table.model_sha256},
        "reference_grid": None if reference is None else "reference_grid.png",
        "heatmaps": heat_files, "grid": "grid.png", "init_latents": "init_latents.npy",
        "versions": {"jax": jax.__version__, "backend": jax.default_backend(), "devices": jax.device_count()},
        "timings": {**{k: round(v, 3) for k, v in dict(result.timings).items()},
                    "total_s": round(time.perf_counter() - t0, 3)},
    }
    write_json_atomic(out / "run.json", sidecar)
    return sidecar


def parse_args(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m sample", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="diffusers folder, single-file checkpoint or converted jaxdiff folder "
                    "(default: the embedded ShapesWorld model)")
    ap.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    ap.add_argument("--prompt-file", help="a text file with one prompt per line")
    ap.add_argument("--negative-prompt", default="", help="negative prompt (the unconditional CFG row)")
    ap.add_argument("--scheduler", default=None,
                    help="ddim, ddpm, pndm, euler, euler_a, dpm++2m (default: the model's own scheduler)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    ap.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-images", type=int, default=1, help="images per prompt")
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="weights/activations dtype (scheduler maths stays float32)")
    ap.add_argument("--init-image", help="img2img: start from this image")
    ap.add_argument("--strength", type=float, default=0.8, help="img2img: how much of the schedule to run")
    ap.add_argument("--init-latents", help="start from these latents (.npy, diffusers (B, 4, H/8, W/8) layout)")
    ap.add_argument("--heatmap", metavar="WORD", help="write a cross-attention heat map of this prompt word")
    ap.add_argument("--concepts", metavar="PATH|NAME",
                    help="a concept table (NAME.safetensors + NAME.json) or a shipped one: sdisc, lwim, respodiff")
    ap.add_argument("--concept", action="append", metavar="NAME[=SCALE]",
                    help="add this concept to every image (repeatable: multi-hot composition); safety concepts "
                         "(e.g. no-red) may be added to --fair")
    ap.add_argument("--fair", metavar="GROUP", help="one concept of GROUP per image, balanced over the images")
    ap.add_argument("--concept-scale", type=float, help="strength of the concept vectors (default: the table's)")
    ap.add_argument("--concept-rows", choices=("cond", "both"),
                    help="guidance rows the concepts edit (default: the table's; SDisc cond, LWIM both)")
    ap.add_argument("--lowpass", type=float, nargs="?", const=1.0, metavar="WEIGHT",
                    help="LWIM background consistency: re-inject a concept-free run's low-pass h (weight 1.0)")
    ap.add_argument("--lowpass-row", choices=("uncond", "cond"),
                    help="which guidance row of the reference run is re-injected (default uncond, as released)")
    ap.add_argument("--steer-relations", nargs="?", const="shipped", metavar="CLASSIFIER",
                    help="Learn-to-Steer: optimise the latents against a relation classifier (a folder from "
                         "python -m train.relation_classifier; default: the one shipped for the embedded model)")
    ap.add_argument("--relation", action="append", metavar="SUBJECT,RELATION,OBJECT",
                    help="the relation to steer, e.g. 'dog,left of,teddy bear' (repeatable; default: parsed from "
                         "each prompt)")
    ap.add_argument("--relation-loss", choices=("learned", "centroid"),
                    help="learned (the classifier, default) or centroid (handcrafted attention-centroid hinge)")
    ap.add_argument("--tto-steps", type=int, help="optimise before steps 0..N-1 (default: half the schedule)")
    ap.add_argument("--tto-lr", type=float, help="gradient step eta (default: the classifier's; SD1 7.5, SD2 5)")
    ap.add_argument("--tto-iters", type=int, help="refinements per step at most (default 15)")
    ap.add_argument("--keep-background", action="store_true",
                    help="Abs-Grad-SAM: keep the --init-image's background, replacing the latents outside the "
                         "subject's saliency mask by the noised reference at --replace-steps")
    ap.add_argument("--subject", action="append", metavar="WORD",
                    help="a subject word of the prompt (repeatable; default: a ShapesWorld caption's object nouns)")
    ap.add_argument("--replace-steps", metavar="R1,R2,...",
                    help="replace after these executed steps (default: the reference's 5,18,28 of 45, scaled)")
    ap.add_argument("--saliency-site", action="append", metavar="PATH",
                    help="cross-attention site(s) of the saliency, e.g. up_blocks_3/attentions_2/"
                         "transformer_blocks_0/attn2 (default: the last up-block cross-attention)")
    ap.add_argument("--saliency", choices=("abs", "relu"), help="gradient rectifier (default abs; relu: the "
                    "released code)")
    ap.add_argument("--saliency-cotangent", choices=("exact", "random"),
                    help="exact per-element gradients (default) or the released code's random projections")
    ap.add_argument("--mask-per-position", action="store_true", help="one mask for all latent channels")
    ap.add_argument("--mask-blur", type=int, help="Gaussian blur kernel of the scores (odd; default 3)")
    ap.add_argument("--mask-sigma", type=float, help="Gaussian blur sigma in latent pixels (default 1)")
    ap.add_argument("--mask-dilation", type=int,
                    help="3x3 dilations of the mask (default: 3 at 64x64 latents, scaled to the run)")
    ap.add_argument("--background-start", choices=("reference", "noise"),
                    help="reference: img2img from the noised reference (default); noise: the released code's "
                         "pure-noise start")
    ap.add_argument("--out", default="out/sample", help="output folder")
    ap.add_argument("--from-json", help="re-run the settings of a run.json sidecar (other flags are ignored)")
    ap.add_argument("--no-compile-cache", action="store_true", help="do not use the persistent XLA cache")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.from_json:
            try:
                settings = json.loads(Path(args.from_json).read_text())["settings"]
            except (OSError, ValueError, KeyError) as e:
                raise CLIError(f"--from-json {args.from_json}: not a run.json sidecar ({e})") from None
        else:
            settings = {k: getattr(args, k, None) for k in SETTINGS if k != "prompts"}
            settings["prompts"] = read_prompts(args.prompt, args.prompt_file)
        sidecar = run(settings, Path(args.out), cache=not args.no_compile_cache, quiet=args.quiet)
    except CLIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(sidecar['images'])} image(s), grid.png and run.json to {args.out} "
          f"({sidecar['timings']['total_s']:.1f} s)")
    return 0
