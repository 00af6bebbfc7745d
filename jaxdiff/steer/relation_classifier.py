"""Learn-to-Steer's relation classifier: a learned loss on per-object cross-attention maps.

Yiflach, Atzmon & Chechik, "Data-Driven Loss Functions for Inference-Time Optimization in Text-to-Image"
(WACV 2026), architecture as specified in ../shared/docs/methods.md §4.2 (trained as in §4.3 by
:mod:`train.relation_classifier`). Input: the two objects' maps ``(B, 2, C, G, G)`` (C maps per object in the
channel order of :func:`jaxdiff.steer.relation_maps.map_layout`, G = 16) and the denoising-step index
``step`` in ``[0, num_steps)`` (index in the 50-step schedule, 0 = noisiest). Output: K relation logits.

1. **Shared per-object extractor** (same weights for both objects): every G x G map becomes one token
   (Linear G*G -> d), a sinusoidal positional encoding over the map index is added, and before *each*
   pre-LN transformer encoder layer the step embedding ``Embedding(num_steps, d)(step)`` is added (the
   reference's "mid" timestep mode; one embedding table shared by the layers). A single learned query pools
   the C tokens by multi-head attention, and Linear(d -> G*G) turns the pooled vector into one aggregated
   G x G map per object.
2. **Relation head**: the two aggregated maps, concatenated (2*G*G), go through Linear(-> d) + positional
   encoding (position 0) and a pre-LN transformer encoder on a length-1 sequence (where attention is the
   identity mixing, so each layer acts as a residual MLP), then ``Embedding(num_steps, 16)(step)`` is
   concatenated and an MLP (d+16 -> 256 -> 128, each LayerNorm + LeakyReLU(0.1) + dropout) gives K logits.

The encoder layers follow PyTorch's ``TransformerEncoderLayer(norm_first=True, activation="relu")``:
``x + Drop(MHA(LN(x)))`` then ``x + Drop(W2 Drop(ReLU(W1 LN(x))))``, attention-probability dropout included,
LayerNorm epsilon 1e-5, no final norm. Everything is computed in float32 with full-precision matmuls, and
the module is differentiable w.r.t. the maps: test-time optimisation (methods.md §4.4) back-propagates the
classifier's cross-entropy to the latent. With ``train=False`` no dropout is drawn, so the output is a pure
function of (params, maps, step).

File format (:func:`save_classifier`): ``DIR/classifier.safetensors`` (the params, keys "/"-joined paths)
and ``DIR/classifier.json``::

    {"format": "jaxdiff-relation-classifier/1", "config": {...ClassifierConfig fields...},
     "layout": [...the attention-map channel layout it was trained on...], "meta": {...}}
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.checkpoint import write_bytes_atomic
from jaxdiff.steer.relation_prompts import RELATION_CLASSES

Array = jax.Array
FORMAT = "jaxdiff-relation-classifier/1"
WEIGHTS_FILE = "classifier.safetensors"
CONFIG_FILE = "classifier.json"
DEFAULT_CLASSES = RELATION_CLASSES
DEFAULT_STEP_INDICES = (5, 10, 15, 20, 25, 49)

# Small classifier, large inputs to the loss gradient: run its matmuls in full float32 (TPU/GPU defaults may
# use bf16/TF32 passes for f32 dots, which would make the learned loss and its gradient drift between devices).
_PRECISION = jax.lax.Precision.HIGHEST
_LN_EPS = 1e-5                       # PyTorch's LayerNorm default (flax's is 1e-6)


class RelationClassifierError(ValueError):
    """A classifier file or configuration that cannot be used (one-line message)."""


@dataclass(frozen=True)
class ClassifierConfig:
    """Shape and hyper-parameters of :class:`RelationClassifier` (defaults: the SD1.4/SD2.1 configuration of
    methods.md §4.2). ``channels`` is C, the maps per object; ``grid`` G; ``classes`` the K relation names in
    logit order; ``step_indices`` the denoising-step indices the training maps were recorded at (recorded
    for the test-time loop, the model accepts any index below ``num_steps``)."""

    channels: int
    grid: int = 16
    d_model: int = 256
    extractor_layers: int = 2
    extractor_heads: int = 2
    extractor_ff: int = 128
    pool_heads: int = 2
    head_layers: int = 2
    head_heads: int = 4
    head_ff: int = 128
    dropout: float = 0.3
    step_embed_dim: int = 16
    num_steps: int = 50
    mlp_hidden: tuple[int, ...] = (256, 128)
    classes: tuple[str, ...] = DEFAULT_CLASSES
    step_indices: tuple[int, ...] = DEFAULT_STEP_INDICES

    def __post_init__(self):
        # tuples from JSON lists, so that equal configs compare (and hash) equal
        for name in ("mlp_hidden", "classes", "step_indices"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        problems = []
        for name in ("channels", "grid", "d_model", "extractor_heads", "pool_heads", "head_heads", "extractor_ff",
                     "head_ff", "num_steps"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1")
        if self.d_model % 2:
            problems.append("d_model must be even (sinusoidal encoding)")
        for name in ("extractor_heads", "pool_heads", "head_heads"):
            if int(getattr(self, name)) >= 1 and self.d_model % int(getattr(self, name)):
                problems.append(f"d_model {self.d_model} is not divisible by {name} {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append("dropout must be in [0, 1)")
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            problems.append("classes must be at least two distinct names")
        if any(not 0 <= int(s) < self.num_steps for s in self.step_indices):
            problems.append(f"step_indices must lie in [0, {self.num_steps})")
        if problems:
            raise RelationClassifierError("bad classifier config: " + "; ".join(problems))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_json(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, d: dict) -> "ClassifierConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise RelationClassifierError(f"unknown classifier config fields {unknown}")
        return cls(**d)


def sinusoidal_encoding(length: int, d: int) -> np.ndarray:
    """(length, d) float32 sinusoidal positional encoding (Vaswani et al. 2017): sin at even features, cos at
    odd ones, frequencies ``10000^(-2i/d)``. A constant, computed in float64 then rounded once."""
    pos = np.arange(length, dtype=np.float64)[:, None]
    freq = np.exp(np.arange(0, d, 2, dtype=np.float64) * (-np.log(10000.0) / d))
    pe = np.zeros((length, d), np.float64)
    pe[:, 0::2] = np.sin(pos * freq)
    pe[:, 1::2] = np.cos(pos * freq)
    return pe.astype(np.float32)


def _dense(features: int, name: str) -> nn.Dense:
    return nn.Dense(features, precision=_PRECISION, name=name)


def _mha(heads: int, d: int, rate: float, name: str) -> nn.MultiHeadDotProductAttention:
    # broadcast_dropout=False: an independent mask per batch row (as PyTorch); the softmax is taken in float32
    return nn.MultiHeadDotProductAttention(num_heads=heads, qkv_features=d, out_features=d, dropout_rate=rate,
                                           broadcast_dropout=False, precision=_PRECISION, name=name)


class EncoderLayer(nn.Module):
    """One pre-LN transformer encoder layer (ReLU feed-forward, dropout on attention probabilities, on both
    residual branches and inside the feed-forward), methods.md §4.2."""

    d_model: int
    heads: int
    ff: int
    dropout: float

    @nn.compact
    def __call__(self, x: Array, *, train: bool) -> Array:
        det = not train
        h = nn.LayerNorm(epsilon=_LN_EPS, name="norm1")(x)
        h = _mha(self.heads, self.d_model, self.dropout, "self_attn")(h, h, deterministic=det)
        x = x + nn.Dropout(self.dropout)(h, deterministic=det)
        h = nn.LayerNorm(epsilon=_LN_EPS, name="norm2")(x)
        h = nn.relu(_dense(self.ff, "ff_in")(h))
        h = _dense(self.d_model, "ff_out")(nn.Dropout(self.dropout)(h, deterministic=det))
        return x + nn.Dropout(self.dropout)(h, deterministic=det)


class ObjectExtractor(nn.Module):
    """Shared per-object extractor (methods.md §4.2, item 1): ``(N, C, G, G)`` maps + ``(N,)`` steps ->
    ``(N, G, G)`` aggregated maps."""

    config: ClassifierConfig

    @nn.compact
    def __call__(self, maps: Array, step: Array, *, train: bool) -> Array:
        c = self.config
        n = maps.shape[0]
        # Maps arrive renormalised to sum 1 (about 1/G^2 = 0.004 per pixel at G = 16). Scaling by G^2 (a uniform
        # map -> all ones) gives the first layer unit-scale inputs; otherwise its weights start ~G^2 too small and
        # AdamW at lr 1e-4 needs far more steps than our data gives to grow them (the ShapesWorld classifier sat
        # at chance for 30 epochs without it). A fixed linear rescale: the same function class.
        x = _dense(c.d_model, "input_proj")(maps.reshape(n, c.channels, c.grid * c.grid) * float(c.grid * c.grid))
        x = x + jnp.asarray(sinusoidal_encoding(c.channels, c.d_model))
        # N(0, 1) init as torch.nn.Embedding / torch.randn (the reference's step table and pooling query)
        t = nn.Embed(c.num_steps, c.d_model, embedding_init=nn.initializers.normal(1.0), name="step_embed")(step)
        for i in range(c.extractor_layers):
            x = EncoderLayer(c.d_model, c.extractor_heads, c.extractor_ff, c.dropout, name=f"layer_{i}")(
                x + t[:, None, :], train=train)
        query = self.param("query", nn.initializers.normal(1.0), (1, 1, c.d_model))
        # attention pooling: no dropout (the reference's pooling MultiheadAttention has none)
        pooled = _mha(c.pool_heads, c.d_model, 0.0, "pool")(jnp.broadcast_to(query, (n, 1, c.d_model)), x,
                                                           deterministic=True)
        return _dense(c.grid * c.grid, "output_proj")(pooled[:, 0]).reshape(n, c.grid, c.grid)


class RelationHead(nn.Module):
    """Relation head (methods.md §4.2, item 2): ``(B, 2, G, G)`` aggregated maps + ``(B,)`` steps -> logits."""

    config: ClassifierConfig

    @nn.compact
    def __call__(self, agg: Array, step: Array, *, train: bool) -> Array:
        c = self.config
        det = not train
        b = agg.shape[0]
        x = _dense(c.d_model, "proj")(agg.reshape(b, 2 * c.grid * c.grid))[:, None, :]
        x = x + jnp.asarray(sinusoidal_encoding(1, c.d_model))
        for i in range(c.head_layers):
            x = EncoderLayer(c.d_model, c.head_heads, c.head_ff, c.dropout, name=f"layer_{i}")(x, train=train)
        t = nn.Embed(c.num_steps, c.step_embed_dim, embedding_init=nn.initializers.normal(1.0),
                     name="step_embed")(step)
        x = jnp.concatenate([x[:, 0], t], axis=-1)
        for i, width in enumerate(c.mlp_hidden):
            x = nn.LayerNorm(epsilon=_LN_EPS, name=f"mlp_norm_{i}")(_dense(width, f"mlp_{i}")(x))
            x = nn.Dropout(c.dropout)(nn.leaky_relu(x, 0.1), deterministic=det)
        return _dense(c.num_classes, "logits")(x)


class RelationClassifier(nn.Module):
    """Learn-to-Steer relation classifier (Yiflach et al., WACV 2026; methods.md §4.2).

    ``__call__(maps, step, *, train=False)``: maps (B, 2, C, G, G) (cast to float32), step (B,) int in
    ``[0, num_steps)`` -> (B, K) float32 logits. ``train=True`` draws dropout from the ``"dropout"`` PRNG
    stream. An out-of-range step looks up no embedding row (JAX fills it with NaN), so its logits are NaN.
    """

    config: ClassifierConfig

    @nn.compact
    def __call__(self, maps: Array, step: Array, *, train: bool = False) -> Array:
        c = self.config
        maps = jnp.asarray(maps, jnp.float32)
        step = jnp.asarray(step, jnp.int32)
        b = maps.shape[0]
        if maps.shape[1:] != (2, c.channels, c.grid, c.grid):
            raise RelationClassifierError(f"classifier input maps have shape {tuple(maps.shape)}; expected "
                                          f"(B, 2, {c.channels}, {c.grid}, {c.grid})")
        # both objects through the one extractor in one call: rows (b, object) -> b * 2 + object
        agg = ObjectExtractor(c, name="extractor")(maps.reshape(b * 2, *maps.shape[2:]), jnp.repeat(step, 2),
                                                   train=train)
        return RelationHead(c, name="head")(agg.reshape(b, 2, c.grid, c.grid), step, train=train)


@functools.lru_cache(maxsize=8)
def _init_fn(config: ClassifierConfig):
    maps = jax.ShapeDtypeStruct((1, 2, config.channels, config.grid, config.grid), jnp.float32)
    step = jax.ShapeDtypeStruct((1,), jnp.int32)
    return jax.jit(lambda k: RelationClassifier(config).init(k, jnp.zeros(maps.shape, maps.dtype),
                                                             jnp.zeros(step.shape, step.dtype))["params"])


def init_params(config: ClassifierConfig, key: Array) -> dict:
    """Fresh float32 params (the ``"params"`` collection) for ``config`` from PRNG ``key`` (one compiled
    initialiser per config)."""
    return _init_fn(config)(key)


def param_shapes(config: ClassifierConfig) -> dict:
    """``{"/"-joined path: shape}`` of the params of ``config`` (abstract evaluation, no compute)."""
    from flax.traverse_util import flatten_dict

    tree = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
    return {k: tuple(v.shape) for k, v in flatten_dict(tree, sep="/").items()}


def predict(params: dict, config: ClassifierConfig, maps: Array, step: Array) -> Array:
    """(B, K) logits of ``maps`` at ``step`` with dropout off (deterministic; differentiable w.r.t. maps).
    ``params`` is the ``"params"`` collection. Not jitted itself: call it inside the caller's jit/grad."""
    return RelationClassifier(config).apply({"params": params}, maps, step, train=False)


