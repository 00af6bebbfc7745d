"""``python -m train.relation_data``: Learn-to-Steer's dual-inversion training data (methods.md §4.3).

    python -m train.relation_data --out runs/relations/data                      # embedded ShapesWorld model
    python -m train.relation_data --out runs/rel_sd --model models/sd15 --images photos/   # real SD: folder

For every scene with a known relation (object 1, relation, object 2), the image is DDIM-inverted
(:func:`sample.inversion.invert`: fixed-point inversion, ``FIXED_POINT_ITERS`` iterations per step, 50 steps,
guidance 1) under **two** prompts, the true one and one with a random *wrong* relation, and both are labelled
with the **true** relation (Yiflach et al.'s dual inversion: the classifier cannot read the relation word, it
must read the spatial pattern). While regenerating from the inverted noise with the same prompt, the per-object
cross-attention maps (:mod:`jaxdiff.steer.relation_maps`) are recorded at step indices ``STEP_INDICES`` of 50.
Inversions whose reconstruction PSNR is below 19.5 dB are dropped (the kept fraction is reported). The fifth
class "is" comes from attribute prompts ("a red circle on grass": maps of "circle" and "red"); an attribute
has no wrong relation, so those scenes are inverted under their true prompt only.

Sources:

* **ShapesWorld** (default; its "real images", as GQA is the paper's): scenes ``make_eval_scene(i,
  split="test")`` (a split no model or judge uses), every attribute and the background named in the prompt;
  the kinds cycle 1 object ("is"), the four relations, 3 objects (skipped). Object words are the shape nouns.
* **An image folder** (``--images DIR``) with ``triplets.jsonl``: one JSON object per line, ``{"image":
  "a.jpg", "subject": "dog", "relation": "left of", "object": "teddy bear"}`` (relation synonyms accepted;
  ``"is"`` with ``"object"`` the attribute: "a white dog"), optional ``"split"`` (train/val/test). Prompts
  are the paper's "a {subject} {relation} a {object}"; images are centre-cropped to the model's size.

Output (``--out``): ``meta.json`` (settings, map layout, model sha256) and ``shard_NNNNN.npz`` files (see
``train/relation_classifier.py`` for the fields), each written atomically; a rerun skips the shards already on
disk (resume) and refuses a folder made with other settings. Scenes are split train/val/test 80/10/10 by scene
group. Jitted batches are sharded over the local devices when they divide the batch.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from jaxdiff.shapesworld.params import RELATIONS
from jaxdiff.steer.relation_classifier import DEFAULT_STEP_INDICES as STEP_INDICES   # methods.md §4.3

NUM_STEPS = 50
FIXED_POINT_ITERS = 5
PSNR_MIN = 19.5
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


class DataError(ValueError):
    """Bad data-generation input (one-line message)."""


@dataclass(frozen=True)
class Row:
    """One inversion to run: image, prompt, the two words whose maps are kept, the TRUE label."""
    image: np.ndarray
    prompt: str
    words: tuple[str, str]
    label: int
    prompt_kind: int          # 0 true prompt, 1 wrong relation
    scene: int
    split: int


@dataclass(frozen=True)
class DataSettings:
    source: str
    scenes: int
    scenes_per_shard: int
    steps: int = NUM_STEPS
    step_indices: tuple[int, ...] = STEP_INDICES
    fixed_point_iters: int = FIXED_POINT_ITERS
    guidance: float = 1.0
    psnr_min: float = PSNR_MIN
    grid: int = 16
    seed: int = 0


def split_of_group(group: int) -> int:
    """80/10/10 by scene group: groups 8 and 9 of every 10 are val and test."""
    return {8: 1, 9: 2}.get(group % 10, 0)


# ----------------------------------------------------------------------------------------------- sources
def shapesworld_rows(index: int, seed: int) -> list[Row]:
    """The inversions of ShapesWorld scene ``index`` of split "test" (none for 3-object scenes)."""
    from jaxdiff.shapesworld import format_caption, make_eval_scene
    from jaxdiff.steer.relation_prompts import RELATION_CLASSES

    scene = make_eval_scene(index, split="test")
    spec = scene.spec
    split = split_of_group(index // 6)
    if len(spec.objects) == 1:
        o = spec.objects[0]
        return [Row(scene.image, scene.caption, (o.shape, o.colour), RELATION_CLASSES.index("is"), 0, index, split)]
    if len(spec.objects) != 2:
        return []
    words = (spec.objects[0].shape, spec.objects[1].shape)
    rng = np.random.default_rng([seed, index])
    wrong = [r for r in RELATION_CLASSES[:4] if r != spec.relation]
    wrong_rel = wrong[int(rng.integers(len(wrong)))]
    wrong_prompt = format_caption(type(spec)(spec.objects, wrong_rel, spec.background))
    label = RELATION_CLASSES.index(spec.relation)
    return [Row(scene.image, scene.caption, words, label, 0, index, split),
            Row(scene.image, wrong_prompt, words, label, 1, index, split)]


_PHRASE = {label: phrase for phrase, label in RELATIONS.items()}   # GenEval prompt wording


def folder_triplets(folder: Path) -> list[dict]:
    """Read and check ``folder/triplets.jsonl``."""
    from jaxdiff.steer.relation_prompts import normalise_relation

    path = folder / "triplets.jsonl"
    if not path.is_file():
        raise DataError(f"{folder} has no triplets.jsonl (one JSON object per line: image, subject, relation, "
                        "object)")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            t = json.loads(line)
            rec = {"image": str(t["image"]), "subject": str(t["subject"]).strip().lower(),
                   "relation": normalise_relation(str(t["relation"])), "object": str(t["object"]).strip().lower(),
                   "split": t.get("split")}
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise DataError(f"{path}:{n}: bad triplet ({e}); expected "
                            '{"image": ..., "subject": ..., "relation": ..., "object": ...}') from None
        if not (folder / rec["image"]).is_file():
            raise DataError(f"{path}:{n}: image {rec['image']!r} not found in {folder}")
        if rec["split"] is not None and rec["split"] not in SPLIT_CODES:
            raise DataError(f"{path}:{n}: split must be one of {', '.join(SPLIT_CODES)}, got {rec['split']!r}")
        out.append(rec)
    if not out:
        raise DataError(f"{path} holds no triplets")
    return out


def centre_crop(path: Path, size: tuple[int, int]) -> np.ndarray:
    """The largest centred crop of the target aspect ratio, resized (Lanczos) to ``size`` (H, W): uint8 RGB."""
    from PIL import Image, UnidentifiedImageError

    h, w = size
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            scale = min(im.width / w, im.height / h)
            cw, ch = round(w * scale), round(h * scale)
            left, top = (im.width - cw) // 2, (im.height - ch) // 2
            im = im.crop((left, top, left + cw, top + ch)).resize((w, h), Image.LANCZOS)
            return np.asarray(im, np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: not a readable image ({e})") from None


def folder_rows(folder: Path, triplets: list[dict], index: int, size: tuple[int, int], seed: int) -> list[Row]:
    from jaxdiff.steer.relation_prompts import RELATION_CLASSES

    t = triplets[index]
    image = centre_crop(folder / t["image"], size)
    split = SPLIT_CODES[t["split"]] if t["split"] else split_of_group(index)
    label = RELATION_CLASSES.index(t["relation"])
    if t["relation"] == "is":
        return [Row(image, f"a {t['object']} {t['subject']}", (t["subject"], t["object"]), label, 0, index, split)]
    rng = np.random.default_rng([seed, index])
    wrong = [r for r in RELATION_CLASSES[:4] if r != t["relation"]]
    wrong_rel = wrong[int(rng.integers(len(wrong)))]
    words = (t["subject"], t["object"])
    return [Row(image, f"a {t['subject']} {_PHRASE[r]} a {t['object']}", words, label, kind, index, split)
            for kind, r in ((0, t["relation"]), (1, wrong_rel))]


# ----------------------------------------------------------------------------------------------- one shard
def shard_arrays(model, tokenizer, layout, rows: list[Row], settings: DataSettings, mesh=None) -> dict:
    """Invert ``rows`` in one batch, regenerate capturing the maps, keep the PSNR-filtered rows."""
    import jax

    from jaxdiff.steer.relation_maps import object_maps, token_weights
    from sample.inversion import invert
    from sample.loop import StepCaptureSpec

    capture = StepCaptureSpec(layout.capture, reduce="steps", steps=tuple(settings.step_indices))
    images = np.stack([r.image for r in rows])
    res = invert(model, images, [r.prompt for r in rows], steps=settings.steps, guidance=settings.guidance,
                 fixed_point_iters=settings.fixed_point_iters, capture=capture, mesh=mesh)
    weights = np.stack([token_weights(tokenizer, r.prompt, r.words) for r in rows])
    maps = jax.vmap(lambda caps: object_maps(caps, layout, weights))(res.aux["attn"])   # (k, B, 2, C, G, G)
    maps = np.asarray(maps)
    keep = np.asarray(res.psnr) >= settings.psnr_min
    k = len(settings.step_indices)
    sel = np.flatnonzero(keep)
    col = lambda f, dt: np.repeat(np.asarray([getattr(rows[i], f) for i in sel], dt), k)   # noqa: E731
    return {"maps": maps[:, sel].transpose(1, 0, 2, 3, 4, 5).reshape(-1, *maps.shape[2:]).astype(np.float16),
            "step": np.tile(np.asarray(settings.step_indices, np.int32), len(sel)),
            "label": col("label", np.int32), "prompt_kind": col("prompt_kind", np.int8),
            "scene": col("scene", np.int64), "split": col("split", np.int8),
            "psnr": np.repeat(np.asarray(res.psnr, np.float32)[sel], k),
            "inverted": np.int64(len(rows)), "kept": np.int64(len(sel)),
            "kept_by_kind": np.asarray([keep[[r.prompt_kind == j for r in rows]].sum() for j in (0, 1)], np.int64),
            "seconds": np.float64(res.timings.get("total", 0.0))}


def write_npz_atomic(path: Path, arrays: dict) -> None:
    from jaxdiff.checkpoint import write_bytes_atomic

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes_atomic(path, buf.getvalue())


# ----------------------------------------------------------------------------------------------- driver
def run(args) -> dict:
    from jaxdiff.steer.relation_maps import map_layout
    from jaxdiff.steer.relation_prompts import RELATION_CLASSES
    from jaxdiff.tokenizer import load_tokenizer
    from sample.cli import load_model
    from sample.spec import SampleSpec, latent_shape, output_size

    out = Path(args.out)
    folder = Path(args.images) if args.images else None
    if folder is not None and not folder.is_dir():
        raise DataError(f"--images {folder} is not a folder")
    if args.model is None and folder is not None:
        raise DataError("--images needs --model (the SD checkpoint whose maps the classifier will read)")
    triplets = folder_triplets(folder) if folder is not None else None
    n_scenes = len(triplets) if triplets is not None else args.scenes
    settings = DataSettings(source=str(folder) if folder else "shapesworld", scenes=n_scenes,
                            scenes_per_shard=args.scenes_per_shard, steps=args.steps,
                            fixed_point_iters=args.fixed_point_iters, psnr_min=args.psnr_min, seed=args.seed)
    if any(not 0 <= s < settings.steps for s in settings.step_indices):
        raise DataError(f"--steps {settings.steps} does not cover the map step indices {settings.step_indices}")
    model = load_model(args.model, "float32")
    size = output_size(model, SampleSpec(), None)
    layout = map_layout(model.params["unet"], model.configs["unet"], latent_shape(model, *size)[:2],
                        grid=settings.grid)
    tokenizer = load_tokenizer(model.tokenizer_dirs["tokenizer"])
    meta = {"settings": json.loads(json.dumps(asdict(settings))), "layout": layout.to_json(), "grid": settings.grid,
            "channels": layout.channels, "step_indices": list(settings.step_indices), "num_steps": settings.steps,
            "classes": list(RELATION_CLASSES), "model": args.model or "embedded ShapesWorld",
            "model_sha256": model.manifest.get("source_sha256", "n/a")}
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "meta.json"
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        same = lambda m: ({k: v for k, v in m["settings"].items() if k != "scenes"},   # noqa: E731
                          m.get("layout"), m.get("model_sha256"))
        if same(old) != same(meta):
            raise DataError(f"{out} holds data made with other settings or another model; use a new --out")
    from jaxdiff.checkpoint import write_bytes_atomic
    write_bytes_atomic(meta_path, json.dumps(meta, indent=1).encode())   # more scenes extend a folder

    n_shards = -(-n_scenes // settings.scenes_per_shard)
    log = (lambda m: print(f"[relation_data] {m}", flush=True))
    t0, done_rows, totals = time.perf_counter(), 0, np.zeros(3, np.int64)
    order = range(n_shards - 1, -1, -1) if args.reverse else range(n_shards)
    for k in order:
        path = out / f"shard_{k:05d}.npz"
        if path.exists():
            with np.load(path) as z:
                totals += [int(z["inverted"]), int(z["kept"]), 0]
            continue
        lo, hi = k * settings.scenes_per_shard, min((k + 1) * settings.scenes_per_shard, n_scenes)
        rows = []
        for i in range(lo, hi):
            rows += (folder_rows(folder, triplets, i, size, settings.seed) if triplets is not None
                     else shapesworld_rows(i, settings.seed))
        if not rows:
            write_npz_atomic(path, {"inverted": np.int64(0), "kept": np.int64(0)})
            continue
        arrays = shard_arrays(model, tokenizer, layout, rows, settings)
        write_npz_atomic(path, arrays)
        totals += [int(arrays["inverted"]), int(arrays["kept"]), 0]
        done_rows += len(rows)
        rate = done_rows / (time.perf_counter() - t0)
        log(f"shard {k + 1}/{n_shards}: {len(rows)} inversions, kept {int(arrays['kept'])} "
            f"(PSNR >= {settings.psnr_min} dB; min {float(np.min(arrays['psnr'])) if arrays['kept'] else 0:.1f}); "
            f"{rate:.2f} inversions/s; kept so far {totals[1]}/{totals[0]}")
    summary = {"inverted": int(totals[0]), "kept": int(totals[1]),
               "kept_fraction": float(totals[1] / max(totals[0], 1)), "shards": n_shards}
    log(f"done: {summary}")
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.relation_data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default=None, help="SD model folder/file (default: the embedded ShapesWorld model)")
    ap.add_argument("--images", default=None, help="folder of images + triplets.jsonl (real SD)")
    ap.add_argument("--scenes", type=int, default=1200, help="ShapesWorld scene indices (5 of every 6 are used)")
    ap.add_argument("--scenes-per-shard", type=int, default=24)
    ap.add_argument("--steps", type=int, default=NUM_STEPS)
    ap.add_argument("--fixed-point-iters", type=int, default=FIXED_POINT_ITERS)
    ap.add_argument("--psnr-min", type=float, default=PSNR_MIN)
    ap.add_argument("--seed", type=int, default=0, help="draws each scene's wrong relation")
    ap.add_argument("--reverse", action="store_true",
                    help="last shard first (a second process on the same --out meets the first in the middle)")
    args = ap.parse_args(argv)
    for name in ("scenes", "scenes_per_shard", "steps"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    try:
        run(args)
    except (DataError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
