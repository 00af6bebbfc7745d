"""Concept steering for sampling runs: shipped tables, per-image concept weights (multi-hot or fair), and
LWIM's low-pass re-injection, which needs a concept-free reference run of the same noise first.

Two compiled programs per low-pass run: the reference run captures h at every step on every UNet row
(``StepCaptureSpec(hspace=True, reduce="stack", cond_only=False)``), then the steered run re-injects the
Haar LL band of that step's reference h (:func:`jaxdiff.steer.lwim.lowpass_steering`). The reference run is
exactly the unsteered image of the same noise, so it is returned too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import jaxdiff
from jaxdiff.checkpoint import StableDiffusionModel
from jaxdiff.steer.concepts import (SAFETY_GROUP, ConceptTable, ConceptTableError, check_fits, concept_steering,
                                    fair_assignment, h_shape_of, load_table)
from jaxdiff.steer.lwim import lowpass_steering
from jaxdiff.steering import compose
from sample.loop import StepCaptureSpec
from sample.pipeline import generate
from sample.spec import SampleResult, SampleSpec, latent_shape, output_size, schedule_for

SHIPPED = Path(jaxdiff.__file__).resolve().parent / "assets" / "concepts"   # tables for the embedded model
REFERENCE_CAPTURE = StepCaptureSpec.of((), hspace=True, reduce="stack", cond_only=False)


def shipped_tables() -> list[str]:
    """Names of the tables shipped with the embedded model (``jaxdiff/assets/concepts``)."""
    return sorted(p.stem for p in SHIPPED.glob("*.json"))


def resolve_table(name_or_path: str) -> ConceptTable:
    """A table file (either of its two files or the stem) or the name of a shipped table."""
    p = Path(name_or_path)
    if p.suffix in (".json", ".safetensors") or p.with_name(p.name + ".json").exists() or p.parent != Path("."):
        return load_table(p)
    if name_or_path in shipped_tables():
        return load_table(SHIPPED / name_or_path)
    raise ConceptTableError(f"no concept table {name_or_path!r}: not a file, and the shipped tables are "
                            f"{', '.join(shipped_tables()) or 'none'}")


def parse_concept(text: str) -> tuple[str, float]:
    """``NAME`` or ``NAME=SCALE`` -> (name, weight)."""
    name, _, value = text.partition("=")
    if not name:
        raise ConceptTableError(f"--concept {text!r}: expected NAME or NAME=SCALE")
    if not value:
        return name, 1.0
    try:
        w = float(value)
    except ValueError:
        raise ConceptTableError(f"--concept {text!r}: scale {value!r} is not a number") from None
    if not math.isfinite(w):
        raise ConceptTableError(f"--concept {text!r}: scale must be finite")
    return name, w


@dataclass(frozen=True)
class ConceptRequest:
    """What a run asks of a table: fixed multi-hot concepts, or one concept of ``fair`` per image (plus any
    safety concepts, which are on for every image)."""

    concepts: tuple[tuple[str, float], ...] = ()
    fair: str | None = None
    scale: float | None = None
    rows: str | None = None

    def per_image(self, table: ConceptTable, n_images: int, seed: int) -> tuple[np.ndarray, list[dict]]:
        """(n_images, N) weights and, per image, the concepts it got."""
        sel = dict(self.concepts)
        if self.fair is not None:
            safety = set(table.groups.get(SAFETY_GROUP, ()))
            other = [n for n in sel if n not in safety]
            if other:
                raise ConceptTableError(f"--fair draws one concept per image: only safety concepts (group "
                                        f"{SAFETY_GROUP!r}) can be added with --concept, not {', '.join(other)}")
            names = fair_assignment(table.group(self.fair), n_images, seed)
            per = [{n: 1.0, **sel} if n not in sel else {**sel, n: sel[n] + 1.0} for n in names]
            return np.stack([table.weights(p) for p in per]), per
        w = table.weights(sel)
        return np.broadcast_to(w, (n_images, len(w))).copy(), [sel] * n_images


def check_table(model: StableDiffusionModel, table: ConceptTable, spec: SampleSpec, image_hw=None) -> list[str]:
    """The table's h shape against the model's at this run's size (raises); returns warnings."""
    hw = latent_shape(model, *output_size(model, spec, image_hw))[:2]
    h = h_shape_of(model.params["unet"], model.configs["unet"], hw)
    return check_fits(table, h, model.manifest.get("source_sha256"))


def concept_run(model: StableDiffusionModel, prompts: list[str], *, spec: SampleSpec, seed: int,
                table: ConceptTable | None, weights: np.ndarray | None, scale: float | None = None,
                rows: str | None = None, lowpass: float | None = None, lowpass_row: str = "uncond",
                negative_prompts=None, init_latents=None, init_image=None, capture=None, progress=None,
                extra=None) -> tuple[SampleResult, SampleResult | None]:
    """Sample ``prompts`` with the table's concepts (per-image ``weights`` (B, N)) and, with ``lowpass``, LWIM's
    re-injection of a reference run's h. Returns ``(steered result, reference result or None)``; ``extra`` is
    any further steering composed after these (another method)."""
    common = dict(spec=spec, seed=seed, negative_prompts=negative_prompts, init_image=init_image)
    reference = None
    steerings = []
    if table is not None:
        steerings.append(concept_steering(table, weights, scale=scale, rows=rows, guided=spec.guided))
    if lowpass is not None:
        reference = generate(model, prompts, init_latents=init_latents, capture=REFERENCE_CAPTURE, **common)
        init_latents = reference.init_latents
        steerings.append(lowpass_steering(reference.aux["h"], lowpass, guided=spec.guided, row=lowpass_row,
                                          num_steps=len(schedule_for(model, spec))))
    steerings.append(extra)
    result = generate(model, prompts, init_latents=init_latents, edits=compose(*steerings), capture=capture,
                      progress=progress, **common)
    return result, reference
