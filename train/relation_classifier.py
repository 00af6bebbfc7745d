"""``python -m train.relation_classifier``: train Learn-to-Steer's relation classifier on recorded attention maps.

    python -m train.relation_classifier --data runs/relations/data --out runs/relations/classifier
    python -m train.relation_classifier --data DATA --out OUT --no-dual-inversion       # the paper's ablation
    python -m train.relation_classifier --data DATA --out OUT --model models/sd14 --ship jaxdiff/assets/l2s

Yiflach, Atzmon & Chechik, "Data-Driven Loss Functions for Inference-Time Optimization in Text-to-Image"
(WACV 2026); the model is :class:`jaxdiff.steer.relation_classifier.RelationClassifier` (methods.md §4.2),
the training recipe that of methods.md §4.3:

* **data** (``--data``, default ``OUT/data``; written by ``train/relation_data.py``): ``meta.json`` (channel
  layout, grid, channels, step indices, classes, the model's sha256) and shards ``shard_*.npz`` with per-row
  ``maps`` (2, C, G, G) float16, ``step``, ``label``, ``prompt_kind`` (0: maps recorded under the true prompt,
  1: under a prompt naming a wrong relation; *both labelled with the true relation*: dual inversion),
  ``scene``, ``split`` (0 train, 1 val, 2 test) and ``psnr``. ``--no-dual-inversion`` drops the kind-1 rows
  from train and val; the test split always reports both kinds.
* **optimisation**: cross-entropy, AdamW (lr 1e-4, weight decay 0.05 on every parameter, as torch's AdamW),
  batch 64, up to ``--epochs`` epochs; ReduceLROnPlateau on the val loss (factor 0.5, patience 5, min lr
  1e-6, strict improvement) and early stopping (patience 10) keeping the params of the best val loss.
* **determinism**: epoch ``e`` shuffles with ``default_rng([seed, e])`` and batch ``b`` draws its dropout from
  ``fold_in(fold_in(run_key, e), b)``, so the state after an epoch determines the rest of the run. An Orbax
  checkpoint is written after every epoch in ``OUT/ckpt`` (params, AdamW moments, best params; the schedule,
  early-stopping counters and history as JSON); re-running the same command resumes, and a resumed run
  equals an uninterrupted one bit for bit. A checkpoint written with other data or settings is refused
  (``--epochs`` may change: it only bounds the run).
* **outputs**: ``OUT/classifier.safetensors`` + ``OUT/classifier.json`` (the best params, with the data's
  layout and a training record) and ``OUT/report.json`` (held-out accuracy overall, on true-prompt and on
  wrong-prompt maps, per class and per step index); ``--ship DIR`` copies the classifier files into DIR.

``--model DIR`` only checks that the data was recorded from that model (its ``source_sha256``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdiff.checkpoint import write_bytes_atomic
from jaxdiff.pytree import pytree_dataclass
from jaxdiff.steer.relation_classifier import (ClassifierConfig, RelationClassifier, RelationClassifierError,
                                               classifier_paths, init_params, layout_channels, predict,
                                               save_classifier)

NAME = "relation_classifier"
ARRAYS = {"maps": None, "step": np.int32, "label": np.int32, "prompt_kind": np.int8, "scene": np.int64,
          "split": np.int8, "psnr": np.float32}
META_KEYS = ("layout", "grid", "channels", "step_indices", "num_steps", "classes")
# architecture fields --arch may set (the rest come from the data's meta.json)
ARCH_FIELDS = ("d_model", "extractor_layers", "extractor_heads", "extractor_ff", "pool_heads", "head_layers",
               "head_heads", "head_ff", "dropout", "step_embed_dim", "mlp_hidden")
SPLITS = {0: "train", 1: "val", 2: "test"}


class RelationTrainError(ValueError):
    """Bad data, arguments or checkpoint; printed as one line with exit status 2."""


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings (defaults: methods.md §4.3, SD1.4). ``keep``: checkpoints kept; ``eval_batch``:
    rows per evaluation call (neither changes the result)."""

    epochs: int = 150
    batch: int = 64
    lr: float = 1e-4
    weight_decay: float = 0.05
    patience: int = 10
    plateau_patience: int = 5
    plateau_factor: float = 0.5
    min_lr: float = 1e-6
    seed: int = 0
    dual_inversion: bool = True
    flips: bool = False
    keep: int = 2
    eval_batch: int = 256

    def fingerprint(self) -> dict:
        """What determines the run (``epochs`` only bounds it, ``keep``/``eval_batch`` do not matter)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("epochs", "keep", "eval_batch")}


# ------------------------------------------------------------------------------------------------ data
def _read_meta(folder: Path) -> dict:
    path = folder / "meta.json"
    if not path.is_file():
        raise RelationTrainError(f"relation data {folder}: no meta.json")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RelationTrainError(f"relation data {path}: not readable JSON ({e})") from None
    if not isinstance(meta, dict):
        raise RelationTrainError(f"relation data {path}: not a JSON object")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise RelationTrainError(f"relation data {path}: missing keys {missing}")
    try:
        channels, grid = int(meta["channels"]), int(meta["grid"])
        steps, classes = [int(s) for s in meta["step_indices"]], [str(c) for c in meta["classes"]]
        int(meta["num_steps"])
    except (TypeError, ValueError) as e:
        raise RelationTrainError(f"relation data {path}: bad values ({e})") from None
    if channels < 1 or grid < 1 or not steps or len(classes) < 2:
        raise RelationTrainError(f"relation data {path}: needs channels, grid >= 1, step indices and >= 2 classes")
    if meta["layout"] and layout_channels(meta["layout"]) != channels:
        raise RelationTrainError(f"relation data {path}: its layout describes {layout_channels(meta['layout'])} "
                                 f"channels but channels is {channels}")
    return meta


def load_data(folder: str | Path) -> dict:
    """The rows of every ``shard_*.npz`` in ``folder`` (sorted by name; partial files, which start with a dot,
    are ignored), concatenated: ``{"maps": (N, 2, C, G, G) float16, "step", "label", "prompt_kind", "scene",
    "split", "psnr": (N,), "meta": meta.json, "shards": [[name, rows], ...], "dir": str}``. Any problem is a
    one-line :class:`RelationTrainError`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RelationTrainError(f"relation data {folder}: no such folder")
    meta = _read_meta(folder)
    c, g = int(meta["channels"]), int(meta["grid"])
    steps, k = {int(s) for s in meta["step_indices"]}, len(meta["classes"])
    shards = sorted(p for p in folder.glob("shard_*.npz") if p.is_file())
    if not shards:
        raise RelationTrainError(f"relation data {folder}: no shard_*.npz files")
    parts: dict[str, list] = {name: [] for name in ARRAYS}
    listing = []
    for p in shards:
        try:
            with np.load(p) as z:
                arrays = {name: np.asarray(z[name]) for name in ARRAYS}
        except KeyError as e:
            raise RelationTrainError(f"relation data {p}: missing array {e}") from None
        except (OSError, ValueError, EOFError) as e:
            raise RelationTrainError(f"relation data {p}: unreadable ({type(e).__name__}: {e})") from None
        maps = arrays["maps"]
        if maps.ndim != 5 or maps.shape[1] != 2 or maps.shape[3:] != (g, g):
            raise RelationTrainError(f"relation data {p}: maps have shape {maps.shape}, expected (n, 2, {c}, {g}, {g})")
        if maps.shape[2] != c:
            raise RelationTrainError(f"relation data {p}: maps have {maps.shape[2]} channels per object, "
                                     f"meta.json says {c}")
        n = maps.shape[0]
        for name, dtype in ARRAYS.items():
            if name != "maps":
                if arrays[name].shape != (n,):
                    raise RelationTrainError(f"relation data {p}: {name} has shape {arrays[name].shape}, expected "
                                             f"({n},)")
                arrays[name] = arrays[name].astype(dtype)
        arrays["maps"] = maps.astype(np.float16, copy=False)
        if not np.isin(arrays["step"], list(steps)).all():
            raise RelationTrainError(f"relation data {p}: step values {sorted(set(arrays['step'].tolist()) - steps)} "
                                     f"are not in step_indices {sorted(steps)}")
        if arrays["label"].size and (arrays["label"].min() < 0 or arrays["label"].max() >= k):
            raise RelationTrainError(f"relation data {p}: labels outside [0, {k})")
        if not np.isin(arrays["split"], (0, 1, 2)).all() or not np.isin(arrays["prompt_kind"], (0, 1)).all():
            raise RelationTrainError(f"relation data {p}: split must be 0/1/2 and prompt_kind 0/1")
        for name in ARRAYS:
            parts[name].append(arrays[name])
        listing.append([p.name, int(n)])
    data = {name: np.concatenate(v) for name, v in parts.items()}
    return {**data, "meta": meta, "shards": listing, "dir": str(folder)}


