"""The projections' matrix product: float32 unchanged, bfloat16 accumulated in float32 (one row padded to
two on CPU, which must not change it)."""

import jax.numpy as jnp
import numpy as np

from gemma3.text import accumulating_dot_general

LINEAR = (((1,), (0,)), ((), ()))  # (rows, in) x (in, out), as nnx.Linear contracts


def test_float32_is_a_plain_dot():
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((3, 64), np.float32), rng.standard_normal((64, 32), np.float32)
    np.testing.assert_array_equal(accumulating_dot_general(jnp.asarray(x), jnp.asarray(w), LINEAR),
                                  jnp.dot(jnp.asarray(x), jnp.asarray(w)))


def test_bfloat16_accumulates_in_float32_and_one_row_equals_its_row_of_two():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 1, 512)), jnp.bfloat16)  # (batch, seq, in) as in decode
    w = jnp.asarray(rng.standard_normal((512, 96)) * 0.05, jnp.bfloat16)
    dims = (((2,), (0,)), ((), ()))
    both = accumulating_dot_general(x, w, dims)
    first = accumulating_dot_general(x[:1], w, dims)  # one row: the padded path
    assert both.dtype == first.dtype == jnp.bfloat16 and first.shape == (1, 1, 96)
    np.testing.assert_array_equal(np.asarray(first, np.float32), np.asarray(both[:1], np.float32))
    exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    np.testing.assert_allclose(np.asarray(both, np.float64), exact, rtol=1e-2, atol=1e-2)
    tied = (((2,), (1,)), ((), ()))  # the tied head: hidden x embedding table (vocab, hidden)
    table = jnp.asarray(rng.standard_normal((96, 512)) * 0.05, jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(accumulating_dot_general(x[:1], table, tied), np.float32),
                                  np.asarray(accumulating_dot_general(x, table, tied)[:1], np.float32))