# ------------------------------------------------------------------------------------------------ layouts
def _layout_json(layout) -> list:
    """A layout (a JSON-able list, or an object with ``to_json()`` such as relation_maps.MapLayout) in its
    canonical JSON form (tuples as lists)."""
    if hasattr(layout, "to_json"):
        layout = layout.to_json()
    return json.loads(json.dumps(layout))


def layout_channels(layout) -> int:
    """Channels described by a layout: the sum of its entries' ``heads`` when every entry has one, else the
    number of entries."""
    entries = _layout_json(layout)
    if entries and all(isinstance(e, dict) and "heads" in e for e in entries):
        return int(sum(int(e["heads"]) for e in entries))
    return len(entries)


def _describe(entry) -> str:
    if isinstance(entry, dict) and "site" in entry:
        extra = ", ".join(f"{k} {entry[k]}" for k in ("heads", "height", "width", "grid") if k in entry)
        return f"{entry['site']} ({extra})" if extra else str(entry["site"])
    return json.dumps(entry, sort_keys=True)


def check_layout(stored_layout, model_layout, *, what: str = "classifier") -> None:
    """Raise :class:`RelationClassifierError` (one line) unless ``stored_layout`` (what ``what`` was trained
    on) equals ``model_layout`` (what the current model produces): the channel order is the classifier's
    input order, so any difference makes its logits meaningless."""
    a, b = _layout_json(stored_layout), _layout_json(model_layout)
    if a == b:
        return
    ca, cb = layout_channels(a), layout_channels(b)
    if ca != cb:
        how = f"{ca} channels per object, this model gives {cb}"
    else:
        i = next((k for k in range(min(len(a), len(b))) if a[k] != b[k]), min(len(a), len(b)))
        sa = _describe(a[i]) if i < len(a) else "nothing"
        sb = _describe(b[i]) if i < len(b) else "nothing"
        how = f"first difference at site {i}: trained on {sa}, this model has {sb}"
    raise RelationClassifierError(f"{what} was trained on another site layout: {how}")


