"""Data parallelism for sampling: the batch axis sharded over a 1-D :class:`jax.sharding.Mesh`, weights replicated.

Nothing in the programs is written for a device count: inputs are placed with a ``NamedSharding`` and XLA's
SPMD partitioner (GSPMD) propagates the batch sharding through the jitted program (computation follows
data). Per-row maths (every UNet/VAE/CLIP op normalises within a row) partitions without collectives apart
from the guidance batch's [uncond, cond] concatenation. Random draws are made on the host side of the
program or with ``jax.random`` in partitionable threefry, so a sharded run equals the single-device run.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BATCH = "batch"


def batch_mesh(devices=None) -> Mesh:
    """A 1-D mesh with axis ``"batch"`` over ``devices`` (default: all local devices)."""
    devices = jax.local_devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (BATCH,))


def resolve_mesh(mesh: Mesh | None, batch: int) -> Mesh | None:
    """The mesh a run uses: an explicit ``mesh`` (its ``"batch"`` axis must divide ``batch``), or for None all
    local devices when there are several and they divide ``batch`` (else unsharded, returns None)."""
    if mesh is None:
        n = jax.local_device_count()
        return batch_mesh() if n > 1 and batch % n == 0 else None
    if BATCH not in mesh.axis_names:
        raise ValueError(f"the sampling mesh needs an axis named {BATCH!r}, got axes {mesh.axis_names}")
    n = mesh.shape[BATCH]
    if batch % n:
        raise ValueError(f"batch {batch} is not divisible by the mesh's {n} devices on axis {BATCH!r}")
    return mesh


def replicate(tree: Any, mesh: Mesh | None) -> Any:
    """Every leaf replicated on ``mesh`` (no copy for leaves already placed so)."""
    if mesh is None:
        return tree
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def shard_batch(tree: Any, mesh: Mesh | None) -> Any:
    """Leaves with a leading batch axis divisible by the mesh are split over it; other leaves replicated."""
    if mesh is None:
        return tree
    n = mesh.shape[BATCH]
    split, rep = NamedSharding(mesh, PartitionSpec(BATCH)), NamedSharding(mesh, PartitionSpec())

    def place(x):
        shape = np.shape(x)
        return jax.device_put(x, split if len(shape) >= 1 and shape[0] % n == 0 and shape[0] >= n else rep)
    return jax.tree.map(place, tree)
