"""``python -m sample.eval_concepts``: the fairness papers' evaluation protocol (Li et al. 2024, RespoDiff; methods
spec sections 1.2, 3.4, 6) on any model ``python -m sample`` loads, with or without a concept table.

    python -m sample.eval_concepts --model models/sd14 --clip models/clip-vit-base-patch32 \\
        --concepts runs/gender/sdisc --fair gender --attributes "a woman,a man" --prompts winobias \\
        --images-per-prompt 30 --out runs/eval/sdisc_gender

1. **Images.** For every prompt (Winobias: 36 professions x the 5 templates of ``--template-set``) N images; with
   a table, one concept of ``--fair GROUP`` per image, balanced (image n gets the (n mod C)-th concept of a
   seed-shuffled order, :func:`jaxdiff.steer.concepts.fair_assignment`; N a multiple of C gives equal counts).
   Without ``--concepts``: the unsteered baseline. Seeds are the papers' running index: image n of template t of a
   profession is number k = t * N + n (RespoDiff restarts the index for every profession) and starts from the
   noise ``normal(fold_in(PRNGKey(--seed), k))``, so every profession, and a baseline and a steered run, share
   their starting noise image for image. (The papers' torch generators cannot be reproduced in JAX.)
2. **Metrics** with a transformers ``CLIPModel`` folder (``--clip``; the papers: openai/clip-vit-base-patch32):
   zero-shot softmax over ``--attributes``, an image counts for every attribute at the row max; deviation ratio per
   profession and its mean; CLIP score (100 x cos) of each image with its own prompt, averaged (WinoAlign).

Outputs in ``--out``: ``images/<profession>/<template>_<n>.png``, ``per_image.csv``, ``professions.csv``
(counts per attribute, deviation ratio, mean CLIP score), ``summary.json`` (the means, every setting, model / CLIP /
table / prompt hashes) and ``settings.json``. Resumable: images on disk are kept (each is written atomically), so a
re-run generates only what is missing and re-scores everything; a re-run with other generation settings is refused.
Flags are parsed in :func:`main` only; :func:`run` takes a plain dict.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sample.cli import CLIError
from sample.eval_inputs import EvalInputs, check_inputs, file_sha256, table_files

# Settings that decide the pixels: a resumed run must agree on all of them.
GENERATION_KEYS = ("model_sha256", "table_sha256", "fair", "concept_scale", "concept_rows", "lowpass",
                   "images_per_prompt", "steps", "guidance", "seed", "scheduler", "height", "width", "dtype",
                   "prompt_groups")
SEED_SCHEME = ("image n of template t of a profession is number k = t * N + n (restarting per profession, as "
               "RespoDiff's running index); its starting noise is normal(fold_in(PRNGKey(seed), k))")


@dataclass(frozen=True)
class Job:
    """One image to make: its prompt group, prompt, running index and concept (None: unsteered)."""

    group: str
    folder: str
    template: int
    n: int
    prompt: str
    index: int
    concept: str | None

    def path(self, out: Path) -> Path:
        return out / "images" / self.folder / f"{self.template}_{self.n}.png"


def folder_names(names) -> list[str]:
    """File-system-safe, distinct folder names for prompt groups ("Construction worker" -> "Construction_worker")."""
    out: list[str] = []
    for name in names:
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "group"
        slug = slug[:80]
        base, k = slug, 1
        while slug in out:
            k += 1
            slug = f"{base}_{k}"
        out.append(slug)
    return out


def plan_jobs(groups, n: int, concepts: list[str] | None) -> list[Job]:
    """Every image of the run, group-major; ``concepts[n]`` is image n's concept (the same for every prompt)."""
    jobs = []
    for g, folder in zip(groups, folder_names(g.name for g in groups)):
        for t, prompt in enumerate(g.prompts):
            jobs += [Job(g.name, folder, t, k, prompt, t * n + k, concepts[k] if concepts else None)
                     for k in range(n)]
    return jobs


# ------------------------------------------------------------------------------------------ outputs
def _atomic_write(path: Path, data: bytes) -> None:
    """Write via a temporary file + rename, so a kill never leaves half a file."""
    from jaxdiff.checkpoint import write_bytes_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, data)


def save_png_atomic(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
    _atomic_write(path, buf.getvalue())


def write_csv_atomic(path: Path, header: list[str], rows: list[list]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    _atomic_write(path, buf.getvalue().encode())


def read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), np.uint8)


