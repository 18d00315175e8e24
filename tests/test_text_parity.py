"""Our text decoder against transformers itself, on tiny random checkpoints it wrote."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from gemma3 import Gemma3ForCausalLM, Gemma3ForSequenceClassification, text
from tests import make_checkpoints as mk
from tests.helpers import max_error_on_mask

VARIANTS = list(mk.VARIANTS)


@pytest.fixture(scope="module")
def ours(text_checkpoints):
    return {v: Gemma3ForCausalLM.from_pretrained(path) for v, (path, _) in text_checkpoints.items()}


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers_on_left_padded_batch(variant, ours, text_checkpoints, left_padded_batch):
    ids, mask = left_padded_batch
    pos = mk.hf_positions(mask)
    hf = text_checkpoints[variant][1]
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)).logits
    got = ours[variant](jnp.asarray(ids), attention_mask=jnp.asarray(mask), position_ids=jnp.asarray(pos)).logits
    assert got.shape == tuple(ref.shape)
    assert max_error_on_mask(got, ref.numpy(), mask) <= 1e-4


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_continuation_matches_transformers_generate(variant, ours, text_checkpoints, left_padded_batch):
    ids, mask = left_padded_batch
    hf = text_checkpoints[variant][1]
    with torch.no_grad():
        ref = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=20, do_sample=False)
    got = ours[variant].generate(ids, mask, max_new_tokens=20, eos_token_id=[])
    assert got.new_tokens.shape == (2, 20)
    np.testing.assert_array_equal(got.sequences, ref.numpy())


def test_a_prefill_of_many_rows_runs_its_mlp_in_parts_and_matches_transformers(ours, text_checkpoints, monkeypatch):
    """A prompt whose MLP outputs exceed MLP_PART_BYTES (3 x 95 rows: two parts, the second padded by a row)
    gives transformers' logits and greedy tokens."""
    ids = np.random.default_rng(5).integers(3, mk.TEXT_BASE["vocab_size"], (3, 95))
    row_bytes = 12 * mk.TEXT_BASE["intermediate_size"]
    monkeypatch.setattr(text, "MLP_PART_BYTES", 150 * row_bytes)  # this model's MLP is far under the default
    hf = text_checkpoints["base"][1]
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids)).logits
        ref_tokens = hf.generate(torch.tensor(ids), max_new_tokens=4, do_sample=False)
    got = ours["base"](jnp.asarray(ids)).logits
    assert max_error_on_mask(got, ref.numpy(), np.ones(ids.shape, bool)) <= 1e-4
    np.testing.assert_array_equal(ours["base"].generate(ids, max_new_tokens=4, eos_token_id=[]).sequences,
                                  ref_tokens.numpy())


def test_left_padding_gives_the_unpadded_logits(ours, left_padded_batch):
    """Without explicit positions: a left-padded row equals the same tokens alone."""
    ids, mask = left_padded_batch
    model = ours["base"]
    padded = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits
    alone = model(jnp.asarray(ids[:1, 3:])).logits
    np.testing.assert_allclose(np.asarray(padded[0, 3:]), np.asarray(alone[0]), atol=1e-5)


def test_hidden_states_and_attentions_match_transformers(ours, text_checkpoints, left_padded_batch):
    ids = left_padded_batch[0][1:]
    hf = text_checkpoints["base"][1]
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), output_hidden_states=True, output_attentions=True)
    got = ours["base"](jnp.asarray(ids), output_hidden_states=True, output_attentions=True)
    assert len(got.hidden_states) == len(ref.hidden_states) == hf.config.num_hidden_layers + 1
    for a, b in zip(got.hidden_states, ref.hidden_states):
        np.testing.assert_allclose(np.asarray(a), b.numpy(), atol=1e-4, rtol=1e-5)
    assert len(got.attentions) == len(ref.attentions) == hf.config.num_hidden_layers
    for a, b in zip(got.attentions, ref.attentions):
        assert a.shape == tuple(b.shape)
        np.testing.assert_allclose(np.asarray(a), b.numpy(), atol=1e-5)


def test_softcapping_bounds_the_logits(ours, left_padded_batch):
    ids = jnp.asarray(left_padded_batch[0][1:])
    model = ours["base"]
    logits = model(ids).logits
    assert float(jnp.abs(logits).max()) < model.config.final_logit_softcapping
    raw = model.get_decoder()(ids).last_hidden_state
    uncapped = model.get_embedding().attend(raw)
    assert float(jnp.abs(uncapped).max()) > model.config.final_logit_softcapping  # the cap really bites here
    np.testing.assert_allclose(np.asarray(logits), 30.0 * np.tanh(np.asarray(uncapped) / 30.0), atol=1e-5)


def test_accessors(ours):
    model = ours["base"]
    assert model.get_encoder() is None
    assert model.get_lm_head() is None  # tied: the head is the embedding
    assert ours["untied"].get_lm_head() is not None
    assert model.get_decoder() is model.model and model.get_embedding() is model.model.embed_tokens


def test_sequence_classification_matches_transformers(tmp_path, left_padded_batch):
    hf = mk.hf_text_model("base", seed=3, cls_name="Gemma3TextForSequenceClassification", num_labels=3)
    hf.save_pretrained(tmp_path)
    ids, mask = left_padded_batch
    right = ids.copy()
    right[0] = np.concatenate([ids[0, 3:], [0, 0, 0]])  # right padding too: pooling takes the rightmost real token
    batch = np.concatenate([ids, right[:1]])
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(batch)).logits.numpy()
    model = Gemma3ForSequenceClassification.from_pretrained(tmp_path)
    got = model(jnp.asarray(batch)).logits
    assert got.shape == (3, 3)
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-4)