def select(data: dict, mask: np.ndarray) -> dict:
    """A copy of the rows of ``data`` where ``mask`` is true (metadata entries kept). Training and evaluation
    index the full arrays instead (no copy of the maps)."""
    return {k: (v[mask] if k in ARRAYS else v) for k, v in data.items()}


def training_splits(data: dict, dual_inversion: bool) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of the train (split 0) and val (split 1) rows; without dual inversion only the true-prompt
    maps (prompt_kind 0) of each (the paper's ablation). Raises if either, or the test split, is empty."""
    keep = np.ones(len(data["label"]), bool) if dual_inversion else data["prompt_kind"] == 0
    train_rows = np.flatnonzero((data["split"] == 0) & keep)
    val_rows = np.flatnonzero((data["split"] == 1) & keep)
    for name, rows in (("training (split 0)", train_rows), ("validation (split 1)", val_rows),
                       ("test (split 2)", np.flatnonzero(data["split"] == 2))):
        if len(rows) == 0:
            raise RelationTrainError(f"relation data {data['dir']}: no {name} rows"
                                     + ("" if dual_inversion or name.startswith("test") else " with prompt_kind 0"))
    return train_rows, val_rows


def classifier_config(meta: dict, arch: dict | None = None) -> ClassifierConfig:
    """The classifier for a data set: shape and classes from its meta, architecture overrides from ``arch``."""
    arch = dict(arch or {})
    unknown = sorted(set(arch) - set(ARCH_FIELDS))
    if unknown:
        raise RelationTrainError(f"--arch: unknown or data-determined fields {unknown}; allowed: {list(ARCH_FIELDS)}")
    try:
        return ClassifierConfig(channels=int(meta["channels"]), grid=int(meta["grid"]),
                                num_steps=int(meta["num_steps"]), classes=tuple(meta["classes"]),
                                step_indices=tuple(int(s) for s in meta["step_indices"]), **arch)
    except (RelationClassifierError, TypeError) as e:
        raise RelationTrainError(str(e)) from None


# ------------------------------------------------------------------------------------------------ compute
def _optimizer(weight_decay: float) -> optax.GradientTransformation:
    """AdamW without its learning rate: Adam's normalised step plus ``weight_decay * p`` (decoupled decay,
    Loshchilov & Hutter 2019; = torch.optim.AdamW); the step multiplies by -lr, which changes per epoch."""
    return optax.chain(optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8), optax.add_decayed_weights(weight_decay))


