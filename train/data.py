"""Training data from ShapesWorld, deterministic by step (so a resumed run sees exactly the batches it would
have seen), and the precomputed latent dataset of the UNet stage.

* VAE stage: step ``s`` renders training scenes ``s*B .. s*B + B - 1`` (every scene is a pure function of its
  index, :func:`jaxdiff.shapesworld.make_scene`); no scene repeats.
* UNet stage: a fixed set of ``n`` scenes is encoded once by the trained VAE (:func:`encode_dataset`; the
  posterior mean and std are stored, so each use draws a fresh latent z = mean + std * noise, as SD trains on
  posterior samples) and its captions tokenised once. Step ``s`` reads positions ``s*B ..`` of the concatenated
  per-epoch permutations (:func:`dataset_indices`) and drops captions to the empty prompt with probability
  ``p_uncond`` (classifier-free guidance training, Ho & Salimans 2022), both drawn from numpy generators
  seeded by (seed, epoch) and (seed, step).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.checkpoint import atomic_folder
from jaxdiff.shapesworld import make_scene
from jaxdiff.shapesworld.imageops import dilate
from jaxdiff.tokenizer import tokenize
from jaxdiff.vae import VAEConfig, vae_encode


def scene_images(indices) -> tuple[np.ndarray, list[str]]:
    """Training scenes ``indices`` -> (uint8 (B, 64, 64, 3) images, captions)."""
    scenes = [make_scene(int(i), "train") for i in indices]
    return np.stack([s.image for s in scenes]), [s.caption for s in scenes]


def object_weights(scene, object_weight: float) -> np.ndarray:
    """(H, W, 1) float32 per-pixel loss weight: 1 + ``object_weight`` on the objects' masks dilated by 1 px
    (so their edges count too)."""
    union = np.zeros(scene.image.shape[:2], bool)
    for o in scene.objects:
        union |= o.mask
    return (1.0 + object_weight * dilate(union, 1)).astype(np.float32)[..., None]


def to_signed(images_u8: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1], the range SD's VAE works in."""
    return images_u8.astype(np.float32) / 127.5 - 1.0


def vae_batch(step: int, batch: int, object_weight: float = 0.0) -> dict:
    """The VAE stage's batch at ``step``: fresh scenes ``step*batch ..`` as float32 [-1, 1] NHWC ``images`` and
    their per-pixel loss ``weight`` (:func:`object_weights`)."""
    scenes = [make_scene(i, "train") for i in range(step * batch, (step + 1) * batch)]
    return {"images": to_signed(np.stack([s.image for s in scenes])),
            "weight": np.stack([object_weights(s, object_weight) for s in scenes])}


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def dataset_indices(step: int, batch: int, n: int, seed: int) -> np.ndarray:
    """Dataset rows of ``step``: positions step*B .. step*B + B - 1 of the concatenation of per-epoch
    permutations of range(n) (a batch may straddle two epochs)."""
    pos = np.arange(step * batch, (step + 1) * batch)
    epochs, offsets = pos // n, pos % n
    return np.array([epoch_permutation(seed, int(e), n)[o] for e, o in zip(epochs, offsets)])


# ------------------------------------------------------------------------------------------ latent dataset
@dataclass(frozen=True, eq=False)
class LatentDataset:
    """``n`` encoded training scenes: posterior ``mean``/``std`` (n, h, w, C) float32 (unscaled latents),
    token ``ids`` (n, T) int32, ``uncond_ids`` (T,) of the empty prompt, and ``scaling_factor`` = 1 / std of
    the posterior samples over the whole set."""
    mean: np.ndarray
    std: np.ndarray
    ids: np.ndarray
    uncond_ids: np.ndarray
    scaling_factor: float

    def __len__(self) -> int:
        return int(self.mean.shape[0])


def unet_batch(ds: LatentDataset, step: int, batch: int, seed: int, p_uncond: float) -> dict:
    """The UNet stage's batch at ``step`` (see module doc); ``drop`` marks the rows given the empty prompt."""
    rows = dataset_indices(step, batch, len(ds), seed)
    drop = np.random.default_rng([seed, 1 << 20, step]).random(batch) < p_uncond
    ids = np.where(drop[:, None], ds.uncond_ids[None], ds.ids[rows])
    return {"mean": ds.mean[rows], "std": ds.std[rows], "ids": ids.astype(np.int32)}


