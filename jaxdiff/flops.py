"""Analytic FLOP counts for one forward of the UNet, the CLIP text encoder and the VAE decoder.

Convention (the one MFU figures use): only the matrix multiplications are counted, one multiply-add = 2 FLOPs.
That is every convolution and dense layer (FLOPs = 2 x output positions x kernel size, where the kernel size
is ``kh*kw*cin*cout`` or ``din*dout``: exactly the number of entries of the layer's ``kernel`` leaf) and the two
attention products ``Q K^T`` and ``P V`` (each ``2 * B * T * S * inner``). Bias adds, norms, activations, softmax,
residual adds and resampling are elementwise, O(activations) rather than O(activations x width), and left out;
at SD sizes they are well under 1% of the total by FLOPs (they matter for *time* on bandwidth-bound hardware,
which is why MFU < 100% even for perfect matmul kernels).

Each count is a :class:`FlopCount`: one :class:`Op` per weight application or attention product, addressed by
the param path of its layer (``down_blocks_0/resnets_0/conv1``, ``.../attn1`` for attention products), so the
count can be checked leaf by leaf against the parameter template and grouped by block or by kind.

The walk mirrors :func:`jaxdiff.unet.apply_unet` (same block specs, same skip bookkeeping, same sizes for odd
latents) and is checked against a trace of the real forward in ``tests/test_flops.py``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from jaxdiff.clip import CLIPTextConfig
from jaxdiff.unet import UNetConfig
from jaxdiff.unet_blocks import FF_MULT, BlockSpec, TransformerSpec
from jaxdiff.vae import VAEConfig

KINDS = ("conv", "dense", "attn_qk", "attn_pv")


@dataclass(frozen=True)
class Op:
    """One matmul-like operation: ``flops = 2 * positions * macs_per_position``.

    conv / dense: ``positions`` are output positions (B*Ho*Wo pixels, or rows of tokens) and
    ``macs_per_position`` is the kernel size (number of entries of the ``kernel`` leaf at ``path``).
    attn_qk / attn_pv: ``positions`` = B * heads * query tokens and ``macs_per_position`` = keys * head dim.
    """

    path: str
    kind: str
    positions: int
    macs_per_position: int

    @property
    def flops(self) -> int:
        return 2 * self.positions * self.macs_per_position


@dataclass(frozen=True)
class FlopCount:
    """The ops of one forward. ``total`` is the sum; ``breakdown()`` groups by kind, ``by_block()`` by the
    first path component (``conv_in``, ``down_blocks_0``, ``mid_block``, ...)."""

    ops: tuple[Op, ...]

    @property
    def total(self) -> int:
        return sum(op.flops for op in self.ops)

    def group(self, key: Callable[[Op], str]) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for op in self.ops:
            out[key(op)] += op.flops
        return dict(out)

    def breakdown(self) -> dict[str, int]:
        """FLOPs per kind (every kind in :data:`KINDS` present, 0 if unused) plus ``total``."""
        by_kind = {k: 0 for k in KINDS}
        by_kind.update(self.group(lambda op: op.kind))
        return {**by_kind, "total": self.total}

    def by_block(self) -> dict[str, int]:
        return self.group(lambda op: op.path.split("/")[0])


@dataclass
class _Tally:
    """Accumulates ops during one walk (local to a counting call)."""

    ops: list[Op] = field(default_factory=list)

    def conv(self, path: str, cin: int, cout: int, k: int, pixels: int):
        self.ops.append(Op(path, "conv", pixels, k * k * cin * cout))

    def dense(self, path: str, din: int, dout: int, rows: int):
        self.ops.append(Op(path, "dense", rows, din * dout))

    def attention(self, path: str, batch: int, heads: int, queries: int, keys: int, head_dim: int):
        """``Q K^T`` and ``P V``: each ``batch*heads*queries`` rows of ``keys*head_dim`` multiply-adds."""
        rows = batch * heads * queries
        self.ops.append(Op(path, "attn_qk", rows, keys * head_dim))
        self.ops.append(Op(path, "attn_pv", rows, keys * head_dim))

    def result(self) -> FlopCount:
        return FlopCount(tuple(self.ops))


def _down_size(n: int) -> int:
    """Output size of a 3x3, stride-2 conv with padding 1 (UNet downsampler): ``floor((n - 1) / 2) + 1``."""
    return (n - 1) // 2 + 1


def _resnet(t: _Tally, path: str, cin: int, cout: int, temb: int | None, batch: int, hw: tuple[int, int]):
    """ResnetBlock2D (:func:`jaxdiff.conv_blocks.resnet`)."""
    px = batch * hw[0] * hw[1]
    t.conv(f"{path}/conv1", cin, cout, 3, px)
    if temb is not None:
        t.dense(f"{path}/time_emb_proj", temb, cout, batch)
    t.conv(f"{path}/conv2", cout, cout, 3, px)
    if cin != cout:
        t.conv(f"{path}/conv_shortcut", cin, cout, 1, px)


def _sd_attention(t: _Tally, path: str, dim: int, kv_dim: int, heads: int, batch: int, queries: int, keys: int):
    """diffusers ``Attention`` as in :func:`jaxdiff.unet_blocks.attention`: q from the queries, k/v from the
    keys' source (itself for self-attention, the text context for cross-attention)."""
    t.dense(f"{path}/to_q", dim, dim, batch * queries)
    t.dense(f"{path}/to_k", kv_dim, dim, batch * keys)
    t.dense(f"{path}/to_v", kv_dim, dim, batch * keys)
    t.attention(path, batch, heads, queries, keys, dim // heads)
    t.dense(f"{path}/to_out_0", dim, dim, batch * queries)


def _transformer2d(t: _Tally, path: str, spec: TransformerSpec, batch: int, hw: tuple[int, int], ctx_len: int):
    """Transformer2DModel (:func:`jaxdiff.unet_blocks.transformer2d`)."""
    tokens = hw[0] * hw[1]
    rows = batch * tokens
    proj = t.dense if spec.linear_proj else (lambda p, i, o, n: t.conv(p, i, o, 1, n))
    proj(f"{path}/proj_in", spec.channels, spec.inner, rows)
    for i in range(spec.layers):
        blk = f"{path}/transformer_blocks_{i}"
        _sd_attention(t, f"{blk}/attn1", spec.inner, spec.inner, spec.heads, batch, tokens, tokens)
        _sd_attention(t, f"{blk}/attn2", spec.inner, spec.cross_dim, spec.heads, batch, tokens, ctx_len)
        t.dense(f"{blk}/ff/net_0/proj", spec.inner, 2 * FF_MULT * spec.inner, rows)   # GEGLU: hidden and gate
        t.dense(f"{blk}/ff/net_2", FF_MULT * spec.inner, spec.inner, rows)
    proj(f"{path}/proj_out", spec.inner, spec.channels, rows)


def _block_layers(t: _Tally, path: str, spec: BlockSpec, batch: int, hw, ctx_len: int, j: int):
    """Resnet ``j`` of a down/up block, then its attention ``j`` if the block has attention."""
    cin, cout = spec.resnet_channels()[j]
    _resnet(t, f"{path}/resnets_{j}", cin, cout, spec.temb_channels, batch, hw)
    if spec.transformer is not None:
        _transformer2d(t, f"{path}/attentions_{j}", spec.transformer, batch, hw, ctx_len)


def unet_flops(config: UNetConfig, batch: int = 1, height: int | None = None, width: int | None = None,
               context_len: int = 77) -> FlopCount:
    """FLOPs of one :func:`jaxdiff.unet.apply_unet` call on ``(batch, height, width, in_channels)`` latents
    (default ``config.sample_size`` square) with a ``context_len``-token text context. Edits and captures do
    not change the count (they add elementwise work only). For classifier-free guidance pass the doubled batch."""
    h = height or config.sample_size
    w = width or h
    t = _Tally()
    c0, temb = config.block_out_channels[0], config.temb_channels
    t.dense("time_embedding/linear_1", c0, temb, batch)
    t.dense("time_embedding/linear_2", temb, temb, batch)
    if config.is_sdxl:
        t.dense("add_embedding/linear_1", config.projection_class_embeddings_input_dim, temb, batch)
        t.dense("add_embedding/linear_2", temb, temb, batch)
    t.conv("conv_in", config.in_channels, c0, 3, batch * h * w)

    hw = (h, w)
    skips = [hw]   # spatial size of every skip tensor, in push order (as apply_unet's ``skips``)
    for spec in config.down_specs():
        path = f"down_blocks_{spec.index}"
        for j in range(spec.num_layers):
            _block_layers(t, path, spec, batch, hw, context_len, j)
            skips.append(hw)
        if spec.resample:
            hw = (_down_size(hw[0]), _down_size(hw[1]))
            t.conv(f"{path}/downsamplers_0/conv", spec.out_channels, spec.out_channels, 3, batch * hw[0] * hw[1])
            skips.append(hw)

    mid = config.mid_spec()
    _resnet(t, "mid_block/resnets_0", mid.in_channels, mid.in_channels, temb, batch, hw)
    for j in range(mid.num_layers):
        _transformer2d(t, f"mid_block/attentions_{j}", mid.transformer, batch, hw, context_len)
        _resnet(t, f"mid_block/resnets_{j + 1}", mid.in_channels, mid.in_channels, temb, batch, hw)

    for spec in config.up_specs():
        path = f"up_blocks_{spec.index}"
        skips = skips[:-spec.num_layers]
        for j in range(spec.num_layers):
            _block_layers(t, path, spec, batch, hw, context_len, j)
        if spec.resample:
            hw = skips[-1]   # upsample to the next skip's size (diffusers' upsample_size)
            t.conv(f"{path}/upsamplers_0/conv", spec.out_channels, spec.out_channels, 3, batch * hw[0] * hw[1])

    t.conv("conv_out", c0, config.out_channels, 3, batch * hw[0] * hw[1])
    return t.result()


def clip_text_flops(config: CLIPTextConfig, batch: int = 1, seq_len: int | None = None) -> FlopCount:
    """FLOPs of one :func:`jaxdiff.clip.apply_clip_text` call on ``(batch, seq_len)`` token ids (default the
    77 positions). The causal mask does not reduce the count: the full ``T x T`` logits are computed."""
    n = seq_len or config.max_position_embeddings
    d, rows = config.hidden_size, batch * n
    t = _Tally()
    for i in range(config.num_hidden_layers):
        lp = f"encoder/layers_{i}"
        for name in ("q_proj", "k_proj", "v_proj"):
            t.dense(f"{lp}/self_attn/{name}", d, d, rows)
        t.attention(f"{lp}/self_attn", batch, config.num_attention_heads, n, n, d // config.num_attention_heads)
        t.dense(f"{lp}/self_attn/out_proj", d, d, rows)
        t.dense(f"{lp}/mlp/fc1", d, config.intermediate_size, rows)
        t.dense(f"{lp}/mlp/fc2", config.intermediate_size, d, rows)
    if config.with_projection:
        t.dense("text_projection", d, config.projection_dim, batch)   # on the pooled (EOS) row only
    return t.result()


def vae_decode_flops(config: VAEConfig, batch: int = 1, latent_height: int | None = None,
                     latent_width: int | None = None) -> FlopCount:
    """FLOPs of one :func:`jaxdiff.vae.vae_decode` call on ``(batch, h, w, latent_channels)`` latents (default
    ``sample_size / 2**(levels-1)`` square, i.e. the latent size of a ``sample_size`` image)."""
    boc, lat = config.block_out_channels, config.latent_channels
    h = latent_height or config.sample_size // 2 ** (len(boc) - 1)
    w = latent_width or h
    hw = (h, w)
    t = _Tally()
    if config.use_post_quant_conv:
        t.conv("post_quant_conv", lat, lat, 1, batch * h * w)
    rev = boc[::-1]
    t.conv("decoder/conv_in", lat, rev[0], 3, batch * h * w)
    c = rev[0]
    _resnet(t, "decoder/mid_block/resnets_0", c, c, None, batch, hw)
    if config.mid_block_add_attention:
        ap, tokens = "decoder/mid_block/attentions_0", h * w
        for name in ("to_q", "to_k", "to_v"):
            t.dense(f"{ap}/{name}", c, c, batch * tokens)
        t.attention(ap, batch, 1, tokens, tokens, c)   # single head of width C
        t.dense(f"{ap}/to_out_0", c, c, batch * tokens)
    _resnet(t, "decoder/mid_block/resnets_1", c, c, None, batch, hw)
    prev = c
    for i, cout in enumerate(rev):
        for j in range(config.layers_per_block + 1):
            _resnet(t, f"decoder/up_blocks_{i}/resnets_{j}", prev if j == 0 else cout, cout, None, batch, hw)
        prev = cout
        if i < len(rev) - 1:
            hw = (2 * hw[0], 2 * hw[1])
            t.conv(f"decoder/up_blocks_{i}/upsamplers_0/conv", cout, cout, 3, batch * hw[0] * hw[1])
    t.conv("decoder/conv_out", boc[0], config.out_channels, 3, batch * hw[0] * hw[1])
    return t.result()