@functools.lru_cache(maxsize=8)
def _train_step(config: ClassifierConfig, weight_decay: float) -> Callable:
    """Jitted ``(params, opt_state, maps, step, label, weight, key, epoch, batch, lr) -> (params, opt_state,
    loss)``; rows of weight 0 are padding (the last batch of an epoch is padded to a fixed shape, so one
    program serves the run; its loss is the mean over the real rows, as a short last batch in PyTorch)."""
    model, opt = RelationClassifier(config), _optimizer(weight_decay)

    def step(params, opt_state, maps, steps, labels, weights, key, epoch, batch, lr):
        key = jax.random.fold_in(jax.random.fold_in(key, epoch), batch)

        def loss_fn(p):
            logits = model.apply({"params": p}, maps, steps, train=True, rngs={"dropout": key})
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
            return jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1.0)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return jax.tree.map(lambda p, u: p - lr * u, params, updates), opt_state, loss

    return jax.jit(step)


@functools.lru_cache(maxsize=8)
def _eval_step(config: ClassifierConfig) -> Callable:
    """Jitted ``(params, maps, step, label) -> (per-row cross-entropy, predicted class)``, dropout off."""
    def fn(params, maps, steps, labels):
        logits = predict(params, config, maps, steps)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels), jnp.argmax(logits, -1)
    return jax.jit(fn)


