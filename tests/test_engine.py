"""The continuous-batching engine: each request gets exactly what it would get alone."""

import threading
import time

import numpy as np
import pytest

from gemma3 import Gemma3ForCausalLM, cpu_kernels
from lm_worker.engine import BURST_MS, Engine, Finished, QueueFull, Request, Token, buckets_for, prompt_chunks
from lm_worker.prefixes import prompt_keys


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


@pytest.mark.parametrize("max_length", [16, 100, 256, 1024, 8192])
def test_prompt_buckets_pad_to_at_most_one_and_a_half_times_the_prompt(max_length):
    """Powers of two and 1.5 times each above 32: a 65-token prompt prefills 96 rows, not 128."""
    buckets = buckets_for(max_length)
    assert buckets[-1] == max_length and list(buckets) == sorted(set(buckets))
    assert all(b % 16 == 0 for b in buckets[:-1])
    for n in range(1, max_length + 1):
        bucket = next(b for b in buckets if b >= n)
        assert bucket <= max(32, 1.5 * n), (n, bucket)
    if max_length >= 128:
        assert next(b for b in buckets if b >= 65) == 96


def test_stop_tokens_finish_early(model, engine):
    prompt = [2, 40, 41, 42, 43]
    free = _alone(model, Request(prompt_ids=prompt, max_new_tokens=10))
    r = engine.submit(Request(prompt_ids=prompt, max_new_tokens=10, stop_token_ids=frozenset({free[2]})))
    tokens, finish = _collect(r)
    assert finish == Finished("stop") and tokens == free[: free.index(free[2]) + 1]


def _events(request) -> list:
    out = []
    while not request.events.empty():
        out.append(request.events.get_nowait())
    return out


def _one_call(eng: Engine) -> None:
    """One decode call, its tokens handed out before returning (the engine's loop runs a call ahead)."""
    eng._step()
    eng._drain()


def test_one_step_decodes_a_burst_that_ends_at_the_first_stop(model):
    """With time to spare, one device call decodes many tokens (a small model's step costs less than the
    call's host overhead), yet ends at the first step where an active slot draws a stop token, and never
    runs past the nearest max_new_tokens: each request's tokens are still its solo ones."""
    eng = Engine(model, num_slots=3, max_length=48, prefill_buckets=(8, 16, 48), burst_ms=1e6)  # driven here
    assert eng.device.max_burst == 16
    long_, short = Request(prompt_ids=[2, 40, 41, 42], max_new_tokens=40), Request(prompt_ids=[2, 9, 8],
                                                                                    max_new_tokens=14)
    sampled = dict(prompt_ids=[2, 50, 51], max_new_tokens=12, temperature=20.0, top_k=40, seed=3)
    free = _alone(model, Request(**sampled))
    stop_at = next(i for i in range(3, 12) if free[i] not in free[:i])  # a token first drawn at step i
    stopping = Request(**sampled, stop_token_ids=frozenset({free[stop_at]}))
    for r in (long_, short, stopping):
        eng.submit(r)
        eng._admit()  # each admitted alone: the first takes no slot's turn from the others
    seen = {id(r): _events(r) for r in (long_, short, stopping)}
    assert [len(e) for e in seen.values()] == [1, 1, 1]  # the prefill's tokens

    _one_call(eng)  # the burst ends after the stopping request's stop token, at step stop_at
    got = {id(r): _events(r) for r in (long_, short, stopping)}
    assert got[id(stopping)][-1] == Finished("stop")
    assert [e.token_id for e in seen[id(stopping)] + got[id(stopping)][:-1]] == free[:stop_at + 1]
    assert len(got[id(long_)]) == len(got[id(short)]) == stop_at
    seen[id(long_)] += got[id(long_)]

    _one_call(eng)  # then it runs to the short request's max_new_tokens (14 tokens, 13 decoded)
    got = _events(long_)
    assert len(got) == 13 - stop_at and _events(short)[-1] == Finished("length")
    seen[id(long_)] += got
    _one_call(eng)  # and alone, 16 steps at most per call
    got = _events(long_)
    assert len(got) == 16 and all(isinstance(e, Token) for e in got)
    seen[id(long_)] += got
    while eng.free_slots < 3:
        _one_call(eng)
    tokens = [e.token_id for e in seen[id(long_)] + _events(long_) if isinstance(e, Token)]
    assert tokens == _alone(model, long_)


def test_burst_length_follows_the_measured_step_time(model):
    """A step time taken at start while other processes compiled (here: one second) must not pin the
    engine to one token per call: the measure follows the calls."""
    eng = Engine(model, num_slots=3, max_length=48, prefill_buckets=(8, 16, 48))  # driven here
    active = np.array([True, False, False])
    eng.device.step_seconds = dict.fromkeys(eng.device.buckets, 1.0)
    assert eng.device.steps_within(active, 0.02) == 1
    r = eng.submit(Request(prompt_ids=[2, 3, 4], max_new_tokens=40))
    eng._admit()
    while eng.free_slots < 3:
        eng._step()
    assert _collect(r)[1] == Finished("length")
    assert eng.device.step_seconds[1] < 0.01 and eng.device.steps_within(active, 0.02) > 1


def test_the_engine_compiles_each_decode_bucket_once(model):
    """Its fresh cache is committed to the weights' device as decode's outputs are: jit keys programs on that,
    and an uncommitted one compiled the first bucket twice (seconds at start) and timed that compile as its step."""
    eng = Engine(model, num_slots=3, max_length=48, prefill_buckets=(8, 16, 48))
    assert eng.device._decode._cache_size() == len(eng.device.buckets) == 3
    assert max(eng.device.step_seconds.values()) < 0.5
    assert eng.burst_seconds == BURST_MS / 1000  # (the default where a waiting request ends a burst early)


