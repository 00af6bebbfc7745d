"""Conversion rules as data: PyTorch key pattern -> pytree path(s) + a named layout op.

A key is first rewritten by the component's ``renames`` (ordered regex substitutions, e.g. CompVis ->
diffusers names, or stripping ``text_model.``), then matched against ``LEAF_RULES`` in order; the first rule
whose pattern and tensor rank match decides the target path(s) and the layout op. ``{m}`` in a target is the
module path of group 1 with ``.N`` written ``_N`` and dots as ``/`` (``down_blocks.0.resnets.1.conv1`` ->
``down_blocks_0/resnets_1/conv1``).

Layout ops (each quirk named once):
* ``identity``;
* ``linear_t``: PyTorch Linear weight (out, in) -> Dense kernel (in, out);
* ``oihw_to_hwio``: Conv2d weight (O, I, H, W) -> (H, W, I, O);
* ``conv1x1_to_linear``: a 1x1 conv weight (O, I, 1, 1) used where our model has a Dense (LDM VAE attention);
* ``split_qkv_linear_t`` / ``split_qkv``: OpenCLIP's fused ``in_proj`` weight (3D, D) / bias (3D,) -> q, k, v.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Rename:
    pattern: str
    repl: str


@dataclass(frozen=True)
class LeafRule:
    pattern: str
    targets: tuple[str, ...]
    op: str = "identity"
    ndim: int | None = None


def _split3(x: np.ndarray) -> tuple[np.ndarray, ...]:
    if x.shape[0] % 3:
        raise ValueError(f"fused in_proj of shape {x.shape} is not divisible into q, k, v")
    return tuple(np.split(x, 3, axis=0))


# Views only (transpose, reshape, split): they also run on shape-only stand-ins to check shapes before any
# tensor is read; the converter makes each piece contiguous while casting it (one copy per leaf).
LAYOUT_OPS = {
    "identity": lambda x: (x,),
    "linear_t": lambda x: (x.T,),
    "oihw_to_hwio": lambda x: (x.transpose(2, 3, 1, 0),),
    "conv1x1_to_linear": lambda x: (x.reshape(x.shape[0], x.shape[1]).T,),
    "split_qkv_linear_t": lambda x: tuple(p.T for p in _split3(x)),
    "split_qkv": _split3,
}

# Generic rules for diffusers/transformers state dicts (our param names mirror theirs).
LEAF_RULES: tuple[LeafRule, ...] = (
    LeafRule(r"(.+_embedding)\.weight$", ("{m}/embedding",), "identity", ndim=2),
    LeafRule(r"(.+)\.weight$", ("{m}/kernel",), "oihw_to_hwio", ndim=4),
    LeafRule(r"(.+)\.weight$", ("{m}/kernel",), "linear_t", ndim=2),
    LeafRule(r"(.+)\.weight$", ("{m}/scale",), "identity", ndim=1),  # GroupNorm / LayerNorm
    LeafRule(r"(.+)\.bias$", ("{m}/bias",), "identity", ndim=1),
)

# Keys that carry no parameters of ours: buffers and bookkeeping.
IGNORE_ALWAYS: tuple[str, ...] = (r"(^|\.)position_ids$",)


def module_path(dotted: str) -> str:
    """``down_blocks.0.resnets.1.conv1`` -> ``down_blocks_0/resnets_1/conv1``."""
    return re.sub(r"\.(\d+)(?=\.|$)", r"_\1", dotted).replace(".", "/")


def apply_renames(key: str, renames: tuple[Rename, ...]) -> str:
    for r in renames:
        key = re.sub(r.pattern, r.repl, key)
    return key


def match_leaf(key: str, ndim: int, rules: tuple[LeafRule, ...] = LEAF_RULES):
    """Return (rule, target paths) for the first rule matching ``key`` at this rank, or None."""
    for rule in rules:
        if rule.ndim is not None and rule.ndim != ndim:
            continue
        m = re.match(rule.pattern, key)
        if m:
            mp = module_path(m.group(1))
            return rule, tuple(t.format(m=mp) for t in rule.targets)
    return None
