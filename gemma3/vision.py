"""The SigLIP vision tower as Gemma 3 uses it: patch embedding, learned positions, pre-LN encoder
layers, post-layernorm; the last hidden state, no pooling head. Numerically equal to transformers'
``SiglipVisionModel``. Einsum letters: N images, P patches, D width, M heads, H head dim; in attention
blocks G (image, head) rows, C queries, T keys.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gemma3 import cpu_kernels
from gemma3.config import SiglipVisionConfig
from gemma3.text import accumulating_dot_general, float32_precision


def _linear(n_in: int, n_out: int, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(n_in, n_out, dtype=dtype, param_dtype=dtype, kernel_init=nnx.initializers.normal(0.02),
                      dot_general=accumulating_dot_general, rngs=rngs)


def _layer_norm(dim: int, eps: float, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(dim, epsilon=eps, dtype=dtype, param_dtype=dtype, rngs=rngs)


class SiglipVisionEmbeddings(nnx.Module):
    """Non-overlapping patches (a stride-p convolution, kept in torch's (out, in, p, p) layout) plus
    one learned position embedding per patch, row-major."""

    def __init__(self, config: SiglipVisionConfig, *, dtype, rngs: nnx.Rngs):
        p, c, d = config.patch_size, config.num_channels, config.hidden_size
        self.patch_size = p
        self.patch_embedding = nnx.Dict(
            weight=nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (d, c, p, p), dtype)),
            bias=nnx.Param(jnp.zeros((d,), dtype)),
        )
        self.position_embedding = nnx.Embed(config.num_patches, d, dtype=dtype, param_dtype=dtype, rngs=rngs)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        n, c, height, width = pixel_values.shape
        p = self.patch_size
        patches = pixel_values.reshape(n, c, height // p, p, width // p, p).astype(self.position_embedding.dtype)
        w, b = self.patch_embedding["weight"][...], self.patch_embedding["bias"][...]
        x = jnp.einsum("NCYyXx,DCyx->NYXD", patches, w, preferred_element_type=jnp.float32,
                       precision=float32_precision(patches, w)).astype(w.dtype) + b
        x = x.reshape(n, -1, x.shape[-1])
        return x + self.position_embedding.embedding[...][None, : x.shape[1]]


def _attention_block(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """q (G, C, H), already scaled; k, v (G, T, H) → (G, C, H). Softmax in float32, normalised after
    the product with V: ``(exp(s - max) @ V) / sum(exp(s - max))``, which spares a pass over the scores."""
    scores = jnp.einsum("GCH,GTH->GCT", q, k, preferred_element_type=jnp.float32, precision=float32_precision(q, k))
    e = jnp.exp(scores - scores.max(axis=-1, keepdims=True))
    out = jnp.einsum("GCT,GTH->GCH", e.astype(v.dtype), v, preferred_element_type=jnp.float32,
                     precision=float32_precision(v))
    return (out / e.sum(axis=-1, keepdims=True)).astype(v.dtype)


def _block_scores() -> int:
    """Score elements per attention block. On CPU a block of about L3 size (16 MiB in float32: one head
    and 1024 queries of a 896-px image) is 2-3x faster than the whole score matrix at once; elsewhere
    blocks only bound the memory."""
    return 1 << 22 if jax.default_backend() == "cpu" else 1 << 28


def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Exact bidirectional attention over (B, T, H) heads-first rows (B = images x heads), q already
    scaled. Runs in blocks of a few rows and a chunk of queries, one after another, so that only one
    block's scores exist at a time; the result is the same as the whole softmax at once."""
    b, t, h = q.shape
    budget = _block_scores()
    chunk = t if t * t <= budget else max(8, budget // t)
    n_chunks = -(-t // chunk)
    rows = 1
    if n_chunks == 1:  # whole rows fit: take as many as the budget allows (a divisor of b)
        rows = max(d for d in range(1, b + 1) if b % d == 0 and (d == 1 or d * t * t <= budget))
        if rows == b:
            return _attention_block(q, k, v)
    pad = n_chunks * chunk - t
    qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0))) if pad else q
    groups = b // rows
    qb = qp.reshape(groups, rows, n_chunks, chunk, h).transpose(0, 2, 1, 3, 4).reshape(-1, rows, chunk, h)
    kb, vb = k.reshape(groups, rows, t, h), v.reshape(groups, rows, t, h)
    group = jnp.arange(groups * n_chunks, dtype=jnp.int32) // n_chunks  # chunks of one group run together
    out = jax.lax.map(lambda a: _attention_block(a[0], kb[a[1]], vb[a[1]]), (qb, group))
    out = out.reshape(groups, n_chunks, rows, chunk, h).transpose(0, 2, 1, 3, 4).reshape(b, n_chunks * chunk, h)
    return out[:, :t] if pad else out


