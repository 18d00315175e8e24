"""The KV cache: a plain pytree that a jitted step takes and returns (and may donate).

Every cache entry remembers the sequence index of the token it holds (``EMPTY`` when it holds none),
so masks are built from indices alone: causal ``k <= q``, sliding ``k > q - window``. That one rule
serves a fresh prefill, a chunk appended to a cache, a single decode step and a batch whose rows sit
at different lengths (serving slots).

Full-attention layers keep ``max_length`` entries, written at their index. Sliding layers keep a ring
of ``min(sliding_window, max_length)`` entries, written at ``index % ring``: a query at index q sees at
most the keys q-W+1..q, and the chunk being processed is attended from its own keys, so the ring never
needs more than the window.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from gemma3 import heap
from gemma3.config import Gemma3TextConfig

EMPTY = 2**30
"""Index stored in a cache entry that holds no token: larger than any query index, so always masked."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values per layer, plus the sequence index held by each entry.

    keys/values[layer]: (batch, entries, num_kv_heads, head_dim); entries is max_length for full
    layers and the ring size for sliding layers; `floats` reads them (`stored_dtype`).
    ``full_index``/``sliding_index``: (batch, entries) int32, shared by all layers of a kind.
    ``length``: (batch,) the next sequence index to write (leading padding included, trailing padding
    not). ``next_position``: (batch,) the RoPE position of the next real token.
    """

    keys: list[jax.Array]
    values: list[jax.Array]
    full_index: jax.Array
    sliding_index: jax.Array
    length: jax.Array
    next_position: jax.Array
    empty: bool = dataclasses.field(default=False, metadata=dict(static=True))
    """Static: the rows a chunk is written to hold nothing yet (see `emptied`). The chunk then attends to
    its own keys alone and only writes the cache; every cache a forward returns has it False."""

    @property
    def batch_size(self) -> int:
        return self.length.shape[0]

    @property
    def max_length(self) -> int:
        return self.full_index.shape[1]

    @classmethod
    def init(cls, config: Gemma3TextConfig, batch_size: int, max_length: int, dtype=jnp.float32) -> KVCache:
        ring = min(config.sliding_window or max_length, max_length)
        sizes = tuple(ring if config.is_sliding(i) else max_length for i in range(config.num_hidden_layers))
        dtype = stored_dtype(dtype)
        per_entry = 2 * batch_size * config.num_key_value_heads * config.head_dim * dtype.itemsize
        heap.release_for(sum(sizes) * per_entry)  # what earlier caches left in the heap goes back first
        return _maker(cls, sizes, batch_size, config.num_key_value_heads, config.head_dim, dtype, max_length, ring)()


@functools.lru_cache(maxsize=64)
def _maker(cls, sizes: tuple, batch_size: int, kv_heads: int, head_dim: int, dtype, max_length: int, ring: int):
    """A new cache's buffers from one compiled program: eager jnp.zeros and jnp.full would compile one per
    shape, and XLA's CPU client keeps about 1.2 MB per compiled program."""
    def make() -> KVCache:
        shape = lambda n: (batch_size, n, kv_heads, head_dim)  # noqa: E731
        return cls(
            keys=[jnp.zeros(shape(n), dtype) for n in sizes],
            values=[jnp.zeros(shape(n), dtype) for n in sizes],
            full_index=jnp.full((batch_size, max_length), EMPTY, jnp.int32),
            sliding_index=jnp.full((batch_size, ring), EMPTY, jnp.int32),
            length=jnp.zeros((batch_size,), jnp.int32),
            next_position=jnp.zeros((batch_size,), jnp.int32),
        )

    return jax.jit(make)


def emptied(cache: KVCache) -> KVCache:
    """``cache`` marked as holding nothing for the rows of the next chunk, for a prefill into a new cache:
    that prefill then scores its queries against its own keys, not against every (empty) entry of the
    cache, and reads no cache buffer (at max_length 8192 a write-first prefill scored 8192 keys per query
    on full layers). Only for a cache that is known to be empty there: its entries would be ignored."""
    return dataclasses.replace(cache, empty=True)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ChunkSlots:
    """Where the tokens of one forward chunk land in the cache (computed once, used by every layer).

    ``full``/``sliding``: (batch, chunk) target entry, or an out-of-range entry (dropped by the
    scatter) for tokens that must not be written: padding, and in the ring tokens that a later token
    of the same chunk overwrites.
    """

    full: jax.Array
    sliding: jax.Array


