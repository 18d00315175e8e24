"""The LM worker as a real process on a loopback port, through real gRPC channels and real Redis."""

import time
import uuid

import grpc
import jax.numpy as jnp
import numpy as np
import pytest

from gemma3serve.v1 import common_pb2, lm_worker_pb2, lm_worker_pb2_grpc
from tests import make_checkpoints as mk
from tests.services import cache_put, chat, expected_answer


def _stream(target, request, timeout=60):
    with grpc.insecure_channel(target) as channel:
        return list(lm_worker_pb2_grpc.LMWorkerStub(channel).Generate(request, timeout=timeout))


def test_text_chat_streams_the_greedy_answer(lm_worker, reference):
    _, target = lm_worker
    request = lm_worker_pb2.LMGenerateRequest(request_id="t1", chat=chat("What is in this image?", system="Be brief."),
                                              sampling=common_pb2.SamplingParams(max_new_tokens=12))
    chunks = _stream(target, request)
    ids, want = expected_answer(reference, request)
    got = [t for c in chunks for t in c.token_ids]
    assert got == want
    last = chunks[-1]
    assert last.finish_reason in (common_pb2.FINISH_REASON_LENGTH, common_pb2.FINISH_REASON_STOP)
    assert last.usage.prompt_tokens == len(ids) and last.usage.completion_tokens == len(want)
    assert all(c.request_id == "t1" for c in chunks)
    text = "".join(c.text for c in chunks)
    assert text == reference[1].tokenizer.decode(want, skip_special_tokens=True)


def test_images_inline_and_from_redis_give_the_same_answer(lm_worker, reference):
    _, target = lm_worker
    model, _ = reference
    features = np.asarray(model.get_image_features(jnp.asarray(mk.random_pixels(2, seed=5))))
    key = f"test:{uuid.uuid4()}"

    cache_put(key, features[1:])
    inline = common_pb2.Tensor(dtype="float32", shape=list(features[:1].shape), data=features[:1].tobytes())
    request = lm_worker_pb2.LMGenerateRequest(
        chat=chat("Where is the square?", images=2), sampling=common_pb2.SamplingParams(max_new_tokens=10),
        images=[lm_worker_pb2.ImageInput(inline=inline), lm_worker_pb2.ImageInput(key=key)])
    got = [t for c in _stream(target, request) for t in c.token_ids]
    _, want = expected_answer(reference, request, features)
    assert got == want


def test_embedding_rows_must_match_the_prompt(lm_worker, reference):
    _, target = lm_worker
    features = np.zeros((2, 9, 64), np.float32)  # two images' worth, announced as one without crops
    inline = common_pb2.Tensor(dtype="float32", shape=list(features.shape), data=features.tobytes())
    request = lm_worker_pb2.LMGenerateRequest(chat=chat("hi", images=1), images=[lm_worker_pb2.ImageInput(
        inline=inline)])
    with pytest.raises(grpc.RpcError) as e:
        _stream(target, request)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "check num_crops" in e.value.details()


def test_missing_embedding_is_not_found_naming_the_key(lm_worker):
    _, target = lm_worker
    request = lm_worker_pb2.LMGenerateRequest(chat=chat("hi", images=1),
                                              images=[lm_worker_pb2.ImageInput(key="test:missing-key")])
    with pytest.raises(grpc.RpcError) as e:
        _stream(target, request)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "test:missing-key" in e.value.details()


@pytest.mark.parametrize("request_, message", [
    (lm_worker_pb2.LMGenerateRequest(chat=chat("hi"), sampling=common_pb2.SamplingParams(temperature=-1)),
     "temperature"),
    (lm_worker_pb2.LMGenerateRequest(chat=chat("hi"), sampling=common_pb2.SamplingParams(top_p=float("nan"))),
     "top_p"),
    (lm_worker_pb2.LMGenerateRequest(chat=chat("hi", images=1)), "1 image placeholders but 0 images"),
    (lm_worker_pb2.LMGenerateRequest(raw=common_pb2.RawPrompt(text="x" * 10), sampling=common_pb2.SamplingParams(
        max_new_tokens=300)), "exceeds the context"),
    (lm_worker_pb2.LMGenerateRequest(), "no prompt"),
])
def test_bad_requests_get_invalid_argument(lm_worker, request_, message):
    _, target = lm_worker
    with pytest.raises(grpc.RpcError) as e:
        _stream(target, request_)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in e.value.details()


def test_stop_strings_cut_the_text(lm_worker, reference):
    _, target = lm_worker
    request = lm_worker_pb2.LMGenerateRequest(raw=common_pb2.RawPrompt(text="Two shapes"),
                                              sampling=common_pb2.SamplingParams(max_new_tokens=20))
    full = "".join(c.text for c in _stream(target, request))
    assert len(full) > 4
    stop = full[2:4]
    request.sampling.stop.append(stop)
    chunks = _stream(target, request)
    assert "".join(c.text for c in chunks) == full[: full.index(stop)]
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_STOP


