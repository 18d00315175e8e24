"""Models with the tied float32 head kept as two planes of halves (gemma3.text.SplitFloat32Embed): the float32
table's logits and greedy tokens, loaded and saved as the table. (The kernel's split products and argmax, near
ties included, are tested in test_cpu_kernels.py, in every CPU-variant build.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from gemma3 import Gemma3ForCausalLM, cpu_kernels
from tests.helpers import greedy_decode_hlo


@pytest.fixture(scope="module")
def models(text_checkpoints):
    """The base checkpoint loaded as the loader does on the CPU (split) and with the float32 table."""
    path = text_checkpoints["base"][0]
    return Gemma3ForCausalLM.from_pretrained(path), Gemma3ForCausalLM.from_pretrained(path, split_head=False)


def test_the_loader_splits_a_tied_float32_head_and_logits_stay_the_same(models, left_padded_batch):
    split, table = models
    assert split.splits_head() and not table.splits_head()
    ids, mask = left_padded_batch
    a, b = split(input_ids=ids, attention_mask=mask).logits, table(input_ids=ids, attention_mask=mask).logits
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)  # past 8 rows: XLA's dot
    hidden = jax.random.normal(jax.random.PRNGKey(0), (3, split.config.hidden_size))
    np.testing.assert_allclose(np.asarray(split.apply_lm_head(hidden)), np.asarray(table.apply_lm_head(hidden)),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(split.greedy_tokens(hidden)), np.asarray(table.greedy_tokens(hidden)))


def test_greedy_generate_reads_the_split_head_and_takes_the_same_tokens(models, left_padded_batch):
    split, table = models
    ids, mask = left_padded_batch
    args = dict(max_new_tokens=12, eos_token_id=[], attention_mask=mask)
    np.testing.assert_array_equal(split.generate(ids, **args).sequences, table.generate(ids, **args).sequences)
    sampled = dict(args, temperature=0.8, seed=list(range(ids.shape[0])))
    np.testing.assert_array_equal(split.generate(ids, **sampled).sequences, table.generate(ids, **sampled).sequences)
    text = greedy_decode_hlo(split)
    assert cpu_kernels.SPLIT_ARGMAX_TARGET in text and cpu_kernels.SPLIT_PRODUCT_TARGET not in text


def test_a_split_model_saves_the_float32_table(models, text_checkpoints, tmp_path):
    split, _ = models
    split.save_pretrained(tmp_path)
    saved, original = load_file(f"{tmp_path}/model.safetensors"), load_file(
        f"{text_checkpoints['base'][0]}/model.safetensors")
    key = "model.embed_tokens.weight"
    assert saved[key].dtype == np.float32
    np.testing.assert_array_equal(saved[key], original[key])


def test_split_head_is_refused_where_the_kernel_would_not_run_it(text_checkpoints):
    untied = Gemma3ForCausalLM.from_pretrained(text_checkpoints["untied"][0])
    assert not untied.splits_head()
    with pytest.raises(ValueError, match="tied float32"):
        untied.split_head()
    from gemma3 import create_mesh

    sharded = Gemma3ForCausalLM.from_pretrained(text_checkpoints["base"][0], mesh=create_mesh(data=1, fsdp=2, tensor=4))
    assert not sharded.splits_head()
    with pytest.raises(ValueError, match="one device"):
        sharded.split_head()
    bf16 = Gemma3ForCausalLM.from_pretrained(text_checkpoints["base"][0], dtype=jnp.bfloat16)
    assert not bf16.splits_head()
