"""The shared training loop: a jitted step (loss -> AdamW update -> EMA), data-parallel over a device mesh,
Orbax checkpoints that make a killed run resume bit-identically, and a progress line.

State. :class:`TrainState` holds everything a step depends on: the step count, params, optimizer state, the
EMA params and the run's PRNG key. The step's randomness is ``fold_in(key, step)`` and the data of step ``s``
is a pure function of ``s`` (:mod:`train.data`), so (state at step s) determines the rest of the run exactly.

Checkpoints. ``orbax.checkpoint.CheckpointManager`` writes each save into a temporary folder and renames it
into place when complete, so a run killed mid-save leaves the previous checkpoint intact (the partial folder is
ignored). Each save holds the whole state plus JSON metadata (stage name, config fingerprint, samples seen);
:func:`run` restores the latest one and refuses one written with a different config.

Data parallelism. With a mesh (:func:`sample.sharding.resolve_mesh`: all local devices when there are several
and they divide the batch), the step is compiled with the batch sharded over the mesh's ``"batch"`` axis and
the state replicated; XLA's SPMD partitioner inserts the gradient all-reduce (the loss is a batch mean).
Random draws use partitionable threefry (JAX's default), so a sharded step equals the single-device step up
to the order of floating-point summation.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdiff.pytree import pytree_dataclass
from sample.sharding import BATCH
from train.config import LoopConfig, fingerprint

Array = jax.Array


@pytree_dataclass
@dataclass(frozen=True)
class TrainState:
    """``params`` is the model's tree; ``opt_state`` and ``ema`` live on the *flat* parameter vector
    (``jax.flatten_util.ravel_pytree`` order), see :func:`train_step`."""
    step: Array          # () int32: optimizer steps taken
    params: Any
    opt_state: Any
    ema: Array           # (n_params,) float32 exponential moving average of the flat params (exported)
    key: Array           # (2,) uint32 raw PRNG key of the run


def optimizer(cfg: LoopConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (optax.adamw's own chain: Adam moments, decoupled weight decay, minus
    the learning rate) with linear warmup and cosine decay. Weight decay applies to kernels and embeddings
    only: :func:`train_step` passes the params with norm scales and biases zeroed as the decay's params."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup, max(cfg.steps, cfg.warmup + 1),
                                                  cfg.lr * cfg.final_lr_fraction)
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
                       optax.add_decayed_weights(cfg.weight_decay), optax.scale_by_learning_rate(schedule))


class Update(Protocol):
    """A method's own update rule in place of :func:`train_step`'s gradient + AdamW, for methods that are not
    one loss under one optimizer (RespoDiff: two modules, two optimizers, alternating). The loop keeps the
    step count, key, EMA, checkpoints and progress. Must be hashable (a frozen dataclass): it keys the
    compiled-step cache."""

    def init(self, params) -> Any:
        """The optimizer state of ``params`` (arrays or shape structs under ``jax.eval_shape``)."""

    def apply(self, params, opt_state, batch: dict, key: Array, *frozen) -> tuple[Any, Any, Array, dict]:
        """``(new params, new opt_state, loss, metrics)`` of one step."""


def _opt_init(params, cfg: LoopConfig, update: Update | None):
    return optimizer(cfg).init(ravel_pytree(params)[0]) if update is None else update.init(params)


def init_state(params, cfg: LoopConfig, update: Update | None = None) -> TrainState:
    """The step-0 state as host arrays (numpy throughout: eager JAX ops would each compile a small program).
    The run key is the raw threefry key of ``cfg.seed``, i.e. ``jax.random.PRNGKey(seed)`` = [0, seed]."""
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    flat = flatten(params)
    opt_state = jax.device_get(jax.jit(functools.partial(_opt_init, cfg=cfg, update=update))(params))
    return TrainState(np.zeros((), np.int32), params, opt_state, flat.copy(), np.array([0, cfg.seed], np.uint32))


def abstract_state(params, cfg: LoopConfig, update: Update | None = None) -> TrainState:
    """Shapes and dtypes of :func:`init_state` (the restore template), computed without any arrays."""
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.float32), params)
    flat = jax.ShapeDtypeStruct((sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)),), np.float32)
    opt = jax.eval_shape(functools.partial(_opt_init, cfg=cfg, update=update), params)
    return TrainState(jax.ShapeDtypeStruct((), np.int32), params, opt, flat, jax.ShapeDtypeStruct((2,), np.uint32))


def flatten(params) -> np.ndarray:
    """Host version of ``ravel_pytree``: the leaves (``jax.tree.leaves`` order) raveled and concatenated."""
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(params)])


def unflatten(flat, template):
    """Inverse of :func:`flatten` on the host: split ``flat`` into leaves shaped like ``template``'s."""
    leaves, treedef = jax.tree.flatten(template)
    sizes = np.cumsum([int(np.prod(np.shape(x))) for x in leaves])[:-1]
    parts = np.split(np.asarray(flat), sizes)
    return jax.tree.unflatten(treedef, [p.reshape(np.shape(x)) for p, x in zip(parts, leaves)])