def test_cancel_and_deadline_free_the_slots(lm_worker, reference):
    _, target = lm_worker
    long_ = lm_worker_pb2.LMGenerateRequest(raw=common_pb2.RawPrompt(text="What colour"),
                                            sampling=common_pb2.SamplingParams(max_new_tokens=200))
    with grpc.insecure_channel(target) as channel:
        stub = lm_worker_pb2_grpc.LMWorkerStub(channel)
        ended = lambda stats: stats.finished["cancelled"] + stats.finished["deadline"]  # noqa: E731
        before = ended(stub.GetStats(lm_worker_pb2.StatsRequest()))
        for _ in range(6):  # more cancelled streams than slots: each must give its slot back
            call = stub.Generate(long_)
            next(call)
            call.cancel()
        # a deadline halfway through the whole answer as this machine streams it (the tiny model can decode
        # 200 tokens in a few tens of ms); a run that still beats it is retried at a quarter and an eighth
        started = time.monotonic()
        assert len([t for c in stub.Generate(long_) for t in c.token_ids]) == 200
        whole = time.monotonic() - started
        for fraction in (0.5, 0.25, 0.125):
            try:
                list(stub.Generate(long_, timeout=fraction * whole))
            except grpc.RpcError as error:
                expired = error
                break
        else:
            pytest.fail(f"200 tokens kept beating a deadline of {fraction * whole:.3f} s")
        assert expired.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            stats = stub.GetStats(lm_worker_pb2.StatsRequest())
            if stats.active_slots == 0 and ended(stats) - before >= 6:
                break
            time.sleep(0.05)
        # the 6 cancelled streams had tokens, so the engine saw them; the expired call may have ended
        # before it was admitted
        assert stats.num_slots == 4 and stats.active_slots == 0 and ended(stats) - before >= 6
    request = lm_worker_pb2.LMGenerateRequest(chat=chat("How many shapes are there?"),
                                              sampling=common_pb2.SamplingParams(max_new_tokens=6))
    got = [t for c in _stream(target, request, timeout=30) for t in c.token_ids]
    assert got == expected_answer(reference, request)[1]


def test_no_request_waits_for_a_compile(lm_worker, reference):
    """The worker compiled the prefill of every length bucket, text and one image (--warm-up all), as a
    whole prompt and as a later chunk of one (--prefill-chunk 64), before it answered SERVING: prompts
    of any length, with an image or none, whole or after a kept prefix, compile nothing (its log names
    every compile: JAX_LOG_COMPILES)."""
    import os
    import tempfile

    _, target = lm_worker
    log = os.path.join(tempfile.gettempdir(), f"gemma3-lm_worker-{target.rsplit(':', 1)[1]}.log")

    def compiles() -> int:
        with open(log) as f:
            text = f.read()
        assert "model ready" in text
        return text.split("model ready", 1)[1].count("Compiling ")

    model, _ = reference
    features = np.asarray(model.get_image_features(jnp.asarray(mk.random_pixels(1, seed=6))))
    inline = common_pb2.Tensor(dtype="float32", shape=list(features.shape), data=features.tobytes())
    sampling = common_pb2.SamplingParams(max_new_tokens=3)
    requests = [lm_worker_pb2.LMGenerateRequest(raw=common_pb2.RawPrompt(text="a " * n), sampling=sampling)
                for n in (2, 20, 40, 90, 110)]
    requests += [lm_worker_pb2.LMGenerateRequest(chat=chat("Where is the square?" + " And?" * n, images=1),
                                                 sampling=sampling, images=[lm_worker_pb2.ImageInput(inline=inline)])
                 for n in (0, 30, 45)]
    # an image after a system prompt: in a later chunk, or across a chunk's boundary (which moves back to it)
    requests += [lm_worker_pb2.LMGenerateRequest(chat=chat("Where?", images=1, system="a " * n), sampling=sampling,
                                                 images=[lm_worker_pb2.ImageInput(inline=inline)])
                 for n in range(20, 36, 3)]
    requests += requests[3:5] + requests[-2:]  # sent again: each from its kept prefix (--prefix-cache)
    before = compiles()
    for request in requests:
        done = _stream(target, request)[-1]
        assert done.finish_reason in (common_pb2.FINISH_REASON_LENGTH, common_pb2.FINISH_REASON_STOP)
    assert compiles() == before


