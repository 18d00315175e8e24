"""Assertions shared by the tests."""

import numpy as np


def max_error_on_mask(ours, theirs, mask) -> float:
    """Largest absolute difference over the positions where ``mask`` is set (all trailing dims)."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.abs(ours - theirs)[np.asarray(mask).astype(bool)].max())


def greedy_decode_hlo(model) -> str:
    """The HLO of ``model``'s compiled greedy decode step (gemma3.generation), to see which kernels it calls."""
    import jax.numpy as jnp

    from gemma3 import generation

    graphdef, state = generation.split_model(model)
    decode = generation._compiled(graphdef, True)[1]
    return decode.lower(state, jnp.zeros(1, jnp.int32), model.init_cache(1, 16), jnp.zeros(1, jnp.uint32),
                        jnp.int32(1), jnp.zeros(1), jnp.zeros(1, jnp.int32), jnp.ones(1)).as_text()