def patch_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """`attention` of (N, P, M, H) patches (N images, M heads), as (N, P, M, H): XLA's blocked einsums, which
    take the heads first."""
    n, p, m, h = q.shape
    out = attention(*(y.transpose(0, 2, 1, 3).reshape(n * m, p, h) for y in (q, k, v)))
    return out.reshape(n, m, p, h).transpose(0, 2, 1, 3)


def kernel_attends(q: jax.Array, k: jax.Array) -> bool:
    """Whether the tower's attention runs in the CPU kernel (`kernel_attention`) rather than XLA's blocked einsums:
    in bfloat16 where the kernel's GEMM multiplies bfloat16 pairs, in AMX tiles (an Intel Xeon: 1.8x the einsums
    at 896 px, which had been two thirds of the tower's time) or by vdpbf16ps (a Zen 5: 1.33-1.39x). Elsewhere it
    was not faster (float32 0.97-1.10x; bfloat16 in float32 FMAs, without pairs, 0.72x on the Xeon), so XLA keeps
    those (bench/RESULTS.md)."""
    return q.dtype == jnp.bfloat16 and cpu_kernels.attention_applies(q, k) and not cpu_kernels.float32_gemm()


@jax.custom_jvp
def kernel_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """`patch_attention` in the CPU kernel (`cpu_kernels.attention`, every patch seen; float32 out). Its
    derivatives are those of `patch_attention` (the kernel has none of its own)."""
    return cpu_kernels.attention(q, k, v, None)


@kernel_attention.defjvp
def _kernel_attention_jvp(primals, tangents):
    def by_xla(q, k, v):
        return patch_attention(q, k, v).astype(jnp.float32)

    return kernel_attention(*primals), jax.jvp(by_xla, primals, tangents)[1]


class SiglipAttention(nnx.Module):
    """Bidirectional multi-head attention with biases, softmax in float32."""

    def __init__(self, config: SiglipVisionConfig, *, dtype, rngs: nnx.Rngs):
        d = config.hidden_size
        self.num_heads, self.head_dim = config.num_attention_heads, d // config.num_attention_heads
        self.q_proj, self.k_proj = _linear(d, d, dtype, rngs), _linear(d, d, dtype, rngs)
        self.v_proj, self.out_proj = _linear(d, d, dtype, rngs), _linear(d, d, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        n, p, _ = x.shape
        m, hd = self.num_heads, self.head_dim
        q = self.q_proj(x)
        q, k, v = (y.reshape(n, p, m, hd) for y in (q * jnp.asarray(hd ** -0.5, q.dtype), self.k_proj(x),
                                                    self.v_proj(x)))
        out = kernel_attention(q, k, v).astype(v.dtype) if kernel_attends(q, k) else patch_attention(q, k, v)
        return self.out_proj(out.reshape(n, p, m * hd))


class SiglipMLP(nnx.Module):
    def __init__(self, config: SiglipVisionConfig, *, dtype, rngs: nnx.Rngs):
        self.fc1 = _linear(config.hidden_size, config.intermediate_size, dtype, rngs)
        self.fc2 = _linear(config.intermediate_size, config.hidden_size, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class SiglipEncoderLayer(nnx.Module):
    def __init__(self, config: SiglipVisionConfig, *, dtype, rngs: nnx.Rngs):
        eps = config.layer_norm_eps
        self.layer_norm1 = _layer_norm(config.hidden_size, eps, dtype, rngs)
        self.self_attn = SiglipAttention(config, dtype=dtype, rngs=rngs)
        self.layer_norm2 = _layer_norm(config.hidden_size, eps, dtype, rngs)
        self.mlp = SiglipMLP(config, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nnx.Module):
    def __init__(self, config: SiglipVisionConfig, *, dtype, rngs: nnx.Rngs):
        self.layers = nnx.List([SiglipEncoderLayer(config, dtype=dtype, rngs=rngs)
                                for _ in range(config.num_hidden_layers)])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = layer(x)
        return x


class SiglipVisionModel(nnx.Module):
    """Pixels (N, C, H, W), channels first as the processor returns them → last hidden state (N, P, D)."""

    def __init__(self, config: SiglipVisionConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = SiglipVisionEmbeddings(config, dtype=dtype, rngs=rngs)
        self.encoder = SiglipEncoder(config, dtype=dtype, rngs=rngs)
        self.post_layernorm = _layer_norm(config.hidden_size, config.layer_norm_eps, dtype, rngs)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        expected = (self.config.num_channels, self.config.image_size, self.config.image_size)
        if tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"pixel_values have shape {tuple(pixel_values.shape)}; expected (N, *{expected})")
        return self.post_layernorm(self.encoder(self.embeddings(pixel_values)))
