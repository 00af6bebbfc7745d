"""Frozen dataclasses as JAX pytrees: array fields are leaves, fields marked static go in the treedef (so
changing them retraces a jitted function, changing a leaf's value does not)."""

from __future__ import annotations

import dataclasses
from dataclasses import field

import jax


def pytree_dataclass(cls):
    """Register a frozen dataclass as a pytree: fields made with :func:`static_field` go in the treedef."""
    data = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("static")]
    meta = [f.name for f in dataclasses.fields(cls) if f.metadata.get("static")]
    return jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=meta)


def static_field(**kw):
    """A dataclass field that is part of the pytree structure (hashable, compared at trace time)."""
    return field(metadata={"static": True}, **kw)