def _flag_set(flag: int) -> bool:
    import jax

    return bool(jax.jit(lambda: cpu_kernels.yield_flag(flag, 0))())


def test_a_set_yield_flag_ends_a_burst_after_its_firm_steps(model):
    """A request that comes while a slot is free sets the engine's yield flag; a decode call that finds it set
    ends after the step under way (its first, firm, steps always run), and the tokens stay the request's own."""
    eng = Engine(model, num_slots=2, max_length=48, prefill_buckets=(8, 16, 48), burst_ms=1e6)  # driven here
    flag = eng.device.yield_flag
    assert flag is not None and eng.device.max_burst == 16
    long_ = eng.submit(Request(prompt_ids=[2, 40, 41, 42], max_new_tokens=40))
    assert _flag_set(flag)  # a slot was free
    eng._admit()
    eng._step()  # nobody waits: the flag is cleared and a burst of 16 steps dispatched
    assert not _flag_set(flag) and eng._inflight.limit == 16
    eng._drain()
    assert len(_events(long_)) == 17

    cpu_kernels.set_yield(flag, True)  # as a submit during the next call would
    active = np.array([True, False])
    args = (np.zeros(2, np.uint32), np.zeros(2, np.float32), np.zeros(2, np.int32), np.ones(2, np.float32),
            np.stack([eng.slots[0].stop_ids, eng.slots[0].stop_ids]))
    picked = eng.device.fetch(eng.device.decode(active, *args, np.int32(8), np.bool_(False), np.bool_(True)))
    assert int(picked[-1]) == 1  # one step of the 8
    firm = eng.device.fetch(eng.device.decode(active, *args, np.int32(8), np.bool_(False), np.bool_(True),
                                              np.int32(3)))
    assert int(firm[-1]) == 3  # the steps of a short burst run whatever the flag says
    cpu_kernels.set_yield(flag, False)
    rest = eng.device.fetch(eng.device.decode(active, *args, np.int32(8), np.bool_(False), np.bool_(True)))
    assert int(rest[-1]) == 8
    ours = [int(picked[0][0, 0])] + firm[0][:3, 0].tolist() + rest[0][:8, 0].tolist()
    assert ours == _alone(model, long_)[17:29]

    full = Engine(model, num_slots=1, max_length=48, prefill_buckets=(8, 16, 48), burst_ms=1e6)
    full.submit(Request(prompt_ids=[2, 3], max_new_tokens=4))
    full._admit()
    full._step()  # (clears the flag)
    full.submit(Request(prompt_ids=[2, 3], max_new_tokens=4))
    assert not _flag_set(full.device.yield_flag)  # no free slot: the burst may run on


def test_a_stopped_request_decoded_a_call_ahead_costs_nothing(model):
    """The loop dispatches each call before it hands out the one before, so a request that stops has
    already decoded in the next call: those tokens are dropped, and a request that takes its slot starts
    from its own first token and step (the slot's last token and step count live on the device)."""
    eng = Engine(model, num_slots=2, max_length=48, prefill_buckets=(8, 16, 48), burst_ms=0)  # one token a call
    sampled = dict(prompt_ids=[2, 50, 51], max_new_tokens=12, temperature=20.0, top_k=40, seed=3)
    free = _alone(model, Request(**sampled))
    stop_at = next(i for i in range(3, 12) if free[i] not in free[:i])
    stopping = Request(**sampled, stop_token_ids=frozenset({free[stop_at]}))
    long_ = Request(prompt_ids=[2, 40, 41, 42], max_new_tokens=30)
    for r in (stopping, long_):
        eng.submit(r)
        eng._admit()
    while eng.free_slots == 0:
        eng._step()
    assert eng._inflight is not None and eng._inflight.owners[0] is stopping  # decoded on after its stop
    late = eng.submit(Request(prompt_ids=[2, 60, 61, 62, 63], max_new_tokens=9, temperature=20.0, top_k=40, seed=5))
    eng._admit()  # into the stopped request's slot, behind the call in flight
    assert eng.slots[0].request is late
    while eng.free_slots < 2:
        eng._step()
    assert _collect(stopping) == (free[:stop_at + 1], Finished("stop"))
    for r in (long_, late):
        assert _collect(r) == (_alone(model, r), Finished("length"))


def test_cancel_frees_the_slot_and_spares_the_others(model):
    eng = Engine(model, num_slots=3, max_length=48, prefill_buckets=(8, 16, 48), burst_ms=0)  # one token a step
    requests = [eng.submit(Request(prompt_ids=[2, 7 + i, 8, 9], max_new_tokens=12)) for i in range(3)]
    eng._admit()
    _one_call(eng)
    requests[0].cancel()
    _one_call(eng)
    assert eng.free_slots == 1
    tokens, finish = _collect(requests[0])
    assert finish == Finished("cancelled") and len(tokens) == 2
    while eng.free_slots < 3:
        eng._step()
    for r in requests[1:]:
        assert _collect(r) == (_alone(model, r), Finished("length"))