def _padded(idx: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``idx`` padded to ``size`` by repeating its first row, and the (size,) float32 weights (0 on padding)."""
    w = np.zeros(size, np.float32)
    w[:len(idx)] = 1.0
    return np.concatenate([idx, np.full(size - len(idx), idx[0], idx.dtype)]), w


def _batch(data: dict, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return data["maps"][idx].astype(np.float32), data["step"][idx], data["label"][idx]


def flip_augment(maps: np.ndarray, labels: np.ndarray, classes: tuple[str, ...],
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Mirror each row's maps left-right and/or top-bottom with probability 1/2 each, relabelling "left of" <->
    "right of" and "above" <-> "below" (the "is" class is unchanged). A spatial relation between two objects is
    a property of their maps' geometry, so the mirrored maps are those of the mirrored scene, up to the UNet's
    small departures from mirror symmetry: 4x the scenes for a data set far smaller than the paper's."""
    maps, labels = maps.copy(), labels.copy()
    swap = np.arange(len(classes))
    for axis, (a, b) in ((-1, ("left of", "right of")), (-2, ("above", "below"))):
        flip = rng.random(len(labels)) < 0.5
        maps[flip] = np.flip(maps[flip], axis=axis)
        if a in classes and b in classes:
            perm = swap.copy()
            perm[classes.index(a)], perm[classes.index(b)] = classes.index(b), classes.index(a)
            labels[flip] = perm[labels[flip]]
    return maps, labels


def _predict_rows(params, config: ClassifierConfig, data: dict, rows: np.ndarray,
                  batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(per-row cross-entropy, predicted class) of ``data``'s ``rows``, in padded batches of ``batch``."""
    fn = _eval_step(config)
    n = len(rows)
    ce, pred = np.zeros(n, np.float32), np.zeros(n, np.int64)
    for s in range(0, n, batch):
        idx, _ = _padded(rows[s:s + batch], batch)
        c, p = fn(params, *_batch(data, idx))
        k = min(batch, n - s)
        ce[s:s + k], pred[s:s + k] = np.asarray(c)[:k], np.asarray(p)[:k]
    return ce, pred


def _acc(correct: np.ndarray, mask: np.ndarray) -> float | None:
    return float(correct[mask].mean()) if mask.any() else None


def evaluate(params, config: ClassifierConfig, data: dict, *, split: int | None = 2, rows: np.ndarray | None = None,
             batch: int = 256) -> dict:
    """Loss and accuracy of ``params`` (dropout off) on the rows of ``split`` of ``data`` (:func:`load_data`;
    None: every row; ``rows``, an index array, overrides ``split``): overall, on true-prompt maps
    (prompt_kind 0) and wrong-prompt maps (prompt_kind 1), per class and per step index. Accuracies of empty
    groups are None."""
    if rows is None:
        rows = np.arange(len(data["label"])) if split is None else np.flatnonzero(data["split"] == split)
    rows = np.asarray(rows, np.int64)
    n = len(rows)
    if n == 0:
        what = "the data" if split is None else f"split {split} ({SPLITS.get(split, '?')})"
        raise RelationTrainError(f"no rows to evaluate in {what}")
    ce, pred = _predict_rows(params, config, data, rows, batch)
    data = {k: data[k][rows] for k in ("label", "prompt_kind", "step")}
    correct = pred == data["label"]
    kind = data["prompt_kind"]
    out = {"n": n, "loss": float(ce.astype(np.float64).mean()), "accuracy": float(correct.mean()),
           "n_true_prompt": int((kind == 0).sum()), "accuracy_true_prompt": _acc(correct, kind == 0),
           "n_wrong_prompt": int((kind == 1).sum()), "accuracy_wrong_prompt": _acc(correct, kind == 1),
           "per_class": {}, "per_step": {}}
    for i, name in enumerate(config.classes):
        m = data["label"] == i
        out["per_class"][name] = {"n": int(m.sum()), "accuracy": _acc(correct, m)}
    for s in sorted(set(config.step_indices) | set(np.unique(data["step"]).tolist())):
        m = data["step"] == s
        out["per_step"][str(s)] = {"n": int(m.sum()), "accuracy": _acc(correct, m)}
    return out


# ------------------------------------------------------------------------------------------------ state
@pytree_dataclass
@dataclass(frozen=True)
class ClassifierState:
    """What an epoch changes, as arrays (Orbax): ``step`` = epochs completed (train.loop's checkpoint step)."""
    step: Any
    params: Any
    opt_state: Any
    best_params: Any


@dataclass(frozen=True)
class TrainResult:
    """``params``: after the last epoch run; ``best_params``: of the best val loss (what is saved);
    ``report``: held-out metrics (None when the run was stopped by ``stop_after``)."""
    config: ClassifierConfig
    params: Any
    best_params: Any
    history: list
    best_epoch: int
    epochs_run: int
    report: dict | None


def _fingerprint(data: dict, settings: TrainSettings, config: ClassifierConfig) -> dict:
    return json.loads(json.dumps({"data": {"meta": data["meta"], "shards": data["shards"]},
                                  "settings": settings.fingerprint(), "classifier": config.to_json()}))


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(a) | set(b))
    out = []
    for k in keys:
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _differences(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out


def _template(config: ClassifierConfig, weight_decay: float) -> ClassifierState:
    params = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
    opt = jax.eval_shape(_optimizer(weight_decay).init, params)
    return ClassifierState(jax.ShapeDtypeStruct((), np.int32), params, opt, params)


def _controller_update(ctl: dict, val_loss: float, settings: TrainSettings, epoch: int) -> tuple[dict, bool]:
    """One epoch of ReduceLROnPlateau (mode min, threshold 0, cooldown 0: reduce when the val loss has not
    improved for more than ``plateau_patience`` epochs, then count afresh) and early stopping (stop after
    ``patience`` epochs without improvement). Returns the new controller state and whether it improved."""
    ctl = dict(ctl)
    improved = ctl["best_val"] is None or val_loss < ctl["best_val"]
    if improved:
        ctl.update(best_val=val_loss, best_epoch=epoch, bad_epochs=0, plateau_bad=0)
    else:
        ctl["bad_epochs"] += 1
        ctl["plateau_bad"] += 1
        if ctl["plateau_bad"] > settings.plateau_patience:
            new_lr = max(ctl["lr"] * settings.plateau_factor, settings.min_lr)
            if ctl["lr"] - new_lr > 1e-8:             # torch's eps: ignore negligible reductions
                ctl["lr"] = new_lr
            ctl["plateau_bad"] = 0
    ctl["stopped"] = ctl["bad_epochs"] >= settings.patience
    return ctl, improved


def _write_json_atomic(path: Path, obj: dict) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=1) + "\n").encode())


