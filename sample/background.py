"""Abs-Grad-SAM for sampling runs: subjects, saliency sites, replacement steps, the reference latents, the steering,
and the mask overlays a run writes.

Host side of :mod:`jaxdiff.steer.abs_grad_sam`. The run is img2img from the reference image: the reference is
encoded with the run's own VAE posterior draw and noised with the run's own noise
(:func:`sample.pipeline.start_draws`), so the replaced background and the img2img start share one noise draw.

``python -m sample.background --reference N --out ref.png`` writes ShapesWorld reference background N (object
free; the kind cycles grass, sky, sand, water, brick) and prints a caption to draw into it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jax
import numpy as np

from jaxdiff.checkpoint import StableDiffusionModel
from jaxdiff.hooks import AttnSite
from jaxdiff.steer import abs_grad_sam as ags
from jaxdiff.steer.relation_maps import WordNotInPromptError, word_span
from jaxdiff.steering import Steering
from jaxdiff.unet import attn_sites
from jaxdiff.vae import VAEConfig, uint8_to_signed
from sample.model_fns import image_latents
from sample.pipeline import start_draws
from sample.spec import SampleSpec, check_images, img2img_start, latent_shape, output_size, schedule_for

STARTS = ("reference", "noise")


class BackgroundError(ValueError):
    """A bad background-keeping request (one line, names the problem)."""


@dataclass(frozen=True)
class BackgroundRequest:
    """What a run asks (None: the default): subject words (empty: the caption's object nouns), replacement
    indices among the executed steps (None: the reference's {5, 18, 28} of 45, scaled), saliency sites (paths;
    empty: the last up-block cross-attention), the score variant and cotangents, the mask settings (dilation
    None: 3 iterations at a 64x64 latent grid, scaled to the run's grid, at least 1) and the start."""

    subjects: tuple[str, ...] = ()
    replace_steps: tuple[int, ...] | None = None
    sites: tuple[str, ...] = ()
    variant: str = "abs"
    cotangent: str = "exact"
    per_position: bool = False
    blur: int = 3
    sigma: float = 1.0
    dilation: int | None = None
    k_std: float = 0.5
    start: str = "reference"


def resolve_sites(config, names: tuple[str, ...]) -> tuple[AttnSite, ...]:
    """The named sites (parameter paths, e.g. ``up_blocks_3/attentions_2/transformer_blocks_0/attn2``), or the
    last cross-attention of the up path (the reference's choice)."""
    sites = attn_sites(config)
    cross = [s for s in sites if s.kind == "cross"]
    if not names:
        up = [s for s in cross if s.part == "up"]
        return ((up or cross)[-1],)
    by_path = {s.path: s for s in sites}
    out = []
    for name in names:
        site = by_path.get(name.strip().strip("/"))
        if site is None:
            raise BackgroundError(f"--saliency-site {name}: no such attention site (cross-attention sites: "
                                  f"{', '.join(s.path for s in cross)})")
        if site.kind != "cross":
            raise BackgroundError(f"--saliency-site {name}: a self-attention site has no text tokens; use a "
                                  f"cross-attention site (attn2)")
        out.append(site)
    return tuple(dict.fromkeys(out))


def prompt_subjects(prompt: str, given: tuple[str, ...]) -> tuple[str, ...]:
    """The subject words of ``prompt``: the given ones, else a ShapesWorld caption's object nouns."""
    if given:
        return given
    from jaxdiff.shapesworld import CaptionError, parse_caption
    try:
        spec = parse_caption(prompt)
    except CaptionError:
        raise BackgroundError(f"no subject for {prompt!r}: name it with --subject WORD (the defaults are the object "
                              "nouns of ShapesWorld captions)") from None
    return tuple(dict.fromkeys(o.shape for o in spec.objects))


def subject_tokens(tokenizer, prompts: list[str], subjects: list[tuple[str, ...]],
                   max_length: int = 77) -> tuple[np.ndarray, np.ndarray]:
    """(onehot (B, T, K), weights (B, J, T)): each prompt's subject-word tokens (BOS counted, first occurrence)
    and each word's average over its tokens; zero padding where a prompt has fewer tokens or words."""
    spans = []
    for p, words in zip(prompts, subjects):
        try:
            spans.append([word_span(tokenizer, p, w, max_length=max_length) for w in words])
        except WordNotInPromptError as e:
            raise BackgroundError(f"--subject: {e}".replace("object word", "subject word")) from None
    # Padded to multiples of 4 so prompts with other subject words reuse the compiled program.
    n_tok = -(-max(sum(len(s) for s in sp) for sp in spans) // 4) * 4
    n_words = -(-max(len(sp) for sp in spans) // 4) * 4
    onehot = np.zeros((len(prompts), n_tok, max_length), np.float32)
    weights = np.zeros((len(prompts), n_words, n_tok), np.float32)
    for b, sp in enumerate(spans):
        t = 0
        for j, span in enumerate(sp):
            for pos in span:
                onehot[b, t, pos] = 1.0
                weights[b, j, t] = 1.0 / len(span)
                t += 1
    return onehot, weights


def check_replace_steps(steps: tuple[int, ...], run_steps: int) -> tuple[int, ...]:
    bad = [r for r in steps if not 1 <= r <= run_steps - 1]
    if bad or not steps:
        raise BackgroundError(f"--replace-steps {','.join(map(str, steps)) or '(none)'}: must be in 1..{run_steps - 1} "
                              f"(this run executes {run_steps} steps; index r replaces the latents after r steps)")
    return tuple(sorted(set(steps)))


@partial(jax.jit, static_argnames=("config",))
def encode_reference(vae_params: dict, images, vae_noise, *, config: VAEConfig):
    """The reference latents exactly as img2img encodes its init image (posterior sample with ``vae_noise``)."""
    return image_latents(vae_params, images, config, vae_noise)


def background_run(model: StableDiffusionModel, prompts: list[str], spec: SampleSpec, request: BackgroundRequest,
                   init_image: np.ndarray, seed: int, noise: np.ndarray | None = None) -> tuple[Steering, dict]:
    """The run's Abs-Grad-SAM :class:`Steering` and a JSON-able record of its settings. ``init_image`` uint8
    (B or 1, H, W, 3) is the reference; ``noise`` the run's img2img noise if given explicitly (else drawn from
    ``seed`` as the sampler draws it)."""
    from jaxdiff.tokenizer import load_tokenizer

    if request.variant not in ags.VARIANTS:
        raise BackgroundError(f"saliency variant {request.variant!r}: choose one of {', '.join(ags.VARIANTS)}")
    if request.cotangent not in ags.COTANGENTS:
        raise BackgroundError(f"saliency cotangent {request.cotangent!r}: choose one of {', '.join(ags.COTANGENTS)}")
    if request.start not in STARTS:
        raise BackgroundError(f"background start {request.start!r}: choose one of {', '.join(STARTS)}")
    if not (np.isfinite(request.sigma) and request.sigma > 0 and np.isfinite(request.k_std)):
        raise BackgroundError(f"mask blur sigma {request.sigma} and threshold {request.k_std}: must be finite, "
                              "sigma > 0")
    images = check_images(init_image, len(prompts))
    height, width = output_size(model, spec, images.shape[1:3])
    if images.shape[1:3] != (height, width):
        raise BackgroundError(f"the reference image is {images.shape[2]}x{images.shape[1]}, the run "
                              f"{width}x{height}")
    schedule = schedule_for(model, spec)
    start = img2img_start(spec.steps, spec.strength, len(schedule))
    run_steps = len(schedule) - start
    steps = check_replace_steps(ags.scaled_steps(run_steps) if request.replace_steps is None
                                else tuple(request.replace_steps), run_steps)
    sites = resolve_sites(model.configs["unet"], request.sites)
    h, w, c = latent_shape(model, height, width)
    dilation = request.dilation if request.dilation is not None else max(1, round(3 * h / 64))
    if dilation < 0 or request.blur < 1 or request.blur % 2 == 0:
        raise BackgroundError(f"mask blur kernel {request.blur} (odd, >= 1) / dilation {dilation} (>= 0)")

    tok = load_tokenizer(model.tokenizer_dirs["tokenizer"])
    subjects = [prompt_subjects(p, request.subjects) for p in prompts]
    onehot, weights = subject_tokens(tok, prompts, subjects)

    vae = model.configs["vae"]
    drawn, vae_noise, _ = start_draws(seed, (len(prompts), h, w, c), (len(prompts), h, w, vae.latent_channels))
    noise = drawn if noise is None else np.asarray(noise, np.float32)
    reference = encode_reference(model.params["vae"], np.asarray(uint8_to_signed(images)), vae_noise, config=vae)
    params = ags.background_params(reference=reference, noise=noise, replace=ags.replace_mask(len(schedule), start,
                                                                                              steps),
                                   onehot=onehot, subject_weights=weights, start=start, sigma=request.sigma,
                                   k_std=request.k_std)
    hook = ags.KeepBackground(ags.SaliencyConfig(sites, request.variant, request.cotangent),
                              ags.MaskConfig(request.blur, dilation, request.per_position))
    record = {"subjects": [list(s) for s in subjects], "replace_steps": list(steps), "run_steps": run_steps,
              "start_step": start, "sites": [s.path for s in sites], "variant": request.variant,
              "cotangent": request.cotangent, "per_position": request.per_position, "blur": request.blur,
              "sigma": request.sigma, "dilation": dilation, "k_std": request.k_std, "start": request.start}
    return ags.background_steering(hook, params, from_noise=request.start == "noise"), record


def mask_panels(image: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """One overlay per replacement step, side by side: the subject mask (fraction of latent channels kept as
    subject at each position, (S, h, w, C)) in red over ``image`` (H, W, 3) uint8."""
    from sample.heatmap import overlay
    from sample.outputs import grid

    height, width = image.shape[:2]
    panels = []
    for m in masks:
        frac = np.asarray(m, np.float32).mean(-1)
        up = np.kron(frac, np.ones((height // frac.shape[0], width // frac.shape[1]), np.float32))
        panels.append(overlay(image, up, alpha=0.5))
    return grid(np.stack(panels), cols=len(panels))


def write_mask_overlays(out: Path, images: np.ndarray, stats: dict) -> tuple[list[str], list[dict]]:
    """``{k:03d}_mask.png`` per image (one panel per replacement step) from the hook's per-step stats; returns
    the file names and per-image records (subject fraction of the latent elements at each replacement)."""
    from sample.outputs import save_png

    masks, replaced = np.asarray(stats["background"]["mask"]), np.asarray(stats["background"]["replaced"])   # (S, B, ...), (S, B)
    files, records = [], []
    for k, image in enumerate(images):
        steps = np.flatnonzero(replaced[:, k])
        name = f"{k:03d}_mask.png"
        save_png(out / name, mask_panels(np.asarray(image), masks[steps, k]))
        files.append(name)
        records.append({"mask": name, "subject_fraction": [round(float(masks[s, k].mean()), 4) for s in steps]})
    return files, records


def main(argv=None) -> int:
    import argparse
    import sys

    from jaxdiff.shapesworld import make_reference_scene
    from sample.outputs import save_png

    ap = argparse.ArgumentParser(prog="python -m sample.background",
                                 description="Write a ShapesWorld reference background (no objects) as a PNG.")
    ap.add_argument("--reference", type=int, default=0, help="reference index (kind = index %% 5)")
    ap.add_argument("--out", default="reference.png")
    args = ap.parse_args(argv)
    if args.reference < 0:
        print(f"error: --reference {args.reference}: must be >= 0", file=sys.stderr)
        return 2
    scene = make_reference_scene(args.reference)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_png(Path(args.out), scene.image)
    print(f"wrote {args.out} ({scene.background}); a caption to draw into it: {scene.caption!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