def test_deadlines_end_requests_waiting_or_decoding(model):
    """Driven step by step (engine not started), so the timing is the test's, not the machine's."""
    eng = Engine(model, num_slots=2, max_length=48, prefill_buckets=(8, 16, 48), burst_ms=0)
    late = eng.submit(Request(prompt_ids=[2, 5, 6], deadline=time.monotonic() - 1))
    running = eng.submit(Request(prompt_ids=[2, 5, 6], max_new_tokens=40))
    eng._admit()
    assert _collect(late) == ([], Finished("deadline"))
    assert isinstance(running.events.get(timeout=1), Token) and eng.free_slots == 1
    _one_call(eng)
    assert isinstance(running.events.get(timeout=1), Token)
    running.deadline = time.monotonic() - 1
    _one_call(eng)
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
    r = eng.submit(Request(prompt_ids=prompt, max_new_tokens=5, top_logprobs=3, temperature=5.0, seed=1))
    eng._admit()
    while eng.free_slots < 2:  # the prefill's token, then decode bursts
        eng._step()
    tokens = [e for e in r.stream(timeout=5) if isinstance(e, Token)]
    assert len(tokens) == 5
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
    """The compiled decode burst (a bucket of the first rows, and all slots) copies none of the cache's
    buffers: each is written in place, then read. A step that attended to the old cache beside the write
    copied every layer's keys and values twice, which cost more than the weights at long contexts."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from lm_worker.engine import _compile

    graphdef, state = nnx.split(model)
    weights, treedef = jax.tree.flatten(state)
    _, _, _, decode, _, init = _compile(graphdef, treedef, 3, 48, 2, 16)
    cache, tokens, steps = jax.jit(init)(weights)
    host = (jnp.ones(rows, bool), jnp.zeros(rows, jnp.uint32), jnp.zeros(rows, jnp.float32), jnp.zeros(rows, jnp.int32),
            jnp.ones(rows, jnp.float32), jnp.full((rows, 8), -1, jnp.int32), jnp.int32(16), jnp.bool_(False),
            jnp.bool_(False), jnp.int32(0), jnp.int32(1))
    hlo = decode.lower(weights, cache, tokens, steps, *host).compile().as_text()
    shapes = {f"{x.dtype.name.replace('float', 'f').replace('int', 's')}[{','.join(map(str, x.shape))}]"
              for x in jax.tree.leaves(cache) if x.ndim >= 2}
    copies = [line.strip() for line in hlo.splitlines() if " copy(" in line and any(s in line for s in shapes)]
    assert shapes and not copies, copies[:3]


def test_warm_up_compiles_every_prefill_and_image_counts_share_shapes(served_checkpoint):
    """After warm_up, a text prompt or a one-image prompt in any bucket compiles nothing, whole or after a kept
    prefix (prompts are not chunked here, so warm-up runs each bucket after one too); image counts
    (crops included) are padded to a power of two, so three images and then four compile one program,
    and the padding changes no token: the engine's answer equals the model's own greedy loop."""
    import jax.numpy as jnp

    from gemma3 import Gemma3ForConditionalGeneration

    model = Gemma3ForConditionalGeneration.from_pretrained(served_checkpoint)
    c = model.config
    tokens, width, image_id = c.mm_tokens_per_image, c.text_config.hidden_size, c.image_token_index
    rng = np.random.default_rng(0)

    def with_images(n_images: int, text: int) -> Request:
        ids, types = [2], [0]
        for _ in range(n_images):
            ids += [image_id] * tokens + [7]
            types += [1] * tokens + [0]
        ids += rng.integers(3, 100, text).tolist()
        types += [0] * text
        features = rng.normal(0, 1, (n_images, tokens, width)).astype(np.float32)
        inputs = {"image_features": features, "token_type_ids": np.array(types, np.int32)} if n_images else {}
        return Request(prompt_ids=ids, max_new_tokens=4, prefill_inputs=inputs)

    eng = Engine(model, num_slots=2, max_length=64, prefill_buckets=(16, 32, 64)).start()
    try:
        assert eng.warm_up(2, (image_id, tokens, width)) == 6 + 1 + 6  # each bucket: text, and one image; then
        assert eng.prompt_tokens == eng.cached_tokens == 0  # (counts of the requests served)
        prefill, cut = eng.device._prefill, eng.device._cut  # a prompt kept, and each again after it
        compiled, cuts = prefill._cache_size(), cut._cache_size()
        kept = list(range(3, 20))
        for n_images, text in ((0, 3), (0, 25), (0, 40), (1, 2), (1, 20), (1, 30)):
            assert _collect(eng.submit(with_images(n_images, text)))[1] == Finished("length")
            after = with_images(n_images, text)  # (its images after 17 text tokens kept before)
            after.prompt_ids[1:1] = kept
            if n_images:
                after.prefill_inputs["token_type_ids"] = np.insert(after.prefill_inputs["token_type_ids"], 1, [0] * 17)
            assert _collect(eng.submit(Request(prompt_ids=[2] + kept, max_new_tokens=1)))[1] == Finished("length")
            assert _collect(eng.submit(after))[1] == Finished("length") and after.cached_tokens == 18
        assert (prefill._cache_size(), cut._cache_size()) == (compiled, cuts)
        three = with_images(3, 4)
        got, _ = _collect(eng.submit(three))
        assert prefill._cache_size() == compiled + 1
        assert _collect(eng.submit(with_images(4, 2)))[1] == Finished("length")
        assert prefill._cache_size() == compiled + 1
    finally:
        eng.stop()
    ids, types = list(three.prompt_ids), three.prefill_inputs["token_type_ids"].tolist()
    want = []
    for _ in range(4):  # the model alone, unpadded, the whole sequence each step
        logits = model(jnp.asarray([ids]), image_features=jnp.asarray(three.prefill_inputs["image_features"]),
                       token_type_ids=jnp.asarray([types])).logits
        want.append(int(jnp.argmax(logits[0, -1])))
        if want[-1] == image_id:  # (fed back, the model would take it for an image's place)
            break
        ids.append(want[-1])
        types.append(0)
    assert got[:len(want)] == want


@pytest.mark.parametrize("variant,dtype", [("base", "float32"), ("rope_scaled", "bfloat16")])
def test_greedy_requests_without_logprobs_skip_the_logits_and_take_the_same_tokens(model, text_checkpoints, variant,
                                                                                   dtype):
    """The loader's head on the CPU is split (float32) or screened (bfloat16, where the CPU has int8 products): a
    call whose requests are all greedy and want no log-probabilities takes its argmax without the logits, the
    same tokens, with logprob 0; one that wants them gets the model's."""
    import jax.numpy as jnp

    if dtype == "bfloat16":
        model = Gemma3ForCausalLM.from_pretrained(text_checkpoints[variant][0], dtype=jnp.bfloat16)
    assert model.greedy_without_logits() or dtype == "bfloat16" and not cpu_kernels.int8_screen()
    eng = Engine(model, num_slots=2, max_length=48, prefill_buckets=(8, 16, 48))
    prompt = [2, 30, 31, 32]
    runs = {}
    for logprobs in (True, False):
        r = eng.submit(Request(prompt_ids=prompt, max_new_tokens=8, logprobs=logprobs))
        eng._admit()
        while eng.free_slots < 2:
            eng._step()
        runs[logprobs] = [e for e in r.stream(timeout=5) if isinstance(e, Token)]
    assert [t.token_id for t in runs[False]] == [t.token_id for t in runs[True]] == _alone(
        model, Request(prompt_ids=prompt, max_new_tokens=8))
    if model.greedy_without_logits():  # decoded without the logits (the prefill's token has a logprob)
        assert all(t.logprob == 0.0 for t in runs[False][1:])
    # (a random bfloat16 model's peaked logits can give a token log-probability 0 exactly)
    assert all(t.logprob < 0.0 if dtype == "float32" else t.logprob <= 0.0 for t in runs[True])