def chunk_slots(cache: KVCache, index: jax.Array, valid: jax.Array) -> ChunkSlots:
    """Cache entries for a chunk with sequence indices ``index`` (batch, T) and validity ``valid``."""
    max_len, ring = cache.full_index.shape[1], cache.sliding_index.shape[1]
    full = jnp.where(valid & (index < max_len), index, max_len)
    # In the ring only the last `ring` valid tokens of the chunk survive; writing only those keeps
    # the scatter free of duplicate targets.
    last = jnp.max(jnp.where(valid, index, -1), axis=1, keepdims=True)
    keep = valid & (index > last - ring)
    sliding = jnp.where(keep, index % ring, ring)
    return ChunkSlots(full=full, sliding=sliding)


def stored_dtype(dtype) -> jnp.dtype:
    """How a cache of ``dtype`` keeps its keys and values: bfloat16 as its bits (uint16) on the CPU backend.
    XLA's CPU backend has no bfloat16 scatter: it widened every layer's buffers to float32 and back around
    each write, every step (a third of a batch-8 decode step), and a bitcast of the buffer around the
    scatter was copied too. Read them with `floats`."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.uint16) if dtype == jnp.bfloat16 and jax.default_backend() == "cpu" else dtype


def floats(buf: jax.Array) -> jax.Array:
    """A layer's keys or values as numbers (bfloat16 kept as bits: `stored_dtype`); the bitcast fuses into
    whatever reads them."""
    return jax.lax.bitcast_convert_type(buf, jnp.bfloat16) if buf.dtype == jnp.uint16 else buf


def as_stored(new: jax.Array, dtype) -> jax.Array:
    """Keys or values in a cache buffer's ``dtype`` (bfloat16 kept as bits: `stored_dtype`)."""
    if dtype == jnp.uint16 and new.dtype != jnp.uint16:
        return jax.lax.bitcast_convert_type(new.astype(jnp.bfloat16), jnp.uint16)
    return new.astype(dtype)


def _scatter(buf: jax.Array, slots: jax.Array, new: jax.Array) -> jax.Array:
    """Write ``new`` at ``slots`` of the buffer's first ``len(slots)`` rows."""
    rows = jnp.arange(slots.shape[0])[:, None]
    return buf.at[rows, slots].set(as_stored(new, buf.dtype), mode="drop")


def scatter_rows(buf: jax.Array, slots: jax.Array, new: jax.Array) -> jax.Array:
    """The first ``len(slots)`` rows of ``buf`` after writing ``new`` at ``slots``."""
    return _scatter(buf, slots, new)[:slots.shape[0]]


def write_layer(cache_k: jax.Array, cache_v: jax.Array, slots: jax.Array, k: jax.Array, v: jax.Array):
    """Store a chunk's keys and values (batch, T, kv_heads, head_dim) at ``slots``."""
    return _scatter(cache_k, slots, k), _scatter(cache_v, slots, v)


def advance(cache: KVCache, keys, values, slots: ChunkSlots, index, valid, positions) -> KVCache:
    """The cache after a chunk: new layer buffers, entry indices, lengths and next positions."""
    idx = jnp.where(valid, index, EMPTY).astype(jnp.int32)
    last_idx = jnp.max(jnp.where(valid, index, -1), axis=1).astype(jnp.int32)
    last_pos = jnp.max(jnp.where(valid, positions, -1), axis=1).astype(jnp.int32)
    b = index.shape[0]  # the chunk's rows: the cache's first b
    return KVCache(
        keys=list(keys),
        values=list(values),
        full_index=_scatter(cache.full_index, slots.full, idx),
        sliding_index=_scatter(cache.sliding_index, slots.sliding, idx),
        # Trailing padding (a right-padded prefill bucket) does not advance the sequence, so the
        # next token sits right after the last real one and sliding windows count real tokens.
        length=cache.length.at[:b].max(last_idx + 1),
        next_position=cache.next_position.at[:b].max(last_pos + 1),
    )
