"""Cached decoding gives, step by step, the logits of a full forward over the same prefix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma3 import Gemma3ForCausalLM
from gemma3.cache import EMPTY


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


@pytest.mark.parametrize("total,chunk", [(18, 6), (5, 2)])
def test_chunked_prefill_equals_one_pass(model, forward, step, total, chunk):
    """18 in chunks of 6, longer than the window (5): sliding layers attend to their ring beside the
    chunk. 5 in chunks of 2: every buffer holds every position, so each chunk is written into the cache
    first and attention reads the cache alone."""
    rng = np.random.default_rng(2)
    ids = jnp.asarray(rng.integers(3, model.config.vocab_size, (1, total)))
    full = np.asarray(forward(ids, jnp.ones((1, total), bool)))
    cache = model.init_cache(1, total)
    got = []
    for s in range(0, total, chunk):
        logits, cache = step(ids[:, s:s + chunk], jnp.ones((1, min(chunk, total - s)), bool), cache)
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


def test_padding_is_never_written(model, step):
    cache = model.init_cache(1, 10)
    mask = jnp.asarray([[False, False, True, True]])
    _, cache = step(jnp.asarray([[0, 0, 5, 6]]), mask, cache)
    full = np.asarray(cache.full_index[0])
    assert full[:4].tolist() == [EMPTY, EMPTY, 2, 3] and (full[4:] == EMPTY).all()
    assert int(cache.next_position[0]) == 2