def test_prompt_chunks_end_every_chunk_tokens_but_never_inside_an_image():
    assert prompt_chunks(10, 0) == [10]
    assert prompt_chunks(10, 4) == [4, 8, 10]
    assert prompt_chunks(8, 4) == [4, 8]
    image = np.zeros(12, bool)
    image[3:7] = True  # tokens 3-6: the boundary at 4 moves back to 3
    assert prompt_chunks(12, 4, image) == [3, 7, 11, 12]
    image = np.zeros(9, bool)
    image[:6] = True  # a run longer than a chunk, starting it: past its end
    assert prompt_chunks(9, 4, image) == [6, 9]
    rng = np.random.default_rng(0)
    for _ in range(200):
        n, chunk = int(rng.integers(1, 80)), int(rng.integers(4, 12))
        image = np.zeros(n, bool)
        for start in rng.integers(0, n, 3):
            image[start:start + int(rng.integers(1, 4))] = True  # runs of at most 3 tokens, some adjacent
        ends = prompt_chunks(n, chunk, image)
        starts = [0] + ends[:-1]
        assert ends[-1] == n and all(s < e for s, e in zip(starts, ends))
        assert not any(image[e - 1] and image[e] for e in ends[:-1]), (ends, image.nonzero())
        assert all(e - s <= chunk or image[s] for s, e in zip(starts, ends))


def _recording(eng: Engine) -> list[str]:
    """The names of the engine's device calls, in order (the real program runs each)."""
    calls = []
    for name in ("extend", "prefill", "decode"):
        call = getattr(eng.device, name)
        setattr(eng.device, name, lambda *a, call=call, name=name: (calls.append(name), call(*a))[1])
    return calls


def test_chunked_prefills_take_the_tokens_of_whole_ones(model):
    """Prompts longer than a chunk (8 tokens, past the test model's 5-token sliding window, so its rings wrap
    within and between chunks) get exactly their solo tokens, sampled or greedy, with the log-probabilities
    of a whole prompt's prefill."""
    whole = Engine(model, num_slots=3, max_length=48, prefill_buckets=(8, 16, 48), prefill_chunk=0).start()
    eng = Engine(model, num_slots=3, max_length=48, prefill_buckets=(8, 16, 48), prefill_chunk=8).start()
    calls = _recording(eng)
    try:
        rng = np.random.default_rng(1)
        for i, n in enumerate([30, 9, 17, 3, 24, 16]):
            sampled = i % 2 == 1
            prompt = [2] + rng.integers(3, 160, n).tolist()
            runs = []
            for e in (eng, whole):
                r = e.submit(Request(prompt_ids=prompt, max_new_tokens=6, seed=i, temperature=20.0 if sampled else 0.0,
                                     top_k=40 if sampled else 0))
                events = list(r.stream(timeout=60))
                assert events[-1] == Finished("length")
                runs.append(events[:-1])
            assert [t.token_id for t in runs[0]] == [t.token_id for t in runs[1]] == _alone(model, r), n + 1
            np.testing.assert_allclose([t.logprob for t in runs[0]], [t.logprob for t in runs[1]], atol=1e-4)
        assert calls.count("extend") == 3 + 1 + 2 + 0 + 3 + 2  # 31 tokens in four chunks, 10 in two, ...
    finally:
        eng.stop()
        whole.stop()