def ema_params(state: TrainState, template):
    """The EMA as a params tree shaped like ``template`` (host arrays)."""
    return unflatten(state.ema, template)


def ema_decay(step: Array, decay: float) -> Array:
    """Warmed-up EMA decay min(decay, (1 + s) / (10 + s)) (the TensorFlow/diffusers EMA warmup): early
    averages forget the random init quickly."""
    s = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + s) / (10.0 + s))


def train_step(state: TrainState, batch: dict, frozen=None, *, loss_fn: Callable | None,
               cfg: LoopConfig, update: Update | None = None) -> tuple[TrainState, dict]:
    """One optimizer step. ``loss_fn(params, batch, key) -> (loss, metrics)``; key = fold_in(run key, step).
    With ``frozen`` (arrays the loss reads but never trains, e.g. a frozen UNet under trainable concept
    vectors; replicated over the mesh, passed as an argument rather than baked into the program as constants)
    it is called as ``loss_fn(params, batch, key, frozen)``.

    The optimizer and the EMA run on one flat vector of all parameters (a "flat buffer", as fused/foreach
    optimizers do): a few large element-wise ops instead of a dozen per leaf. For these models that cuts XLA
    compile time of the step by ~1/3 and the per-step overhead on CPU; the arithmetic is the same per element.

    With ``update`` (:class:`Update`) the method's own rule replaces the gradient and AdamW (``loss_fn`` unused).
    """
    key = jax.random.fold_in(state.key, state.step)
    extra = () if frozen is None else (frozen,)
    if update is not None:
        params, opt_state, loss, metrics = update.apply(state.params, state.opt_state, batch, key, *extra)
        flat, _ = ravel_pytree(params)
        d = ema_decay(state.step, cfg.ema_decay)
        ema = state.ema + (1.0 - d) * (flat - state.ema)
        return TrainState(state.step + 1, params, opt_state, ema, state.key), dict(metrics, loss=loss)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, key, *extra)
    flat, unravel = ravel_pytree(state.params)
    decayable, _ = ravel_pytree(jax.tree.map(lambda x: x if x.ndim >= 2 else jnp.zeros_like(x), state.params))
    flat_grads, _ = ravel_pytree(grads)
    updates, opt_state = optimizer(cfg).update(flat_grads, state.opt_state, decayable)
    flat = flat + updates
    d = ema_decay(state.step, cfg.ema_decay)
    ema = state.ema + (1.0 - d) * (flat - state.ema)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(flat_grads))
    return TrainState(state.step + 1, unravel(flat), opt_state, ema, state.key), metrics


@functools.lru_cache(maxsize=16)
def compiled_step(loss_fn: Callable | None, cfg: LoopConfig, mesh: Mesh | None, update: Update | None = None):
    """``train_step`` jitted for one (loss, loop config, mesh); cached so repeated runs in one process (resume
    tests) reuse the compiled program. ``loss_fn`` must be hashable (a module function or a partial of one over
    hashable arguments is compared by identity, so build it once per stage config)."""
    fn = functools.partial(train_step, loss_fn=loss_fn, cfg=cfg, update=update)
    if mesh is None:
        return jax.jit(fn)
    rep, data = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec(BATCH))
    jitted = jax.jit(fn, in_shardings=(rep, data, rep), out_shardings=(rep, rep))
    return lambda state, batch, frozen=None: jitted(state, batch, frozen)


# ------------------------------------------------------------------------------------------- checkpoints
def checkpoint_manager(directory: str | Path, cfg: LoopConfig):
    import orbax.checkpoint as ocp

    # Synchronous saves: the state is small (~5M params, < 1 s to write) and a finished save is then on disk
    # before the next step, which is what "resume after kill" relies on.
    options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, enable_async_checkpointing=False, create=True)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def save(manager, state: TrainState, meta: dict) -> None:
    import orbax.checkpoint as ocp

    step = int(state.step)
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(jax.device_get(state)),
                                               meta=ocp.args.JsonSave(meta)), force=True)
    manager.wait_until_finished()


def restore(manager, template: TrainState, step: int | None = None) -> tuple[TrainState, dict]:
    """The checkpoint at ``step`` (default latest) as host arrays; ``template`` gives shapes (e.g.
    :func:`abstract_state`)."""
    import orbax.checkpoint as ocp

    step = manager.latest_step() if step is None else step
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), template)
    out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                        meta=ocp.args.JsonRestore()))
    return jax.device_get(out.state), out.meta