def latent_scale(mean: np.ndarray, std: np.ndarray) -> float:
    """1 / std of z = mean + std * eps over all elements: Var z = E[mean^2 + std^2] - (E mean)^2 (float64)."""
    m, s = mean.astype(np.float64), std.astype(np.float64)
    var = np.mean(m * m + s * s) - np.mean(m) ** 2
    return float(1.0 / np.sqrt(var))


@functools.partial(jax.jit, static_argnames="config")
def encode_images(params, images, *, config: VAEConfig):
    """Images in [-1, 1] -> the VAE posterior's (mean, std), unscaled."""
    mean, logvar = vae_encode(params, images, config=config)
    return mean, jnp.exp(0.5 * logvar)


def rendered_chunks(n: int, chunk: int, workers: int):
    """``scene_images`` of scenes 0..n-1 in chunks of ``chunk``, in order. With ``workers`` > 1 the chunks are
    rendered by that many spawned processes (rendering is single-threaded numpy, ~3 ms a scene: 131072 scenes
    take ~7 min on one core) while the caller encodes the chunks already done. Spawn, not fork: the parent has
    JAX's threads running, and forking a threaded process can deadlock the child."""
    ranges = [range(start, min(start + chunk, n)) for start in range(0, n, chunk)]
    if workers <= 1:
        yield from map(scene_images, ranges)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from pool.map(scene_images, ranges)


class DatasetSizeError(ValueError):
    """A latent folder encoded for another number of scenes than the plan's."""


def dataset_size(folder: str | Path) -> int | None:
    """The number of scenes of a complete latent dataset ``folder`` (None when there is none)."""
    meta = Path(folder) / "meta.json"
    return json.loads(meta.read_text())["n"] if meta.is_file() else None


def encode_dataset(folder: str | Path, vae_params, vae_config: VAEConfig, tokenizer, n: int, chunk: int = 256,
                   max_tokens: int = 77, log=print, workers: int | None = None) -> Path:
    """Render, encode and tokenise training scenes 0..n-1 into ``folder`` (written atomically: a temporary
    sibling renamed into place when complete; an existing complete folder is kept, and one of another size
    refused). ``workers``: rendering processes (default: one per CPU core when there are several chunks)."""
    folder = Path(folder).absolute()
    have = dataset_size(folder)
    if have is not None:
        if have != n:
            raise DatasetSizeError(f"{folder} holds {have} encoded scenes, the plan wants {n}: use a new --workdir")
        return folder
    if workers is None:
        workers = min(os.cpu_count() or 1, -(-n // chunk)) if n > 4 * chunk else 1
    with atomic_folder(folder) as tmp:
        means, stds, captions = [], [], []
        for start, (images, caps) in zip(range(0, n, chunk), rendered_chunks(n, chunk, workers)):
            m, s = encode_images(vae_params, to_signed(images), config=vae_config)
            means.append(np.asarray(m)), stds.append(np.asarray(s)), captions.extend(caps)
            if log and (start // chunk) % 16 == 0:
                log(f"[latents] encoded {start + len(caps)}/{n}")
        mean, std = np.concatenate(means), np.concatenate(stds)
        unique = sorted(set(captions) | {""})
        table = dict(zip(unique, tokenize(tokenizer, unique, max_length=max_tokens)))
        ids = np.stack([table[c] for c in captions]).astype(np.int32)
        for name, arr in (("mean", mean), ("std", std), ("ids", ids), ("uncond_ids", table[""])):
            np.save(tmp / f"{name}.npy", arr)
        (tmp / "captions.json").write_text(json.dumps(captions))
        meta = {"n": n, "scaling_factor": latent_scale(mean, std), "latent_shape": list(mean.shape[1:]),
                "latent_mean": float(mean.mean()), "posterior_std_mean": float(std.mean())}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    return folder


def load_dataset(folder: str | Path) -> LatentDataset:
    folder = Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    arrays = {name: np.load(folder / f"{name}.npy") for name in ("mean", "std", "ids", "uncond_ids")}
    return LatentDataset(**arrays, scaling_factor=float(meta["scaling_factor"]))