def test_a_prompt_sent_again_prefills_only_its_last_token_and_says_so(lm_worker, reference):
    """The worker keeps prompts' cache rows (--prefix-cache): the same chat again, with its image, starts
    from the first one's row (the test model's 5-token window allows only a whole-prompt match, one token
    short) and answers the same; its usage counts the reused tokens; another image is not reused."""
    _, target = lm_worker
    model, _ = reference
    features = [np.asarray(model.get_image_features(jnp.asarray(mk.random_pixels(1, seed=s)))) for s in (31, 32)]
    system = "You describe images in one short sentence, naming every shape, its colour and where it is."

    def ask(f):
        inline = common_pb2.Tensor(dtype="float32", shape=list(f.shape), data=f.tobytes())
        request = lm_worker_pb2.LMGenerateRequest(chat=chat("Where is the circle?", images=1, system=system),
                                                  sampling=common_pb2.SamplingParams(max_new_tokens=6),
                                                  images=[lm_worker_pb2.ImageInput(inline=inline)])
        chunks = _stream(target, request)
        return [t for c in chunks for t in c.token_ids], chunks[-1].usage

    def stats():
        with grpc.insecure_channel(target) as channel:
            return lm_worker_pb2_grpc.LMWorkerStub(channel).GetStats(lm_worker_pb2.StatsRequest())

    before = stats()
    first, again, other = ask(features[0]), ask(features[0]), ask(features[1])
    assert first[1].cached_prompt_tokens == 0 and first[1].prompt_tokens > 16
    assert again[1].cached_prompt_tokens == again[1].prompt_tokens - 1 and again[0] == first[0]
    assert other[1].cached_prompt_tokens == 0
    after = stats()  # (the worker's totals: hit rates for operators)
    assert after.prompt_tokens - before.prompt_tokens == 3 * first[1].prompt_tokens
    assert after.cached_prompt_tokens - before.cached_prompt_tokens == again[1].cached_prompt_tokens
    assert after.kept_prefixes == 4  # (--prefix-cache's default; the earlier tests' prompts filled it)


def test_a_conversations_next_turn_starts_from_the_turn_before(lm_worker, reference):
    """The next turn's prompt (the chat template's text, tokenized anew, with the answer as text) begins
    with the earlier prompt less at most its last token, so it starts from that prompt's kept row (past the
    test model's 5-token window) and answers as the model does from scratch."""
    _, target = lm_worker
    turn = lambda role, text: common_pb2.Turn(role=role, parts=[common_pb2.ContentPart(text=text)])  # noqa: E731
    sampling = common_pb2.SamplingParams(max_new_tokens=8)
    first = lm_worker_pb2.LMGenerateRequest(chat=chat("Name a shape and a colour, then say where it is."),
                                            sampling=sampling)
    chunks = _stream(target, first)
    answer = "".join(c.text for c in chunks)
    turns = [*first.chat.turns, turn("assistant", answer), turn("user", "And another one, further left?")]
    second = lm_worker_pb2.LMGenerateRequest(chat=common_pb2.Chat(turns=turns), sampling=sampling)
    got = _stream(target, second)
    assert got[-1].usage.cached_prompt_tokens >= chunks[-1].usage.prompt_tokens - 1 > 16
    _, want = expected_answer(reference, second)
    assert [t for c in got for t in c.token_ids] == want


def test_logprobs_stream_with_the_tokens(lm_worker, reference):
    import jax

    _, target = lm_worker
    model, prompts = reference
    request = lm_worker_pb2.LMGenerateRequest(chat=chat("What is in this image?"), sampling=common_pb2.SamplingParams(
        max_new_tokens=4, top_logprobs=2))
    chunks = _stream(target, request)
    entries = [lp for c in chunks for lp in c.logprobs]
    tokens = [t for c in chunks for t in c.token_ids]
    assert [e.token_id for e in entries] == tokens and all(len(e.top) == 2 for e in entries)
    ids, _ = prompts.build(request, [])
    logp = np.asarray(jax.nn.log_softmax(model(jnp.asarray([ids + tokens])).logits[0], axis=-1))
    for i, e in enumerate(entries):
        assert abs(e.logprob - logp[len(ids) - 1 + i, e.token_id]) < 1e-3
    request.sampling.top_logprobs = 6
    with pytest.raises(grpc.RpcError) as err:
        _stream(target, request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_logprobs" in err.value.details()


def test_a_full_queue_answers_resource_exhausted(lm_worker):
    from concurrent.futures import ThreadPoolExecutor

    _, target = lm_worker
    # long enough that the 4 slots are still busy while 60 client threads start: at 40 tokens a fast host once
    # finished requests as quickly as a busy one started them, and none was refused
    request = lm_worker_pb2.LMGenerateRequest(raw=common_pb2.RawPrompt(text="Queue"),
                                              sampling=common_pb2.SamplingParams(max_new_tokens=160))

    def one(_):
        try:
            _stream(target, request, timeout=120)
            return "ok"
        except grpc.RpcError as e:
            return e.code()

    with ThreadPoolExecutor(60) as pool:  # 4 slots + 32 queued: the rest must be refused, not lost
        outcomes = list(pool.map(one, range(60)))
    refused = outcomes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert refused >= 1 and outcomes.count("ok") + refused == 60
