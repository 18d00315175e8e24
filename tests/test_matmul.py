"""The projections' matrix product: float32 unchanged, bfloat16 accumulated in float32 (one row padded to
two on CPU, which must not change it)."""

import jax.numpy as jnp
import numpy as np

from gemma3.text import accumulating_dot_general

LINEAR = (((1,), (0,)), ((), ()))  # (rows, in) x (in, out), as nnx.Linear contracts


def test_float32_is_a_plain_dot():
    """Float32 in full (no bfloat16 or TF32 passes: those err by 1e-3 and more); the CPU kernel sums the
    products in another order than XLA's dot, so equal to float32 rounding."""
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((3, 64), np.float32), rng.standard_normal((64, 32), np.float32)
    got = accumulating_dot_general(jnp.asarray(x), jnp.asarray(w), LINEAR)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, jnp.dot(jnp.asarray(x), jnp.asarray(w), precision="highest"), rtol=1e-6,
                               atol=1e-6 * np.abs(x @ w).max())


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


def _dot_precisions(fn, *args) -> list[str]:
    """The precision of every dot_general in ``fn``'s lowered program."""
    import re

    import jax

    text = jax.jit(fn).lower(*args).as_text()
    dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
    return [(re.search(r"precision = \[([^\]]*)\]", line) or [None, "DEFAULT"])[1] for line in dots]


def test_float32_models_ask_for_full_precision_products_and_bfloat16_models_do_not():
    """GPUs run float32 products in TF32 unless asked for HIGHEST (1e-2 logit errors on an H200, see
    bench/RESULTS.md); every product of a float32 model must ask, a bfloat16 one must not."""
    from flax import nnx

    from gemma3 import Gemma3Config, Gemma3ForConditionalGeneration
    from tests import make_checkpoints as mk

    config = Gemma3Config.from_dict({"text_config": mk.text_config_dict(), "vision_config": mk.VISION_BASE,
                                     **mk.MULTIMODAL_BASE})
    ids = jnp.full((1, 24), 5, jnp.int32)  # more rows than the CPU kernel takes: XLA's own products
    pixels = jnp.zeros((1, 3, 42, 42), jnp.float32)

    def forward(graphdef):
        def run(state, ids, pixels):
            model = nnx.merge(graphdef, state)
            return model(input_ids=ids).logits, model.get_image_features(pixels)
        return run

    for dtype in (jnp.float32, jnp.bfloat16):
        graphdef, state = nnx.split(Gemma3ForConditionalGeneration(config, dtype=dtype, rngs=nnx.Rngs(0)))
        precisions = _dot_precisions(forward(graphdef), state, ids, pixels)
        assert len(precisions) > 10  # the vision tower, projector, attention, MLPs and head
        assert all(("HIGHEST" in p) == (dtype == jnp.float32) for p in precisions), precisions
