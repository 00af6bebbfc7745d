"""``python -m train.concepts``: learn h-space concept tables (SDisc, LWIM from a frozen model's own images;
RespoDiff from its own predictions, no images).

    python -m train.concepts --method sdisc --group colour --out runs/concepts        # embedded ShapesWorld
    python -m train.concepts --method lwim --group colour --out runs/concepts         # same data folder
    python -m train.concepts --method respodiff --group colour --out runs/concepts    # no data stage
    python -m train.concepts --method sdisc --group safety --out runs/concepts        # "no-red" -> sdisc_safety
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
   RespoDiff (:mod:`jaxdiff.steer.respodiff`) skips stage 1: its step rolls its own anchors.

Groups: ``colour`` (fairness, one concept per colour) and ``safety`` (``no-red``: a concept that *removes* the
world's bias colour). A safety concept names its unsafe attribute in ``negatives``: SDisc/LWIM train on images
generated with it as the negative prompt (Li et al.'s "anti-" vectors; LWIM then regresses the true noise, as
there is no attribute prompt to distil), RespoDiff's target is ``e(unsafe) + 12 (e(neutral) - e(unsafe))``.
Groups other than ``colour`` keep their data in ``OUT/data_GROUP`` and name their table ``METHOD_GROUP``;
``python -m train.concepts_merge`` joins the groups of one method into one table.

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
    ``beta`` 0 switch LWIM's (a)/(b)/(c) off. RespoDiff: ``loop.lr`` is RAM's learning rate, ``sam_lr`` SAM's,
    ``lam`` weights L_sem (0: RAM only), the anchor is a ``rollout_steps`` DDIM trajectory at guidance
    ``rollout_guidance``, ``target_guidance`` is w of the target (4 for fairness, 12 for safety)."""

    loop: LoopConfig
    scale: float = 1.0
    rows: str = "cond"
    gamma_a: float | None = 0.0
    gamma_h: float = 0.5
    beta: float = 1.0
    target: str = "distill"
    lam: float = 0.5
    sam_lr: float = 1e-2
    rollout_steps: int = 50
    rollout_guidance: float = 3.0
    target_guidance: float = 4.0

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
    negatives: dict = field(default_factory=dict)      # safety concept -> its unsafe prompt
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
    # the race concept set's learning rates (RAM 1e-1, SAM 1e-2; the reference's gender/safety runs use 1e-2 with
    # 5000 steps at batch 1); batch 6 = one row per colour (each row's anchor rollout costs up to 49 guided steps)
    respodiff: MethodConfig = MethodConfig(constant_lr(150, 6, 1e-1, save_every=25))

    def data_settings(self) -> dict:
        """What determines the data folder's contents (a resume with other values is refused)."""
        keys = ("group", "concepts", "templates", "neutral_word", "images_per_concept", "steps", "guidance", "seed",
                "batch", "judge_filter")
        out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items() if k in keys}
        if self.negatives:                 # absent for groups without them: older data folders stay valid
            out["negatives"] = dict(self.negatives)
        return out

    def data_folder(self, out: Path) -> Path:
        return out / ("data" if self.group == "colour" else f"data_{self.group}")

    def table_name(self, method: str) -> str:
        return method if self.group == "colour" else f"{method}_{self.group}"


def safety_preset() -> ConceptConfig:
    """``no-red`` on ShapesWorld: remove the bias colour from the neutral prompts."""
    base = ConceptConfig()
    from jaxdiff.steer.concepts import SAFETY_GROUP
    return ConceptConfig(group=SAFETY_GROUP, concepts={"no-red": ""}, negatives={"no-red": "red"},
                         lwim=base.lwim.with_settings(target="noise"),
                         respodiff=base.respodiff.with_settings(target_guidance=12.0))


PRESETS = {"colour": ConceptConfig, "safety": safety_preset}


class ConceptCLIError(ValueError):
    """A bad argument or input; printed as one line with exit status 2."""


def read_config(path: str | None, overrides: dict) -> ConceptConfig:
    """The group's preset (``colour`` by default), then the ``--config`` file, then ``overrides``."""
    cfg = PRESETS.get(overrides.get("group") or "colour", ConceptConfig)()
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
    for m in METHODS:
        if m in raw:
            raw[m] = getattr(cfg, m).with_settings(**raw[m])
    if "templates" in raw:
        raw["templates"] = tuple(raw["templates"])
    cfg = dataclasses.replace(cfg, **raw)
    if not cfg.concepts or any("{}" not in t for t in cfg.templates):
        raise ConceptCLIError("the config needs concepts and templates that each contain '{}' for the word")
    unknown = sorted(set(cfg.negatives) - set(cfg.concepts))
    if unknown:
        raise ConceptCLIError(f"--config: negatives name unknown concepts {unknown}")
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
                          "neutral": neutral_caption(tpl, cfg.neutral_word), "negative": cfg.negatives.get(name, "")})
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
    """(77,) bool: the positions of ``word``'s tokens in ``prompt`` (BOS at 0); none for an empty word (a safety
    concept's prompt names no attribute)."""
    from sample.heatmap import word_token_indices
    m = np.zeros(77, bool)
    if not word:
        return m
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
        negatives = [it["negative"] for it in chunk] + [chunk[0]["negative"]] * pad
        res = txt2img(model, prompts, spec=spec, seed=cfg.seed, init_latents=noise, capture=capture,
                      negative_prompts=negatives if any(negatives) else None)
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


