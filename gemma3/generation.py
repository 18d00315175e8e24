"""Sampling and a simple batched ``generate``: one jitted prefill, one jitted decode step per shape.

Sampling parameters are per row (arrays), so a serving batch can mix greedy and sampled requests, and
each row draws from its own seed: a row's tokens do not depend on what it is batched with.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import weakref

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma3 import cache as kv
from gemma3 import heap
from gemma3.text import positions_of

CANDIDATES = 256
"""Tokens a filtered draw (top-k, nucleus) sorts: each row's best, found with ``lax.top_k``. A row whose
filters could keep more falls back to sorting the whole vocabulary (a 262k-token sort costs about
70 ms per row on a CPU, the top 256 under 1 ms)."""


def sample_tokens(logits, keys, temperature, top_k, top_p, *, greedy: bool = False) -> jax.Array:
    """One token per row from logits (B, V).

    temperature (B,) 0 means greedy (argmax); top_k (B,) 0 means no limit; top_p (B,) 1 means no limit.
    Applied in transformers' order: temperature, then top-k, then top-p (nucleus). keys: (B, 2) uint32.
    Each row's draw depends on its own logits, parameters and key only, whichever way it is computed:
    unfiltered rows by inverse CDF over the whole vocabulary, filtered ones over their CANDIDATES best
    tokens when the filters keep no more (top_k <= CANDIDATES, or a nucleus inside them), else over the
    whole sorted vocabulary.

    ``greedy``: every row is greedy, as known when compiling: the program is the argmax alone. (The
    sampler is most of a sampling step's compiled code: on the CPU backend it keeps about 24 MB per
    program at a 262k vocabulary, and a second of compile time.)
    """
    logits = logits.astype(jnp.float32)
    if greedy:
        return argmax(logits)
    best = argmax(logits)

    def stochastic():
        x = logits / jnp.maximum(temperature, 1e-6)[:, None]
        vocab = x.shape[-1]
        k = jnp.where(top_k >= vocab, 0, top_k)  # a top-k of the whole vocabulary filters nothing
        c = min(vocab, CANDIDATES)
        best, ids = jax.lax.top_k(x, c)
        log_total = jax.nn.logsumexp(x, axis=-1)
        k_fits = (k > 0) & (k <= c)
        fits = k_fits | ((k == 0) & (jnp.exp(best - log_total[:, None]).sum(-1) >= top_p))
        unfiltered = (k == 0) & (top_p >= 1)
        # without a top-k, a nucleus inside the candidates is measured against the whole vocabulary's mass
        total = jnp.where(k_fits, jnp.inf, log_total)
        ranked = _draw_ranked(keys, best, ids, k, top_p, total)
        # the unfiltered draw is another pass over the whole vocabulary: only when a row needs it
        drawn = jnp.where(unfiltered, jax.lax.cond(jnp.any(unfiltered), lambda: _draw_unfiltered(keys, x),
                                                   lambda: ranked), ranked)

        def sorted_draw():
            order = jnp.argsort(-x, axis=-1)
            ranked = jnp.take_along_axis(x, order, axis=-1)
            return _draw_ranked(keys, ranked, order, k, top_p, jnp.full(k.shape, jnp.inf))

        slow = ~(unfiltered | fits)
        return jnp.where(slow, jax.lax.cond(jnp.any(slow), sorted_draw, lambda: drawn), drawn)

    sampled = jax.lax.cond(jnp.any(temperature > 0), stochastic, lambda: best)
    return jnp.where(temperature > 0, sampled, best)


def argmax(x) -> jax.Array:
    """``jnp.argmax`` over the last axis (int32) in two steps: the first block of up to 128 entries that
    holds the maximum, then the first maximum inside it. XLA's CPU backend runs a plain argmax as a slow
    two-value reduction (1.2 ms for one 262k-token row, 4.9 for eight); block maxima are a plain
    vectorised max."""
    vocab = x.shape[-1]
    block = math.gcd(vocab, 128)
    blocks = x.reshape(*x.shape[:-1], vocab // block, block)
    which = jnp.argmax(blocks.max(axis=-1), axis=-1)
    inside = jnp.take_along_axis(blocks, which[..., None, None], axis=-2)[..., 0, :]
    return (which * block + jnp.argmax(inside, axis=-1)).astype(jnp.int32)


def _draw_ranked(keys, ranked, ids, top_k, top_p, log_total):
    """A token id from ``ranked`` (B, N): each row's logits best first, ``ids`` their token ids. The
    top-k and nucleus filters are masks over ranks, never comparisons of recomputed values, so ties
    and rounding cannot widen them. The nucleus mass is measured against ``log_total`` where finite
    (the whole vocabulary's log-sum-exp when ``ranked`` holds only the best tokens), else against
    what the top-k filter keeps."""
    n = ranked.shape[-1]
    rank = jnp.arange(n)[None, :]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, n), n)
    ranked = jnp.where(rank < k[:, None], ranked, -jnp.inf)
    norm = jnp.where(jnp.isfinite(log_total), log_total, jax.nn.logsumexp(ranked, axis=-1))
    probs = jnp.exp(ranked - norm[:, None])
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each candidate
    keep = (before < top_p[:, None]) | (rank == 0)
    picked = jax.vmap(jax.random.categorical)(keys, jnp.where(keep, ranked, -jnp.inf))
    return jnp.take_along_axis(ids, picked[:, None], axis=-1)[:, 0].astype(jnp.int32)


def _draw_unfiltered(keys, x, block: int = 512):
    """A token id from softmax(x) per row without sorting or drawing noise per token: a block of the
    vocabulary by inverse CDF over the blocks' masses, then a token within it."""
    b, vocab = x.shape
    blocks = -(-vocab // block)
    p = jnp.exp(x - x.max(axis=-1, keepdims=True))
    p = jnp.pad(p, ((0, 0), (0, blocks * block - vocab))).reshape(b, blocks, block)
    cum = jnp.cumsum(p.sum(-1), axis=-1)
    outer, inner = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
    u = jax.vmap(jax.random.uniform)(outer) * cum[:, -1]
    chosen = jnp.sum(cum <= u[:, None], axis=-1)  # the first block whose cumulative mass passes u
    inside = jnp.take_along_axis(p, chosen[:, None, None], axis=1)[:, 0]
    picked = jax.vmap(jax.random.categorical)(inner, jnp.log(inside))
    return (chosen * block + picked).astype(jnp.int32)


def step_keys(seeds: jax.Array, steps: jax.Array) -> jax.Array:
    """Per-row PRNG keys for the token each row draws at ``steps`` (a scalar or one per row), derived
    from each row's seed only: the same request samples the same tokens in any batch."""
    steps = jnp.broadcast_to(steps, seeds.shape)
    return jax.vmap(lambda s, t: jax.random.fold_in(jax.random.PRNGKey(s), t))(seeds, steps)


@dataclasses.dataclass
class GenerateOutput:
    sequences: np.ndarray  # (B, prompt + generated) prompt as given, then new tokens (pad after a stop)
    new_tokens: np.ndarray  # (B, max_new_tokens)
    num_new_tokens: np.ndarray  # (B,) tokens generated per row, the stop token included


def _decode_step(graphdef, greedy, state, tokens, cache, seeds, step, temperature, top_k, top_p):
    """One token per row from the previous one: a forward of length 1 through the cache, then sampling
    (``greedy``: argmax only, see sample_tokens)."""
    model = nnx.merge(graphdef, state)
    inputs = dict(input_ids=tokens[:, None], position_ids=cache.next_position[:, None], past_key_values=cache)
    if greedy and model.greedy_without_logits():  # half the head read (SplitFloat32Embed, HeadScreen)
        out = model.model(**inputs)
        return model.greedy_tokens(out.last_hidden_state[:, -1]), out.past_key_values
    out = model(**inputs)
    nxt = sample_tokens(out.logits[:, -1], step_keys(seeds, step), temperature, top_k, top_p, greedy=greedy)
    return nxt, out.past_key_values


_splits: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def split_model(model) -> tuple[nnx.GraphDef, nnx.State]:
    """``nnx.split(model)``, with the graph walk done once per model structure: ``nnx.split`` walks the
    module graph in Python (3 ms for the demo model, a quarter of a 32-token ``generate``), while
    flattening the model as a pytree takes a tenth of that. The walk is redone whenever the model's
    pytree structure changes (a module or variable added, replaced or removed); its arrays are read
    afresh on every call, so weights updated in place are always the ones used, and none is kept here."""
    leaves, treedef = jax.tree.flatten(model)
    known = _splits.get(model)
    if known is not None and known[0] == treedef:
        return known[1], jax.tree.unflatten(known[2], leaves)
    graphdef, state = nnx.split(model)
    state_leaves, state_treedef = jax.tree.flatten(state)
    if len(state_leaves) == len(leaves) and all(a is b for a, b in zip(state_leaves, leaves)):
        _splits[model] = (treedef, graphdef, state_treedef)  # same arrays in the same order: reusable
    return graphdef, state


@functools.lru_cache(maxsize=64)
def _compiled(graphdef, greedy: bool = False):
    """The jitted prefill (shared by both samplers), decode step (cache donated) and first-token sampling
    of one model structure; ``greedy``: programs that only ever take the argmax (see sample_tokens)."""
    decode = functools.partial(_decode_step, graphdef, greedy)

    def first(logits, seeds, temperature, top_k, top_p):
        return sample_tokens(logits, step_keys(seeds, jnp.int32(0)), temperature, top_k, top_p, greedy=greedy)

    return (_prefill_program(graphdef), jax.jit(decode, donate_argnums=(2,)),
            jax.jit(first, compiler_options=loop_compiler_options()))


@functools.lru_cache(maxsize=32)
def _prefill_program(graphdef):
    """The jitted prefill of one model structure (the new cache is donated)."""

    def prefill(state, input_ids, attention_mask, position_ids, cache, extra):
        """The prompt into a new cache (``prepare_inputs_for_generation``'s)."""
        model = nnx.merge(graphdef, state)
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    past_key_values=kv.emptied(cache), logits_to_keep=1, **extra)
        return out.logits[:, -1], out.past_key_values

    return jax.jit(prefill, donate_argnums=(4,))


def decodes_one_row_as_two() -> bool:
    """Whether a one-row batch decodes as two copies of its row. XLA's GPU backend runs one-row
    products as reductions that use a fraction of the memory bandwidth, and two-row ones as matrix
    products: gemma-3-4b in bfloat16 on an H200 took 5.37 ms per decode step at batch 1 and 2.64 ms at
    batch 2 (bench/RESULTS.md). The CPU backend has its own kernel for both."""
    return jax.default_backend() == "gpu"


def loop_compiler_options() -> dict:
    """XLA options for a jitted decode loop or sampling step on the CPU backend.

    XLA's CPU backend gathers rows of a bfloat16 embedding from a float32 conversion of the whole table;
    inside a while_loop, loop-invariant code motion hoists that conversion out of the loop, so every call
    built a float32 copy of the table (gemma-3-1b: 1.2 GB and about a second, bench/RESULTS.md). Without
    the pass the conversion stays fused into the gather and touches only the rows it reads.

    Its older loop emitters (``xla_cpu_use_fusion_emitters`` off) compile these programs with 100 MB less
    memory at their peak and keep less compiled code (270m float32: a process's peak 1.55 -> 1.44 GiB),
    and decode as fast: the products and attention run in our kernel, and what XLA emits is small glue.
    (Prefill keeps the default: its bfloat16 batch-8 attention ran 4% slower with the older emitters.)
    Other backends gather bfloat16 as it is and keep every default."""
    if jax.default_backend() != "cpu":
        return {}
    options = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}
    if _knows_option("xla_cpu_use_fusion_emitters", False):
        options["xla_cpu_use_fusion_emitters"] = False
    return options


