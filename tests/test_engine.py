"""The continuous-batching engine: each request gets exactly what it would get alone."""

import threading
import time

import numpy as np
import pytest

from gemma3 import Gemma3ForCausalLM
from lm_worker.engine import Engine, Finished, QueueFull, Request, Token


@pytest.fixture(scope="module")
def model(text_checkpoints):
    return Gemma3ForCausalLM.from_pretrained(text_checkpoints["base"][0])


@pytest.fixture(scope="module")
def engine(model):
    eng = Engine(model, num_slots=3, max_length=48, max_queue=16, prefill_buckets=(8, 16, 48)).start()
    yield eng
    eng.stop()


def _collect(request, timeout=60):
    tokens, finish = [], None
    for event in request.stream(timeout=timeout):
        if isinstance(event, Token):
            tokens.append(event.token_id)
        else:
            finish = event
    return tokens, finish


def _alone(model, r: Request):
    out = model.generate([r.prompt_ids], max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                         top_k=r.top_k, top_p=r.top_p, seed=r.seed, eos_token_id=[],
                         stop_token_ids=sorted(r.stop_token_ids))
    return out.new_tokens[0, : out.num_new_tokens[0]].tolist()


def test_concurrent_requests_equal_their_solo_runs(model, engine):
    rng = np.random.default_rng(0)
    requests = []
    for i, n in enumerate([3, 9, 14, 6, 20, 11, 5]):  # more requests than slots: queueing and slot reuse
        sampled = i % 2 == 1
        requests.append(Request(prompt_ids=[2] + rng.integers(3, 160, n).tolist(), max_new_tokens=4 + 3 * i,
                                temperature=20.0 if sampled else 0.0, top_k=40 if sampled else 0, seed=i))
    for r in requests:
        engine.submit(r)
    for r in requests:
        tokens, finish = _collect(r)
        assert finish == Finished("length")
        assert tokens == _alone(model, r), f"request {r.id}"
    assert engine.free_slots == 3


def test_stop_tokens_finish_early(model, engine):
    prompt = [2, 40, 41, 42, 43]
    free = _alone(model, Request(prompt_ids=prompt, max_new_tokens=10))
    r = engine.submit(Request(prompt_ids=prompt, max_new_tokens=10, stop_token_ids=frozenset({free[2]})))
    tokens, finish = _collect(r)
    assert finish == Finished("stop") and tokens == free[: free.index(free[2]) + 1]


def test_cancel_frees_the_slot_and_spares_the_others(model):
    eng = Engine(model, num_slots=3, max_length=48, prefill_buckets=(8, 16, 48))  # driven step by step
    requests = [eng.submit(Request(prompt_ids=[2, 7 + i, 8, 9], max_new_tokens=12)) for i in range(3)]
    eng._admit()
    eng._step()
    requests[0].cancel()
    eng._step()
    assert eng.free_slots == 1
    tokens, finish = _collect(requests[0])
    assert finish == Finished("cancelled") and len(tokens) == 2
    while eng.free_slots < 3:
        eng._step()
    for r in requests[1:]:
        assert _collect(r) == (_alone(model, r), Finished("length"))


def test_deadlines_end_requests_waiting_or_decoding(model):
    """Driven step by step (engine not started), so the timing is the test's, not the machine's."""
    eng = Engine(model, num_slots=2, max_length=48, prefill_buckets=(8, 16, 48))
    late = eng.submit(Request(prompt_ids=[2, 5, 6], deadline=time.monotonic() - 1))
    running = eng.submit(Request(prompt_ids=[2, 5, 6], max_new_tokens=40))
    eng._admit()
    assert _collect(late) == ([], Finished("deadline"))
    assert isinstance(running.events.get(timeout=1), Token) and eng.free_slots == 1
    eng._step()
    assert isinstance(running.events.get(timeout=1), Token)
    running.deadline = time.monotonic() - 1
    eng._step()
    assert running.events.get(timeout=1) == Finished("deadline") and eng.free_slots == 2


def test_bad_requests_are_refused_up_front(engine):
    with pytest.raises(ValueError, match="exceeds the context of 48 tokens"):
        engine.submit(Request(prompt_ids=list(range(40)), max_new_tokens=10))
    with pytest.raises(ValueError, match="empty"):
        engine.submit(Request(prompt_ids=[], max_new_tokens=1))


def test_full_queue_is_refused(model):
    eng = Engine(model, num_slots=1, max_length=48, max_queue=2, prefill_buckets=(8, 48))  # not started
    eng.submit(Request(prompt_ids=[2, 3]))
    eng.submit(Request(prompt_ids=[2, 3]))
    with pytest.raises(QueueFull):
        eng.submit(Request(prompt_ids=[2, 3]))


