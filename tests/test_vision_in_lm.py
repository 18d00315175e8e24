"""Images embedded in the LM worker (``--embed-images``, the gateway's ``--vision-target lm``): the same
answers, keys and cache as the stack with a vision worker, with one hop fewer."""

import concurrent.futures
import threading

import grpc
import numpy as np
import pytest

from gemma3serve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, lm_worker_pb2, lm_worker_pb2_grpc
from tests import services
from tests.test_hostile_input import SPECIAL_IMAGES
from tests.test_stack import ask, image_request, library_answer
from tests.test_vision_worker import png


@pytest.fixture(scope="module")
def embedding_lm_worker(served_checkpoint):
    """An LM worker that embeds images."""
    with services.running("lm_worker", "gemma3serve.v1.LMWorker", "--model", served_checkpoint,
                          "--dtype", "float32", "--num-slots", "4", "--max-length", "256",
                          "--redis-url", services.REDIS_URL, "--embed-images", "--cache-ttl", "120") as running:
        yield running


@pytest.fixture(scope="module")
def colocated(embedding_lm_worker):
    """A gateway in front of it, with no vision worker."""
    with services.running("gateway", "gemma3serve.v1.Gateway", "--lm-target", embedding_lm_worker[1],
                          "--vision-target", "lm") as (_, target):
        yield target


def fresh_png(size=(40, 30)) -> bytes:
    return png(int(np.random.default_rng().integers(1 << 30)), size)


def test_answers_equal_the_library_and_repeats_hit_the_cache(colocated, reference, served_checkpoint):
    request = image_request([fresh_png(), fresh_png()])
    first = ask(colocated, request)
    assert list(first.token_ids) == library_answer(reference, served_checkpoint, request)
    assert first.usage.image_cache_hits == 0 and len(first.usage.image_embedding_keys) == 2
    second = services.landed(lambda: ask(colocated, request), ok=lambda r: r.usage.image_cache_hits == 2)
    assert list(second.token_ids) == list(first.token_ids)
    assert list(second.usage.image_embedding_keys) == list(first.usage.image_embedding_keys)
    by_key = image_request([b"", b""])  # the embeddings again, by the keys the first answer reported
    for part, key in zip(by_key.chat.turns[0].parts, first.usage.image_embedding_keys):
        part.image.embedding_key = key
    third = ask(colocated, by_key)
    assert list(third.token_ids) == list(first.token_ids)
    assert list(third.usage.image_embedding_keys) == list(first.usage.image_embedding_keys)


def forget(key: str) -> None:
    """Delete an embedding from Redis once its write (behind the reply) has landed."""
    import redis

    with redis.Redis.from_url(services.REDIS_URL) as client:
        services.landed(lambda: client.exists(key), ok=bool)
        client.delete(key)


@pytest.mark.parametrize("max_new_tokens", [1, 8])
def test_a_new_embedding_is_in_redis_when_the_answer_ends(colocated, max_new_tokens):
    """Its write goes on behind the answer's first token, and the last message waits for it: a repeat sent
    at once hits the cache in any LM worker. Redis holds writes back for a while (``CLIENT PAUSE ... WRITE``:
    reads go on), so an answer that ended before its write landed would find the key missing."""
    import redis

    ask(colocated, image_request([fresh_png()], max_new_tokens=1))  # warm: the answer below takes milliseconds
    with redis.Redis.from_url(services.REDIS_URL) as client:
        client.execute_command("CLIENT", "PAUSE", 300, "WRITE")  # (under the services' 1 s Redis timeout)
        answer = ask(colocated, image_request([fresh_png()], max_new_tokens=max_new_tokens))
        assert answer.usage.image_cache_hits == 0 and len(answer.token_ids) <= max_new_tokens
        assert client.exists(answer.usage.image_embedding_keys[0])


def test_keys_and_bytes_mixed_in_one_request(colocated, reference, served_checkpoint):
    known, new = fresh_png(), fresh_png()
    key = ask(colocated, image_request([known], max_new_tokens=2)).usage.image_embedding_keys[0]
    both = image_request([known, new])
    mixed = image_request([b"", new])
    mixed.chat.turns[0].parts[0].image.embedding_key = key
    answer = services.landed(lambda: ask(colocated, mixed), ok=lambda r: r.usage.image_cache_hits == 1)
    assert list(answer.token_ids) == library_answer(reference, served_checkpoint, both)
    assert answer.usage.image_embedding_keys[0] == key and len(answer.usage.image_embedding_keys) == 2


def test_shares_keys_and_cache_with_the_vision_worker(colocated, stack):
    """An image the vision worker embedded is a hit here, under the same key, with the same answer."""
    request = image_request([fresh_png()])
    split = ask(stack, request)
    here = services.landed(lambda: ask(colocated, request), ok=lambda r: r.usage.image_cache_hits == 1)
    assert list(here.usage.image_embedding_keys) == list(split.usage.image_embedding_keys)
    assert list(here.token_ids) == list(split.token_ids)


