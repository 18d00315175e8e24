"""Output classes are pytrees and round-trip through dicts and JSON."""

import jax
import jax.numpy as jnp
import numpy as np

from gemma3 import Gemma3CausalLMOutputWithPast, Gemma3ForCausalLM, KVCache


def test_outputs_round_trip_and_pass_through_jit(text_checkpoints):
    model = Gemma3ForCausalLM.from_pretrained(text_checkpoints["base"][0])
    cache = model.init_cache(1, 8)
    out = model(jnp.asarray([[2, 5, 9]]), past_key_values=cache, output_hidden_states=True)
    assert set(out.to_dict()) == {"logits", "past_key_values", "hidden_states"}
    back = Gemma3CausalLMOutputWithPast.from_json(out.to_json())
    assert isinstance(back.past_key_values, KVCache) and isinstance(back.hidden_states, tuple)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(back)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert Gemma3CausalLMOutputWithPast.from_dict(out.to_dict()).logits is out.logits
    doubled = jax.jit(lambda o: o.replace(logits=o.logits * 2))(out)
    np.testing.assert_allclose(np.asarray(doubled.logits), 2 * np.asarray(out.logits))
    assert doubled["past_key_values"].length.tolist() == [3]


def test_bfloat16_arrays_survive_json():
    out = Gemma3CausalLMOutputWithPast(logits=jnp.asarray([[1.5, -2.25]], jnp.bfloat16))
    back = Gemma3CausalLMOutputWithPast.from_json(out.to_json())
    assert back.logits.dtype == jnp.bfloat16 and back.logits.tolist() == [[1.5, -2.25]]


def test_causal_lm_loss_ignores_minus_100(text_checkpoints):
    model = Gemma3ForCausalLM.from_pretrained(text_checkpoints["base"][0])
    ids = jnp.asarray([[2, 5, 9, 11, 4]])
    labels = jnp.asarray([[-100, -100, 9, 11, 4]])
    out = model(ids, labels=labels)
    logp = jax.nn.log_softmax(out.logits[0, :-1], -1)
    expected = -(logp[1, 9] + logp[2, 11] + logp[3, 4]) / 3
    np.testing.assert_allclose(float(out.loss), float(expected), rtol=1e-6)
