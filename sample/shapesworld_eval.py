"""Sample captions with the ShapesWorld judge as the metric: the evaluation harness of the baseline table
and of every steering method measured on ShapesWorld (issue 5, part 6).

Noise is a function of ``(seed, caption position)`` only (``fold_in(PRNGKey(seed), position)``), never of the
batch a caption lands in, so a caption's image is the same whatever ``batch`` is used, and a steering method run
on the same caption list sees exactly the starting latents of the baseline it is compared with.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.checkpoint import StableDiffusionModel
from jaxdiff.shapesworld import CaptionScore, score_caption
from jaxdiff.shapesworld.accuracy import Tally
from sample.pipeline import txt2img
from sample.spec import SampleSpec, latent_shape, output_size

ATTRIBUTES = ("count", "colour", "shape", "background", "relation")


def caption_noise(model: StableDiffusionModel, spec: SampleSpec, seed: int, indices: Sequence[int]) -> np.ndarray:
    """(N, h, w, C) unit-variance starting latents, row k drawn from ``fold_in(PRNGKey(seed), indices[k])``."""
    shape = latent_shape(model, *output_size(model, spec))
    key = jax.random.PRNGKey(seed)
    draw = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32))
    return np.asarray(draw(jnp.asarray(indices, jnp.uint32)))


def sample_captions(model: StableDiffusionModel, captions: Sequence[str], seed: int, *,
                    spec: SampleSpec = SampleSpec(), batch: int = 64, edits=None,
                    log: Callable[[str], None] | None = None) -> np.ndarray:
    """(N, H, W, 3) uint8: caption k sampled from :func:`caption_noise` row k, ``batch`` captions per call
    (the last call is padded to ``batch`` so the program compiles once)."""
    captions = list(captions)
    out = []
    for lo in range(0, len(captions), batch):
        chunk = captions[lo:lo + batch]
        pad = batch - len(chunk) if len(captions) > batch else 0
        idx = list(range(lo, lo + len(chunk))) + [lo] * pad
        noise = caption_noise(model, spec, seed, idx)
        images = txt2img(model, chunk + chunk[:1] * pad, spec=spec, seed=seed, init_latents=noise,
                         edits=edits).images
        out.append(np.asarray(images)[:len(chunk)])
        if log:
            log(f"seed {seed}: {lo + len(chunk)}/{len(captions)} captions")
    return np.concatenate(out)


def tally_score(tally: Tally, score: CaptionScore) -> None:
    """Count one judged image: each check overall, per caption kind (single / pair / triple) and per relation;
    colour and shape also per named caption object; ``all`` = every check of the caption passed."""
    kind = {1: "single", 3: "triple"}.get(len(score.spec.objects), "pair")
    for name, check in score.checks.items():
        tally.add(name, check.passed)
        tally.add(f"{name}/{kind}", check.passed)
        if name == "relation":
            tally.add(f"relation/{score.spec.relation}", check.passed)
    for name in ("colour", "shape"):
        if name in score.checks:
            check = score.checks[name]
            for expected, found in zip(check.expected, check.found):
                if expected is not None:
                    tally.add(f"{name}/object", expected == found)
    tally.add("all", score.passed)


def judge_images(images: np.ndarray, captions: Sequence[str], tally: Tally | None = None) -> tuple[Tally, list]:
    """Score image k against caption k; returns the tally and one ``{caption, passed, checks}`` row per image."""
    tally = Tally() if tally is None else tally
    rows = []
    for image, caption in zip(images, captions):
        score = score_caption(np.asarray(image), caption)
        tally_score(tally, score)
        rows.append({"caption": caption, "passed": score.passed,
                     "checks": {k: {"passed": c.passed, "expected": c.expected, "found": c.found}
                                for k, c in score.checks.items()}})
    return tally, rows