def test_pan_and_scan_crops_answer_as_with_the_vision_worker(colocated, stack):
    request = image_request([fresh_png(size=(1024, 300))], max_new_tokens=4)  # wide: pan-and-scan adds crops
    request.pan_and_scan = True
    split = ask(stack, request)
    forget(split.usage.image_embedding_keys[0])  # so that the LM worker embeds it anew
    here = ask(colocated, request)
    assert split.usage.image_cache_hits == here.usage.image_cache_hits == 0
    assert here.usage.prompt_tokens == split.usage.prompt_tokens > ask(stack, image_request(
        [fresh_png(size=(1024, 300))], max_new_tokens=4)).usage.prompt_tokens  # the crops' image tokens
    assert list(here.token_ids) == list(split.token_ids)
    assert list(here.usage.image_embedding_keys) == list(split.usage.image_embedding_keys)


def test_a_bad_image_is_invalid_argument_and_the_worker_goes_on(colocated):
    with pytest.raises(grpc.RpcError) as e:
        ask(colocated, image_request([fresh_png(), b"not an image"]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "image 1: cannot decode" in e.value.details()
    assert ask(colocated, image_request([fresh_png()], max_new_tokens=2)).finish_reason


def test_an_lm_worker_that_does_not_embed_refuses_image_bytes(lm_worker):
    request = lm_worker_pb2.LMGenerateRequest(chat=services.chat("What is this?", images=1),
                                              images=[lm_worker_pb2.ImageInput(data=png(3))],
                                              sampling=common_pb2.SamplingParams(max_new_tokens=2))
    with grpc.insecure_channel(lm_worker[1]) as channel, pytest.raises(grpc.RpcError) as e:
        list(lm_worker_pb2_grpc.LMWorkerStub(channel).Generate(request, timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "--embed-images" in e.value.details()


def test_text_requests_are_unchanged(colocated, stack):
    request = gateway_pb2.GenerateRequest(chat=services.chat("Name a colour."),
                                          sampling=common_pb2.SamplingParams(max_new_tokens=6))
    with grpc.insecure_channel(colocated) as channel:
        here = gateway_pb2_grpc.GatewayStub(channel).GenerateComplete(request, timeout=60)
    assert list(here.token_ids) == list(ask(stack, request).token_ids) and not here.usage.image_embedding_keys


@pytest.mark.parametrize("name", sorted(SPECIAL_IMAGES))
def test_each_strange_image_gets_an_answer_or_invalid_argument(colocated, name):
    request = image_request([SPECIAL_IMAGES[name]], max_new_tokens=2)
    if name.startswith("bomb"):
        with pytest.raises(grpc.RpcError) as e:
            ask(colocated, request)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "image 0" in e.value.details()
    else:
        assert ask(colocated, request).finish_reason


def test_the_worker_ends_the_module_serving_with_every_slot_free(embedding_lm_worker, colocated):
    proc, target = embedding_lm_worker
    assert ask(colocated, image_request([fresh_png()], max_new_tokens=2)).finish_reason
    with grpc.insecure_channel(target) as channel:
        stats = lm_worker_pb2_grpc.LMWorkerStub(channel).GetStats(lm_worker_pb2.StatsRequest(), timeout=10)
    assert proc.poll() is None and stats.active_slots == 0 and stats.queued == 0


def test_a_full_queue_refuses_image_requests_and_loses_none(served_checkpoint):
    """One slot and a queue of one, kept full by text clients: image requests sent as bytes are answered or
    refused with RESOURCE_EXHAUSTED and the queue's message, none is lost, and the worker ends with its slot
    free."""
    with services.running("lm_worker", "gemma3serve.v1.LMWorker", "--model", served_checkpoint,
                          "--dtype", "float32", "--num-slots", "1", "--max-queue", "1", "--max-length", "256",
                          "--redis-url", services.REDIS_URL, "--embed-images") as (_, target), \
            grpc.insecure_channel(target) as channel:
        stub = lm_worker_pb2_grpc.LMWorkerStub(channel)
        full = threading.Event()

        def outcome(request):
            try:
                list(stub.Generate(request, timeout=60))
                return "ok"
            except grpc.RpcError as e:
                return e.code(), e.details()

        def keep_full():
            text = lm_worker_pb2.LMGenerateRequest(chat=services.chat("Keep the queue full."),
                                                   sampling=common_pb2.SamplingParams(max_new_tokens=200))
            while not full.is_set():
                outcome(text)

        def image_request_for(image: bytes):
            return lm_worker_pb2.LMGenerateRequest(chat=services.chat("What is in this image?", images=1),
                                                   images=[lm_worker_pb2.ImageInput(data=image)],
                                                   sampling=common_pb2.SamplingParams(max_new_tokens=2))

        refusal = (grpc.StatusCode.RESOURCE_EXHAUSTED, "the admission queue is full (1 requests waiting)")
        outcomes = []
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            clients = [pool.submit(keep_full) for _ in range(5)]
            for _ in range(200):
                outcomes.append(outcome(image_request_for(fresh_png())))
                if refusal in outcomes:
                    break
            full.set()
            for client in clients:
                client.result()
        assert refusal in outcomes and all(o in ("ok", refusal) for o in outcomes), outcomes[-3:]
        assert outcome(image_request_for(fresh_png())) == "ok"  # the worker goes on, its queue free again
        stats = services.landed(lambda: stub.GetStats(lm_worker_pb2.StatsRequest(), timeout=10),
                                ok=lambda s: s.active_slots == 0 and s.queued == 0)
        assert stats.active_slots == 0 and stats.queued == 0
