"""Cached decoding gives, step by step, the logits of a full forward over the same prefix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma3 import Gemma3ForCausalLM
from gemma3.cache import EMPTY, KVCache, emptied


@pytest.fixture(scope="module")
def model(text_checkpoints):
    return Gemma3ForCausalLM.from_pretrained(text_checkpoints["base"][0])


@pytest.fixture(scope="module")
def forward(model):
    return jax.jit(lambda ids, mask: model(ids, attention_mask=mask).logits)


@pytest.fixture(scope="module")
def step(model):
    def run(ids, mask, cache):
        out = model(ids, attention_mask=mask, past_key_values=cache)
        return out.logits, out.past_key_values

    return jax.jit(run, donate_argnums=(2,))


def test_sliding_layers_keep_a_ring_of_the_window(model):
    cache = model.init_cache(batch_size=3, max_length=40)
    window = model.config.sliding_window
    for i, (k, v) in enumerate(zip(cache.keys, cache.values)):
        expected = window if model.config.is_sliding(i) else 40
        assert k.shape == v.shape == (3, expected, model.config.num_key_value_heads, model.config.head_dim)
    assert cache.sliding_index.shape == (3, window) and cache.full_index.shape == (3, 40)


def test_decode_steps_equal_full_forward_past_the_window(model, forward, step):
    rng = np.random.default_rng(1)
    total = 24  # window is 5: most steps see a wrapped ring
    ids = jnp.asarray(rng.integers(3, model.config.vocab_size, (2, total)))
    full = np.asarray(forward(ids, jnp.ones((2, total), bool)))
    cache = model.init_cache(2, total)
    logits, cache = step(ids[:, :4], jnp.ones((2, 4), bool), cache)
    np.testing.assert_allclose(np.asarray(logits), full[:, :4], atol=1e-5)
    for t in range(4, total):
        logits, cache = step(ids[:, t:t + 1], jnp.ones((2, 1), bool), cache)
        np.testing.assert_allclose(np.asarray(logits[:, 0]), full[:, t], atol=1e-5, rtol=1e-6, err_msg=f"step {t}")
    assert np.asarray(cache.length).tolist() == [total, total]


@pytest.fixture(scope="module")
def step_in_xla(model):
    """`step` with the attention probabilities returned, which takes XLA's attention, not the CPU kernel."""
    def run(ids, mask, cache):
        out = model(ids, attention_mask=mask, past_key_values=cache, output_attentions=True)
        return out.logits, out.past_key_values

    return jax.jit(run, donate_argnums=(2,))


@pytest.mark.parametrize("attention", ["kernel", "xla"])
@pytest.mark.parametrize("total,chunk", [(18, 6), (5, 2)])
def test_chunked_prefill_equals_one_pass(model, forward, step, step_in_xla, total, chunk, attention):
    """18 in chunks of 6, longer than the window (5): sliding layers attend to their ring beside the
    chunk (XLA: two key sets under one softmax; the CPU kernel: both joined). 5 in chunks of 2: every
    buffer holds every position, so each chunk is written into the cache first and attention reads the
    cache alone."""
    rng = np.random.default_rng(2)
    ids = jnp.asarray(rng.integers(3, model.config.vocab_size, (1, total)))
    full = np.asarray(forward(ids, jnp.ones((1, total), bool)))
    cache = model.init_cache(1, total)
    got, run = [], step if attention == "kernel" else step_in_xla
    for s in range(0, total, chunk):
        logits, cache = run(ids[:, s:s + chunk], jnp.ones((1, min(chunk, total - s)), bool), cache)
        got.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(got, axis=1), full, atol=1e-5)