def _long_behind_a_running_one(model, slots: int = 2, running_tokens: int = 12):
    """An engine driven call by call (chunks of 8 tokens, one token a call): a request decoding, then a
    31-token prompt admitted, its first chunk and a decode call in: (engine, its device calls, running, long)."""
    eng = Engine(model, num_slots=slots, max_length=48, prefill_buckets=(8, 16, 48), prefill_chunk=8, burst_ms=0)
    calls = _recording(eng)
    running = eng.submit(Request(prompt_ids=[2, 5, 6], max_new_tokens=running_tokens))
    eng._admit()
    long = eng.submit(Request(prompt_ids=[2] + list(range(40, 70)), max_new_tokens=4))
    eng._admit()
    eng._step()
    assert calls == ["prefill", "extend", "decode"] and eng._partial.done == 1
    return eng, calls, running, long


def test_a_long_prompt_prefills_a_chunk_between_the_running_requests_decode_calls(model):
    """Driven call by call: while a request decodes, a prompt of four chunks takes one prefill call per decode
    call, so the running request keeps streaming; both get their solo tokens."""
    eng, calls, running, long = _long_behind_a_running_one(model)
    while eng.free_slots < 2 or eng._inflight is not None:
        eng._admit()
        eng._step()
    assert calls[:9] == ["prefill", "extend", "decode", "extend", "decode", "extend", "decode", "prefill", "decode"]
    assert _collect(running) == (_alone(model, running), Finished("length"))
    assert _collect(long) == (_alone(model, long), Finished("length"))


@pytest.mark.parametrize("end", ["cancel", "deadline"])
def test_a_request_ended_between_its_chunks_frees_its_slot(model, end):
    eng, calls, running, long = _long_behind_a_running_one(model, running_tokens=6)
    if end == "cancel":
        long.cancel()
    else:
        long.deadline = time.monotonic() - 1
    eng._admit()
    assert _collect(long) == ([], Finished("cancelled" if end == "cancel" else "deadline"))
    assert eng._partial is None and eng.free_slots == 1 and calls.count("extend") == 1
    assert eng.device._row is None  # (its first chunk's cache row is not kept until the next long prompt)
    while eng.free_slots < 2 or eng._inflight is not None:
        eng._step()
    assert _collect(running) == (_alone(model, running), Finished("length"))
    after = eng.submit(Request(prompt_ids=[2] + list(range(50, 70)), max_new_tokens=3))  # a fresh row, not the old
    eng._admit()
    while eng.free_slots < 2 or eng._inflight is not None:
        eng._step()
    assert _collect(after) == (_alone(model, after), Finished("length"))


def test_chunks_keep_images_whole_and_warm_up_compiles_every_chunk_program(served_checkpoint):
    """A multimodal model prefilling 16-token chunks (an image is 9 tokens, which attend to each other both
    ways): images at a chunk's boundary, two adjacent (one run of 18 tokens, longer than a chunk) and images in
    later chunks take the tokens of whole-prompt prefills; after warm_up, none of these compiles a program
    (one image a chunk; more images in one chunk are padded to a power of two, and compile once)."""
    from gemma3 import Gemma3ForConditionalGeneration

    model = Gemma3ForConditionalGeneration.from_pretrained(served_checkpoint)
    c = model.config
    tokens, width, image_id = c.mm_tokens_per_image, c.text_config.hidden_size, c.image_token_index
    rng = np.random.default_rng(3)

    def prompt(parts) -> Request:
        """parts: text lengths (int) and image runs (a tuple of images)"""
        ids, types, images = [2], [0], 0
        for part in parts:
            if isinstance(part, tuple):
                ids += [image_id] * tokens * len(part)
                types += [1] * tokens * len(part)
                images += len(part)
            else:
                ids += rng.integers(3, 100, part).tolist()
                types += [0] * part
        features = rng.normal(0, 1, (images, tokens, width)).astype(np.float32)
        return Request(prompt_ids=ids, max_new_tokens=4,
                       prefill_inputs={"image_features": features, "token_type_ids": np.array(types, np.int32)})

    requests = [prompt(p) for p in ([10, (1,), 12], [40, (1,), 3], [3, (1, 1), 20], [20, (1,), 5, (1,), 8],
                                    [30], [5, (1,)])]
    def answers(engine: Engine) -> list:
        try:
            return [_collect(engine.submit(Request(prompt_ids=r.prompt_ids, max_new_tokens=4,
                                                   prefill_inputs=r.prefill_inputs))) for r in requests]
        finally:
            engine.stop()

    shapes = (16, 32, 48, 64, 96)
    want = answers(Engine(model, num_slots=2, max_length=96, prefill_buckets=shapes, prefill_chunk=0).start())
    eng = Engine(model, num_slots=2, max_length=96, prefill_buckets=shapes, prefill_chunk=16).start()
    assert eng.chunk_buckets == [16]
    assert eng.warm_up(2, (image_id, tokens, width)) == 2 + 2 + 3 + 2  # (the last two: a prefix kept, reused)
    programs = eng.device._prefill, eng.device._extend  # (shared with the first engine, which compiled its own)
    compiled = [p._cache_size() for p in programs]
    assert answers(eng) == want and {f for _, f in want} == {Finished("length")}
    # two adjacent images, one run longer than a chunk: a chunk of 32 holding two images' features
    assert [p._cache_size() - n for p, n in zip(programs, compiled)] == [0, 1]