def test_a_failing_prefill_fails_only_its_request(model, engine):
    bad = engine.submit(Request(prompt_ids=[2, 3, 4], prefill_inputs={"image_features": np.zeros((1, 9, 64))}))
    good = engine.submit(Request(prompt_ids=[2, 3, 4], max_new_tokens=5))
    tokens, finish = _collect(bad)
    assert finish.reason == "error" and tokens == []
    assert _collect(good) == (_alone(model, good), Finished("length"))
    assert threading.active_count() >= 1


def test_logprobs_are_the_models_log_softmax(model):
    import jax
    import jax.numpy as jnp

    eng = Engine(model, num_slots=2, max_length=48, prefill_buckets=(8, 16, 48), max_top_logprobs=3)
    prompt = [2, 30, 31, 32]
    r = eng.submit(Request(prompt_ids=prompt, max_new_tokens=3, top_logprobs=3, temperature=5.0, seed=1))
    eng._admit()
    eng._step()
    eng._step()
    tokens = [e for e in r.stream(timeout=5) if isinstance(e, Token)]
    assert len(tokens) == 3
    ids = prompt + [t.token_id for t in tokens]
    logp = np.asarray(jax.nn.log_softmax(model(jnp.asarray([ids])).logits[0], axis=-1))
    for i, t in enumerate(tokens):
        row = logp[len(prompt) - 1 + i]
        assert abs(t.logprob - row[t.token_id]) < 1e-4
        assert [a for a, _ in t.top] == np.argsort(-row)[:3].tolist()
        np.testing.assert_allclose([b for _, b in t.top], np.sort(row)[::-1][:3], atol=1e-4)
    with pytest.raises(ValueError, match="top_logprobs must be between 0 and 3"):
        eng.submit(Request(prompt_ids=prompt, top_logprobs=4))


def test_steady_state_compiles_nothing(model):
    """Once warm, new prompt lengths inside a compiled bucket and requests joining the running batch
    reuse the compiled programs: no step of a serving engine waits for XLA."""
    eng = Engine(model, num_slots=3, max_length=48, prefill_buckets=(8, 16, 48)).start()
    try:
        for length in (3, 12):  # one prompt per bucket used below, and decode
            _collect(eng.submit(Request(prompt_ids=list(range(1, length + 1)), max_new_tokens=3)))
        programs = (eng.device._prefill, eng.device._insert, eng.device._decode)
        compiled = [p._cache_size() for p in programs]
        rng = np.random.default_rng(0)
        requests = [eng.submit(Request(prompt_ids=rng.integers(1, 50, n).tolist(), max_new_tokens=int(k),
                                       temperature=float(t), seed=int(s)))
                    for n, k, t, s in zip((2, 5, 8, 9, 13, 16, 7), (4, 9, 2, 6, 3, 8, 5), (0, 1, 0, 0.7, 0, 1, 0),
                                          range(7))]
        for r in requests:  # more requests than slots: they join the batch as others leave
            assert isinstance(_collect(r)[1], Finished)
        assert [p._cache_size() for p in programs] == compiled
    finally:
        eng.stop()


@pytest.mark.parametrize("rows", [1, 3])
def test_decode_updates_the_cache_in_place(model, rows):
    """The compiled decode step (a bucket of the first rows, and all slots) copies none of the cache's
    buffers: each is written in place, then read. A step that attended to the old cache beside the write
    copied every layer's keys and values twice, which cost more than the weights at long contexts."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from lm_worker.engine import _compile

    graphdef, state = nnx.split(model)
    _, _, decode, init = _compile(graphdef, 3, 48, 2)
    cache = jax.jit(init)(state)
    host = (jnp.zeros(rows, jnp.int32), cache, jnp.ones(rows, bool), jnp.zeros(rows, jnp.uint32),
            jnp.zeros(rows, jnp.int32), jnp.zeros(rows, jnp.float32), jnp.zeros(rows, jnp.int32),
            jnp.ones(rows, jnp.float32))
    hlo = decode.lower(state, *host).compile().as_text()
    shapes = {f"{x.dtype.name.replace('float', 'f').replace('int', 's')}[{','.join(map(str, x.shape))}]"
              for x in jax.tree.leaves(cache) if x.ndim >= 2}
    copies = [line.strip() for line in hlo.splitlines() if " copy(" in line and any(s in line for s in shapes)]
    assert shapes and not copies, copies[:3]
