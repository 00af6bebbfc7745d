"""``python -m train.concepts``: learn h-space concept tables (SDisc, LWIM) from a frozen model's own images.

    python -m train.concepts --method sdisc --group colour --out runs/concepts        # embedded ShapesWorld
    python -m train.concepts --method lwim --group colour --out runs/concepts         # same data folder
    python -m train.concepts --method sdisc --group gender --model models/sd15 --config gender.json --out runs/g

Two stages, both resumable (re-run the same command after a kill):

1. **Data** (``OUT/data/``): for every concept of the group, ``images_per_concept`` images sampled by the frozen
   model from the attribute prompts (``templates`` formatted with the concept's word: "a red shape on grass"),
   stored as their final latents with the neutral caption (the template with ``neutral_word``: "a shape on
   grass"), the label, and the attribute word's DAAM-style cross-attention map (summed over every
   cross-attention site, head and step, resized to the latent grid, max-normalised; LWIM's loss weight).
   Jitted batches sharded over the local devices, starting noise per image from ``(seed, image index)``,
   written as atomic shards. On ShapesWorld the judge can filter (``judge_filter``): only images it confirms
   are kept, and the kept fraction is recorded.
2. **Training** (``OUT/ckpt_NAME/``, :mod:`train.loop`: Orbax checkpoints, resume, progress with loss and it/s,
   data-parallel mesh): the method's loss (:mod:`jaxdiff.steer.sdisc`, :mod:`jaxdiff.steer.lwim`) with only the
   concept vectors trainable, every concept of the group in one step (each row its own concept); the EMA
   vectors are written as the table ``OUT/NAME.safetensors`` + ``OUT/NAME.json`` with the training record.

A ``--config`` JSON file overrides any field of :class:`ConceptConfig` (e.g. a gender pair on a real SD
folder: ``{"group": "gender", "concepts": {"female": "woman", "male": "man"}, "templates": ["a photo of a
{}"], "neutral_word": "person"}``) and of the method's hyper-parameters under ``"sdisc"`` / ``"lwim"``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from train.config import LoopConfig

SHAPESWORLD_COLOURS = ("red", "orange", "yellow", "green", "blue", "purple")
SHAPESWORLD_TEMPLATES = ("a {} shape", "a {} shape on grass", "a {} shape on sky", "a {} shape on sand",
                         "a {} shape on water", "a {} shape on brick")


@dataclass(frozen=True)
class MethodConfig:
    """Optimiser (``loop``: train.loop's settings; constant learning rate) and loss settings of one method
    (defaults: the papers' code, methods spec sections 1.2 and 2.2). ``gamma_a`` None / ``gamma_h`` 1 /
    ``beta`` 0 switch LWIM's (a)/(b)/(c) off."""

    loop: LoopConfig
    scale: float = 1.0
    rows: str = "cond"
    gamma_a: float | None = 0.0
    gamma_h: float = 0.5
    beta: float = 1.0
    target: str = "distill"

    def with_settings(self, **kw) -> "MethodConfig":
        """A copy with settings replaced; loop settings (steps, batch, lr, ...) go to ``loop``."""
        loop_keys = {f.name for f in dataclasses.fields(LoopConfig)}
        unknown = set(kw) - loop_keys - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConceptCLIError(f"unknown method settings {sorted(unknown)}; known: "
                                  f"{sorted(loop_keys | {f.name for f in dataclasses.fields(self)} - {'loop'})}")
        loop = dataclasses.replace(self.loop, **{k: v for k, v in kw.items() if k in loop_keys})
        return dataclasses.replace(self, loop=loop, **{k: v for k, v in kw.items() if k not in loop_keys})


def constant_lr(steps: int, batch: int, lr: float, **kw) -> LoopConfig:
    return LoopConfig(steps=steps, batch=batch, lr=lr, warmup=0, final_lr_fraction=1.0,
                      **{"weight_decay": 0.0, "clip_norm": 1e9, "save_every": 100, "log_every": 25, **kw})


@dataclass(frozen=True)
class ConceptConfig:
    """Data generation and training of one concept group."""

    group: str = "colour"
    concepts: dict = field(default_factory=lambda: {c: c for c in SHAPESWORLD_COLOURS})
    templates: tuple = SHAPESWORLD_TEMPLATES
    neutral_word: str = ""
    images_per_concept: int = 192
    steps: int = 30
    guidance: float = 7.5
    seed: int = 0
    batch: int = 64
    judge_filter: bool = True
    sdisc: MethodConfig = MethodConfig(constant_lr(400, 48, 0.1))
    lwim: MethodConfig = MethodConfig(constant_lr(250, 48, 1e-2, weight_decay=0.01, clip_norm=1.0), scale=2.0,
                                      rows="both")

    def data_settings(self) -> dict:
        """What determines the data folder's contents (a resume with other values is refused)."""
        keys = ("group", "concepts", "templates", "neutral_word", "images_per_concept", "steps", "guidance", "seed",
                "batch", "judge_filter")
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items() if k in keys}


class ConceptCLIError(ValueError):
    """A bad argument or input; printed as one line with exit status 2."""


def read_config(path: str | None, overrides: dict) -> ConceptConfig:
    cfg = ConceptConfig()
    raw: dict = {}
    if path:
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ConceptCLIError(f"--config {path}: cannot read a JSON object ({e})") from None
        if not isinstance(raw, dict):
            raise ConceptCLIError(f"--config {path}: not a JSON object")
    raw = {**raw, **{k: v for k, v in overrides.items() if v is not None}}
    known = {f.name for f in dataclasses.fields(ConceptConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConceptCLIError(f"--config: unknown settings {unknown}; known: {sorted(known)}")
    for m in ("sdisc", "lwim"):
        if m in raw:
            raw[m] = getattr(cfg, m).with_settings(**raw[m])
    if "templates" in raw:
        raw["templates"] = tuple(raw["templates"])
    cfg = dataclasses.replace(cfg, **raw)
    if not cfg.concepts or any("{}" not in t for t in cfg.templates):
        raise ConceptCLIError("the config needs concepts and templates that each contain '{}' for the word")
    return cfg


def neutral_caption(template: str, word: str) -> str:
    return " ".join(template.format(word).split())


def data_items(cfg: ConceptConfig) -> list[dict]:
    """Image k of the data set: its concept, attribute prompt and neutral caption (templates cycled)."""
    items = []
    for label, (name, word) in enumerate(cfg.concepts.items()):
        for j in range(cfg.images_per_concept):
            tpl = cfg.templates[j % len(cfg.templates)]
            items.append({"concept": name, "label": label, "word": word, "prompt": neutral_caption(tpl, word),
                          "neutral": neutral_caption(tpl, cfg.neutral_word)})
    return items


# ------------------------------------------------------------------------------------------ data generation
def attribute_maps(aux_attn: dict, token_masks: np.ndarray, latent_hw: tuple[int, int]) -> np.ndarray:
    """(B, h, w) DAAM-style maps: each site's step-summed head-mean probabilities of the attribute tokens,
    bilinearly resized to the latent grid, summed over sites, divided by their max."""
    import jax

    lh, lw = latent_hw
    total = np.zeros((token_masks.shape[0], lh, lw), np.float32)
    for probs in aux_attn.values():                       # (B, Q, K)
        probs = np.asarray(probs, np.float32)
        q = probs.shape[1]
        f = int(round((lh * lw / q) ** 0.5))
        word = (probs * token_masks[:, None, :]).sum(-1).reshape(-1, lh // f, lw // f)
        total += np.asarray(jax.image.resize(word, (word.shape[0], lh, lw), "bilinear"))
    peak = total.reshape(len(total), -1).max(1)[:, None, None]
    return np.where(peak > 0, total / np.maximum(peak, 1e-12), 0.0).astype(np.float32)


def token_mask(tok, prompt: str, word: str) -> np.ndarray:
    """(77,) bool: the positions of ``word``'s tokens in ``prompt`` (BOS at 0)."""
    from sample.heatmap import word_token_indices
    m = np.zeros(77, bool)
    try:
        m[word_token_indices(tok, prompt, word)] = True
    except ValueError:
        raise ConceptCLIError(f"the concept word {word!r} does not occur in its prompt {prompt!r}") from None
    return m


def _save_npz_atomic(path: Path, **arrays) -> None:
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def is_shapesworld(model) -> bool:
    """Whether ``model`` is the embedded ShapesWorld model (whose images the judge can check)."""
    return "shapesworld" in str(model.manifest.get("source", "")).lower()


def generate_data(model, cfg: ConceptConfig, folder: Path, *, log=functools.partial(print, flush=True)) -> dict:
    """Write the data shards into ``folder`` (skipping those already there); returns the data summary."""
    from jaxdiff.tokenizer import load_tokenizer
    from jaxdiff.unet import attn_sites
    from sample.loop import StepCaptureSpec
    from sample.outputs import write_json_atomic
    from sample.pipeline import txt2img
    from sample.shapesworld_eval import caption_noise
    from sample.spec import SampleSpec, latent_shape, output_size

    folder.mkdir(parents=True, exist_ok=True)
    meta_path = folder / "data.json"
    settings = {**cfg.data_settings(), "model_sha256": model.manifest.get("source_sha256")}
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        if old.get("settings") != settings:
            raise ConceptCLIError(f"{folder} holds data made with other settings; use another --out (or delete it)")
    else:
        write_json_atomic(meta_path, {"settings": settings})
    items = data_items(cfg)
    tok = load_tokenizer(model.tokenizer_dirs["tokenizer"])
    spec = SampleSpec(steps=cfg.steps, guidance=cfg.guidance)
    latent_hw = latent_shape(model, *output_size(model, spec))[:2]
    sites = tuple(s for s in attn_sites(model.configs["unet"]) if s.kind == "cross")
    capture = StepCaptureSpec.of(sites, "mean", reduce="sum", cond_only=True)
    judge = cfg.judge_filter and is_shapesworld(model)
    n_shards = -(-len(items) // cfg.batch)
    t0, made = time.perf_counter(), 0
    for k in range(n_shards):
        path = folder / f"shard_{k:05d}.npz"
        if path.exists():
            continue
        chunk = items[k * cfg.batch:(k + 1) * cfg.batch]
        pad = cfg.batch - len(chunk)
        idx = list(range(k * cfg.batch, k * cfg.batch + len(chunk))) + [k * cfg.batch] * pad
        prompts = [it["prompt"] for it in chunk] + [chunk[0]["prompt"]] * pad
        noise = caption_noise(model, spec, cfg.seed, idx)
        res = txt2img(model, prompts, spec=spec, seed=cfg.seed, init_latents=noise, capture=capture)
        masks = np.stack([token_mask(tok, it["prompt"], it["word"]) for it in chunk])
        maps = attribute_maps({s: a[:len(chunk)] for s, a in res.aux["attn"].items()}, masks, latent_hw)
        images = np.asarray(res.images)[:len(chunk)]
        keep = np.ones(len(chunk), bool)
        if judge:
            from jaxdiff.shapesworld import score_caption
            keep = np.array([score_caption(im, it["prompt"]).passed for im, it in zip(images, chunk)])
        _save_npz_atomic(path, latents=np.asarray(res.latents)[:len(chunk)], images=images, maps=maps,
                         token_mask=masks, label=np.array([it["label"] for it in chunk], np.int32),
                         index=np.array(idx[:len(chunk)], np.int64), keep=keep)
        made += len(chunk)
        rate = made / (time.perf_counter() - t0)
        log(f"[data] shard {k + 1}/{n_shards}  {rate:.2f} images/s  kept {keep.mean():.0%} of this shard")
    summary = data_summary(folder, list(cfg.concepts))
    meta = json.loads(meta_path.read_text())
    if made:
        meta["images_per_s"] = round(made / (time.perf_counter() - t0), 3)
    meta["summary"] = summary
    write_json_atomic(meta_path, meta)
    return meta


def load_data(folder: Path) -> dict:
    shards = sorted(folder.glob("shard_*.npz"))
    if not shards:
        raise ConceptCLIError(f"{folder}: no data shards")
    parts = [dict(np.load(p)) for p in shards]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def data_summary(folder: Path, names: list[str]) -> dict:
    """Images and judge-kept images, overall and per concept."""
    d = load_data(folder)
    per = {name: {"images": int((d["label"] == k).sum()), "kept": int(d["keep"][d["label"] == k].sum())}
           for k, name in enumerate(names)}
    return {"images": int(len(d["label"])), "kept": int(d["keep"].sum()),
            "kept_fraction": round(float(d["keep"].mean()), 4), "per_concept": per}


# ------------------------------------------------------------------------------------------ training
def frozen_arrays(model, captions: list[str], spec_hw: tuple[int, int]) -> dict:
    """The frozen inputs of the loss: UNet params, every caption encoded once, the training noise process."""
    import jax
    import jax.numpy as jnp

    from jaxdiff.schedulers.common import alphas_cumprod_np
    from sample.spec import scheduler_config
    from sample.text import encode_prompts, prompt_ids, sdxl_time_ids, text_encoder_names

    tid = sdxl_time_ids(*spec_hw) if model.is_sdxl else None
    ids = prompt_ids(model, captions, None, guided=False, time_ids=tid)
    names = text_encoder_names(model)
    cond = jax.jit(encode_prompts, static_argnums=1)(tuple(model.params[n] for n in names),
                                                     tuple(model.configs[n] for n in names), ids)
    frozen = {"unet": model.params["unet"], "context": cond.context,
              "alphas_cumprod": jnp.asarray(alphas_cumprod_np(scheduler_config(model)))}
    if cond.added_cond is not None:
        frozen.update(text_embeds=cond.added_cond["text_embeds"], time_ids=cond.added_cond["time_ids"])
    return frozen


def method_module(method: str):
    from jaxdiff.steer import lwim, sdisc
    return {"sdisc": sdisc, "lwim": lwim}[method]


def make_loss(method: str, model, mc: MethodConfig):
    mod = method_module(method)
    prediction = model.scheduler_config.get("prediction_type", "epsilon")
    if method == "lwim":
        return functools.partial(mod.loss, unet=model.configs["unet"], prediction_type=prediction,
                                 cfg=mod.LWIMTraining(gamma_a=mc.gamma_a, gamma_h=mc.gamma_h, beta=mc.beta,
                                                      target=mc.target))
    return functools.partial(mod.loss, unet=model.configs["unet"], prediction_type=prediction)


def training_batches(data: dict, captions: list[str], prompts: list[str], neutrals: list[str], batch: int, seed: int):
    """``batch_fn(step)``: rows drawn epoch by epoch (train.data's permutation order) from the kept images."""
    from train.data import dataset_indices

    rows = np.flatnonzero(data["keep"])
    # min-max per image: the DAAM sum is spread over the whole grid (max-normalised it rarely drops below ~0.4),
    # so the loss weight 1 + beta M would be nearly uniform
    maps = data["maps"] - data["maps"].min(axis=(1, 2), keepdims=True)
    maps = maps / np.maximum(maps.max(axis=(1, 2), keepdims=True), 1e-12)
    cap_index = {c: i for i, c in enumerate(captions)}
    attr = np.array([cap_index[p] for p in prompts], np.int32)
    neut = np.array([cap_index[n] for n in neutrals], np.int32)

    def batch_fn(step: int) -> dict:
        r = rows[dataset_indices(step, batch, len(rows), seed)]
        return {"latents": data["latents"][r], "label": data["label"][r], "neutral": neut[r], "attribute": attr[r],
                "token_mask": data["token_mask"][r], "map": maps[r]}
    return batch_fn


def train_table(model, cfg: ConceptConfig, method: str, out: Path, name: str, *, stop_after: int | None = None,
                log=print) -> Path | None:
    """Train ``method`` on ``out/data`` and write ``out/NAME`` (None when stopped early by ``stop_after``)."""
    from jaxdiff.steer.concepts import ConceptTable, h_shape_of, save_table
    from sample.sharding import resolve_mesh
    from sample.spec import SampleSpec, latent_shape, output_size
    from train import loop
    from train.config import fingerprint

    mc: MethodConfig = getattr(cfg, method)
    meta = json.loads((out / "data" / "data.json").read_text())
    data = load_data(out / "data")
    items = data_items(cfg)
    by_index = [items[int(i)] for i in data["index"]]
    prompts, neutrals = [it["prompt"] for it in by_index], [it["neutral"] for it in by_index]
    captions = sorted(set(prompts) | set(neutrals))
    spec = SampleSpec(steps=cfg.steps, guidance=cfg.guidance)
    hw = output_size(model, spec)
    h_shape = h_shape_of(model.params["unet"], model.configs["unet"], latent_shape(model, *hw)[:2])
    mod = method_module(method)
    names = tuple(cfg.concepts)
    vectors = mod.init_vectors(len(names), h_shape)
    lc = dataclasses.replace(mc.loop, seed=cfg.seed + 1)
    batch_fn = training_batches(data, captions, prompts, neutrals, lc.batch, cfg.seed)
    t0 = time.perf_counter()
    frozen = frozen_arrays(model, captions, hw)     # captions encoded once, for training and the final loss
    state = loop.run(f"{name}", out / f"ckpt_{name}", vectors, make_loss(method, model, mc), batch_fn, lc,
                     config_fingerprint=fingerprint({"method": method, "cfg": cfg, "data": meta["settings"]}),
                     mesh=resolve_mesh(None, lc.batch), stop_after=stop_after, out=None,
                     frozen=frozen)
    if int(state.step) < lc.steps:
        return None
    seconds = time.perf_counter() - t0
    trained = loop.trained_ema(name, out / f"ckpt_{name}", vectors, lc)
    loss_fn = make_loss(method, model, mc)
    record = {"method": method, "steps": lc.steps, "batch": lc.batch, "lr": lc.lr, "weight_decay": lc.weight_decay,
              "optimizer": "adam" if lc.weight_decay == 0 else "adamw", "clip_norm": lc.clip_norm,
              "vectors": "EMA of the trained vectors", "data": meta.get("summary"),
              "data_images_per_s": meta.get("images_per_s"), "data_settings": meta["settings"],
              "this_process_s": round(seconds, 1),
              "final_loss_mean": eval_loss(loss_fn, trained, batch_fn, frozen, lc.steps)}
    if method == "lwim":
        record.update(gamma_a=mc.gamma_a, gamma_h=mc.gamma_h, beta=mc.beta, target=mc.target)
    table = ConceptTable(vectors=np.asarray(trained), names=names, method=method, kind=mod.KIND, h_shape=h_shape,
                         groups={cfg.group: names}, scale=mc.scale, rows=mc.rows,
                         model_sha256=model.manifest.get("source_sha256"), training=record)
    st, _ = save_table(out / name, table)
    log(f"wrote {st} and {st.with_suffix('.json')}")
    return st


def eval_loss(loss_fn, vectors, batch_fn, frozen, step0: int, n: int = 4) -> float:
    """Mean loss of the trained vectors over ``n`` fresh batches (fixed keys)."""
    import jax
    f = jax.jit(loss_fn)
    vals = [float(f(vectors, batch_fn(step0 + k), jax.random.PRNGKey(1000 + k), frozen)[0]) for k in range(n)]
    return round(float(np.mean(vals)), 6)


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m train.concepts", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", required=True, choices=("sdisc", "lwim"))
    ap.add_argument("--group", help="concept group name (default: colour, or the config's)")
    ap.add_argument("--out", required=True, help="folder for data/, checkpoints and the table")
    ap.add_argument("--name", help="table name (default: the method)")
    ap.add_argument("--model", help="diffusers/converted folder or single file (default: embedded ShapesWorld)")
    ap.add_argument("--config", help="JSON file overriding ConceptConfig fields")
    ap.add_argument("--steps", type=int, help="training steps (overrides the method's)")
    ap.add_argument("--no-suppress", action="store_true", help="LWIM without (a) attribute-token suppression")
    ap.add_argument("--no-attenuate", action="store_true", help="LWIM without (b) h attenuation")
    ap.add_argument("--no-weight", action="store_true", help="LWIM without (c) the spatially weighted loss")
    ap.add_argument("--target", choices=("distill", "noise"), help="LWIM loss target")
    ap.add_argument("--gamma-a", type=float, help="LWIM suppression probability scale")
    ap.add_argument("--gamma-h", type=float, help="LWIM h attenuation")
    ap.add_argument("--beta", type=float, help="LWIM loss-weight strength")
    ap.add_argument("--data-only", action="store_true", help="generate the data set and stop")
    return ap.parse_args(argv)


def method_overrides(args) -> dict:
    o = {"steps": args.steps, "target": args.target, "gamma_a": args.gamma_a, "gamma_h": args.gamma_h,
         "beta": args.beta}
    o = {k: v for k, v in o.items() if v is not None}
    if args.no_suppress:
        o["gamma_a"] = None
    if args.no_attenuate:
        o["gamma_h"] = 1.0
    if args.no_weight:
        o["beta"] = 0.0
    return o


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.method == "sdisc" and (args.no_suppress or args.no_attenuate or args.no_weight or args.target):
            raise ConceptCLIError("--no-suppress/--no-attenuate/--no-weight/--target are LWIM switches")
        cfg = read_config(args.config, {"group": args.group})
        mc = getattr(cfg, args.method).with_settings(**method_overrides(args))
        cfg = dataclasses.replace(cfg, **{args.method: mc})
        from sample.cli import CLIError, load_model
        try:
            model = load_model(args.model, "float32")
        except CLIError as e:
            raise ConceptCLIError(str(e)) from None
        out = Path(args.out)
        generate_data(model, cfg, out / "data")
        if not args.data_only:
            train_table(model, cfg, args.method, out, args.name or args.method)
    except ConceptCLIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