METHODS = ("sdisc", "lwim", "respodiff")


def method_module(method: str):
    from jaxdiff.steer import lwim, respodiff, sdisc
    return {"sdisc": sdisc, "lwim": lwim, "respodiff": respodiff}[method]


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

    if method == "respodiff":
        return train_respodiff(model, cfg, out, name, stop_after=stop_after, log=log)
    mc: MethodConfig = getattr(cfg, method)
    meta = json.loads((cfg.data_folder(out) / "data.json").read_text())
    data = load_data(cfg.data_folder(out))
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


@dataclass(frozen=True)
class RespoDiffUpdate:
    """:class:`train.loop.Update` of RespoDiff: its alternating two-optimizer step."""

    unet: object
    cfg: object                      # jaxdiff.steer.respodiff.RespoDiffTraining
    latent_shape: tuple

    def init(self, params):
        from jaxdiff.steer.respodiff import init_opt_state
        return init_opt_state(params, self.cfg)

    def apply(self, params, opt_state, batch, key, frozen):
        from jaxdiff.steer.respodiff import train_step
        return train_step(params, opt_state, batch, key, frozen, unet=self.unet, cfg=self.cfg,
                          latent_shape=self.latent_shape)


def respodiff_captions(cfg: ConceptConfig) -> list[dict]:
    """Per (concept, template): the neutral prompt the anchor follows, and the target's ``pos``/``base`` prompts
    and guidance (fairness: attribute prompt over ""; safety: neutral prompt over the unsafe one)."""
    mc = cfg.respodiff
    rows = []
    for label, (name, word) in enumerate(cfg.concepts.items()):
        for tpl in cfg.templates:
            neutral = neutral_caption(tpl, cfg.neutral_word)
            if name in cfg.negatives:
                rows.append({"label": label, "neutral": neutral, "pos": neutral, "base": cfg.negatives[name],
                             "w": mc.target_guidance})
            else:
                rows.append({"label": label, "neutral": neutral, "pos": neutral_caption(tpl, word), "base": "",
                             "w": mc.target_guidance})
    return rows


def respodiff_batches(rows: list[dict], captions: list[str], n_concepts: int, batch: int, seed: int):
    """``batch_fn(step)``: concepts in turn (row r of step s gets concept (s B + r) mod N), a random template."""
    index = {c: i for i, c in enumerate(captions)}
    by_label = [[r for r in rows if r["label"] == k] for k in range(n_concepts)]

    def batch_fn(step: int) -> dict:
        rng = np.random.default_rng([seed, step])
        picked = []
        for r in range(batch):
            options = by_label[(step * batch + r) % n_concepts]
            picked.append(options[rng.integers(len(options))])
        return {"label": np.array([p["label"] for p in picked], np.int32),
                "neutral": np.array([index[p["neutral"]] for p in picked], np.int32),
                "uncond": np.full(batch, index[""], np.int32),
                "pos": np.array([index[p["pos"]] for p in picked], np.int32),
                "base": np.array([index[p["base"]] for p in picked], np.int32),
                "w": np.array([p["w"] for p in picked], np.float32)}
    return batch_fn