def test_the_lm_worker_prefills_in_the_engines_chunks_by_default(monkeypatch, reference):
    from lm_worker.__main__ import parse_args
    from lm_worker.engine import PREFILL_CHUNK, PREFIX_ROWS

    assert parse_args(["--model", "m"]).prefill_chunk == PREFILL_CHUNK
    assert parse_args(["--model", "m"]).prefix_cache == PREFIX_ROWS  # (and keeps the engine's prefix rows)
    monkeypatch.setenv("GEMMA3_LM_PREFILL_CHUNK", "0")
    assert parse_args(["--model", "m"]).prefill_chunk == 0
    with pytest.raises(ValueError, match="at least an image's 9 tokens, got 8"):  # (a chunk never splits an image)
        Engine(reference[0], prefill_chunk=8)


def _fail_next_fetch(eng: Engine) -> None:
    """The next decode call's fetch raises (a fault of the device call, injected once)."""
    fetch = eng.device.fetch

    def failing(pending):
        eng.device.fetch = fetch
        raise RuntimeError("injected device failure")

    eng.device.fetch = failing


def test_a_failed_decode_call_also_ends_a_prompt_between_its_chunks(model):
    """A decode call that fails resets the device's cache (it was donated): the prompt whose first chunks it
    held ends with an error too (never continued from a fresh row), and the engine serves on."""
    eng, _, running, long = _long_behind_a_running_one(model)
    _fail_next_fetch(eng)
    eng._step()
    for r in (running, long):
        finish = [e for e in r.stream(timeout=5) if isinstance(e, Finished)]
        assert finish[0].reason == "error" and "injected device failure" in finish[0].detail
    assert eng._partial is None and eng.free_slots == 2
    after = eng.submit(Request(prompt_ids=[2] + list(range(50, 70)), max_new_tokens=3))
    while after.events.empty() or eng.free_slots < 2 or eng._inflight is not None:
        eng._admit()
        eng._step()
    assert _collect(after) == (_alone(model, after), Finished("length"))


def test_a_short_prompt_goes_ahead_of_a_long_ones_next_chunk(model):
    """Between two chunks of a long prompt, a waiting prompt of one chunk is prefilled into another free slot
    (every other turn: two short ones do not hold the long one back twice in a row); all get their solo tokens."""
    eng, calls, running, long = _long_behind_a_running_one(model, slots=4, running_tokens=14)
    shorts = [eng.submit(Request(prompt_ids=[2, 9 + i, 10], max_new_tokens=3)) for i in range(2)]
    while eng.free_slots < 4 or eng._inflight is not None:
        eng._admit()
        eng._step()
    assert calls[:11] == ["prefill", "extend", "decode", "prefill", "decode", "extend", "decode", "prefill", "decode",
                          "extend", "decode"]
    for r in (running, long, *shorts):
        assert _collect(r) == (_alone(model, r), Finished("length"))


def test_a_lost_group_ends_a_prompt_between_its_chunks_too(model):
    eng, _, running, long = _long_behind_a_running_one(model)
    eng.fail_all("a process of the group is gone")
    for r in (running, long):
        assert [e for e in r.stream(timeout=5) if isinstance(e, Finished)][0] == Finished(
            "unavailable", "a process of the group is gone")


def test_a_failed_decode_call_before_a_short_prompts_prefill_spares_it(model):
    """The call in flight is handed out before a prompt's (last) prefill: when that fails, the decoding
    requests end with an error, and the prompt, which held no cache row yet, is prefilled on the fresh cache
    and answers in full, with exactly one Finished."""
    eng = Engine(model, num_slots=2, max_length=48, prefill_buckets=(8, 16, 48), prefill_chunk=8, burst_ms=0)
    running = eng.submit(Request(prompt_ids=[2, 5, 6], max_new_tokens=12))
    eng._admit()
    eng._step()
    short = eng.submit(Request(prompt_ids=[2, 7, 8, 9], max_new_tokens=3))
    _fail_next_fetch(eng)
    eng._admit()
    while eng.free_slots < 2 or eng._inflight is not None:
        eng._step()
    assert [e.reason for e in running.stream(timeout=5) if isinstance(e, Finished)] == ["error"]
    assert _collect(short) == (_alone(model, short), Finished("length"))
    assert short.events.empty()


def test_a_request_gets_one_finished_whoever_ends_it():
    r = Request(prompt_ids=[2])
    r.put(Token(5))
    r.put(Finished("unavailable", "gone"))
    r.put(Finished("error", "later"))
    r.put(Token(6))
    assert list(r.stream(timeout=1)) == [Token(5), Finished("unavailable", "gone")] and r.events.empty()


def test_token_types_must_match_the_prompt(engine):
    with pytest.raises(ValueError, match="token_type_ids holds 2 types for a prompt of 3 tokens"):
        engine.submit(Request(prompt_ids=[2, 3, 4], prefill_inputs={"token_type_ids": np.zeros(2, np.int32)}))


# ----------------------------------------------------------------- prefix caching (lm_worker.prefixes)
@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """The test model with a 32-token sliding window: prompts that fit it can share any prefix."""
    from tests import make_checkpoints as mk

    path = str(tmp_path_factory.mktemp("wide"))
    mk.save_text_checkpoint(path, "base", sliding_window=32)
    return Gemma3ForCausalLM.from_pretrained(path)