@functools.cache
def _knows_option(name: str, value) -> bool:
    """Whether this jaxlib's XLA takes the compile option (older and newer ones may not know it)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options={name: value}).lower(np.float32(0)).compile()
    except Exception:  # noqa: BLE001 - an unknown option is an error of the compiler's own type
        return False
    return True


_precompiled: set = set()  # (program ids, shapes): ids, not the programs, so that none is kept alive


def _compile_first(model, programs, state, prompt, extra, max_length, sampling) -> None:
    """Compile generate's programs for these shapes, once, before any of its buffers exist: a compile's
    working memory (100-200 MB at gemma-3-1b) then never sits beside the cache and the logits (at 1b
    float32 the process's peak fell by their size: 14 MB at batch 1, 110 MB at batch 8). The calls that
    follow find the programs compiled. Only for weights on one device (a sharded model's outputs are
    placed by the compiler; its programs compile at the calls)."""
    prefill, first, loop = programs
    padded, seeds = prompt[0], sampling[0]
    key = (tuple(map(id, programs)), padded.shape, max_length,
           tuple((k, v.shape, v.dtype) for k, v in sorted(extra.items())))
    if key in _precompiled:
        return
    placed = next((x.sharding for x in jax.tree.leaves(state) if isinstance(x, jax.Array)), None)
    if not isinstance(placed, jax.sharding.SingleDeviceSharding):
        return
    if len(_precompiled) > 1024:  # an id reused after its program was freed only skips this step
        _precompiled.clear()
    cache = jax.eval_shape(lambda: model.init_cache(padded.shape[0], max_length))
    # what the prefill returns lives where the weights do: its avals, and that placement, key the next calls
    out = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=placed)  # noqa: E731
    logits = out((padded.shape[0], model.get_decoder().config.vocab_size), jnp.float32)
    prefill.lower(state, *prompt, cache, extra).compile()
    first.lower(logits, *sampling[:4]).compile()
    loop.lower(state, out(seeds.shape, jnp.int32), jax.tree.map(lambda x: out(x.shape, x.dtype), cache), *sampling,
               np.int32(0), np.int32(0)).compile()
    _precompiled.add(key)


@functools.lru_cache(maxsize=64)
def _compiled_loop(graphdef, size: int, twice: bool = False, greedy: bool = False):
    """All decode steps of ``generate`` in one jitted ``while_loop``: tokens land in a (B, size) buffer
    (pad after a row's stop token) until every row has stopped or ``limit`` tokens were made. ``twice``:
    every row is decoded twice over (see decodes_one_row_as_two) and the first copy is returned;
    ``greedy``: argmax only (see sample_tokens)."""
    def loop(state, token, cache, seeds, temperature, top_k, top_p, stop_ids, limit, pad):
        rows = token.shape[0]
        if twice:
            token, cache, seeds, temperature, top_k, top_p = jax.tree.map(
                lambda x: jnp.concatenate([x, x]), (token, cache, seeds, temperature, top_k, top_p))
        def record(i, tok, out, done, count):
            out = jax.lax.dynamic_update_slice(out, jnp.where(done, pad, tok)[:, None], (0, i))
            return out, done | (tok[:, None] == stop_ids[None, :]).any(-1), count + (~done)

        b = token.shape[0]
        out, done, count = record(0, token, jnp.full((b, size), pad, jnp.int32), jnp.zeros((b,), bool),
                                  jnp.zeros((b,), jnp.int32))

        def body(carry):
            i, tok, cache, out, done, count = carry
            tok, cache = _decode_step(graphdef, greedy, state, tok, cache, seeds, i, temperature, top_k, top_p)
            return (i + 1, tok, cache, *record(i, tok, out, done, count))

        carry = (jnp.int32(1), token, cache, out, done, count)
        carry = jax.lax.while_loop(lambda c: (c[0] < limit) & ~c[4].all(), body, carry)
        return carry[3][:rows], carry[5][:rows], carry[2]  # the cache too: the donated one is updated in place

    # a cache decoded twice over is a new buffer
    return jax.jit(loop, donate_argnums=() if twice else (2,), compiler_options=loop_compiler_options())


def _per_row(value, b: int, dtype) -> np.ndarray:
    return np.broadcast_to(np.asarray(value, dtype), (b,))


def generate(model, input_ids, attention_mask=None, *, max_new_tokens: int = 32, temperature=0.0, top_k=0,
             top_p=1.0, seed=0, eos_token_id=None, stop_token_ids=(), pad_token_id=None, mesh=None,
             **prefill_inputs) -> GenerateOutput:
    """Continue each row of a (left-padded) batch until a stop token or ``max_new_tokens``.

    ``prefill_inputs`` go to the prefill call only: ``pixel_values``, ``token_type_ids`` or
    ``image_features`` for the multimodal model.

    temperature/top_k/top_p/seed may be scalars or per-row sequences. ``eos_token_id`` defaults to the
    config's; ``stop_token_ids`` are added to it. Greedy rows match transformers' greedy search.
    With a ``mesh``, the cache is sharded over it like the parameters.
    """
    # The inputs are prepared with numpy: each eager jax operation would compile a program of its own,
    # and XLA's CPU client keeps about 1.2 MB per compiled program (twenty here at each new shape).
    config = model.get_decoder().config
    input_ids = np.asarray(input_ids, np.int32)
    b, t = input_ids.shape
    stops = set(config.eos_token_ids if eos_token_id is None else
                ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))) | set(stop_token_ids)
    pad = config.pad_token_id if pad_token_id is None else pad_token_id
    pad = 0 if pad is None else pad
    temperature, top_k = _per_row(temperature, b, np.float32), _per_row(top_k, b, np.int32)
    top_p, seeds = _per_row(top_p, b, np.float32), _per_row(seed, b, np.uint32)
    if (temperature < 0).any() or (top_p <= 0).any() or (top_p > 1).any():
        raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
    greedy = not (temperature > 0).any()  # then the programs hold no sampler (see sample_tokens)
    temperature, top_k, top_p, seeds = jax.device_put((temperature, top_k, top_p, seeds))  # (jnp.asarray compiles)

    # The prompt is left-padded to a bucket (a multiple of 16 and of an eighth of its power of two: at
    # most 1/8 wasted) and the cache sized to it plus the power-of-two token buffer, so prompts of other
    # lengths reuse the compiled prefill and loop. Left padding is masked and shifts no position.
    size = 1 << max(3, (max_new_tokens - 1).bit_length())
    step = max(16, 1 << max(0, t.bit_length() - 3))
    bucket = -(-t // step) * step
    mask = np.ones((b, t), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    padded = np.pad(input_ids, ((0, 0), (bucket - t, 0)), constant_values=pad)
    mask = np.pad(mask, ((0, 0), (bucket - t, 0)))
    if prefill_inputs.get("token_type_ids") is not None:
        prefill_inputs = {**prefill_inputs, "token_type_ids": np.pad(np.asarray(prefill_inputs["token_type_ids"]),
                                                                     ((0, 0), (bucket - t, 0)))}
    graphdef, state = split_model(model)
    prefill, _, first = _compiled(graphdef, greedy)
    extra = {k: v if isinstance(v, jax.Array) else jax.device_put(np.asarray(v))  # lists, torch tensors too
             for k, v in prefill_inputs.items() if v is not None}
    if "pixel_values" in extra or "image_features" in extra:  # the image-token count is checked eagerly here
        from gemma3.multimodal import check_image_token_count

        check_image_token_count(model.config, input_ids, extra)
    # The decode loop runs on the device (one call, no host round trip per token); its buffer and the stop
    # list are padded to powers of two, so other lengths and stop sets reuse the compiled loop.
    stop_ids = np.full(1 << max(2, (len(stops) - 1).bit_length()), -1, np.int32)
    stop_ids[:len(stops)] = sorted(stops)
    twice = b == 1 and decodes_one_row_as_two()
    loop = _compiled_loop(graphdef, size, twice, greedy)
    mask, positions = jax.device_put((mask, positions_of(mask)))
    if mesh is None:
        _compile_first(model, (prefill, first, loop), state, (padded, mask, positions), extra, bucket + size,
                       (seeds, temperature, top_k, top_p, stop_ids))
    cache = model.init_cache(b, bucket + size)  # (prepare_inputs_for_generation's, made after the compiles)
    if mesh is not None:
        from gemma3.sharding import shard_cache

        cache = shard_cache(cache, mesh)
    logits, cache = prefill(state, padded, mask, positions, cache, extra)
    token = first(logits, seeds, temperature, top_k, top_p)
    del logits  # (batch x vocabulary floats: 8 MB at gemma-3-1b batch 8, not kept through the loop)
    cache_bytes = sum(x.nbytes for x in jax.tree.leaves(cache))
    out, count, cache = loop(state, token, cache, seeds, temperature, top_k, top_p, stop_ids,
                             np.int32(max_new_tokens), np.int32(pad))
    new = np.asarray(out)[:, :max_new_tokens].astype(np.int64)
    del cache
    heap.release_for(cache_bytes)
    return GenerateOutput(sequences=np.concatenate([np.asarray(input_ids), new], axis=1), new_tokens=new,
                          num_new_tokens=np.asarray(count).astype(np.int64))
