"""The Gemma 3 text decoder in Flax NNX, numerically equal to transformers' ``modeling_gemma3``.

Parameter names follow transformers (``model.layers.3.self_attn.q_proj``) so that checkpoint loading is
a table of renames; linear kernels are stored (in, out), the JAX way. Einsum letters name their axes:
B batch, T query tokens, S key tokens, D model width, K kv heads, G query heads per kv head, H head dim.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma3 import cache as kv
from gemma3 import cpu_kernels
from gemma3.config import FULL, SLIDING, Gemma3TextConfig
from gemma3.outputs import (
    Gemma3CausalLMOutputWithPast,
    Gemma3ModelOutputWithPast,
    Gemma3SequenceClassifierOutputWithPast,
)

MLP_PART_BYTES = 32 << 20
"""Prefill runs the MLP over parts of the prompt's rows when its float32 gate, up and GeGLU outputs (12 bytes
per row and intermediate unit) would take more than this, each part at most this: gemma-3-1b batch 8 x 128
(1,024 rows) in 3 parts, its compiled prefill's temporaries 88 -> 26 MB (19 at 256-row parts), at the
same speed; gemma-3-270m batch 8 (25 MB) in one, where 256-row parts made its float32 prefill 5-15% slower
(bench/RESULTS.md, session 25)."""

_MASKED = float(jnp.finfo(jnp.float32).min)  # finite, so a fully masked row gives no NaN


def float32_precision(*operands) -> jax.lax.Precision | None:
    """HIGHEST when every operand is float32, else None (the backend's default). XLA runs float32
    products on GPUs in TF32 by default, which moved our logits by up to 1e-2 from transformers' on an
    H200 (bench/gpu_numerics.py; 1e-5 at HIGHEST); PyTorch, and so transformers, does not. The CPU
    backend computes float32 in full either way."""
    return jax.lax.Precision.HIGHEST if all(x.dtype == jnp.float32 for x in operands) else None


def accumulating_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                             out_sharding=None):
    """``lax.dot_general`` whose low-precision (bfloat16) products accumulate in float32 and come back in
    the operands' dtype (or ``preferred_element_type``): better numerics, and XLA's CPU backend then runs
    them as fast library kernels instead of slow loops. On the CPU backend, decode-sized products (up to 8
    rows) run in our own kernel (`gemma3.cpu_kernels`), which reads the weights at memory speed, and so do
    bfloat16 ones of any size with (in, out) weights (its GEMM); elsewhere (a CPU without the kernel, GPUs), a one-row
    bfloat16 product is padded to two, XLA's fast path (on an H200 XLA runs one row as a slow reduction;
    bench/RESULTS.md has the measurements). Float32 operands are otherwise multiplied as before."""
    out_dtype = preferred_element_type or lhs.dtype
    if rhs.ndim == 3:  # (in, out) weights kept as the CPU kernel's panels (`CausalLMMixin.keep_panels`)
        return cpu_kernels.kept_matmul(lhs, rhs, out_dtype)
    if cpu_kernels.applies(lhs, rhs, dimension_numbers):
        return cpu_kernels.rows_matmul(lhs, rhs, dimension_numbers, out_dtype)
    if lhs.dtype == jnp.float32 and rhs.dtype == jnp.float32:
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision or float32_precision(lhs, rhs),
                                   preferred_element_type=preferred_element_type)
    (contract_l, contract_r), batch = dimension_numbers
    one_row = (jax.default_backend() in ("cpu", "gpu") and batch == ((), ()) and tuple(contract_l) == (lhs.ndim - 1,)
               and math.prod(lhs.shape[:-1]) == 1)
    if not one_row:
        out = jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                  preferred_element_type=jnp.float32)
        return out.astype(out_dtype)
    row = lhs.reshape(1, lhs.shape[-1])
    two = jnp.concatenate([row, jnp.zeros_like(row)])
    out = jax.lax.dot_general(two, rhs, (((1,), tuple(contract_r)), ((), ())), precision=precision,
                              preferred_element_type=jnp.float32)[:1]
    free = [d for i, d in enumerate(rhs.shape) if i not in tuple(contract_r)]
    return out.reshape(*lhs.shape[:-1], *free).astype(out_dtype)


def _linear(n_in: int, n_out: int, dtype, rngs: nnx.Rngs, out_dtype=None) -> nnx.Linear:
    """A bias-free projection in ``dtype``; its result in ``out_dtype`` (default: ``dtype``)."""
    init = nnx.initializers.normal(0.02)
    return nnx.Linear(n_in, n_out, use_bias=False, dtype=dtype, param_dtype=dtype, kernel_init=init, rngs=rngs,
                      dot_general=accumulating_dot_general, preferred_element_type=out_dtype)


def positions_of(mask: np.ndarray) -> np.ndarray:
    """Each token's position from a (B, T) padding mask (left padding shifts none): numpy, not jax."""
    return np.maximum(np.cumsum(mask, axis=1, dtype=np.int32) - 1, 0)