# ------------------------------------------------------------------------------------------------ files
def classifier_paths(path_dir: str | os.PathLike) -> tuple[Path, Path]:
    d = Path(path_dir)
    return d / WEIGHTS_FILE, d / CONFIG_FILE


def save_classifier(path_dir: str | os.PathLike, params: dict, config: ClassifierConfig, layout,
                    meta: dict) -> tuple[Path, Path]:
    """Write ``classifier.safetensors`` (float32 params keyed by "/"-joined paths) and ``classifier.json``
    (format, config, ``layout``, ``meta``) into ``path_dir``, each atomically, the tensors first (so a JSON
    on disk always has its tensors)."""
    from flax.traverse_util import flatten_dict
    from safetensors.numpy import save

    st, js = classifier_paths(path_dir)
    st.parent.mkdir(parents=True, exist_ok=True)
    flat = {k: np.ascontiguousarray(np.asarray(v, np.float32))
            for k, v in flatten_dict(jax.device_get(params), sep="/").items()}
    want = param_shapes(config)
    if {k: v.shape for k, v in flat.items()} != want:
        raise RelationClassifierError(f"{st}: the params do not match the classifier config")
    write_bytes_atomic(st, save(flat))
    doc = {"format": FORMAT, "config": config.to_json(), "layout": _layout_json(layout), "meta": meta}
    write_bytes_atomic(js, (json.dumps(doc, indent=1) + "\n").encode())
    return st, js


