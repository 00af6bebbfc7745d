"""``python -m train.relations_eval``: Learn-to-Steer measured on ShapesWorld (issue 14), against the baseline.

    python -m train.relations_eval                                   # every row, 160 captions x 4 seeds
    python -m train.relations_eval --rows baseline l2s --seeds 0     # a quick look

The held-out relation captions of the baseline table (:func:`jaxdiff.shapesworld.eval_captions`, the 2-object
kinds: 40 per relation in 240) x seeds, each image from the baseline table's own starting noise (caption
index ``i`` of the 240 -> :func:`sample.shapesworld_eval.caption_noise` row ``i``), the model's sampler, 30
steps, guidance 7.5. Rows:

* ``baseline``: no steering;
* ``l2s``: Learn-to-Steer with the classifier trained with dual inversion (``--classifier``, default the
  shipped one);
* ``l2s_nodual``: the same optimisation with the classifier trained without dual inversion
  (``--classifier-nodual``);
* ``centroid``: the same optimisation loop with the handcrafted attention-centroid hinge.

Every image is judged (relation by GenEval's rule, colour, shape, background); the refinements used and the
seconds per image are recorded. Batches are cached under ``--out`` (a killed run resumes), then the table is
written between the ``relations`` markers of ``--results`` and a before/after grid (same noise, baseline vs
Learn-to-Steer) into ``--figures``.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

MARK_START, MARK_END = "<!-- relations:start -->", "<!-- relations:end -->"
ROWS = ("baseline", "l2s", "l2s_nodual", "centroid")
ROW_TITLES = {"baseline": "baseline (no steering)", "l2s": "Learn-to-Steer (dual inversion)",
              "l2s_nodual": "Learn-to-Steer (classifier without dual inversion)",
              "centroid": "centroid-loss TTO (handcrafted)"}


def relation_captions(n: int = 240) -> list[tuple[int, str]]:
    """(index among the baseline's ``n`` captions, caption) of its 2-object relation captions."""
    from jaxdiff.shapesworld import eval_captions, parse_caption

    return [(i, c) for i, c in enumerate(eval_captions(n)) if parse_caption(c).relation is not None]


def steering_for(row: str, model, prompts, spec, args):
    if row == "baseline":
        return None, None
    from sample.relations import RelationRequest, relation_run

    classifier = {"l2s": args.classifier, "l2s_nodual": args.classifier_nodual, "centroid": args.classifier}[row]
    request = RelationRequest(classifier=classifier, loss="centroid" if row == "centroid" else "learned",
                              eta=args.centroid_lr if row == "centroid" else args.lr)
    return relation_run(model, prompts, spec, request)


def run_batch(model, spec, row: str, seed: int, items: list[tuple[int, str]], args) -> dict:
    from sample.pipeline import generate
    from sample.relations import image_reports
    from sample.shapesworld_eval import caption_noise, judge_images

    prompts = [c for _, c in items]
    noise = caption_noise(model, spec, seed, [i for i, _ in items])
    steering, record = steering_for(row, model, prompts, spec, args)
    t0 = time.perf_counter()
    res = generate(model, prompts, spec=spec, seed=seed, init_latents=noise, edits=steering)
    seconds = time.perf_counter() - t0
    _, judged = judge_images(res.images, prompts)
    reports = image_reports(res.aux["hooks"]["relations"], record) if record else [{}] * len(prompts)
    return {"row": row, "seed": seed, "indices": [i for i, _ in items], "seconds": seconds,
            "compiled": res.timings.get("compiled"),
            "images": [{"caption": j["caption"], "checks": {k: v["passed"] for k, v in j["checks"].items()},
                        "refinements": r.get("refinements"), "final_prob": r.get("final_prob")}
                       for j, r in zip(judged, reports)],
            "settings": record}, res.images


def pct(images: list[dict], check: str) -> str:
    vals = [im["checks"][check] for im in images if check in im["checks"]]
    return f"{100 * np.mean(vals):.1f}% ({sum(vals)}/{len(vals)})" if vals else "-"


def table(results: dict) -> str:
    """The markdown table of every measured row."""
    from jaxdiff.shapesworld import RELATION_LABELS, parse_caption

    head = ("| row | images | relation (all) | " + " | ".join(RELATION_LABELS) +
            " | colour | shape | background | refinements / image | s / image |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row, batches in results.items():
        imgs = [im for b in batches for im in b["images"]]
        if not imgs:
            continue
        per_rel = [pct([im for im in imgs if parse_caption(im["caption"]).relation == r], "relation")
                   for r in RELATION_LABELS]
        refs = [im["refinements"] for im in imgs if im["refinements"] is not None]
        timed = [b for b in batches if not b.get("compiled")] or batches
        secs = sum(b["seconds"] for b in timed) / sum(len(b["images"]) for b in timed)
        cells = [ROW_TITLES[row], str(len(imgs)), pct(imgs, "relation"), *per_rel, pct(imgs, "colour"),
                 pct(imgs, "shape"), pct(imgs, "background"), f"{np.mean(refs):.1f}" if refs else "-", f"{secs:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def classifier_table(paths: dict) -> str:
    """Held-out accuracy of each classifier on maps from true-prompt and wrong-prompt inversions."""
    lines = ["| classifier | held-out maps | true-prompt inversions | wrong-prompt inversions | epochs (best) |",
             "|---|---|---|---|---|"]
    for name, path in paths.items():
        rep = Path(path) / "report.json"
        if not rep.exists():
            continue
        r = json.loads(rep.read_text())
        t = r.get("test", r)
        lines.append(f"| {name} | {100 * t['accuracy']:.1f}% (n={t['n']}) | "
                     f"{100 * t['accuracy_true_prompt']:.1f}% (n={t['n_true_prompt']}) | "
                     f"{100 * t['accuracy_wrong_prompt']:.1f}% (n={t['n_wrong_prompt']}) | "
                     f"{r.get('epochs_run', '?')} ({r.get('best_epoch', '?')}) |")
    return "\n".join(lines)


def run(args) -> dict:
    import jax

    from sample.cli import load_model
    from sample.outputs import save_png, write_json_atomic
    from sample.spec import SampleSpec
    from train.shapesworld_baseline import labelled_grid, publish

    t0 = time.perf_counter()
    model = load_model(args.model, "float32")
    spec = SampleSpec(steps=args.steps, guidance=args.guidance)
    items = relation_captions(args.captions)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = (lambda m: print(f"[relations_eval] {m}", flush=True))
    results: dict = {}
    grids: dict = {}
    for row in args.rows:
        results[row] = []
        for seed in args.seeds:
            for lo in range(0, len(items), args.batch):
                chunk = items[lo:lo + args.batch]
                path = out / row / f"seed{seed}_{lo:04d}.json"
                if path.exists():
                    results[row].append(json.loads(path.read_text()))
                    continue
                path.parent.mkdir(parents=True, exist_ok=True)
                batch, images = run_batch(model, spec, row, seed, chunk, args)
                write_json_atomic(path, batch)
                if seed == args.seeds[0] and lo == 0:
                    np.save(out / row / "first_batch_images.npy", images)
                results[row].append(batch)
                n = sum(len(b["images"]) for b in results[row])
                ok = np.mean([im["checks"]["relation"] for b in results[row] for im in b["images"]])
                log(f"{row} seed {seed}: {n} images, relation accuracy so far {100 * ok:.1f}%, "
                    f"{batch['seconds'] / len(chunk):.2f} s/image")
        first = out / row / "first_batch_images.npy"
        if first.exists():
            grids[row] = np.load(first)

    block = [MARK_START, "",
             f"Measured {time.strftime('%Y-%m-%d')} by `python -m train.relations_eval` ({platform.machine()} "
             f"{jax.default_backend()}, {jax.device_count()} device(s)): embedded ShapesWorld model, "
             f"{len(items)} held-out relation captions x seeds {list(args.seeds)}, {args.steps} steps, guidance "
             f"{args.guidance}, same starting noise in every row. Relation by GenEval's rule; colour/shape: every "
             "caption object has its attribute.", "", table(results), "",
             "Held-out classifier accuracy (test split of the dual-inversion data):", "",
             classifier_table({"dual inversion": args.classifier_report,
                               "without dual inversion": args.classifier_nodual_report}), ""]
    if "baseline" in grids and "l2s" in grids and args.figures:
        fig = Path(args.figures)
        fig.mkdir(parents=True, exist_ok=True)
        k = min(8, len(grids["baseline"]))
        caps = [c for _, c in items[:k]]
        save_png(fig / "relations_before_after.png",
                 labelled_grid([grids["baseline"][:k], grids["l2s"][:k]], caps, list(range(k))))
        block += [f"![baseline (left) vs Learn-to-Steer (right), same noise]({fig.as_posix()}/"
                  "relations_before_after.png)", ""]
    block.append(MARK_END)
    text = "\n".join(block)
    summary = {"settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
               "seconds": time.perf_counter() - t0, "results": results}
    publish(text, out, summary, args.results, (MARK_START, MARK_END), log)
    return summary


def main(argv=None) -> int:
    from train.shapesworld_baseline import method_eval_parser

    ap = method_eval_parser("python -m train.relations_eval", __doc__, ROWS, "runs/relations/eval")
    ap.add_argument("--captions", type=int, default=240, help="the baseline's held-out captions (relations: 2/3)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--batch", type=int, default=40)
    ap.add_argument("--classifier", default=None, help="dual-inversion classifier (default: the shipped one)")
    ap.add_argument("--classifier-nodual", default="runs/relations/classifier_nodual")
    ap.add_argument("--classifier-report", default="runs/relations/classifier")
    ap.add_argument("--classifier-nodual-report", default="runs/relations/classifier_nodual")
    ap.add_argument("--lr", type=float, default=None, help="eta of the learned rows (default: the classifier's)")
    ap.add_argument("--centroid-lr", type=float, default=None, help="eta of the centroid row")
    ap.add_argument("--figures", default="train/figures")
    run(ap.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