def train(data: dict, out: str | Path, settings: TrainSettings = TrainSettings(), *, arch: dict | None = None,
          stop_after: int | None = None, ship: str | Path | None = None, record: dict | None = None,
          log: Callable[[str], None] = functools.partial(print, flush=True)) -> TrainResult:
    """Train on ``data`` (:func:`load_data`) in ``out`` from its latest checkpoint, up to ``settings.epochs``
    epochs or early stopping, then write the classifier and ``report.json`` (and copy the classifier into
    ``ship``). ``stop_after`` returns after that many epochs in total *without* the final outputs (a kill, for
    tests); ``record`` is extra JSON for the classifier's meta (e.g. the model path)."""
    from train.loop import checkpoint_manager, restore, save

    out = Path(out)
    config = classifier_config(data["meta"], arch)
    train_rows, val_rows = training_splits(data, settings.dual_inversion)
    if settings.batch < 1 or settings.epochs < 0:
        raise RelationTrainError("--batch must be >= 1 and --epochs >= 0")
    fp = _fingerprint(data, settings, config)
    init_key, run_key = jax.random.split(jax.random.PRNGKey(settings.seed))

    ckpt = out / "ckpt"
    out.mkdir(parents=True, exist_ok=True)
    manager = checkpoint_manager(ckpt, settings)
    try:
        if manager.latest_step() is None:
            params = jax.device_get(init_params(config, init_key))
            state = ClassifierState(np.zeros((), np.int32), params,
                                    jax.device_get(_optimizer(settings.weight_decay).init(params)), params)
            ctl = {"lr": float(settings.lr), "best_val": None, "best_epoch": 0, "bad_epochs": 0, "plateau_bad": 0,
                   "stopped": False, "history": []}
        else:
            state, meta = restore(manager, _template(config, settings.weight_decay))
            if meta.get("fingerprint") != fp:
                diff = _differences(meta.get("fingerprint") or {}, fp)
                raise RelationTrainError(f"{ckpt}: checkpoint was written with other data or settings "
                                         f"({', '.join(diff[:4]) or 'unknown'}); use a new --out (or delete it)")
            ctl = meta["controller"]
            log(f"[{NAME}] resumed at epoch {int(state.step)} from {ckpt}")

        step_fn = _train_step(config, float(settings.weight_decay))
        n_train, b = len(train_rows), settings.batch
        epoch = int(state.step)
        params, opt_state, best = state.params, state.opt_state, state.best_params
        while epoch < settings.epochs and not ctl["stopped"] and (stop_after is None or epoch < stop_after):
            t0 = time.perf_counter()
            perm = train_rows[np.random.default_rng([settings.seed, epoch]).permutation(n_train)]
            lr = np.float32(ctl["lr"])
            losses = []
            for i, s in enumerate(range(0, n_train, b)):
                idx, w = _padded(perm[s:s + b], b)
                maps, steps, labels = _batch(data, idx)
                if settings.flips:
                    maps, labels = flip_augment(maps, labels, config.classes,
                                                np.random.default_rng([settings.seed, epoch, i, 1]))
                params, opt_state, loss = step_fn(params, opt_state, maps, steps, labels, w, run_key,
                                                  np.int32(epoch), np.int32(i), lr)
                losses.append((loss, float(w.sum())))
            train_loss = float(sum(float(l) * n for l, n in losses) / n_train)
            rate = n_train / (time.perf_counter() - t0)
            val = evaluate(params, config, data, rows=val_rows, batch=settings.eval_batch)
            epoch += 1
            ctl, improved = _controller_update(ctl, val["loss"], settings, epoch)
            if improved:
                best = params
            ctl["history"].append({"epoch": epoch, "train_loss": train_loss, "val_loss": val["loss"],
                                   "val_accuracy": val["accuracy"], "lr": float(lr)})
            log(f"[{NAME}] epoch {epoch}/{settings.epochs}  train loss {train_loss:.4f}  val loss {val['loss']:.4f}"
                f"  val acc {val['accuracy']:.3f}  lr {float(lr):.3g}  {rate:.1f} samples/s"
                + ("  (best)" if improved else "") + ("  early stop" if ctl["stopped"] else ""))
            state = ClassifierState(np.asarray(epoch, np.int32), params, opt_state, best)
            save(manager, state, {"stage": NAME, "fingerprint": fp, "controller": ctl})
    finally:
        manager.close()

    params, best = jax.device_get(state.params), jax.device_get(state.best_params)
    result = TrainResult(config, params, best, list(ctl["history"]), int(ctl["best_epoch"]), int(state.step), None)
    if stop_after is not None and not ctl["stopped"] and int(state.step) < settings.epochs:
        return result
    return dataclasses.replace(result, report=finish(result, data, out, settings, ship=ship, record=record, log=log))


