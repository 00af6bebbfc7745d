"""Random initialisation of a parameter tree for training from scratch.

The tree comes from ``jaxdiff.checkpoint.param_template`` (shapes only); leaves are filled by their name:

* ``kernel`` (conv HWIO or dense (in, out)): N(0, 1 / fan_in), fan_in = product of all axes but the last
  (LeCun normal; keeps activations' variance ~constant through the stack, LeCun et al. 1998);
* ``embedding``: N(0, 0.02^2) (CLIP's token-embedding init, Radford et al. 2021); ``bias``: 0; norm ``scale``: 1;
* paths matched by ``zero`` get all-zero kernels: the UNet's residual branches (ResnetBlock2D ``conv2``,
  Transformer2D ``proj_out``) and its output conv start as identities / zero output, as in ADM (Dhariwal &
  Nichol 2021, "zero_module"), which makes early training of deep residual UNets stable.

Deterministic: one numpy ``SeedSequence`` child per leaf, in the tree's flattening order.
"""

from __future__ import annotations

import re

import numpy as np
from flax import traverse_util

UNET_ZERO = re.compile(r"(resnets_\d+/conv2|attentions_\d+/proj_out|^conv_out)/kernel$")


def init_params(template: dict, seed: int, zero: re.Pattern | None = None) -> dict:
    """Fill ``template`` (leaves with ``.shape``/``.dtype``) with float32 numpy arrays (see module doc)."""
    flat = traverse_util.flatten_dict(template, sep="/")
    seeds = np.random.SeedSequence(seed).spawn(len(flat))
    out = {}
    for (path, leaf), ss in zip(sorted(flat.items()), seeds):
        rng, name, shape = np.random.default_rng(ss), path.rsplit("/", 1)[-1], tuple(leaf.shape)
        if name == "kernel":
            std = 0.0 if zero is not None and zero.search(path) else 1.0 / np.sqrt(np.prod(shape[:-1]))
            x = rng.standard_normal(shape) * std
        elif name == "embedding":
            x = rng.standard_normal(shape) * 0.02
        elif name == "scale":
            x = np.ones(shape)
        elif name == "bias":
            x = np.zeros(shape)
        else:
            raise ValueError(f"init_params: no rule for leaf {path!r}")
        out[path] = x.astype(np.float32)
    return traverse_util.unflatten_dict(out, sep="/")


