"""The SigLIP vision tower as Gemma 3 uses it: patch embedding, learned positions, pre-LN encoder
layers, post-layernorm; the last hidden state, no pooling head. Numerically equal to transformers'
``SiglipVisionModel``. Einsum letters: N images, P patches, D width, M heads, H head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gemma3.config import SiglipVisionConfig


def _linear(n_in: int, n_out: int, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(n_in, n_out, dtype=dtype, param_dtype=dtype, kernel_init=nnx.initializers.normal(0.02),
                      rngs=rngs)


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
        x = jnp.einsum("NCYyXx,DCyx->NYXD", patches, w) + b
        x = x.reshape(n, -1, x.shape[-1])
        return x + self.position_embedding.embedding[...][None, : x.shape[1]]


class SiglipAttention(nnx.Module):
    """Bidirectional multi-head attention with biases, softmax in float32."""

    def __init__(self, config: SiglipVisionConfig, *, dtype, rngs: nnx.Rngs):
        d = config.hidden_size
        self.num_heads, self.head_dim = config.num_attention_heads, d // config.num_attention_heads
        self.q_proj, self.k_proj = _linear(d, d, dtype, rngs), _linear(d, d, dtype, rngs)
        self.v_proj, self.out_proj = _linear(d, d, dtype, rngs), _linear(d, d, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        n, p, _ = x.shape
        split = lambda y: y.reshape(n, p, self.num_heads, self.head_dim)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        scores = jnp.einsum("NPMH,NQMH->NMPQ", q * jnp.asarray(self.head_dim ** -0.5, q.dtype), k,
                            preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        return self.out_proj(jnp.einsum("NMPQ,NQMH->NPMH", probs, v).reshape(n, p, -1))


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