def test_right_padded_prefill_then_decode_equals_unpadded(model, forward, step):
    """The serving pattern: a prompt prefilled in a longer bucket, rows at different lengths."""
    rng = np.random.default_rng(3)
    lengths, bucket, extra = [7, 12], 16, 9
    seqs = [rng.integers(3, model.config.vocab_size, n + extra) for n in lengths]
    ids = np.zeros((2, bucket), np.int64)
    mask = np.zeros((2, bucket), bool)
    for r, n in enumerate(lengths):
        ids[r, :n], mask[r, :n] = seqs[r][:n], True
    cache = model.init_cache(2, bucket + extra)
    logits, cache = step(jnp.asarray(ids), jnp.asarray(mask), cache)
    assert np.asarray(cache.length).tolist() == lengths
    for r, n in enumerate(lengths):
        ref = np.asarray(forward(jnp.asarray(seqs[r][None]), jnp.ones((1, n + extra), bool)))[0]
        np.testing.assert_allclose(np.asarray(logits[r, :n]), ref[:n], atol=1e-5)
    for t in range(extra):
        nxt = jnp.asarray([[seqs[r][lengths[r] + t]] for r in range(2)])
        logits, cache = step(nxt, jnp.ones((2, 1), bool), cache)
        for r, n in enumerate(lengths):
            ref = np.asarray(forward(jnp.asarray(seqs[r][None, :n + t + 1]), jnp.ones((1, n + t + 1), bool)))
            np.testing.assert_allclose(np.asarray(logits[r, 0]), ref[0, -1], atol=1e-5)


@pytest.mark.parametrize("max_length", [9, 30])
def test_a_prefill_into_an_emptied_cache_writes_and_scores_as_a_plain_one(model, forward, step, max_length):
    """The prefill of generate and of the serving engine: the chunk attends to its own keys alone, and
    leaves the cache a plain prefill leaves (rings of the window wrapped by 8 tokens; a buffer longer
    than the chunk, whose plain prefill attends to the whole cache), so decoding goes on alike."""
    rng = np.random.default_rng(4)
    ids = jnp.asarray(rng.integers(3, model.config.vocab_size, (2, 8)))
    mask = jnp.asarray([[True] * 8, [False] * 3 + [True] * 5])  # a left-padded row
    plain_logits, plain = step(ids, mask, model.init_cache(2, max_length))
    logits, cache = step(ids, mask, emptied(model.init_cache(2, max_length)))
    assert not cache.empty
    real = np.asarray(mask)  # (what padding positions score is nobody's business)
    np.testing.assert_allclose(np.asarray(logits)[real], np.asarray(plain_logits)[real], atol=1e-5, rtol=1e-6)
    ref = np.asarray(forward(ids[1:, 3:], jnp.ones((1, 5), bool)))
    np.testing.assert_allclose(np.asarray(logits[1, 3:]), ref[0], atol=1e-5, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(cache), jax.tree.leaves(plain)):  # indices exact, keys and values to rounding
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 if a.dtype == jnp.float32 else 0)
    nxt = jnp.asarray([[5], [6]])
    after, _ = step(nxt, jnp.ones((2, 1), bool), cache)
    plain_after, plain = step(nxt, jnp.ones((2, 1), bool), plain)
    np.testing.assert_allclose(np.asarray(after), np.asarray(plain_after), atol=1e-5, rtol=1e-6)
    # what the emptied cache held is never read: over a used cache the prefill scores as over a new one
    logits, _ = step(ids, mask, emptied(plain))
    np.testing.assert_allclose(np.asarray(logits)[real], np.asarray(plain_logits)[real], atol=1e-5, rtol=1e-6)


def test_padding_is_never_written(model, step):
    cache = model.init_cache(1, 10)
    mask = jnp.asarray([[False, False, True, True]])
    _, cache = step(jnp.asarray([[0, 0, 5, 6]]), mask, cache)
    full = np.asarray(cache.full_index[0])
    assert full[:4].tolist() == [EMPTY, EMPTY, 2, 3] and (full[4:] == EMPTY).all()
    assert int(cache.next_position[0]) == 2


def test_a_new_cache_has_a_buffer_of_its_own_for_every_leaf():
    """A new cache comes from one compiled program, whose equal zero outputs could come back as one buffer;
    they are donated leaf by leaf, so each must be its own (and no two caches may share one)."""
    from gemma3 import Gemma3TextConfig
    from tests.make_checkpoints import TEXT_BASE

    config = Gemma3TextConfig.from_dict(TEXT_BASE)
    first, second = (KVCache.init(config, 2, 16) for _ in range(2))
    pointers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(first) + jax.tree.leaves(second)]
    assert len(set(pointers)) == len(pointers) == 2 * (2 * config.num_hidden_layers + 4)