def _answers(eng: Engine, prompts, **sampling) -> list[tuple[list[Token], int]]:
    """Each prompt's tokens (one at a time, in order) and the prompt tokens it reused."""
    out = []
    for i, prompt in enumerate(prompts):
        r = eng.submit(Request(prompt_ids=list(prompt), max_new_tokens=5, seed=i, **sampling))
        events = list(r.stream(timeout=60))
        assert events[-1] == Finished("length")
        out.append((events[:-1], r.cached_tokens))
    return out


def _same_tokens(got, want) -> None:
    assert [t.token_id for t in got] == [t.token_id for t in want]
    np.testing.assert_allclose([t.logprob for t in got], [t.logprob for t in want], atol=1e-4)


@pytest.mark.parametrize("sampled,rows", [(False, 4), (True, 1)])
def test_prompts_sharing_a_system_prompt_prefill_only_the_rest(wide_model, sampled, rows):
    """Chats that begin with the same 20 tokens (within the window) start from a kept row (with room for one,
    the last prompt's): they prefill only their own tokens (in chunks from the kept row when longer than one)
    and get the tokens and log-probabilities of a prefill from scratch."""
    rng = np.random.default_rng(5)
    system = [2] + rng.integers(3, 160, 19).tolist()
    prompts = [system + [k] + rng.integers(3, 160, n).tolist() for k, n in ((3, 6), (4, 2), (5, 11), (6, 9))]
    sampling = dict(temperature=20.0, top_k=40) if sampled else {}
    kw = dict(num_slots=2, max_length=64, prefill_buckets=(8, 16, 32, 64), prefill_chunk=8)
    eng, scratch = Engine(wide_model, **kw, prefix_rows=rows).start(), Engine(wide_model, **kw, prefix_rows=0).start()
    calls = _recording(eng)
    try:
        got, want = _answers(eng, prompts, **sampling), _answers(scratch, prompts, **sampling)
        assert len(eng.device._kept) == len(eng.prefixes) == rows
    finally:
        eng.stop()
        scratch.stop()
    assert [cached for _, cached in got] == [0, 20, 20, 20] and {cached for _, cached in want} == {0}
    for (tokens, _), (expected, _), prompt in zip(got, want, prompts):
        _same_tokens(tokens, expected)
        assert [t.token_id for t in tokens] == _alone(wide_model, Request(prompt_ids=prompt, max_new_tokens=5,
                                                                         seed=prompts.index(prompt), **sampling))
    assert calls.count("extend") == 3 + 0 + 0 + 1 + 1  # 27 tokens in chunks of 8, then 3, 12 and 10 after the 20


def test_a_conversation_reuses_its_earlier_turns_past_the_window(model):
    """The test model's window is 5 tokens, so a kept prompt of 24 serves only a prompt that begins with all
    of it (the next turn of a conversation) or with all but its last token (the same prompt again, sampled
    anew): a shorter shared prefix would need keys its rings overwrote, and is prefilled from scratch."""
    rng = np.random.default_rng(6)
    first = [2] + rng.integers(3, 160, 23).tolist()
    prompts = [first, first + rng.integers(3, 160, 10).tolist(), first, first[:20] + [7, 8, 9]]
    kw = dict(num_slots=2, max_length=48, prefill_buckets=(8, 16, 48), prefill_chunk=8)
    eng, scratch = Engine(model, **kw).start(), Engine(model, **kw, prefix_rows=0).start()
    try:
        got = _answers(eng, prompts, temperature=1.0)
        want = _answers(scratch, prompts, temperature=1.0)
    finally:
        eng.stop()
        scratch.stop()
    assert [cached for _, cached in got] == [0, 24, 23, 0]
    for (tokens, _), (expected, _) in zip(got, want):
        _same_tokens(tokens, expected)


@pytest.mark.parametrize("rows", [4, 1])
def test_a_system_prompt_past_the_window_is_reused_from_the_third_chat_on(model, rows):
    """Chats sharing a 20-token system prompt, past the test model's 5-token window: the second shares it with
    the first, whose row cannot serve it (its rings hold only its last tokens), so its chunks end at the 20th
    token and a copy of its row is kept there; the third and fourth start from that copy (not with room for one
    row, which each chat's own row would take at once: nothing is reused). All answer as from scratch."""
    rng = np.random.default_rng(9)
    system = [2] + rng.integers(3, 160, 19).tolist()
    prompts = [system + [k] + rng.integers(3, 160, 5).tolist() for k in (3, 4, 5, 6)]
    kw = dict(num_slots=2, max_length=48, prefill_buckets=(8, 16, 48), prefill_chunk=8)
    eng, scratch = Engine(model, **kw, prefix_rows=rows).start(), Engine(model, **kw, prefix_rows=0).start()
    calls = _recording(eng)
    try:
        got = _answers(eng, prompts, temperature=1.0)
        want = _answers(scratch, prompts, temperature=1.0)
        assert len(eng.prefixes) == len(eng.device._kept) == rows  # the chats' rows (one evicted), the system's:
        assert sorted(keys.size for keys in eng.prefixes._rows.values()) == [20, 26, 26, 26][4 - rows:]
    finally:
        eng.stop()
        scratch.stop()
    assert [cached for _, cached in got] == ([0, 0, 20, 20] if rows > 1 else [0] * 4)
    for (tokens, _), (expected, _) in zip(got, want):
        _same_tokens(tokens, expected)
    # 26 tokens in chunks of 8; the second chat's chunks end at 8, 16 and 20 (kept there), 26; then 6 tokens each
    prefills = [c for c in calls if c != "decode"]
    whole = ["extend"] * 3 + ["prefill"]
    assert prefills == whole * 2 + (["prefill"] * 2 if rows > 1 else whole * 2)