def load_classifier(path_dir: str | os.PathLike) -> tuple[dict, ClassifierConfig, list, dict]:
    """``(params, config, layout, meta)`` of a classifier written by :func:`save_classifier`. A missing or
    corrupt file, or params that do not fit the config, raise :class:`RelationClassifierError` naming the
    file."""
    from flax.traverse_util import unflatten_dict
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    st, js = classifier_paths(path_dir)
    for p in (js, st):
        if not p.is_file():
            raise RelationClassifierError(f"relation classifier {p}: no such file")
    try:
        doc = json.loads(js.read_text())
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise RelationClassifierError(f"relation classifier {js}: not a {FORMAT} file")
        config = ClassifierConfig.from_json(doc["config"])
        layout, meta = doc.get("layout", []), doc.get("meta", {})
    except RelationClassifierError as e:
        if str(e).startswith("relation classifier"):
            raise
        raise RelationClassifierError(f"relation classifier {js}: {e}") from None
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise RelationClassifierError(f"relation classifier {js}: corrupt ({type(e).__name__}: {e})") from None
    try:
        flat = load_file(st)
    except (ValueError, OSError, SafetensorError) as e:
        raise RelationClassifierError(f"relation classifier {st}: corrupt or truncated ({type(e).__name__}: "
                                      f"{e})".replace("\n", " ")) from None
    want = param_shapes(config)
    have = {k: tuple(v.shape) for k, v in flat.items()}
    if have != want:
        missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        bad = sorted(k for k in set(want) & set(have) if want[k] != have[k])
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}" if extra
                  else f"{bad[0]} has shape {have[bad[0]]}, expected {want[bad[0]]}")
        raise RelationClassifierError(f"relation classifier {st}: params do not match its config ({detail})")
    if any(v.dtype != np.float32 for v in flat.values()):
        raise RelationClassifierError(f"relation classifier {st}: params are not float32")
    params = unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
    return params, config, layout, meta
