"""Tensor- and fsdp-sharded models on 8 forced CPU devices give the single-device results."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from gemma3 import Gemma3ForCausalLM, create_mesh
from gemma3.sharding import cache_sharding


@pytest.fixture(scope="module")
def single(text_checkpoints):
    return Gemma3ForCausalLM.from_pretrained(text_checkpoints["base"][0])


def test_eight_devices_are_forced():
    assert len(jax.devices()) == 8


@pytest.mark.parametrize("axes", [dict(tensor=4, fsdp=2), dict(fsdp=8, tensor=1), dict(data=2, tensor=4)],
                         ids=["tensor4-fsdp2", "fsdp8", "data2-tensor4"])
def test_sharded_forward_and_generate_equal_single_device(axes, single, text_checkpoints, left_padded_batch):
    mesh = create_mesh(**axes)
    model = Gemma3ForCausalLM.from_pretrained(text_checkpoints["base"][0], mesh=mesh)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    q = attn.q_proj.kernel.get_value()
    assert q.sharding.spec == P("fsdp", "tensor")
    assert attn.o_proj.kernel.get_value().sharding.spec == P("tensor", "fsdp")
    assert mlp.down_proj.kernel.get_value().sharding.spec == P("tensor", "fsdp")
    assert model.model.embed_tokens.embedding.get_value().sharding.spec == P("tensor", "fsdp")
    assert attn.q_norm.weight.get_value().sharding.is_fully_replicated  # norms
    shard = q.addressable_shards[0].data.shape
    assert shard == (q.shape[0] // mesh.shape["fsdp"], q.shape[1] // mesh.shape["tensor"])
    assert len({d for s in q.addressable_shards for d in [s.device]}) == 8

    ids, mask = left_padded_batch
    ref = single(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits
    got = jax.jit(lambda i, m: model(i, attention_mask=m).logits)(jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5)

    want = single.generate(ids, mask, max_new_tokens=12, eos_token_id=[])
    out = model.generate(ids, mask, max_new_tokens=12, eos_token_id=[], mesh=mesh)
    np.testing.assert_array_equal(out.sequences, want.sequences)


def test_cache_is_sharded_over_batch_and_kv_heads(single):
    mesh = create_mesh(data=2, tensor=2, fsdp=2)
    cache = single.init_cache(batch_size=4, max_length=16)
    shardings = cache_sharding(cache, mesh)
    assert shardings.keys[0].spec == P(("data", "fsdp"), None, "tensor", None)
    assert shardings.length.spec == P(("data", "fsdp"))


def test_axes_that_do_not_divide_a_dimension_are_dropped():
    from gemma3.sharding import parameter_spec

    mesh = create_mesh(tensor=8)
    assert parameter_spec("model.layers.0.self_attn.k_proj.kernel", (64, 12), mesh) == P("fsdp", None)
    assert parameter_spec("model.layers.0.self_attn.k_proj.kernel", (64, 32), mesh) == P("fsdp", "tensor")


def test_mesh_sizes_are_checked():
    with pytest.raises(ValueError, match="needs 6 devices"):
        create_mesh(data=2, tensor=3, fsdp=1)
    assert dict(create_mesh().shape) == {"data": 1, "fsdp": 1, "tensor": 8}
    assert dict(create_mesh(data=-1, tensor=2).shape) == {"data": 4, "fsdp": 1, "tensor": 2}


def test_a_sharded_engine_reuses_kept_rows_without_compiling_again(single, text_checkpoints):
    """On an 8-device mesh the engine's kept rows and their cut copies keep the cache's layout: prompts that
    start from them (a next turn, a shared prefix past the window, split and reused) answer as on one device,
    and a second round of such prompts compiles nothing."""
    from lm_worker.engine import Engine, Request, Token

    mesh = create_mesh(tensor=4, fsdp=2)
    sharded = Gemma3ForCausalLM.from_pretrained(text_checkpoints["base"][0], mesh=mesh)
    kw = dict(num_slots=2, max_length=48, prefill_buckets=(8, 16, 48), prefill_chunk=8)
    engines = Engine(sharded, mesh=mesh, **kw).start(), Engine(single, prefix_rows=0, **kw).start()
    rng = np.random.default_rng(4)

    def rounds():
        system = [2] + rng.integers(3, 160, 19).tolist()
        chats = [system + [k] + rng.integers(3, 160, 4).tolist() for k in (3, 4, 5)]
        return chats + [chats[0] + rng.integers(3, 160, 6).tolist()]  # the first chat's next turn

    def answers(engine, prompts):
        out = []
        for p in prompts:
            r = engine.submit(Request(prompt_ids=p, max_new_tokens=4))
            out.append(([e.token_id for e in r.stream(timeout=60) if isinstance(e, Token)], r.cached_tokens))
        return out

    try:
        device = engines[0].device
        for i in range(2):
            prompts = rounds()
            got, want = answers(engines[0], prompts), answers(engines[1], prompts)
            assert [tokens for tokens, _ in got] == [tokens for tokens, _ in want]
            assert [cached for _, cached in got] == [0, 0, 20, 25]  # (the split at 20; the whole first chat)
            if i == 0:
                compiled = [p._cache_size() for p in (device._prefill, device._extend, device._cut)]
        assert [p._cache_size() for p in (device._prefill, device._extend, device._cut)] == compiled
    finally:
        for e in engines:
            e.stop()
