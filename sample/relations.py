"""Learn-to-Steer for sampling runs: the shipped classifier, the prompts' relations, the steering and its report.

Host side of :mod:`jaxdiff.steer.learn_to_steer`: resolve the classifier (a folder, or the one shipped for the
embedded model), check it against the model (its hash and its map layout), find each prompt's relation
triplets (parsed, or given explicitly), turn the object words into token weights, map the run's steps to the
classifier's step indices, and build the traced parameters. :func:`image_reports` turns the hook's per-step
stats into per-image records for ``run.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

import jaxdiff
from jaxdiff.checkpoint import StableDiffusionModel
from jaxdiff.steer import learn_to_steer as l2s
from jaxdiff.steer.relation_classifier import check_layout, load_classifier
from jaxdiff.steer.relation_maps import map_layout, token_weights
from jaxdiff.steer.relation_prompts import (SPATIAL, RelationError, Triplet, check_words_in_prompt,
                                            parse_relation_flag, require_relations)
from jaxdiff.steering import Steering
from sample.inversion import inversion_schedule
from sample.spec import SampleSpec, latent_shape, output_size, schedule_for

SHIPPED = Path(jaxdiff.__file__).resolve().parent / "assets" / "relations" / "shapesworld"


@dataclass(frozen=True)
class RelationRequest:
    """What a run asks: the classifier folder (None: the shipped one), the loss, the optimisation settings
    (None: defaults), and explicit triplets ``"subject,relation,object"`` (empty: parse every prompt)."""

    classifier: str | None = None
    loss: str = "learned"
    tto_steps: int | None = None
    eta: float | None = None
    max_updates: int = l2s.MAX_UPDATES
    relations: tuple[str, ...] = ()


def default_eta(model: StableDiffusionModel, meta: dict) -> float:
    """The classifier's own recommendation (``meta["eta"]``), else the reference's: 5 for SD2.x (1024-d
    text), 7.5 otherwise."""
    if meta.get("eta") is not None:
        return float(meta["eta"])
    return l2s.ETA["sd2"] if model.configs["unet"].cross_attention_dim == 1024 else l2s.ETA["sd1"]


def prompt_triplets(prompts: list[str], explicit: tuple[str, ...]) -> list[tuple[Triplet, ...]]:
    """Each prompt's triplets: the explicit ones (for every prompt) or the parsed ones; words checked."""
    given = tuple(parse_relation_flag(r) for r in explicit)
    out = []
    for p in prompts:
        trips = given or require_relations(p)
        for t in trips:
            if t.relation not in SPATIAL:
                raise RelationError(f"relation {t.relation!r} cannot be steered: use one of {', '.join(SPATIAL)}")
            check_words_in_prompt(t, p)
        out.append(trips)
    return out


def relation_run(model: StableDiffusionModel, prompts: list[str], spec: SampleSpec, request: RelationRequest,
                 image_hw=None) -> tuple[Steering, dict]:
    """The run's Learn-to-Steer :class:`Steering` and a JSON-able record of its settings.

    Raises :class:`RelationError` / ``ValueError`` with one-line messages: no relation in a prompt, an object
    word not in the prompt, an unknown relation, a classifier for another model or map layout."""
    from jaxdiff.tokenizer import load_tokenizer

    if request.loss not in l2s.LOSSES:
        raise RelationError(f"--relation-loss {request.loss!r}: choose one of {', '.join(l2s.LOSSES)}")
    hw = latent_shape(model, *output_size(model, spec, image_hw))[:2]
    folder = Path(request.classifier) if request.classifier else SHIPPED
    params, config, stored_layout, meta = load_classifier(folder)
    layout = map_layout(model.params["unet"], model.configs["unet"], hw, grid=config.grid)
    sha = model.manifest.get("source_sha256")
    if meta.get("model_sha256") not in (None, "n/a", sha):
        raise RelationError(f"classifier {folder} was trained on another model (sha256 "
                            f"{str(meta.get('model_sha256'))[:12]}, this model {str(sha)[:12]}); train one for this "
                            "model with python -m train.relation_classifier")
    check_layout(stored_layout, layout)
    unknown = [c for c in SPATIAL if c not in config.classes]
    if unknown:
        raise RelationError(f"classifier {folder} has no class for {', '.join(unknown)}")

    triplets = prompt_triplets(prompts, request.relations)
    tok = load_tokenizer(model.tokenizer_dirs["tokenizer"])
    r_max = max(len(t) for t in triplets)
    weights = np.zeros((len(prompts), r_max, 2, 77), np.float32)
    targets = np.zeros((len(prompts), r_max), np.int32)
    for b, (p, trips) in enumerate(zip(prompts, triplets)):
        for r, t in enumerate(trips):
            weights[b, r] = token_weights(tok, p, (t.subject, t.object))
            targets[b, r] = config.classes.index(t.relation)
    schedule = schedule_for(model, spec)
    n = len(schedule)
    tto_steps = n // 2 if request.tto_steps is None else request.tto_steps
    if not 0 <= tto_steps <= n:
        raise RelationError(f"--tto-steps {tto_steps}: must be in 0..{n} (this run has {n} steps)")
    if request.max_updates < 0:
        raise RelationError(f"--tto-iters {request.max_updates}: must be >= 0")
    eta = default_eta(model, meta) if request.eta is None else float(request.eta)
    if not np.isfinite(eta):
        raise RelationError(f"--tto-lr {eta}: must be finite")
    tau = l2s.classifier_steps(np.asarray(schedule.timesteps),
                               np.asarray(inversion_schedule(model, config.num_steps).timesteps), config.step_indices)
    p = l2s.relation_params(weights, targets, np.asarray([len(t) for t in triplets]), num_steps=n,
                            tto_steps=tto_steps, eta=eta, tau=tau, classifier=params, max_updates=request.max_updates)
    hook = l2s.RelationTTO(layout, config, request.loss)
    record = {"classifier": str(folder), "loss": request.loss, "tto_steps": tto_steps, "eta": eta,
              "max_updates": request.max_updates, "thresholds": list(l2s.THRESHOLDS),
              "classifier_steps": tau.tolist(), "classifier_meta": {k: meta.get(k) for k in ("model_sha256",
                                                                                           "dual_inversion")},
              "triplets": [[[t.subject, t.relation, t.object] for t in trips] for trips in triplets]}
    return l2s.relation_steering(hook, p), record


def image_reports(stats: dict, record: dict) -> list[dict]:
    """Per image: its triplets, the refinements made (total and per step) and the last evaluated target
    probability and loss (the final step of the optimisation)."""
    used = np.asarray(stats["refinements"])            # (S, B)
    prob, loss = np.asarray(stats["prob"]), np.asarray(stats["loss"])
    out = []
    for b in range(used.shape[1]):
        seen = np.flatnonzero(np.isfinite(loss[:, b]))
        last = int(seen[-1]) if len(seen) else None
        out.append({"triplets": record["triplets"][b], "refinements": int(used[:, b].sum()),
                    "refinements_per_step": used[:record["tto_steps"], b].tolist(),
                    "final_prob": None if last is None or not np.isfinite(prob[last, b]) else float(prob[last, b]),
                    "final_loss": None if last is None else float(loss[last, b])})
    return out
