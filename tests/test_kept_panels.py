"""bfloat16 layer weights kept as the CPU kernel's pair panels (`cpu_kernels.to_panels`, `keep_panels` of the
causal-LM classes): the same products at every row count, derivatives through the unpacked weights, the loader
keeping them where the kernel's GEMM multiplies pairs (AMX tiles, AVX512-BF16), and the checkpoint written back as
it was."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from gemma3 import Gemma3ForCausalLM, cpu_kernels
from tests import make_checkpoints as mk

kept_here = pytest.mark.skipif(not cpu_kernels.keeps_panels(), reason="weights are kept as panels only where the "
                               "GEMM multiplies bfloat16 pairs (AMX tiles, or AVX512-BF16 that outpaces float32 FMAs)")


@pytest.mark.parametrize("k,n", [(64, 64), (1030, 192), (640, 128)])
def test_kept_products_match_float64_at_every_row_count(k, n):
    """One row (three panels at a time, and the rest), 2-16 rows (a tile a panel), more (AMX: depth blocks of 256,
    blocks of 128 rows; AVX512-BF16: a panel at a time up to 510 rows, then depth blocks); without pair products,
    XLA's dot on the weights unpacked."""
    rng = np.random.default_rng(k + n)
    w = jnp.asarray(rng.standard_normal((k, n)), jnp.bfloat16)
    kept = cpu_kernels.to_panels(w)
    assert kept.shape == (n // 64, k // 2, 128)
    np.testing.assert_array_equal(np.asarray(cpu_kernels.from_panels(kept)), np.asarray(w))
    product = jax.jit(lambda x, kept: cpu_kernels.kept_matmul(x, kept, jnp.float32))
    for rows in (1, 2, 5, 8, 9, 16, 17, 37, 130, 300, 530):
        x = jnp.asarray(rng.standard_normal((rows, k)), jnp.bfloat16)
        want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
        got = np.asarray(product(x, kept), np.float64)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_derivatives_flow_through_the_unpacked_weights():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((128, 64)), jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((3, 128)), jnp.bfloat16)

    def kept_loss(x, kept):
        return jnp.sum(cpu_kernels.kept_matmul(x, kept, jnp.float32) ** 2)

    def plain_loss(x, w):
        return jnp.sum(jax.lax.dot_general(x, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32) ** 2)

    dx, dkept = jax.grad(kept_loss, argnums=(0, 1))(x, cpu_kernels.to_panels(w))
    want_dx, want_dw = jax.grad(plain_loss, argnums=(0, 1))(x, w)
    np.testing.assert_allclose(np.asarray(dx, np.float32), np.asarray(want_dx, np.float32), rtol=2e-2, atol=0.5)
    np.testing.assert_allclose(np.asarray(cpu_kernels.from_panels(dkept), np.float32),
                               np.asarray(want_dw, np.float32), rtol=2e-2, atol=0.5)


@pytest.fixture(scope="module")
def panel_checkpoint(tmp_path_factory):
    """A checkpoint whose every layer weight fits whole panels (64 columns), GQA and a sliding window."""
    path = str(tmp_path_factory.mktemp("panels"))
    mk.save_text_checkpoint(path, "rope_scaled", seed=3, hidden_size=128,
                            intermediate_size=256, head_dim=32, num_attention_heads=4, num_key_value_heads=2)
    return path


@kept_here
def test_the_loader_keeps_panels_and_the_model_answers_as_before(panel_checkpoint, left_padded_batch, tmp_path):
    kept = Gemma3ForCausalLM.from_pretrained(panel_checkpoint, dtype=jnp.bfloat16)
    plain = Gemma3ForCausalLM.from_pretrained(panel_checkpoint, dtype=jnp.bfloat16, keep_panels=False)
    assert kept.keeps_panels() and not plain.keeps_panels()
    layer = kept.model.layers[0]
    assert all(linear.kernel[...].ndim == 3 for linear in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                           layer.mlp.gate_proj, layer.mlp.down_proj))
    ids, mask = left_padded_batch
    ours, theirs = kept(ids, attention_mask=mask).logits, plain(ids, attention_mask=mask).logits
    np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(theirs, np.float32), rtol=0.05,
                               atol=0.05 * float(jnp.abs(theirs.astype(jnp.float32)).max()))
    for batch in (ids[:1], ids):  # one row decodes three panels at a time; two rows in tiles
        args = dict(max_new_tokens=8, eos_token_id=[], attention_mask=mask[:len(batch)])
        np.testing.assert_array_equal(kept.generate(batch, **args).sequences, plain.generate(batch, **args).sequences)
    kept.save_pretrained(tmp_path / "kept")
    plain.save_pretrained(tmp_path / "plain")
    saved, want = load_file(f"{tmp_path}/kept/model.safetensors"), load_file(f"{tmp_path}/plain/model.safetensors")
    assert set(saved) == set(want)
    for name, tensor in want.items():
        np.testing.assert_array_equal(saved[name], tensor, err_msg=name)


def test_keep_panels_is_refused_where_the_kernel_would_not_run_it(panel_checkpoint):
    f32 = Gemma3ForCausalLM.from_pretrained(panel_checkpoint, dtype=jnp.float32)
    assert not f32.keeps_panels()
    with pytest.raises(ValueError, match="pairs"):
        f32.keep_panels()