def train_respodiff(model, cfg: ConceptConfig, out: Path, name: str, *, stop_after: int | None = None,
                    log=print) -> Path | None:
    """RespoDiff on its own anchors (no data folder); writes ``out/NAME`` with ``ram + sam`` per concept."""
    import jax

    from jaxdiff.schedulers import make_schedule
    from jaxdiff.schedulers.config import DDIM
    from jaxdiff.steer import respodiff
    from jaxdiff.steer.concepts import ConceptTable, h_shape_of, save_table
    from sample.sharding import resolve_mesh
    from sample.spec import SampleSpec, latent_shape, output_size, scheduler_config
    from train import loop
    from train.config import fingerprint

    mc: MethodConfig = cfg.respodiff
    rcfg = respodiff.RespoDiffTraining(lam=mc.lam, ram_lr=mc.loop.lr, sam_lr=mc.sam_lr,
                                       rollout_guidance=mc.rollout_guidance)
    rows = respodiff_captions(cfg)
    captions = sorted({r[k] for r in rows for k in ("neutral", "pos", "base")} | {""})
    hw = output_size(model, SampleSpec(steps=cfg.steps, guidance=cfg.guidance))
    lat = latent_shape(model, *hw)
    h_shape = h_shape_of(model.params["unet"], model.configs["unet"], lat[:2])
    names = tuple(cfg.concepts)
    modules = respodiff.init_modules(len(names), h_shape)
    lc = dataclasses.replace(mc.loop, seed=cfg.seed + 1)
    batch_fn = respodiff_batches(rows, captions, len(names), lc.batch, cfg.seed)
    t0 = time.perf_counter()
    frozen = frozen_arrays(model, captions, hw)
    frozen["schedule"] = make_schedule(scheduler_config(model, DDIM), mc.rollout_steps)
    update = RespoDiffUpdate(model.configs["unet"], rcfg, tuple(lat))
    state = loop.run(name, out / f"ckpt_{name}", modules, None, batch_fn, lc, update=update, frozen=frozen,
                     config_fingerprint=fingerprint({"method": "respodiff", "cfg": cfg,
                                                     "model": model.manifest.get("source_sha256")}),
                     mesh=resolve_mesh(None, lc.batch), stop_after=stop_after, out=None)
    if int(state.step) < lc.steps:
        return None
    seconds = time.perf_counter() - t0
    trained = loop.trained_ema(name, out / f"ckpt_{name}", modules, lc, update)
    step = jax.jit(update.apply)
    opt = update.init(trained)
    finals = [step(trained, opt, batch_fn(lc.steps + k), jax.random.PRNGKey(1000 + k), frozen)[3]
              for k in range(4)]
    record = {"method": "respodiff", "steps": lc.steps, "batch": lc.batch, "ram_lr": lc.lr, "sam_lr": mc.sam_lr,
              "lam": mc.lam, "optimizer": "adam (two, alternating)", "rollout_steps": mc.rollout_steps,
              "rollout_guidance": mc.rollout_guidance, "target_guidance": mc.target_guidance,
              "negatives": dict(cfg.negatives), "templates": list(cfg.templates),
              "vectors": "EMA of ram + sam", "this_process_s": round(seconds, 1),
              "final_l_resp_mean": round(float(np.mean([f["l_resp"] for f in finals])), 6),
              "final_l_sem_mean": round(float(np.mean([f["l_sem"] for f in finals])), 6)}
    table = ConceptTable(vectors=respodiff.table_vectors(trained), names=names, method="respodiff",
                         kind=respodiff.KIND, h_shape=h_shape, groups={cfg.group: names}, scale=mc.scale,
                         rows=mc.rows, model_sha256=model.manifest.get("source_sha256"), training=record)
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
    ap.add_argument("--method", required=True, choices=METHODS)
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
    ap.add_argument("--lam", type=float, help="RespoDiff weight of the semantic loss (0: RAM only)")
    ap.add_argument("--data-only", action="store_true", help="generate the data set and stop")
    return ap.parse_args(argv)


def method_overrides(args) -> dict:
    o = {"steps": args.steps, "target": args.target, "gamma_a": args.gamma_a, "gamma_h": args.gamma_h,
         "beta": args.beta, "lam": args.lam}
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
        lwim_only = (args.no_suppress, args.no_attenuate, args.no_weight, args.target, args.gamma_a is not None,
                     args.gamma_h is not None, args.beta is not None)
        if args.method != "lwim" and any(lwim_only):
            raise ConceptCLIError("--no-suppress/--no-attenuate/--no-weight/--target/--gamma-a/--gamma-h/--beta are "
                                  "LWIM switches")
        if args.method != "respodiff" and args.lam is not None:
            raise ConceptCLIError("--lam is a RespoDiff setting")
        if args.method == "respodiff" and args.data_only:
            raise ConceptCLIError("--data-only: RespoDiff has no data stage (it trains on its own predictions)")
        if args.group and args.group not in PRESETS and not args.config:
            raise ConceptCLIError(f"--group {args.group!r} has no preset ({', '.join(PRESETS)}); describe its "
                                  "concepts and templates with --config")
        cfg = read_config(args.config, {"group": args.group})
        mc = getattr(cfg, args.method).with_settings(**method_overrides(args))
        cfg = dataclasses.replace(cfg, **{args.method: mc})
        from sample.cli import CLIError, load_model
        try:
            model = load_model(args.model, "float32")
        except CLIError as e:
            raise ConceptCLIError(str(e)) from None
        out = Path(args.out)
        if args.method != "respodiff":
            generate_data(model, cfg, cfg.data_folder(out))
        if not args.data_only:
            train_table(model, cfg, args.method, out, args.name or cfg.table_name(args.method))
    except ConceptCLIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
