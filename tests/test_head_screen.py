"""Models with the tied bfloat16 head screened by an int8 copy (gemma3.text.HeadScreen): the same greedy
tokens as the logits' argmax, the screen never saved, and refused where the kernel would not run it. (The
kernel's screened argmax, near ties and the bound included, is tested in test_cpu_kernels.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from gemma3 import Gemma3ForCausalLM, cpu_kernels
from tests.helpers import greedy_decode_hlo

pytestmark = pytest.mark.skipif(not cpu_kernels.int8_screen(), reason="the int8 screen needs AVX512-VNNI or AVX2")


@pytest.fixture(scope="module")
def models(text_checkpoints):
    """A tied checkpoint without final-logit softcapping (as Gemma 3's) in bfloat16 as the loader loads it on the
    CPU (screened), and without the screen."""
    path = text_checkpoints["rope_scaled"][0]
    return (Gemma3ForCausalLM.from_pretrained(path, dtype=jnp.bfloat16),
            Gemma3ForCausalLM.from_pretrained(path, dtype=jnp.bfloat16, screen_head=False))


def test_the_loader_screens_a_tied_bfloat16_head_and_greedy_tokens_stay_the_same(models):
    screened, table = models
    assert screened.screens_head() and not table.screens_head() and not screened.splits_head()
    hidden = jax.random.normal(jax.random.PRNGKey(0), (11, screened.config.hidden_size), jnp.bfloat16) * 3
    for rows in (1, 3, 8, 11):
        np.testing.assert_array_equal(np.asarray(screened.greedy_tokens(hidden[:rows])),
                                      np.asarray(table.greedy_tokens(hidden[:rows])))


def test_greedy_generate_reads_the_screen_and_takes_the_same_tokens(models, left_padded_batch):
    screened, table = models
    ids, mask = left_padded_batch
    args = dict(max_new_tokens=12, eos_token_id=[], attention_mask=mask)
    np.testing.assert_array_equal(screened.generate(ids, **args).sequences, table.generate(ids, **args).sequences)
    text = greedy_decode_hlo(screened)
    assert cpu_kernels.SCREEN_ARGMAX_TARGET in text


def test_a_screened_model_saves_the_table_alone(models, text_checkpoints, tmp_path):
    screened, _ = models
    screened.save_pretrained(tmp_path)
    saved, original = load_file(f"{tmp_path}/model.safetensors"), load_file(
        f"{text_checkpoints['base'][0]}/model.safetensors")
    assert set(saved) == set(original)


def test_screen_head_is_refused_where_the_kernel_would_not_run_it(text_checkpoints, tmp_path):
    untied = Gemma3ForCausalLM.from_pretrained(text_checkpoints["untied"][0], dtype=jnp.bfloat16)
    assert not untied.screens_head()
    with pytest.raises(ValueError, match="tied bfloat16"):
        untied.screen_head()
    f32 = Gemma3ForCausalLM.from_pretrained(text_checkpoints["rope_scaled"][0], screen_head=False)
    with pytest.raises(ValueError, match="tied bfloat16"):
        f32.screen_head()
    from gemma3 import create_mesh

    sharded = Gemma3ForCausalLM.from_pretrained(text_checkpoints["rope_scaled"][0], dtype=jnp.bfloat16,
                                                mesh=create_mesh(data=1, fsdp=2, tensor=4))
    assert not sharded.screens_head()
    with pytest.raises(ValueError, match="one device"):
        sharded.screen_head()
    # softcapped logits (the base checkpoint's): the cap's rounding could tie rows that the screen tells apart
    capped = Gemma3ForCausalLM.from_pretrained(text_checkpoints["base"][0], dtype=jnp.bfloat16)
    assert not capped.screens_head()