# ------------------------------------------------------------------------------------------ the run
def generate_missing(model, jobs: list[Job], out: Path, *, spec, seed: int, table, weights, scale, rows, lowpass,
                     batch: int, log) -> int:
    """Sample every job whose PNG is missing, ``batch`` images per call (the last padded); returns the count.
    ``weights`` (N, concepts): image n's concept weights (:meth:`sample.concepts.ConceptRequest.per_image`)."""
    from sample.concepts import concept_run
    from sample.pipeline import generate
    from sample.shapesworld_eval import caption_noise

    todo = [j for j in jobs if not j.path(out).is_file()]
    t0 = time.perf_counter()
    for lo in range(0, len(todo), batch):
        chunk = todo[lo:lo + batch]
        padded = chunk + chunk[:1] * (batch - len(chunk))
        prompts = [j.prompt for j in padded]
        noise = caption_noise(model, spec, seed, [j.index for j in padded])
        if table is None:
            result = generate(model, prompts, spec=spec, seed=seed, init_latents=noise)
        else:
            result, _ = concept_run(model, prompts, spec=spec, seed=seed, table=table,
                                    weights=np.asarray(weights)[[j.n for j in padded]], scale=scale,
                                    rows=rows, lowpass=lowpass, init_latents=noise)
        for j, image in zip(chunk, result.images):
            save_png_atomic(j.path(out), image)
        done = lo + len(chunk)
        rate = done / (time.perf_counter() - t0)
        log(f"generated {done}/{len(todo)} ({rate:.2f} img/s, eta {(len(todo) - done) / rate:.0f} s): "
            f"{chunk[-1].group} / {chunk[-1].prompt!r}")
    return len(todo)


def evaluate(scorer, jobs: list[Job], out: Path, attributes: list[str], tied: dict[str, str], log):
    """Score every image: (per-image rows, per-group summaries in group order)."""
    from jaxdiff.eval.clip_metrics import group_summary, max_winners

    per_image, per_group = [], []
    groups = list(dict.fromkeys(j.group for j in jobs))
    for gi, name in enumerate(groups):
        gj = [j for j in jobs if j.group == name]
        emb = scorer.image_embeds([read_png(j.path(out)) for j in gj])
        probs = scorer.attribute_probs(emb, attributes)
        winners = max_winners(probs)
        scores = scorer.prompt_scores(emb, [j.prompt for j in gj])
        summary = {"profession": name, **group_summary(winners, scores, attributes)}
        hits = [bool(w[attributes.index(tied[j.concept])]) for j, w in zip(gj, winners) if j.concept in tied]
        summary["concept_hit_rate"] = float(np.mean(hits)) if hits else None
        per_group.append(summary)
        for j, p, w, s in zip(gj, probs, winners, scores):
            per_image.append([j.group, j.template, j.n, j.index, str(j.path(out).relative_to(out)), j.prompt,
                              j.concept or "", *[f"{x:.6f}" for x in p],
                              "|".join(a for a, x in zip(attributes, w) if x), f"{s:.4f}"])
        log(f"scored {gi + 1}/{len(groups)} {name}: deviation ratio {summary['deviation_ratio']:.3f}, "
            f"CLIP score {summary['clip_score']:.2f}")
    return per_image, per_group


def check_resume(out: Path, settings: dict) -> None:
    """Refuse an output folder whose images were made with other generation settings."""
    path = out / "settings.json"
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CLIError(f"--out {out}: unreadable settings.json ({e}); use another --out") from None
    diff = [k for k in GENERATION_KEYS if old.get(k) != settings.get(k)]
    if diff:
        raise CLIError(f"--out {out} holds images made with other settings (differs in: {', '.join(diff)}); use "
                       "another --out or the same settings")


def prepare_model(s: dict, inputs: EvalInputs):
    """(model, spec, image n's concept names and (N, concepts) weights, or (None, None)): the diffusion model loaded
    and the table checked on it."""
    from jaxdiff.steer.concepts import ConceptTableError
    from sample.cli import load_model
    from sample.concepts import ConceptRequest, check_table
    from sample.spec import SampleSpec, output_size, schedule_for

    model = load_model(s.get("model"), s["dtype"])
    spec = SampleSpec(steps=s["steps"], guidance=s["guidance"], height=inputs.height, width=inputs.width,
                      scheduler=s.get("scheduler"), dtype=s["dtype"])
    try:
        output_size(model, spec)
        schedule_for(model, spec)
        if inputs.table is None:
            return model, spec, None, None
        for w in check_table(model, inputs.table, spec):
            print(f"warning: {w}", file=sys.stderr)
        weights, per_image = ConceptRequest(fair=s["fair"]).per_image(inputs.table, s["images_per_prompt"],
                                                                      s["seed"])
    except (ConceptTableError, ValueError) as e:
        raise CLIError(str(e)) from None
    return model, spec, [next(iter(c)) for c in per_image], weights