class Gemma3RMSNorm(nnx.Module):
    """``x * rsqrt(mean(x²) + eps) * (1 + w)`` in float32, cast back; the stored weight is an offset."""

    def __init__(self, dim: int, eps: float, *, dtype=jnp.float32):
        self.weight = nnx.Param(jnp.zeros((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        # as rows of the normalized axis: XLA's CPU backend reduced a key's (B, T, 1, head_dim) over its last
        # axis at ~0.1 GB/s (2.6 ms a layer in a 270m batch-8 prefill, 8% of it)
        xf = x.astype(jnp.float32).reshape(-1, x.shape[-1])
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * (1.0 + self.weight[...].astype(jnp.float32))).reshape(x.shape).astype(x.dtype)


class Gemma3MLP(nnx.Module):
    """GeGLU: ``down(gelu_tanh(gate(x)) * up(x))``. Gate and up come back in float32 (their float32 sums
    unrounded), so the GeGLU runs in float32 and rounds once: in bfloat16 XLA's CPU backend widened and
    rounded every step of it, 3x slower (6% of a 1b prefill)."""

    def __init__(self, config: Gemma3TextConfig, *, dtype, rngs: nnx.Rngs):
        self.gate_proj = _linear(config.hidden_size, config.intermediate_size, dtype, rngs, out_dtype=jnp.float32)
        self.up_proj = _linear(config.hidden_size, config.intermediate_size, dtype, rngs, out_dtype=jnp.float32)
        self.down_proj = _linear(config.intermediate_size, config.hidden_size, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        rows = math.prod(x.shape[:-1])
        parts = -(-rows * 12 * self.gate_proj.out_features // MLP_PART_BYTES)
        if parts <= 1 or jax.default_backend() != "cpu":  # (GPUs: unmeasured; their memory is rarely the limit)
            return self._geglu(x)
        # a loop over equal parts (padded), each written over its own input rows: XLA schedules a Python
        # loop's parts side by side, and a loop with an output buffer of its own keeps one per layer live
        size = -(-rows // parts)
        flat = jnp.pad(x.reshape(rows, x.shape[-1]), ((0, parts * size - rows), (0, 0)))

        def part(i, buf):
            y = self._geglu(jax.lax.dynamic_slice_in_dim(buf, i * size, size))
            return jax.lax.dynamic_update_slice_in_dim(buf, y, i * size, 0)

        return jax.lax.fori_loop(0, parts, part, flat)[:rows].reshape(x.shape)

    def _geglu(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.gelu(self.gate_proj(x), approximate=True) * self.up_proj(x))


def rope_tables(positions: jax.Array, head_dim: int, base: float, factor: float, dtype) -> tuple[jax.Array, jax.Array]:
    """cos and sin (B, T, head_dim // 2) for the rotate-half convention, whose two halves turn by the same
    angles (transformers' tables repeat them); linear scaling divides inv_freq."""
    inv_freq = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)) / factor
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(freqs).astype(dtype), jnp.sin(freqs).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: (B, T, heads, H); cos/sin: (B, T, H // 2). Each half rotated apart and the two joined once: the
    same values as ``x * cos + rotate_half(x) * sin``, without writing out the rotated copy first."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class AttentionContext:
    """What every layer of one kind (full or sliding) needs about the current chunk, built once.

    q_index: (B, T) sequence index of each query. k_index: (B, T) the same for the chunk's own keys,
    EMPTY where the token is padding. blocks: (B, T) image-block id per token (0 = text) or None;
    tokens of one block see each other whatever their order. cache_index / slots: the cache entries'
    indices and where the chunk is written, or None without a cache (cache_index also with an empty one,
    `kv.emptied`: the chunk writes it and attends to its own keys). window: sliding window or None.
    write_first: the chunk (a decode step's token, or any chunk when the buffer holds every position)
    writes its keys and values into the cache before attending to the cache alone, and cache_index
    already holds the chunk's entries. A buffer that is only updated in place and then read needs no
    copy, while reading the old cache beside the write made XLA copy every layer's buffers twice per step.
    cache_blocks: with write_first and image blocks, the cache entries' block ids (the chunk's written
    where it lands, 0 elsewhere: earlier chunks' entries are all before every query anyway), else None.
    """

    cos: jax.Array
    sin: jax.Array
    q_index: jax.Array
    k_index: jax.Array
    blocks: jax.Array | None
    cache_index: jax.Array | None
    slots: jax.Array | None
    cache_blocks: jax.Array | None = None
    window: int | None = dataclasses.field(metadata=dict(static=True), default=None)
    write_first: bool = dataclasses.field(metadata=dict(static=True), default=False)
    probabilities: bool = dataclasses.field(metadata=dict(static=True), default=False)
    """Whether the layers return their attention probabilities (output_attentions)."""


def visibility_mask(q_index, k_index, window, q_blocks=None, k_blocks=None) -> jax.Array:
    """(B, T, S) visibility: ``(k <= q or same image block) and k > q - window and k holds a token``.

    The window cuts after the OR, exactly as transformers' masks do, so an image block is cut by the
    window on sliding layers.
    """
    q, k = q_index[:, :, None], k_index[:, None, :]
    visible = k <= q
    if q_blocks is not None and k_blocks is not None:
        qb, kb = q_blocks[:, :, None], k_blocks[:, None, :]
        visible = visible | ((qb == kb) & (qb > 0))
    if window is not None:
        visible = visible & (k > q - window)
    return visible & (k != kv.EMPTY)


def dot_product_attention(q, key_sets, ctx: AttentionContext):
    """Attention of queries q (B, T, N, H), already scaled, over several key sets at once.

    key_sets: [(k, v, k_index, k_blocks)], k/v (B, S_i, K, H). Scores of all sets share one softmax
    (float32), so attending to the cache and to the chunk needs no concatenation of the cache.
    Returns the output (B, T, N, H) and the probabilities (B, N, T, sum S_i).
    """
    return attend(q, [(k, v, visibility_mask(ctx.q_index, k_index, ctx.window, ctx.blocks, k_blocks))
                      for k, v, k_index, k_blocks in key_sets])


def attend(q, key_sets):
    """`dot_product_attention` over key sets [(k, v, visible)] whose (B, T, S_i) masks are given."""
    b, t, n, h = q.shape
    n_kv = key_sets[0][0].shape[2]
    qg = q.reshape(b, t, n_kv, n // n_kv, h)
    # Scores as (B, K, T, G, S): with one key-value head (gemma-3-270m and 1b) the queries are already
    # (B, T*G, H) rows and the output comes back as (B, T, N, H), so neither needs a transposed copy
    # (with G before T, XLA's CPU backend copied q, the probabilities and the output every layer).
    scores = []
    for k, _, visible in key_sets:
        s = jnp.einsum("BTKGH,BSKH->BKTGS", qg, k, preferred_element_type=jnp.float32,
                       precision=float32_precision(qg, k))
        scores.append(jnp.where(visible[:, None, :, None], s, _MASKED))
    probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1)
    out, start = 0.0, 0
    for k, v, _ in key_sets:
        p = probs[..., start:start + k.shape[1]].astype(v.dtype)
        out = out + jnp.einsum("BKTGS,BSKH->BTKGH", p, v, precision=float32_precision(p, v))
        start += k.shape[1]
    return out.reshape(b, t, n, h).astype(q.dtype), probs.transpose(0, 1, 3, 2, 4).reshape(b, n, t, -1)


@jax.custom_jvp
def kernel_attention(q, keys, values, visible):
    """`cpu_kernels.attention` (float32 out), whose derivatives are those of `attend`, the same attention in
    XLA's einsums (the kernel has none of its own)."""
    return cpu_kernels.attention(q, keys, values, visible)


@kernel_attention.defjvp
def _kernel_attention_jvp(primals, tangents):
    def by_xla(q, keys, values, visible):
        b = q.shape[0]
        return attend(q, [(kv.floats(keys[:b]), kv.floats(values[:b]), visible)])[0].astype(jnp.float32)

    return kernel_attention(*primals), jax.jvp(by_xla, primals, tangents)[1]


def _joined(key_sets, b: int):
    """Key sets as one, for the kernel (which reads one): the first ``b`` rows of each, stored alike,
    concatenated (one copy of a ring's old buffers: a window's entries per layer); a set without image
    blocks counts as text (0)."""
    dtype = key_sets[0][0].dtype
    keys, values = (jnp.concatenate([kv.as_stored(s[i][:b], dtype) for s in key_sets], 1) for i in (0, 1))
    index = jnp.concatenate([s[2] for s in key_sets], 1)
    blocks = None if all(s[3] is None for s in key_sets) else jnp.concatenate(
        [jnp.zeros_like(s[2]) if s[3] is None else s[3] for s in key_sets], 1)
    return keys, values, index, blocks


class Gemma3Attention(nnx.Module):
    """GQA with per-head Q/K RMSNorm before RoPE, scaled by ``query_pre_attn_scalar ** -0.5``."""

    def __init__(self, config: Gemma3TextConfig, layer_idx: int, *, dtype, rngs: nnx.Rngs):
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.scale = c.query_pre_attn_scalar ** -0.5
        self.is_sliding = c.is_sliding(layer_idx)
        self.q_proj = _linear(c.hidden_size, c.num_attention_heads * c.head_dim, dtype, rngs)
        self.k_proj = _linear(c.hidden_size, c.num_key_value_heads * c.head_dim, dtype, rngs)
        self.v_proj = _linear(c.hidden_size, c.num_key_value_heads * c.head_dim, dtype, rngs)
        self.o_proj = _linear(c.num_attention_heads * c.head_dim, c.hidden_size, dtype, rngs)
        self.q_norm = Gemma3RMSNorm(c.head_dim, c.rms_norm_eps, dtype=dtype)
        self.k_norm = Gemma3RMSNorm(c.head_dim, c.rms_norm_eps, dtype=dtype)

    def __call__(self, x, ctx: AttentionContext, cache_kv=None):
        """Returns (output, updated (k, v) cache buffers or None, attention probabilities)."""
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        q = q * jnp.asarray(self.scale, q.dtype)
        # The key sets attention reads, (keys, values, index, blocks), a cache's as stored, whole buffers
        key_sets = [(k, v, ctx.k_index, ctx.blocks)]  # no cache, or an empty one: the chunk alone
        use_kernel = False
        if cache_kv is not None:
            old_k, old_v = cache_kv
            cache_kv = kv.write_layer(old_k, old_v, ctx.slots, k, v)
            if ctx.write_first:  # the cache alone, the chunk written in it
                key_sets = [(*cache_kv, ctx.cache_index, ctx.cache_blocks)]
            elif ctx.cache_index is not None:  # the chunk beside the cache as it was (a ring the chunk overwrites)
                key_sets.insert(0, (old_k, old_v, ctx.cache_index, None))
            # on the CPU the kernel reads keys and values in place (XLA's dots copied or widened them)
            use_kernel = not ctx.probabilities and cpu_kernels.attention_applies(q, old_k)
        if use_kernel:
            keys, values, k_index, k_blocks = key_sets[0] if len(key_sets) == 1 else _joined(key_sets, b)
            visible = visibility_mask(ctx.q_index, k_index, ctx.window, ctx.blocks, k_blocks)
            out = kernel_attention(q, keys, values, visible).astype(q.dtype)
            return self.o_proj(out.reshape(b, t, -1)), cache_kv, None
        out, probs = dot_product_attention(
            q, [(kv.floats(keys[:b]), kv.floats(values[:b]), i, bl) for keys, values, i, bl in key_sets], ctx)
        return self.o_proj(out.reshape(b, t, -1)), cache_kv, probs


class Gemma3DecoderLayer(nnx.Module):
    """Pre- and post-norms around both attention and MLP (four norms)."""

    def __init__(self, config: Gemma3TextConfig, layer_idx: int, *, dtype, rngs: nnx.Rngs):
        eps = config.rms_norm_eps
        self.is_sliding = config.is_sliding(layer_idx)
        self.self_attn = Gemma3Attention(config, layer_idx, dtype=dtype, rngs=rngs)
        self.mlp = Gemma3MLP(config, dtype=dtype, rngs=rngs)
        self.input_layernorm = Gemma3RMSNorm(config.hidden_size, eps, dtype=dtype)
        self.post_attention_layernorm = Gemma3RMSNorm(config.hidden_size, eps, dtype=dtype)
        self.pre_feedforward_layernorm = Gemma3RMSNorm(config.hidden_size, eps, dtype=dtype)
        self.post_feedforward_layernorm = Gemma3RMSNorm(config.hidden_size, eps, dtype=dtype)

    def __call__(self, x, ctx: AttentionContext, cache_kv=None):
        a, cache_kv, probs = self.self_attn(self.input_layernorm(x), ctx, cache_kv)
        h = x + self.post_attention_layernorm(a)
        y = h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        return y, cache_kv, probs


def _chunk_mask(attention_mask, t: int, cache: kv.KVCache | None, index):
    """The chunk's validity (B, T) from an attention mask covering the chunk or the whole cache."""
    if attention_mask is None:
        return jnp.ones(index.shape, bool)
    m = jnp.asarray(attention_mask).astype(bool)
    if m.shape[1] != t and cache is not None and m.shape[1] == cache.max_length:
        m = jnp.take_along_axis(m, jnp.minimum(index, m.shape[1] - 1), axis=1)
    if m.shape != index.shape:
        raise ValueError(f"attention_mask has shape {m.shape}; expected {index.shape} (or the cache length)")
    return m


class SplitFloat32Embed(nnx.Module):
    """A float32 embedding table (vocab, hidden) kept as two uint16 planes (2, vocab, hidden): the top half of
    every float32 (its bfloat16 truncation), then the bottom half. The tied LM head of a float32 model on the CPU
    kernel (`CausalLMMixin.split_head`; the loader's default there): a greedy decode step then reads the top
    plane alone but for the few rows that may hold the maximum (`cpu_kernels.split_argmax`), half the head's
    bytes, which are most of gemma-3-270m's step and 30% of gemma-3-1b's. Rows are the float32 table's exactly,
    logits its products to float32 rounding. An inference form: it has no derivatives (train on `nnx.Embed`)."""

    def __init__(self, planes: jax.Array):
        self.num_embeddings, self.features = planes.shape[1:]
        self.dtype = jnp.float32
        self.planes = nnx.Param(planes)

    @staticmethod
    def split(table: jax.Array) -> jax.Array:
        bits = jax.lax.bitcast_convert_type(table.astype(jnp.float32), jnp.uint32)
        return jnp.stack([(bits >> 16).astype(jnp.uint16), (bits & 0xFFFF).astype(jnp.uint16)])

    @staticmethod
    def join(planes: jax.Array) -> jax.Array:
        """The float32 values of planes (2, ...)."""
        bits = planes[0].astype(jnp.uint32) << 16 | planes[1].astype(jnp.uint32)
        return jax.lax.bitcast_convert_type(bits, jnp.float32)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        return self.join(self.planes[...][:, input_ids])

    def attend(self, hidden: jax.Array) -> jax.Array:
        """hidden (..., D) times the table transposed, as ``nnx.Embed.attend``: (..., V) float32, by the kernel,
        reading the planes in place. Its row loops suit decode steps: at 64 rows they took twice the time of
        XLA's GEMM on the float32 table (which XLA could not run as fast on blocks joined from the planes)."""
        x = hidden.reshape(-1, self.features).astype(jnp.float32)
        return cpu_kernels.split_product(x, self.planes[...]).reshape(*hidden.shape[:-1], self.num_embeddings)

    def greedy(self, hidden: jax.Array) -> jax.Array:
        """hidden (B, D) → the argmax of its logits (B,) int32, exactly."""
        return cpu_kernels.split_argmax(hidden.astype(jnp.float32), self.planes[...])


class Derived(nnx.Variable):
    """State computed from the weights (`HeadScreen`): not a parameter, so never loaded, saved or trained."""


@functools.partial(jax.jit, static_argnums=4, donate_argnums=(0, 1))
def _screen_block(screen, rows, table, start, size):
    """Rows start..start+size of `HeadScreen`'s screen and row data from the table, written into the donated
    arrays (so that the screen is built in place, one block of the table widened at a time)."""
    w = jax.lax.dynamic_slice_in_dim(table, start, size).astype(jnp.float32)
    most = jnp.max(jnp.abs(w), axis=1)
    s = jnp.where(most > 0, most / 127, 1.0)
    q = jnp.clip(jnp.round(w / s[:, None]), -127, 127)
    # what rounding left, plus the product s q's own rounding (under 2^-24 of 127 s)
    r = jnp.max(jnp.abs(w - s[:, None] * q), axis=1) + s * 2.0**-16
    finite = jnp.all(jnp.isfinite(w), axis=1)
    block = jnp.stack([jnp.where(finite, s, jnp.nan), r, jnp.sum(jnp.abs(q), axis=1), jnp.sum(q, axis=1)])
    screen = jax.lax.dynamic_update_slice_in_dim(screen, q.astype(jnp.int8), start, 0)
    return screen, jax.lax.dynamic_update_slice_in_dim(rows, block, start, 1)


class HeadScreen(nnx.Module):
    """An int8 copy of a tied bfloat16 head, beside the table (`CausalLMMixin.screen_head`; the loader's default
    where the CPU kernel has int8 products): each row n as q[n] = round(w[n] / s[n]), s[n] = max |w[n]| / 127, and
    rows (4, vocab): s, a bound on |w[n] - s[n] q[n]|, sum |q[n]|, sum q[n]. A greedy decode step reads the
    screen (half the head's bytes, most of gemma-3-270m's step) and sums from the table only the rows whose
    bound reaches the best (`cpu_kernels.screen_argmax`): the same tokens as the logits' argmax. A copy of the
    table: build it again (`screen_head`) after changing the table."""

    BLOCK_ROWS = 16384

    def __init__(self, screen: jax.Array, rows: jax.Array):
        self.screen = Derived(screen)
        self.rows = Derived(rows)

    @classmethod
    def of(cls, table: jax.Array) -> HeadScreen:
        vocab, hidden = table.shape
        size = min(vocab, cls.BLOCK_ROWS)
        screen, rows = jnp.zeros((vocab, hidden), jnp.int8), jnp.zeros((4, vocab), jnp.float32)
        for start in range(0, vocab, size):  # the last block ends at the table's end (overlapping the one before)
            screen, rows = _screen_block(screen, rows, table, min(start, vocab - size), size)
        return cls(screen, rows)

    def greedy(self, hidden: jax.Array, table: jax.Array) -> jax.Array:
        """hidden (B, D) → the argmax of its logits against ``table`` (B,) int32, exactly."""
        return cpu_kernels.screen_argmax(hidden, table, self.screen[...], self.rows[...])


class Gemma3TextModel(nnx.Module):
    """Embedding (scaled by sqrt(hidden_size) in the weight dtype), decoder layers, final norm."""

    def __init__(self, config: Gemma3TextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=dtype,
                                      embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.layers = nnx.List([Gemma3DecoderLayer(config, i, dtype=dtype, rngs=rngs)
                                for i in range(config.num_hidden_layers)])
        self.norm = Gemma3RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        scale = jnp.asarray(math.sqrt(self.config.hidden_size), self.dtype)
        return self.embed_tokens(input_ids) * scale

    def __call__(
        self,
        input_ids: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        past_key_values: kv.KVCache | None = None,
        inputs_embeds: jax.Array | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        image_blocks: jax.Array | None = None,
    ) -> Gemma3ModelOutputWithPast:
        """Forward one chunk of tokens, with or without a cache.

        Without ``position_ids``, positions count real tokens only (``cumsum(attention_mask) - 1``,
        continued from the cache), so a left-padded row gives the logits of its unpadded self;
        transformers' forward instead uses plain indices unless told otherwise.
        ``image_blocks`` (B, T): per token, 0 for text or the id of the image it belongs to.
        The cache may hold more rows than the chunk: the chunk then reads and writes its first B rows
        only, in place (the serving engine decodes the prefix of its slots that holds the active ones).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
        b, t = x.shape[:2]
        cache = past_key_values
        start = cache.length[:b, None] if cache is not None else jnp.zeros((b, 1), jnp.int32)
        index = start + jnp.arange(t, dtype=jnp.int32)[None, :]
        valid = _chunk_mask(attention_mask, t, cache, index)
        if position_ids is None:
            first = cache.next_position[:b, None] if cache is not None else 0
            position_ids = first + jnp.maximum(jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1, 0)
        position_ids = jnp.broadcast_to(jnp.asarray(position_ids, jnp.int32), (b, t))
        k_index = jnp.where(valid, index, kv.EMPTY)
        slots = kv.chunk_slots(cache, index, valid) if cache is not None else None

        ctx = {}
        for kind in (FULL, SLIDING):
            base, factor = self.config.rope(kind)
            cos, sin = rope_tables(position_ids, self.config.head_dim, base, factor, x.dtype)
            sliding = kind == SLIDING
            cache_index = kind_slots = cache_blocks = None
            write_first = False
            if cache is not None:
                kind_slots = slots.sliding if sliding else slots.full
            if cache is not None and not cache.empty:  # (an empty cache: attention reads the chunk alone)
                cache_index = cache.sliding_index if sliding else cache.full_index
                # A chunk can be written before it is read when no entry it overwrites is one of its own
                # queries still needs: one token, or a buffer holding every position (no ring wraps).
                # Then attention reads the cache alone (image blocks: `cache_blocks`), not the cache beside
                # the chunk, which the CPU kernel reads `_joined` (a prefill into a new cache, `kv.emptied`,
                # reads no cache at all).
                holds_all = cache_index.shape[1] >= cache.full_index.shape[1]
                write_first = t == 1 or holds_all
                if write_first and image_blocks is not None:
                    cache_blocks = kv.scatter_rows(jnp.zeros_like(cache_index), kind_slots, image_blocks)
                cache_index = kv.scatter_rows(cache_index, kind_slots, k_index) if write_first else cache_index[:b]
            ctx[kind] = AttentionContext(
                cos=cos, sin=sin, q_index=index, k_index=k_index, blocks=image_blocks, cache_index=cache_index,
                slots=kind_slots, cache_blocks=cache_blocks, window=self.config.sliding_window if sliding else None,
                write_first=write_first, probabilities=output_attentions,
            )

        hidden_states, attentions, new_k, new_v = [], [], [], []
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                hidden_states.append(x)
            cache_kv = None if cache is None else (cache.keys[i], cache.values[i])
            x, cache_kv, probs = layer(x, ctx[SLIDING if layer.is_sliding else FULL], cache_kv)
            if cache is not None:
                new_k.append(cache_kv[0])
                new_v.append(cache_kv[1])
            if output_attentions:
                attentions.append(probs)
        x = self.norm(x)
        if output_hidden_states:
            hidden_states.append(x)
        if cache is not None:
            cache = kv.advance(cache, new_k, new_v, slots, index, valid, position_ids)
        return Gemma3ModelOutputWithPast(
            last_hidden_state=x,
            past_key_values=cache,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
        )


def softcap(logits: jax.Array, cap: float | None) -> jax.Array:
    return logits if cap is None else jnp.tanh(logits / cap) * cap


def causal_lm_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean next-token cross entropy in float32; label -100 is ignored (transformers' convention)."""
    logits, labels = logits[:, :-1].astype(jnp.float32), labels[:, 1:]
    keep = labels != -100
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(keep, labels, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(keep, nll, 0.0)) / jnp.maximum(jnp.sum(keep), 1)


def _on_several_devices(array) -> bool:
    """Whether ``array`` is laid out over more than one device (never while traced abstractly)."""
    sharding = getattr(array, "sharding", None)
    return sharding is not None and len(sharding.device_set) > 1


def head_screens(config, dtype) -> bool:
    """Whether a model of ``config`` in ``dtype`` can screen its head (`CausalLMMixin.screen_head`): tied,
    bfloat16, no final-logit softcapping (Gemma 3 has none; its rounding could tie rows the screen tells
    apart), and on the CPU backend with the kernel's int8 products."""
    text = getattr(config, "text_config", config)
    return (getattr(config, "tie_word_embeddings", False) and jnp.dtype(dtype) == jnp.bfloat16
            and getattr(text, "final_logit_softcapping", None) is None
            and jax.default_backend() == "cpu" and cpu_kernels.int8_screen())


def panels_kept(dtype) -> bool:
    """Whether a model in ``dtype`` keeps its decoder's layer weights as the CPU kernel's panels
    (`CausalLMMixin.keep_panels`): bfloat16, on the CPU backend where the kernel's GEMM multiplies pairs
    (`cpu_kernels.keeps_panels`)."""
    return jnp.dtype(dtype) == jnp.bfloat16 and jax.default_backend() == "cpu" and cpu_kernels.keeps_panels()


def head_splits(config, dtype) -> bool:
    """Whether a model of ``config`` in ``dtype`` can keep its head split (`CausalLMMixin.split_head`): tied,
    float32, and on the CPU backend with the kernel."""
    return (getattr(config, "tie_word_embeddings", False) and jnp.dtype(dtype) == jnp.float32
            and jax.default_backend() == "cpu" and cpu_kernels.available())


class PretrainedMixin:
    """Checkpoint I/O shared by every model class."""

    @classmethod
    def from_pretrained(cls, path, dtype=jnp.float32, mesh=None, progress=None, config=None, split_head=None,
                        screen_head=None, keep_panels=None):
        """Load a Hugging Face checkpoint directory, each tensor straight onto its devices (``split_head``,
        ``screen_head``, ``keep_panels``: see `gemma3.checkpoint.load_pretrained`)."""
        from gemma3.checkpoint import load_pretrained

        return load_pretrained(cls, path, dtype=dtype, mesh=mesh, progress=progress, config=config,
                               split_head=split_head, screen_head=screen_head, keep_panels=keep_panels)

    def save_pretrained(self, path) -> None:
        """Write config.json and model.safetensors in the layout transformers 5.x writes."""
        from gemma3.checkpoint import save_pretrained

        save_pretrained(self, path)


class CausalLMMixin(PretrainedMixin):
    """What the causal-LM classes share: the head and the generation hooks."""

    def apply_lm_head(self, hidden: jax.Array) -> jax.Array:
        """Logits (with final-logit softcapping) from hidden states; tied heads use the embedding."""
        text = self.get_decoder()
        lm_head = self.get_lm_head()
        if lm_head is None and self.splits_head():
            logits = text.embed_tokens.attend(hidden)
        elif lm_head is None:  # tied: the embedding table (vocab, hidden) is the head
            table = text.embed_tokens.embedding[...]
            logits = accumulating_dot_general(hidden.astype(table.dtype), table, (((hidden.ndim - 1,), (1,)), ((), ())))
        else:
            logits = lm_head(hidden)
        return softcap(logits, text.config.final_logit_softcapping)

    def splits_head(self) -> bool:
        """Whether the tied head is kept as a `SplitFloat32Embed` (see `split_head`)."""
        return isinstance(self.get_decoder().embed_tokens, SplitFloat32Embed)

    def split_head(self) -> None:
        """Keep the tied float32 embedding as a `SplitFloat32Embed`, in place: same logits, and greedy decode
        reads half the head (`greedy_tokens`). Only where the CPU kernel runs it: float32, tied, the CPU
        backend, one device. The loader does this itself there (``from_pretrained(split_head=None)``)."""
        text = self.get_decoder()
        if not self.splits_head():
            table = text.embed_tokens.embedding[...]
            if not head_splits(self.config, text.dtype) or _on_several_devices(table):
                raise ValueError("split_head needs a tied float32 head on one device, on the CPU kernel")
            text.embed_tokens = SplitFloat32Embed(SplitFloat32Embed.split(table))

    def screens_head(self) -> bool:
        """Whether the tied head has an int8 screen for greedy decode (see `screen_head`)."""
        return getattr(self.get_decoder(), "head_screen", None) is not None

    def screen_head(self) -> None:
        """Give the tied bfloat16 head an int8 screen (`HeadScreen`, built from the table; half its bytes more
        memory, never saved): greedy decode then reads the screen instead of the table (`greedy_tokens`), the
        same tokens. Only where the CPU kernel runs it: bfloat16, tied, the CPU backend (AVX512-VNNI or AVX2),
        one device. The loader does this itself there (``from_pretrained(screen_head=None)``); call it again after
        changing the embedding."""
        text = self.get_decoder()
        table = text.embed_tokens.embedding[...] if head_screens(self.config, text.dtype) else None
        if table is None or _on_several_devices(table):
            raise ValueError("screen_head needs a tied bfloat16 head on one device, on the CPU kernel with "
                             "int8 products (AVX512-VNNI or AVX2)")
        text.head_screen = HeadScreen.of(table)

    def _decoder_linears(self) -> list[nnx.Linear]:
        return [m for _, m in nnx.iter_graph(self.get_decoder()) if isinstance(m, nnx.Linear)]

    def keeps_panels(self) -> bool:
        """Whether the decoder's layer weights are kept as the CPU kernel's panels (see `keep_panels`)."""
        return any(linear.kernel[...].ndim == 3 for linear in self._decoder_linears())

    def keep_panels(self) -> None:
        """Keep the text decoder's bfloat16 layer weights as the CPU kernel's pair panels, in place
        (`cpu_kernels.to_panels`; the same bytes): the same products, but no call packs them any more. With AMX
        tiles packing took 40-56% of a 128-row product, and kept panels read 1.3-1.8x faster at a batch's 8
        rows (bench/RESULTS.md, session 37); on a Zen 4, 3-14% faster at 128 rows and up to 1.7x at 8 (session
        39). Only on one device, where `cpu_kernels.keeps_panels`; the loader does this itself there
        (``from_pretrained(keep_panels=None)``), and `save_pretrained` writes the weights back as they were.
        Derivatives go through XLA on the weights unpacked."""
        if not panels_kept(self.get_decoder().dtype):
            raise ValueError("keep_panels needs bfloat16 weights on a CPU kernel whose GEMM multiplies bfloat16 pairs "
                             "(AMX tiles or AVX512-BF16)")
        for linear in self._decoder_linears():
            w = linear.kernel[...]
            if cpu_kernels.panels_fit(w):
                if _on_several_devices(w):
                    raise ValueError("keep_panels needs the weights on one device")
                # on the host, as the loader placed them: a jitted transpose would compile a program per shape,
                # each kept for the rest of the process
                kept = np.ascontiguousarray(cpu_kernels.to_panels(jax.device_get(w)))
                linear.kernel.set_value(jax.device_put(kept, next(iter(w.devices()))))

    def greedy_without_logits(self) -> bool:
        """Whether `greedy_tokens` takes the argmax without computing the logits (a split or screened head)."""
        return self.splits_head() or self.screens_head()

    def greedy_tokens(self, hidden: jax.Array) -> jax.Array:
        """The argmax of the logits of hidden states (B, D), (B,) int32; with a split or screened head,
        without computing them (the softcap keeps the order)."""
        if self.splits_head():
            return self.get_decoder().embed_tokens.greedy(hidden)
        if self.screens_head():
            text = self.get_decoder()
            return text.head_screen.greedy(hidden, text.embed_tokens.embedding[...])
        return jnp.argmax(self.apply_lm_head(hidden).astype(jnp.float32), axis=-1).astype(jnp.int32)

    def logits_and_loss(self, hidden: jax.Array, labels: jax.Array | None, logits_to_keep: int):
        """Logits of the last ``logits_to_keep`` positions (0: all), and the loss when labels are given."""
        logits = self.apply_lm_head(hidden if logits_to_keep == 0 else hidden[:, -logits_to_keep:])
        return logits, None if labels is None else causal_lm_loss(logits, labels)

    def init_cache(self, batch_size: int, max_length: int) -> kv.KVCache:
        text = self.get_decoder()
        return kv.KVCache.init(text.config, batch_size, max_length, text.dtype)

    def prepare_inputs_for_generation(self, input_ids, max_length: int, attention_mask=None, **kwargs) -> dict:
        """The keyword arguments of the prefill call: a fresh cache, the mask and positions."""
        b, t = input_ids.shape  # mask and positions by numpy: eager jax operations would each compile
        mask = np.ones((b, t), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
        return dict(past_key_values=self.init_cache(b, max_length), attention_mask=jax.device_put(mask),
                    position_ids=jax.device_put(positions_of(mask)), **kwargs)

    def update_inputs_for_generation(self, model_outputs, model_kwargs: dict) -> dict:
        """The keyword arguments of the next decode step: the new cache; one real token per row."""
        cache = model_outputs.past_key_values
        model_kwargs = {k: v for k, v in model_kwargs.items() if k not in ("pixel_values", "token_type_ids")}
        model_kwargs["past_key_values"] = cache
        model_kwargs["attention_mask"] = jnp.ones((cache.batch_size, 1), bool)
        model_kwargs["position_ids"] = cache.next_position[:, None]
        return model_kwargs

    def generate(self, input_ids, attention_mask=None, **kwargs):
        """Sample a continuation; see :func:`gemma3.generation.generate` for the options."""
        from gemma3.generation import generate

        return generate(self, input_ids, attention_mask, **kwargs)


class Gemma3ForCausalLM(CausalLMMixin, nnx.Module):
    """The text decoder with its language-model head."""

    config_class = Gemma3TextConfig
    hf_architecture = "Gemma3ForCausalLM"

    def __init__(self, config: Gemma3TextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.config = config
        self.model = Gemma3TextModel(config, dtype=dtype, rngs=rngs)
        self.lm_head = None if config.tie_word_embeddings else _linear(config.hidden_size, config.vocab_size,
                                                                        dtype, rngs)

    def get_embedding(self) -> nnx.Embed:
        return self.model.embed_tokens

    def get_decoder(self) -> Gemma3TextModel:
        return self.model

    def get_lm_head(self) -> nnx.Linear | None:
        """The untied head, or None when the head is the embedding (``apply_lm_head`` handles both)."""
        return self.lm_head

    def get_encoder(self):
        return None

    def __call__(
        self,
        input_ids: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        past_key_values: kv.KVCache | None = None,
        inputs_embeds: jax.Array | None = None,
        labels: jax.Array | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        logits_to_keep: int = 0,
    ) -> Gemma3CausalLMOutputWithPast:
        """``logits_to_keep=n`` computes logits for the last n positions only (0: all), as transformers."""
        out = self.model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds,
                         output_attentions, output_hidden_states)
        logits, loss = self.logits_and_loss(out.last_hidden_state, labels, logits_to_keep)
        return Gemma3CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=out.past_key_values,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
        )


class Gemma3ForSequenceClassification(PretrainedMixin, nnx.Module):
    """A score head on the decoder, read at each row's last non-pad token (rightmost, as transformers)."""

    config_class = Gemma3TextConfig
    hf_architecture = "Gemma3TextForSequenceClassification"

    def __init__(self, config: Gemma3TextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.config = config
        self.num_labels = config.num_labels
        self.model = Gemma3TextModel(config, dtype=dtype, rngs=rngs)
        self.score = _linear(config.hidden_size, config.num_labels, dtype, rngs)

    def get_decoder(self) -> Gemma3TextModel:
        return self.model

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                 inputs_embeds=None, output_attentions=False, output_hidden_states=False):
        out = self.model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds,
                         output_attentions, output_hidden_states)
        logits = self.score(out.last_hidden_state)
        b, t = logits.shape[:2]
        pad = self.config.pad_token_id
        if input_ids is None or pad is None:
            last = jnp.full((b,), t - 1)
        else:
            last = jnp.argmax(jnp.arange(t)[None, :] * (input_ids != pad), axis=-1)
        return Gemma3SequenceClassifierOutputWithPast(
            logits=logits[jnp.arange(b), last],
            past_key_values=out.past_key_values,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
        )