def finish(result: TrainResult, data: dict, out: Path, settings: TrainSettings, *, ship=None, record=None,
           log: Callable[[str], None] = print) -> dict:
    """Evaluate the best params on the held-out split, write the classifier and ``report.json``, ship."""
    config, meta = result.config, data["meta"]
    test = evaluate(result.best_params, config, data, split=2, batch=settings.eval_batch)
    best_hist = next((h for h in result.history if h["epoch"] == result.best_epoch), {})
    report = {"test": test, "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
              "val_loss": best_hist.get("val_loss"), "val_accuracy": best_hist.get("val_accuracy"),
              "dual_inversion": settings.dual_inversion, "data": data["dir"], "model_sha256": meta.get("model_sha256")}
    cmeta = {"model_sha256": meta.get("model_sha256"), "grid": config.grid, "step_indices": list(config.step_indices),
             "dual_inversion": settings.dual_inversion, "epochs_run": result.epochs_run,
             "best_epoch": result.best_epoch, "val_loss": report["val_loss"], "val_accuracy": report["val_accuracy"],
             "test_accuracy": test["accuracy"], "test_accuracy_true_prompt": test["accuracy_true_prompt"],
             "test_accuracy_wrong_prompt": test["accuracy_wrong_prompt"], "training": settings.fingerprint(),
             "data": {"dir": data["dir"], "rows": int(len(data["label"]))}, **(record or {})}
    save_classifier(out, result.best_params, config, meta["layout"], cmeta)
    _write_json_atomic(out / "report.json", report)
    if ship is not None:
        ship = Path(ship)
        ship.mkdir(parents=True, exist_ok=True)
        for p in classifier_paths(out):               # tensors first, as save_classifier
            write_bytes_atomic(ship / p.name, p.read_bytes())

    def fmt(a):
        return "n/a" if a is None else f"{a:.3f}"
    log(f"[{NAME}] best epoch {result.best_epoch}/{result.epochs_run}  held-out accuracy {fmt(test['accuracy'])} "
        f"(n={test['n']})  true-prompt maps {fmt(test['accuracy_true_prompt'])} (n={test['n_true_prompt']})  "
        f"wrong-prompt maps {fmt(test['accuracy_wrong_prompt'])} (n={test['n_wrong_prompt']})")
    log(f"[{NAME}] per class: " + ", ".join(f"{k} {fmt(v['accuracy'])}" for k, v in test["per_class"].items()))
    log(f"[{NAME}] per step: " + ", ".join(f"{k} {fmt(v['accuracy'])}" for k, v in test["per_step"].items()))
    log(f"[{NAME}] wrote {out / 'classifier.safetensors'}, {out / 'report.json'}"
        + (f"; shipped to {ship}" if ship is not None else ""))
    return report