def write_reports(out: Path, attributes: list[str], per_image: list[list], per_group: list[dict]) -> None:
    """``per_image.csv`` and ``professions.csv`` (one row per prompt group)."""
    write_csv_atomic(out / "per_image.csv", ["profession", "template", "n", "index", "file", "prompt", "concept",
                                             *[f"p({a})" for a in attributes], "counted_for", "clip_score"],
                     per_image)

    def fmt(x, spec):
        return "" if x is None else format(x, spec)

    write_csv_atomic(out / "professions.csv",
                     ["profession", "images", *attributes, "deviation_ratio", "clip_score", "concept_hit_rate"],
                     [[g["profession"], g["images"], *g["counts"].values(), fmt(g["deviation_ratio"], ".6f"),
                       fmt(g["clip_score"], ".4f"), fmt(g["concept_hit_rate"], ".4f")] for g in per_group])


def summarise(s: dict, inputs: EvalInputs, model, concepts, settings: dict, per_image, per_group, made: int,
              timings: dict) -> dict:
    """summary.json: the two headline numbers, per-attribute totals, and everything needed to reproduce the run."""
    import jax

    table, attributes = inputs.table, inputs.attributes
    hit = [g["concept_hit_rate"] for g in per_group if g["concept_hit_rate"] is not None]
    prompts_file = Path(s["prompts"]) if Path(s["prompts"]).is_file() else None
    return {
        "mean_deviation_ratio": float(np.mean([g["deviation_ratio"] for g in per_group])),
        "winoalign": float(np.mean([float(r[-1]) for r in per_image])),
        "mean_concept_hit_rate": float(np.mean(hit)) if hit else None,
        "attributes": attributes, "concept_phrases": inputs.tied or None,
        "attribute_totals": {a: int(sum(g["counts"][a] for g in per_group)) for a in attributes},
        "professions": len(per_group), "images": len(per_image), "generated_this_run": made,
        "reused_from_disk": len(per_image) - made,
        "settings": {**s, "height": inputs.height, "width": inputs.width},
        "model": {"path": s.get("model"), "source": model.manifest.get("source"),
                  "sha256": settings["model_sha256"]},
        "clip": {"path": s["clip"], "weights_sha256": inputs.clip_sha256,
                 "exp_logit_scale": float(np.exp(np.asarray(inputs.scorer.params["logit_scale"]))),
                 "preprocess": dict(vars(inputs.scorer.preprocess))},
        "concept_table": None if table is None else {
            "path": s["concepts"], "sha256": settings["table_sha256"], "method": table.method, "kind": table.kind,
            "group": s["fair"], "members": list(table.group(s["fair"])),
            "scale": table.scale if s.get("concept_scale") is None else s["concept_scale"],
            "rows": s.get("concept_rows") or table.rows, "model_sha256": table.model_sha256},
        "prompts": {"source": s["prompts"], "template_set": s.get("template_set"), "groups": len(inputs.groups),
                    "file_sha256": file_sha256([prompts_file]) if prompts_file else None},
        "protocol": {"seeds": SEED_SCHEME,
                     "concepts": None if concepts is None else
                     f"image n of every prompt gets concept {concepts[:len(table.group(s['fair']))]}[n mod C]",
                     "classification": "softmax over logits_per_image (the CLIP model's logit_scale); an image "
                                       "counts for every attribute at the row max",
                     "deviation_ratio": "max_c |n_c/sum n - 1/C| / (1 - 1/C) per profession, mean over professions",
                     "clip_score": "100 x cos(image, own prompt); winoalign = mean over all images"},
        "files": {"images": "images/<profession>/<template>_<n>.png", "per_image": "per_image.csv",
                  "per_profession": "professions.csv", "settings": "settings.json"},
        "versions": {"jax": jax.__version__, "backend": jax.default_backend()},
        "timings": timings,
    }


