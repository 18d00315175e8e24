"""KV cache memory at real shapes (abstract arrays: nothing is allocated): sliding layers keep a ring of
their window, so a long context costs global layers only."""

import jax
import jax.numpy as jnp

from gemma3 import Gemma3TextConfig
from gemma3.cache import KVCache
from gemma3.config import FULL, SLIDING


def gemma_3_1b(**overrides) -> Gemma3TextConfig:
    """google/gemma-3-1b-it's text shapes: 26 layers, 5 sliding (window 512) to 1 global."""
    layer_types = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(26)]
    return Gemma3TextConfig(vocab_size=262_144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
                            num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
                            layer_types=layer_types, **overrides)


def cache_bytes(cache) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))


def test_gemma_3_1b_at_8k_needs_under_a_third_of_a_full_length_cache():
    config = gemma_3_1b()
    ours = jax.eval_shape(lambda: KVCache.init(config, 1, 8192, jnp.bfloat16))
    kv = [x for x in ours.keys + ours.values]
    assert [x.shape[1] for x in ours.keys] == [512 if config.is_sliding(i) else 8192 for i in range(26)]
    full_length = 2 * 26 * 8192 * config.num_key_value_heads * config.head_dim * 2  # K and V, bf16, every layer
    assert sum(x.size * x.dtype.itemsize for x in kv) <= full_length / 3
    assert cache_bytes(ours) <= full_length / 3  # the position indices included