def test_a_next_turn_goes_ahead_of_a_long_prompts_next_chunk_as_a_short_one(model):
    """What a prompt has to prefill after its kept prefix decides whether it goes between a long prompt's
    chunks: a conversation's next turn of 23 tokens, 20 of them kept, takes one call; all get their solo tokens."""
    eng = Engine(model, num_slots=3, max_length=48, prefill_buckets=(8, 16, 48), prefill_chunk=8, burst_ms=0)
    calls = _recording(eng)
    first = eng.submit(Request(prompt_ids=[2] + list(range(100, 119)), max_new_tokens=1))
    running = eng.submit(Request(prompt_ids=[2, 5, 6], max_new_tokens=12))
    eng._admit()
    eng._admit()
    long = eng.submit(Request(prompt_ids=[2] + list(range(40, 70)), max_new_tokens=4))
    eng._admit()
    eng._step()
    turn = eng.submit(Request(prompt_ids=first.prompt_ids + [7, 8, 9], max_new_tokens=3))
    while eng.free_slots < 3 or eng._inflight is not None:
        eng._admit()
        eng._step()
    # (the running one goes between the first's chunks; the turn between the long one's)
    assert calls[:9] == ["extend", "prefill", "extend", "prefill", "extend", "decode", "prefill", "decode", "extend"]
    assert turn.cached_tokens == 20 and long.cached_tokens == 0
    for r in (first, running, long, turn):
        assert _collect(r) == (_alone(model, r), Finished("length"))


def test_a_prompt_reuses_an_image_only_where_it_is_the_same_image(reference):
    """A next turn after an image starts from the kept row only when its image has the same features (the
    test model's 5-token window: a prefix ending before the image would need overwritten keys); both answer
    as from scratch. (The second comes with its keys computed by the caller, as the LM worker does for large
    images off its event loop.)"""
    model, _ = reference
    c = model.config
    tokens, width, image_id = c.mm_tokens_per_image, c.text_config.hidden_size, c.image_token_index
    rng = np.random.default_rng(8)
    ids = [2] + rng.integers(3, 100, 12).tolist() + [image_id] * tokens + rng.integers(3, 100, 4).tolist()
    types = np.array([1 if t == image_id else 0 for t in ids], np.int32)
    seen, other = (rng.normal(0, 1, (1, tokens, width)).astype(np.float32) for _ in range(2))
    more = rng.integers(3, 100, 6).tolist()

    def request(features, extra=(), caller_keys=False):
        inputs = {"image_features": features, "token_type_ids": np.concatenate([types, np.zeros(len(extra), np.int32)])}
        keys = prompt_keys(ids + list(extra), inputs["token_type_ids"], features) if caller_keys else None
        return Request(prompt_ids=ids + list(extra), max_new_tokens=4, prefill_inputs=inputs, prefix_keys=keys)

    kw = dict(num_slots=2, max_length=64, prefill_buckets=(16, 32, 64), prefill_chunk=16)
    runs = []
    for rows in (4, 0):
        eng = Engine(model, **kw, prefix_rows=rows).start()
        try:
            runs.append([(*_collect(eng.submit(r)), r.cached_tokens)
                         for r in (request(seen), request(seen.copy(), more, True), request(other, more))])
        finally:
            eng.stop()
    assert [cached for *_, cached in runs[0]] == [0, len(ids), 0]
    assert [answer for *answer, _ in runs[0]] == [answer for *answer, _ in runs[1]]


def test_kept_rows_outlive_a_failed_decode_call_and_a_failed_prefill_keeps_none(model):
    """A failed decode call resets the batched cache but not the kept rows (never donated): a next turn still
    starts from one. A prompt whose prefill fails leaves no row behind in the store, and the row it started
    from goes too (a chunk's failure may show only in a later call, and a row kept from it would fail every
    prompt that begins alike)."""
    eng = Engine(model, num_slots=2, max_length=48, prefill_buckets=(8, 16, 48), prefill_chunk=8, burst_ms=0)

    def served(r: Request) -> Request:
        eng.submit(r)
        eng._admit()
        while eng.free_slots < 2 or eng._inflight is not None:
            eng._step()
        return r

    first = eng.submit(Request(prompt_ids=[2] + list(range(100, 119)), max_new_tokens=6))
    eng._admit()
    _fail_next_fetch(eng)
    eng._step()
    eng._step()
    assert [e.reason for e in first.stream(timeout=5) if isinstance(e, Finished)] == ["error"]
    turn = served(Request(prompt_ids=first.prompt_ids + [7, 8], max_new_tokens=3))
    assert turn.cached_tokens == 20 and _collect(turn) == (_alone(model, turn), Finished("length"))
    prefill = eng.device._prefill

    def failing(*args):
        eng.device._prefill = prefill
        raise RuntimeError("injected prefill failure")

    eng.device._prefill = failing
    bad = served(Request(prompt_ids=first.prompt_ids + [9, 10, 11], max_new_tokens=3))  # from the first's row
    assert bad.cached_tokens == 20 and _collect(bad)[1].reason == "error"
    assert len(eng.prefixes) == len(eng.device._kept) == 1  # the turn's row alone
    again = served(Request(prompt_ids=first.prompt_ids + [9, 10, 11], max_new_tokens=3))
    assert again.cached_tokens == 0 and _collect(again) == (_alone(model, again), Finished("length"))