class ResumeError(RuntimeError):
    """A checkpoint folder holds a run made with a different configuration."""


# -------------------------------------------------------------------------------------------------- loop
def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = round(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


@dataclass
class Progress:
    """Prints ``[stage] step s/N  <mean metrics>  it/s  ETA`` every ``every`` steps. Metrics stay on the device
    between log points (no per-step host sync, so the host prepares the next batch while a step runs). The rate
    is that of the last interval (it excludes compilation, and recovers after a pause of the process, e.g. a
    SIGSTOP while someone benchmarks); the ETA extrapolates it."""
    name: str
    total: int
    every: int
    out: Any = None                       # None: sys.stdout at the time of printing

    def __post_init__(self):
        self.t0, self.s0, self.pending = None, 0, []

    def update(self, step: int, metrics: dict) -> None:
        self.pending.append(metrics)
        if self.t0 is None:                       # first step of this process: wait for it (compile included)
            jax.block_until_ready(metrics)
            self.t0, self.s0, self.pending = time.perf_counter(), step, []
            return
        if step % self.every and step != self.total:
            return
        means = {k: float(np.mean([float(m[k]) for m in self.pending])) for k in self.pending[0]}
        now = time.perf_counter()
        rate = (step - self.s0) / (now - self.t0)
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        avg = "  ".join(f"{k} {v:.4g}" for k, v in sorted(means.items()))
        print(f"[{self.name}] step {step}/{self.total}  {avg}  {rate:.3f} it/s  ETA {_duration(eta)}",
              file=self.out or sys.stdout, flush=True)
        self.t0, self.s0, self.pending = now, step, []


def run(name: str, directory: str | Path, params, loss_fn: Callable, batch_fn: Callable[[int], dict],
        cfg: LoopConfig, *, config_fingerprint: str, mesh: Mesh | None = None, stop_after: int | None = None,
        out=None, frozen=None, update: Update | None = None) -> TrainState:
    """Train from the latest checkpoint in ``directory`` (or from ``params``) to ``cfg.steps``.

    ``batch_fn(step)`` returns the host batch of that step. Saves every ``cfg.save_every`` steps and at the end.
    ``stop_after`` returns after that many total steps *without* a final save (a kill, for tests).
    ``frozen``: see :func:`train_step` (placed on the device once, replicated over the mesh); ``update``: a
    method's own update rule (:class:`Update`). Returns the final state (EMA as a params tree: :func:`ema_params`).
    """
    manager = checkpoint_manager(directory, cfg)
    full_fp = fingerprint({"stage": name, "loop": fingerprint(cfg), "config": config_fingerprint})
    if manager.latest_step() is None:
        state = init_state(params, cfg, update)
    else:
        state, meta = restore(manager, abstract_state(params, cfg, update))
        if meta.get("fingerprint") != full_fp:
            raise ResumeError(f"{directory}: checkpoint was written by a different {name!r} configuration; "
                              "use a new --workdir (or delete this one) to train with the new settings")
        print(f"[{name}] resumed at step {int(state.step)} from {directory}", file=out or sys.stdout, flush=True)
    step_fn = compiled_step(loss_fn, cfg, mesh, update)
    if frozen is not None:
        frozen = jax.device_put(frozen, NamedSharding(mesh, PartitionSpec()) if mesh is not None else None)
    progress = Progress(name, cfg.steps, cfg.log_every, out)
    step = int(state.step)
    try:
        while step < cfg.steps and (stop_after is None or step < stop_after):
            state, metrics = step_fn(state, batch_fn(step), frozen)
            step += 1
            progress.update(step, metrics)
            if step % cfg.save_every == 0 or step == cfg.steps:
                save(manager, state, {"stage": name, "fingerprint": full_fp, "step": step,
                                      "samples_seen": step * cfg.batch})
    finally:
        manager.close()
    return state


def trained_ema(name: str, directory: str | Path, template, cfg: LoopConfig, update: Update | None = None):
    """The EMA params of a finished stage as host arrays shaped like ``template`` (arrays or shape structs);
    raises if the stage has not reached ``cfg.steps``."""
    manager = checkpoint_manager(directory, cfg)
    if manager.latest_step() != cfg.steps:
        raise RuntimeError(f"{name}: {directory} has no finished checkpoint (latest step "
                           f"{manager.latest_step()}, want {cfg.steps})")
    state, _ = restore(manager, abstract_state(template, cfg, update))
    manager.close()
    return ema_params(state, template)