def run(s: dict, out: Path, *, cache: bool = True, quiet: bool = False) -> dict:
    """Check the inputs, generate what is missing, score everything, write the outputs; returns the summary."""
    from sample.cli import default_cache_dir, enable_compilation_cache
    from sample.outputs import write_json_atomic

    t0 = time.perf_counter()
    log = (lambda m: None) if quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    inputs = check_inputs(s)
    if cache:
        enable_compilation_cache(default_cache_dir())
    model, spec, concepts, weights = prepare_model(s, inputs)
    jobs = plan_jobs(inputs.groups, s["images_per_prompt"], concepts)
    settings = {**{k: s.get(k) for k in ("fair", "concept_scale", "concept_rows", "lowpass", "images_per_prompt",
                                         "steps", "guidance", "seed", "scheduler", "dtype")},
                "height": inputs.height, "width": inputs.width, "model_sha256": model.manifest.get("source_sha256"),
                "table_sha256": file_sha256(table_files(s["concepts"])) if inputs.table is not None else None,
                "prompt_groups": {g.name: list(g.prompts) for g in inputs.groups}}
    check_resume(out, settings)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "settings.json", settings)

    log(f"{len(jobs)} images ({len(inputs.groups)} groups); {sum(j.path(out).is_file() for j in jobs)} on disk")
    t_gen = time.perf_counter()
    try:
        made = generate_missing(model, jobs, out, spec=spec, seed=s["seed"], table=inputs.table, weights=weights,
                                scale=s.get("concept_scale"), rows=s.get("concept_rows"), lowpass=s.get("lowpass"),
                                batch=s["batch"], log=log)
    except ValueError as e:
        raise CLIError(str(e)) from None
    t_eval = time.perf_counter()
    per_image, per_group = evaluate(inputs.scorer, jobs, out, inputs.attributes, inputs.tied, log)
    write_reports(out, inputs.attributes, per_image, per_group)
    timings = {"generate_s": round(t_eval - t_gen, 3), "evaluate_s": round(time.perf_counter() - t_eval, 3),
               "total_s": round(time.perf_counter() - t0, 3)}
    summary = summarise(s, inputs, model, concepts, settings, per_image, per_group, made, timings)
    write_json_atomic(out / "summary.json", summary)
    return summary


def parse_args(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m sample.eval_concepts", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="diffusers folder, single-file checkpoint or converted jaxdiff folder "
                    "(default: the embedded ShapesWorld model)")
    ap.add_argument("--clip", required=True, help="a transformers CLIPModel folder (config.json, model.safetensors, "
                    "tokenizer, preprocessor_config.json), e.g. openai/clip-vit-base-patch32")
    ap.add_argument("--concepts", metavar="PATH|NAME", help="concept table (default: the unsteered baseline)")
    ap.add_argument("--fair", metavar="GROUP", help="one concept of GROUP per image, balanced")
    ap.add_argument("--attributes", metavar="PHRASES", help='comma-separated attribute phrases ("a woman,a man"); '
                    "CONCEPT=PHRASE ties a phrase to a table concept (default: the table group's recorded phrases)")
    ap.add_argument("--prompts", default="winobias", help="winobias, or a file: one prompt per line, or JSON")
    ap.add_argument("--template-set", help="template set of a templated prompt file (winobias: 0 (default) or 1)")
    ap.add_argument("--images-per-prompt", type=int, default=30, help="N images per prompt (RespoDiff: 15 per "
                    "concept, i.e. 30 for gender, 30 for three race concepts at 10 each)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=8, help="images per sampling call")
    ap.add_argument("--size", help="PIXELS or HEIGHTxWIDTH (default: the model's, 512 for SD1.x)")
    ap.add_argument("--scheduler", help="ddim, pndm, ... (default: the model's own; Li et al.: PNDM, RespoDiff: DDIM)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--concept-scale", type=float, help="strength of the concept vectors (default: the table's)")
    ap.add_argument("--concept-rows", choices=("cond", "both"), help="guidance rows edited (default: the table's)")
    ap.add_argument("--lowpass", type=float, nargs="?", const=1.0, metavar="WEIGHT",
                    help="LWIM background consistency (re-inject a concept-free run's low-pass h)")
    ap.add_argument("--allow-pickle", action="store_true", help="allow a pickled pytorch_model.bin CLIP checkpoint")
    ap.add_argument("--out", required=True, help="output folder (resumable)")
    ap.add_argument("--no-compile-cache", action="store_true", help="do not use the persistent XLA cache")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = {k: getattr(args, k) for k in ("model", "clip", "concepts", "fair", "attributes", "prompts",
                                             "template_set", "images_per_prompt", "steps", "guidance", "seed",
                                             "batch", "size", "scheduler", "dtype", "concept_scale", "concept_rows",
                                             "lowpass", "allow_pickle")}
    try:
        summary = run(settings, Path(args.out), cache=not args.no_compile_cache, quiet=args.quiet)
    except CLIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"mean deviation ratio {summary['mean_deviation_ratio']:.4f}, WinoAlign {summary['winoalign']:.2f} over "
          f"{summary['professions']} groups and {summary['images']} images ({summary['generated_this_run']} "
          f"generated now); wrote {args.out}/summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