# ------------------------------------------------------------------------------------------------ CLI
def check_model(model_dir: str, meta: dict) -> str | None:
    """The ``source_sha256`` of ``model_dir``; raises unless it is the model the data was recorded from."""
    from sample.cli import CLIError, load_model
    try:
        model = load_model(model_dir, "float32")
    except CLIError as e:
        raise RelationTrainError(str(e)) from None
    sha = model.manifest.get("source_sha256")
    if sha != meta.get("model_sha256"):
        raise RelationTrainError(f"--model {model_dir}: its sha256 {str(sha)[:12]} is not the data's model "
                                 f"{str(meta.get('model_sha256'))[:12]}; record the data with this model")
    return sha


def parse_args(argv):
    d = TrainSettings()
    ap = argparse.ArgumentParser(prog="python -m train.relation_classifier", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for ckpt/, classifier.* and report.json")
    ap.add_argument("--data", help="data folder (meta.json + shard_*.npz; default OUT/data)")
    ap.add_argument("--model", help="the model the data was recorded from (checked against the data's sha256)")
    ap.add_argument("--no-dual-inversion", action="store_true", help="train/validate on true-prompt maps only")
    ap.add_argument("--epochs", type=int, default=d.epochs)
    ap.add_argument("--batch", type=int, default=d.batch)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--weight-decay", type=float, default=d.weight_decay)
    ap.add_argument("--patience", type=int, default=d.patience, help="early-stopping patience (epochs)")
    ap.add_argument("--plateau-patience", type=int, default=d.plateau_patience,
                    help="ReduceLROnPlateau patience (epochs)")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--flip-augment", action="store_true",
                    help="mirror maps left-right / top-bottom at random, swapping the relation labels")
    ap.add_argument("--arch", help="JSON object overriding architecture fields, e.g. '{\"d_model\": 64}'")
    ap.add_argument("--ship", help="also copy classifier.safetensors/.json into this folder")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        arch = None
        if args.arch:
            try:
                arch = json.loads(args.arch)
            except ValueError as e:
                raise RelationTrainError(f"--arch: not JSON ({e})") from None
            if not isinstance(arch, dict):
                raise RelationTrainError("--arch: not a JSON object")
        settings = TrainSettings(epochs=args.epochs, batch=args.batch, lr=args.lr, weight_decay=args.weight_decay,
                                 patience=args.patience, plateau_patience=args.plateau_patience, seed=args.seed,
                                 dual_inversion=not args.no_dual_inversion, flips=args.flip_augment)
        data = load_data(args.data or Path(args.out) / "data")
        record = {}
        if args.model:
            check_model(args.model, data["meta"])
            record["model"] = args.model
        train(data, args.out, settings, arch=arch, ship=args.ship, record=record)
    except (RelationTrainError, RelationClassifierError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
