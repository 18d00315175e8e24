"""Sampling semantics and generate's stopping rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma3 import Gemma3ForCausalLM, sample_tokens
from tests.make_checkpoints import TEXT_BASE


@pytest.fixture(scope="module")
def model(text_checkpoints):
    return Gemma3ForCausalLM.from_pretrained(text_checkpoints["base"][0])


def _sample(logits, n, temperature=1.0, top_k=0, top_p=1.0):
    b = logits.shape[0]
    keys = jax.random.split(jax.random.PRNGKey(0), n * b).reshape(n, b, 2)
    f = jax.jit(jax.vmap(lambda k: sample_tokens(logits, k, jnp.full((b,), temperature), jnp.full((b,), top_k),
                                                 jnp.full((b,), top_p))))
    return np.asarray(f(keys))


def test_greedy_is_argmax_and_zero_temperature_ignores_the_key():
    logits = jax.random.normal(jax.random.PRNGKey(1), (4, 50))
    np.testing.assert_array_equal(_sample(logits, 8, temperature=0.0), np.tile(np.argmax(logits, -1), (8, 1)))


def test_top_k_keeps_only_the_k_best():
    logits = jnp.asarray([[0.0, 3.0, 2.9, -1.0, 2.8, 0.5]])
    drawn = set(_sample(logits, 400, temperature=5.0, top_k=2).ravel().tolist())
    assert drawn == {1, 2}


def test_top_p_keeps_the_smallest_nucleus():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.asarray(np.log(probs))[None]
    drawn = _sample(logits, 2000, top_p=0.75).ravel()
    assert set(drawn.tolist()) == {0, 1}  # 0.5 < 0.75, 0.5 + 0.3 covers it
    assert abs((drawn == 0).mean() - 0.5 / 0.8) < 0.05  # renormalised within the nucleus


def test_temperature_flattens_the_distribution():
    logits = jnp.asarray([[2.0, 0.0]])
    cold = (_sample(logits, 2000, temperature=0.5) == 0).mean()
    hot = (_sample(logits, 2000, temperature=4.0) == 0).mean()
    assert abs(cold - 1 / (1 + np.exp(-4.0))) < 0.04 and abs(hot - 1 / (1 + np.exp(-0.5))) < 0.04


def test_seeds_reproduce_and_rows_do_not_depend_on_batchmates(model):
    ids = np.array([[2, 10, 20, 30, 40], [2, 11, 21, 31, 41]])
    kw = dict(max_new_tokens=10, temperature=20.0, eos_token_id=[])  # this random model is very peaked
    a = model.generate(ids, seed=[7, 8], **kw).new_tokens
    b = model.generate(ids, seed=[7, 8], **kw).new_tokens
    np.testing.assert_array_equal(a, b)
    alone = model.generate(ids[1:], seed=8, **kw).new_tokens
    np.testing.assert_array_equal(a[1:], alone)
    other = model.generate(ids, seed=[9, 8], **kw).new_tokens
    assert (other[0] != a[0]).any()


def test_a_one_row_batch_decoded_as_two_rows_gives_the_same_tokens(model, monkeypatch):
    """On GPUs a one-row batch decodes as two copies of its row (XLA's one-row products are slow there);
    the answer, the stop and the count must be those of the row decoded alone."""
    from gemma3 import generation

    ids = np.array([[2, 10, 20, 30, 40]])
    kw = dict(max_new_tokens=12, temperature=20.0, seed=5)
    alone = model.generate(ids, eos_token_id=[], **kw)
    stop = int(alone.new_tokens[0, 6])
    alone_stopped = model.generate(ids, eos_token_id=[stop], **kw)
    assert alone_stopped.num_new_tokens[0] < 12
    compiled = []
    loop = generation._compiled_loop
    monkeypatch.setattr(generation, "decodes_one_row_as_two", lambda: True)
    monkeypatch.setattr(generation, "_compiled_loop", lambda *a: compiled.append(a[1:]) or loop(*a))
    twice = model.generate(ids, eos_token_id=[], **kw)
    twice_stopped = model.generate(ids, eos_token_id=[stop], **kw)
    assert [c[1] for c in compiled] == [True, True]  # (size, twice, greedy)
    np.testing.assert_array_equal(twice.new_tokens, alone.new_tokens)
    np.testing.assert_array_equal(twice_stopped.new_tokens, alone_stopped.new_tokens)
    np.testing.assert_array_equal(twice_stopped.num_new_tokens, alone_stopped.num_new_tokens)
    model.generate(np.repeat(ids, 2, 0), eos_token_id=[], **kw)
    assert [c[1] for c in compiled] == [True, True, False]  # only a one-row batch


def test_greedy_generate_compiles_the_argmax_alone_and_agrees_with_the_sampler(model):
    """An all-greedy generate compiles programs without the sampler (its top-k, sorts and draws are most
    of a sampling step's compiled code); a greedy row decoded beside a sampled one takes the same tokens."""
    from flax import nnx

    from gemma3 import generation

    ids = np.array([[2, 10, 20, 30, 40], [2, 10, 20, 30, 40]])
    greedy = model.generate(ids[:1], max_new_tokens=10, eos_token_id=[])
    mixed = model.generate(ids, max_new_tokens=10, eos_token_id=[], temperature=[0.0, 1.0], seed=[0, 3])
    np.testing.assert_array_equal(mixed.new_tokens[0], greedy.new_tokens[0])
    graphdef, _ = nnx.split(model)
    args = (jnp.zeros((1, model.config.vocab_size)), jnp.zeros(1, jnp.uint32), jnp.zeros(1), jnp.zeros(1, jnp.int32),
            jnp.ones(1))
    texts = {g: generation._compiled(graphdef, g)[2].lower(*args).as_text() for g in (True, False)}
    assert "stablehlo.sort" in texts[False] and "stablehlo.sort" not in texts[True]
    assert len(texts[True]) < len(texts[False]) / 5


def test_stop_tokens_end_a_row_and_pad_after(model):
    ids = np.array([[2, 10, 20, 30, 40], [2, 50, 60, 70, 80]])
    free = model.generate(ids, max_new_tokens=12, eos_token_id=[]).new_tokens
    stop = int(free[0, 3])
    out = model.generate(ids, max_new_tokens=12, eos_token_id=[], stop_token_ids=[stop])
    first = int(np.argmax(free[0] == stop))
    assert out.num_new_tokens[0] == first + 1
    np.testing.assert_array_equal(out.new_tokens[0, :first + 1], free[0, :first + 1])
    assert (out.new_tokens[0, first + 1:] == model.config.pad_token_id).all()
    if stop not in free[1]:
        np.testing.assert_array_equal(out.new_tokens[1], free[1])


def test_invalid_sampling_values_are_rejected(model):
    with pytest.raises(ValueError, match="temperature"):
        model.generate([[2, 3]], temperature=-1.0, max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        model.generate([[2, 3]], top_p=0.0, max_new_tokens=2)


def test_generation_hooks_drive_a_manual_loop_like_generate(model, left_padded_batch):
    """prepare_inputs_for_generation / update_inputs_for_generation, as an external loop uses them."""
    ids, mask = left_padded_batch
    want = model.generate(ids, mask, max_new_tokens=8, eos_token_id=[]).new_tokens
    kwargs = model.prepare_inputs_for_generation(jnp.asarray(ids), max_length=ids.shape[1] + 8,
                                                 attention_mask=jnp.asarray(mask))
    assert kwargs["past_key_values"].max_length == ids.shape[1] + 8
    out = model(jnp.asarray(ids), **kwargs)
    got = []
    for _ in range(8):
        token = jnp.argmax(out.logits[:, -1], axis=-1)
        got.append(np.asarray(token))
        kwargs = model.update_inputs_for_generation(out, kwargs)
        assert kwargs["attention_mask"].shape == (2, 1)
        out = model(token[:, None], **kwargs)
    np.testing.assert_array_equal(np.stack(got, axis=1), want)


def test_top_k_holds_for_flat_distributions_under_jit():
    """Regression: with top_p = 1 the float32 cumulative mass can stay below 1, which once let every
    token past the top-k cut. Each draw must come from its row's k best."""
    rows, vocab, k = 16, 1000, 5
    logits = jax.random.normal(jax.random.PRNGKey(3), (rows, vocab))
    f = jax.jit(lambda keys, t: sample_tokens(logits, keys, t, jnp.full((rows,), k), jnp.ones((rows,))))
    best = np.argsort(-np.asarray(logits), axis=-1)[:, :k]
    for i in range(30):
        keys = jax.random.split(jax.random.PRNGKey(i), rows)
        drawn = np.asarray(f(keys, jnp.full((rows,), 10.0)))
        assert all(drawn[r] in best[r] for r in range(rows))


def test_argmax_is_jnp_argmax_first_maximum_included():
    from gemma3.generation import argmax

    rng = np.random.default_rng(4)
    for vocab in (160, 600, 1000, 1024 + 64):
        x = rng.integers(0, 7, (6, vocab)).astype(np.float32)  # many ties: the first maximum must win
        x[2, :] = 0.0
        x[3, -1] = 99.0
        np.testing.assert_array_equal(np.asarray(jax.jit(argmax)(jnp.asarray(x))), np.argmax(x, axis=-1))


def _frequencies(tokens, vocab):
    return np.bincount(np.asarray(tokens).ravel(), minlength=vocab) / np.asarray(tokens).size


def test_unfiltered_draws_follow_the_softmax_across_vocabulary_blocks():
    """Pure temperature sampling draws a block of the vocabulary, then a token inside it; the tokens
    sit on both sides of a block boundary and in the padded last block."""
    vocab = 600
    logits = np.full((1, vocab), -30.0, np.float32)
    hot = [3, 100, 511, 512, 513, 599]
    logits[0, hot] = [1.0, 0.0, 2.0, 1.5, -0.5, 0.5]
    want = np.exp(logits[0] - logits[0].max())
    want /= want.sum()
    got = _frequencies(_sample(jnp.asarray(logits), 6000), vocab)
    assert set(np.flatnonzero(got)) <= set(hot)
    np.testing.assert_allclose(got[hot], want[hot], atol=0.025)


def test_a_nucleus_inside_the_candidates_and_one_past_them_keep_the_same_rule():
    """top_p without top_k: a peaked row's nucleus lies inside the CANDIDATES best tokens (measured
    against the whole vocabulary's mass); a flat row's does not and is drawn from the sorted
    vocabulary. Both draw only from their nucleus, in proportion, and a row draws the same token
    whether or not its batch holds a row of the other kind."""
    from gemma3.generation import CANDIDATES

    vocab, top_p = 2000, 0.8
    rng = np.random.default_rng(5)
    peaked = rng.normal(size=vocab).astype(np.float32)
    peaked[:8] += 9.0  # the nucleus: a few of these 8
    flat = rng.normal(size=vocab).astype(np.float32) * 0.1
    for row in (peaked, flat):
        order = np.argsort(-row)
        p = np.exp(row[order] - row.max())
        p /= p.sum()
        nucleus = order[(np.cumsum(p) - p) < top_p]
        assert (len(nucleus) <= CANDIDATES) == (row is peaked)
        got = _frequencies(_sample(jnp.asarray(row[None]), 4000, top_p=top_p), vocab)
        assert set(np.flatnonzero(got)) <= set(nucleus)
        if row is peaked:
            want = np.exp(row[nucleus] - row.max())
            np.testing.assert_allclose(got[nucleus], want / want.sum(), atol=0.03)
    both = jnp.asarray(np.stack([peaked, flat]))
    keys = jax.random.split(jax.random.PRNGKey(6), 64 * 2).reshape(64, 2, 2)
    draw = jax.jit(jax.vmap(lambda k, x: sample_tokens(x, k, jnp.ones(x.shape[0]), jnp.zeros(x.shape[0], jnp.int32),
                                                       jnp.full(x.shape[0], top_p)), in_axes=(0, None)))
    together = np.asarray(draw(keys, both))
    alone = np.asarray(draw(keys[:, :1], both[:1]))
    np.testing.assert_array_equal(together[:, 0], alone[:, 0])


_LOOPS_IN_BFLOAT16 = """
import jax.numpy as jnp
from flax import nnx
from gemma3 import Gemma3ForCausalLM, Gemma3TextConfig
from lm_worker.engine import Engine, Request
from tests.make_checkpoints import TEXT_BASE

model = Gemma3ForCausalLM(Gemma3TextConfig.from_dict({**TEXT_BASE, "vocab_size": 4096}), dtype=jnp.bfloat16,
                          rngs=nnx.Rngs(0))
model.generate([[2, 5, 6, 7]], max_new_tokens=4, eos_token_id=[])
engine = Engine(model, num_slots=2, max_length=32, max_queue=4, prefill_buckets=(8,)).start()
request = Request(prompt_ids=[2, 5, 6, 7], max_new_tokens=4)
engine.submit(request)
assert len(list(request.stream(timeout=120))) == 5  # four tokens and the finish
engine.stop()
"""


def test_bfloat16_decode_loops_widen_neither_the_embedding_nor_the_cache(tmp_path):
    """A bfloat16 model's decode loops (generate's and the serving engine's) on the CPU: XLA gathers
    bfloat16 rows from a float32 conversion of the table, and hoisting that conversion out of the loop
    built a float32 copy of the whole embedding on every call (gemma3.generation.loop_compiler_options);
    and it has no bfloat16 scatter, so writing a step's keys widened every cache buffer to float32 and
    back (gemma3.cache.stored_dtype); every layer attends in the CPU kernel (gemma3.cpu_kernels.attention).
    Read from the programs XLA compiled (its HLO dump)."""
    import os
    import re
    import subprocess
    import sys

    dump = tmp_path / "hlo"
    done = subprocess.run([sys.executable, "-c", _LOOPS_IN_BFLOAT16], capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(__file__)),
                          env={**os.environ, "XLA_FLAGS": f"--xla_dump_to={dump} --xla_dump_hlo_as_text"})
    assert done.returncode == 0, done.stderr[-3000:]
    loops = {}
    for name in os.listdir(dump):
        if name.endswith("cpu_after_optimizations.txt") and ("jit_loop" in name or "jit_decode" in name):
            text = (dump / name).read_text()
            if " while(" in text:
                loops[name] = text
    assert len(loops) >= 2, sorted(os.listdir(dump))  # generate's loop and the engine's decode
    for name, text in loops.items():
        assert "bf16[4096,64]" in text, name  # the table is there, in its own dtype
        # a conversion fused into the gather reads only the gathered rows; one of its own is a new buffer
        assert "= f32[4096,64]{1,0} fusion(" not in text, f"{name} converts the whole embedding table to float32"
        # the cache's (batch, entries, kv heads, head dim) buffers are written as they are stored (one row:
        # XLA makes the scatter a dynamic-update-slice)
        writes = set(re.findall(r"= (\w+)\[\d+,\d+,\d+,\d+\]\S* (?:scatter|dynamic-update-slice)\(", text))
        assert writes == {"u16"}, f"{name} writes the cache as {writes}, not as bfloat16's bits"
        # every layer attends in the CPU kernel, which reads the cache in place (XLA's dots copied it transposed)
        calls = text.count('custom_call_target="gemma3_attention"')
        assert calls == TEXT_BASE["num_hidden_layers"], f"{name} attends in the kernel {calls} times"


def test_generate_walks_the_module_graph_once_per_structure_and_reads_weights_afresh(text_checkpoints, monkeypatch):
    from flax import nnx

    from gemma3 import generation

    model = Gemma3ForCausalLM.from_pretrained(text_checkpoints["base"][0])
    ids = np.array([[2, 10, 20, 30, 40]])
    real, walks = nnx.split, []
    monkeypatch.setattr(nnx, "split", lambda *a, **k: walks.append(1) or real(*a, **k))
    first = model.generate(ids, max_new_tokens=6, eos_token_id=[]).new_tokens
    np.testing.assert_array_equal(model.generate(ids, max_new_tokens=6, eos_token_id=[]).new_tokens, first)
    assert len(walks) == 1

    # weights replaced in place: the same structure, so no new walk, and the new arrays are the ones used
    # ((1 + w) = -1 in the final norm turns the logits around: the copied token comes last)
    _, state = real(model)
    state["model"]["norm"]["weight"] = nnx.Param(jnp.full_like(model.model.norm.weight[...], -2.0))
    nnx.update(model, state)
    after = model.generate(ids, max_new_tokens=6, eos_token_id=[]).new_tokens
    assert len(walks) == 1
    assert all(a is b for a, b in zip(jax.tree.leaves(generation.split_model(model)[1]), jax.tree.leaves(model)))
    reference = nnx.merge(*real(model)).generate(ids, max_new_tokens=6, eos_token_id=[]).new_tokens
    np.testing.assert_array_equal(after, reference)
    assert not np.array_equal(after, first)

    # a changed structure is walked again
    model.extra = nnx.Param(jnp.zeros(3))
    walks.clear()
    np.testing.assert_array_equal(model.generate(ids, max_new_tokens=6, eos_token_id=[]).new_tokens, after)
    assert walks


def test_generate_compiles_its_programs_once_and_before_it_allocates_the_cache(model, monkeypatch):
    """At a new shape the prefill, first-token and loop programs compile first, each once (their calls
    then find them compiled), and only then is the cache made (its own small program compiles there)."""
    from gemma3 import generation, heap

    generation._knows_option("xla_cpu_use_fusion_emitters", False)  # the one-time probe of the compiler
    jax.clear_caches()  # whatever an earlier test compiled at these shapes compiles again here
    monkeypatch.setattr(generation, "_precompiled", set())
    events = []
    real_init = type(model).init_cache

    def init_cache(self, *args):
        events.append("cache")
        made = real_init(self, *args)
        if isinstance(made.length, jax.core.Tracer):  # generate's abstract one, for compiling: not a cache
            events.pop()
        return made

    monkeypatch.setattr(type(model), "init_cache", init_cache)
    listener = lambda event, duration, **_: event == heap.COMPILE_EVENT and events.append("compile")  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        ids = np.full((3, 21), 7)
        first = model.generate(ids, max_new_tokens=5, eos_token_id=[]).new_tokens
        assert events == ["compile"] * 3 + ["cache", "compile"]
        events.clear()
        np.testing.assert_array_equal(model.generate(ids, max_new_tokens=5, eos_token_id=[]).new_tokens, first)
        assert events == ["cache"]
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_a_generate_with_a_large_cache_hands_the_freed_heap_back(model, monkeypatch):
    from gemma3 import heap

    ids = np.full((1, 5), 7)
    model.generate(ids, max_new_tokens=4, eos_token_id=[])  # compiled (each compile also trims)
    calls = []
    monkeypatch.setattr(heap, "release", lambda: calls.append(1))
    model.generate(ids, max_new_tokens=4, eos_token_id=[])
    assert calls == []  # this model's cache is far under the threshold: no trim on a short call
    monkeypatch.setattr(heap, "LARGE_BYTES", 1)
    model.generate(ids, max_new_tokens=4, eos_token_id=[])
    assert calls == [1, 1]  # before its cache is made, and at its end
