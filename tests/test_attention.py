"""The CPU fast path computes large attention in query blocks; it must equal the explicit path exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.attention import BLOCK_LOGITS, KERNEL_ENV, _query_block, attend, attention_kernel


def test_query_block_sizes():
    assert _query_block(1, 4096, 8, 4096) == 128            # SD1.5 64x64 self-attention
    assert _query_block(2, 4096, 8, 4096) == 128            # per batch row: same block at any batch
    assert _query_block(2, 4096, 8, 77) == 4096             # cross-attention: small logits, not blocked
    assert _query_block(1, 9216, 5, 9216) == 72             # SD2 96x96: largest divisor under the budget
    assert 5 * 72 * 9216 <= BLOCK_LOGITS


@pytest.mark.parametrize("batch", [1, 3])
def test_blocked_fast_path_equals_explicit_path(batch):
    t, heads = 2048, 2                                         # 2 x 2048 x 2048 logits per row: blocked
    assert _query_block(batch, t, heads, t) < t
    rng = np.random.default_rng(batch)
    q, k, v = (jnp.asarray(rng.standard_normal((batch, t, heads * 16)), jnp.float32) for _ in range(3))
    fast = jax.jit(lambda q, k, v: attend(q, k, v, heads)[0])(q, k, v)
    explicit, probs = jax.jit(lambda q, k, v: attend(q, k, v, heads, capture="heads"))(q, k, v)
    np.testing.assert_array_equal(np.asarray(fast), np.asarray(explicit))
    ref = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(
        jnp.einsum("bthd,bshd->bhts", q.reshape(batch, t, heads, 16), k.reshape(batch, t, heads, 16)) / 4.0),
        v.reshape(batch, t, heads, 16)).reshape(batch, t, -1)
    np.testing.assert_allclose(np.asarray(fast), np.asarray(ref), atol=2e-6)
    g_fast = jax.grad(lambda q: attend(q, k, v, heads)[0].sum())(q)
    g_expl = jax.grad(lambda q: attend(q, k, v, heads, capture="mean")[0].sum())(q)
    np.testing.assert_allclose(np.asarray(g_fast), np.asarray(g_expl), atol=1e-6)


def test_attention_kernel_selection():
    """The fast path's kernel per backend, dtype, head dim and device (GPU rules checked without a GPU)."""
    bf16, f16, f32 = jnp.bfloat16, jnp.float16, jnp.float32
    assert attention_kernel("cpu", bf16, 64, False) == "blocked"
    assert attention_kernel("cpu", f32, 64, True, override="cudnn") == "blocked"
    assert attention_kernel("tpu", bf16, 64, False) == "xla"
    hopper, ampere = "9.0", "8.0"
    assert attention_kernel("gpu", bf16, 64, False, hopper) == "cudnn"
    assert attention_kernel("gpu", f16, 128, False, ampere) == "cudnn"
    assert attention_kernel("gpu", bf16, 160, False, hopper) == "cudnn"     # SD1.5's head dim: Hopper only
    assert attention_kernel("gpu", bf16, 160, False, ampere) == "xla"
    assert attention_kernel("gpu", bf16, 264, False, hopper) == "xla"       # > 256
    assert attention_kernel("gpu", bf16, 60, False, hopper) == "xla"        # not a multiple of 8
    assert attention_kernel("gpu", f32, 64, False, hopper) == "xla"         # cuDNN: half precision only
    assert attention_kernel("gpu", bf16, 64, True, hopper) == "blocked"     # masked: explicit path
    assert attention_kernel("gpu", bf16, 64, True, hopper, override="cudnn") == "blocked"
    assert attention_kernel("tpu", bf16, 64, True) == "blocked"
    assert attention_kernel("gpu", bf16, 64, False, "7.5") == "xla"
    assert attention_kernel("gpu", bf16, 64, False, hopper, override="xla") == "xla"
    assert attention_kernel("gpu", f32, 64, False, hopper, override="cudnn") == "cudnn"
    assert attention_kernel("gpu", bf16, 64, False, hopper, override="auto") == "cudnn"
    with pytest.raises(ValueError, match=KERNEL_ENV):
        attention_kernel("gpu", bf16, 64, False, hopper, override="flash")


def test_kernel_override_leaves_cpu_outputs_unchanged(monkeypatch):
    """The GPU override is ignored on CPU: outputs stay bit-identical to the default."""
    q = jax.random.normal(jax.random.PRNGKey(0), (1, 16, 32))
    k = jax.random.normal(jax.random.PRNGKey(1), (1, 7, 32))
    ref = attend(q, k, k, heads=4)[0]
    monkeypatch.setenv(KERNEL_ENV, "cudnn")
    np.testing.assert_array_equal(np.asarray(attend(q, k, k, heads=4)[0]), np.asarray(ref))


def test_half_precision_logits_accumulate_in_float32():
    """bf16 q, k give float32 logits and probabilities equal to the upcast-then-matmul reference (on GPU to
    float32 summation order: there the matmul takes bf16 inputs with float32 accumulation)."""
    key = jax.random.PRNGKey(3)
    q = jax.random.normal(key, (2, 64, 64)).astype(jnp.bfloat16)
    k = jax.random.normal(jax.random.fold_in(key, 1), (2, 77, 64)).astype(jnp.bfloat16)
    _, probs = attend(q, k, k, heads=2, capture="heads")
    qf, kf = (x.astype(jnp.float32).reshape(2, -1, 2, 32).transpose(0, 2, 1, 3) for x in (q, k))
    ref = jax.nn.softmax(jnp.einsum("bhtd,bhsd->bhts", qf, kf) * 32 ** -0.5, axis=-1)
    assert probs.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(probs), np.asarray(ref), rtol=1e-5, atol=1e-7)
