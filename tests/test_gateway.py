"""The gateway as a real process in front of a real LM worker (and no vision worker, to see faults)."""

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid

import grpc
import jax.numpy as jnp
import numpy as np
import pytest

from gemma3serve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, lm_worker_pb2
from tests import make_checkpoints as mk
from tests import services
from tests.services import chat, expected_answer, expected_answers


@pytest.fixture(scope="module")
def gateway(lm_worker):
    _, lm_target = lm_worker
    nobody = f"127.0.0.1:{services.free_port()}"  # no vision worker listens here
    with services.running("gateway", "gemma3serve.v1.Gateway", "--lm-target", lm_target,
                          "--vision-target", nobody, "--max-images", "3") as (proc, target):
        yield target


def _spans(target):
    with open(services.trace_file(target)) as f:
        return [json.loads(line) for line in f if line.strip()]


def _call(target, request, unary=False, timeout=60):
    with grpc.insecure_channel(target) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        if unary:
            return stub.GenerateComplete(request, timeout=timeout)
        return list(stub.Generate(request, timeout=timeout))



def test_the_gateway_runs_on_uvloop(gateway):
    with open(services.log_file("gateway", gateway)) as f:
        assert "event loop: uvloop" in f.read()


def test_text_chat_streams_and_completes(gateway, reference):
    request = gateway_pb2.GenerateRequest(request_id="g1", chat=chat("What colour is the triangle?"),
                                          sampling=common_pb2.SamplingParams(max_new_tokens=10))
    chunks = _call(gateway, request)
    _, want = expected_answer(reference, services.lm_request(request))
    assert [t for c in chunks for t in c.token_ids] == want
    whole = _call(gateway, request, unary=True)
    assert list(whole.token_ids) == want and whole.text == "".join(c.text for c in chunks)
    assert whole.request_id == "g1" and whole.finish_reason == chunks[-1].finish_reason != 0
    assert whole.usage.completion_tokens == len(want) and whole.usage.image_cache_hits == 0
    assert whole.usage.time_to_first_token_s > 0


def test_an_embedding_key_needs_no_vision_worker(gateway, reference):
    model, _ = reference
    features = np.asarray(model.get_image_features(jnp.asarray(mk.random_pixels(1, seed=9))))
    key = f"test:{uuid.uuid4()}"

    services.cache_put(key, features)
    conversation = chat("Where is the square?", images=1)
    conversation.turns[0].parts[0].image.embedding_key = key
    request = gateway_pb2.GenerateRequest(chat=conversation, sampling=common_pb2.SamplingParams(max_new_tokens=8))
    whole = _call(gateway, request, unary=True)
    _, want = expected_answer(reference, services.lm_request(request), features)
    assert list(whole.token_ids) == want and list(whole.usage.image_embedding_keys) == [key]


def test_image_bytes_without_a_vision_worker_fail_fast_with_unavailable(gateway):
    conversation = chat("What is in this image?", images=1)
    conversation.turns[0].parts[0].image.data = b"\x89PNG not really"
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        _call(gateway, gateway_pb2.GenerateRequest(chat=conversation), timeout=30)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "vision worker" in e.value.details()
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("request_, message", [
    (gateway_pb2.GenerateRequest(), "no prompt"),
    (gateway_pb2.GenerateRequest(chat=chat("four images", images=4)), "4 images exceed the limit of 3"),
    (gateway_pb2.GenerateRequest(raw=common_pb2.RawPrompt(text="<start_of_image>", images=[common_pb2.Image()])),
     "image 0 is empty"),
    (gateway_pb2.GenerateRequest(chat=chat("hi"), sampling=common_pb2.SamplingParams(temperature=-2)),
     "temperature"),  # found by the LM worker, passed through
])
def test_bad_requests_get_invalid_argument(gateway, request_, message):
    with pytest.raises(grpc.RpcError) as e:
        _call(gateway, request_)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in e.value.details()


def test_python_clients_and_cli(gateway, reference):
    from gateway.client import AsyncClient, Client, build_request

    request = build_request("How many shapes are there?", max_new_tokens=8, request_id="c1")
    with Client(gateway) as client:
        streamed = list(client.stream(request))
        whole = client.complete(request)

    async def go():
        async with AsyncClient(gateway) as client:
            return [c async for c in client.stream(request)], await client.complete(request)

    async_streamed, async_whole = asyncio.run(go())
    text = "".join(c.text for c in streamed)
    assert whole.text == text == async_whole.text == "".join(c.text for c in async_streamed)
    _, want = expected_answer(reference, services.lm_request(request))
    assert list(whole.token_ids) == want

    env = {**os.environ, "PYTHONPATH": services.ROOT}
    cli = [sys.executable, "-m", "gateway.client", "--target", gateway, "--max-new-tokens", "8",
           "How many shapes are there?"]
    out = subprocess.run(cli, capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0 and out.stdout == text + "\n"
    out = subprocess.run(cli + ["--json"], capture_output=True, text=True, env=env, timeout=60)
    reply = json.loads(out.stdout)
    assert reply["text"] == text and reply["usage"]["completion_tokens"] == len(want)
    bad = subprocess.run(cli[:-1] + ["--image", "/nonexistent.png", "x"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "cannot read image" in bad.stderr


def test_one_trace_spans_the_gateway_and_the_lm_worker(gateway, lm_worker):
    request = gateway_pb2.GenerateRequest(chat=chat("Trace me"), sampling=common_pb2.SamplingParams(max_new_tokens=2))
    _call(gateway, request, unary=True)
    time.sleep(0.5)
    server = [s for s in _spans(gateway) if s["name"].endswith("Gateway/GenerateComplete")]
    assert server
    trace_id = server[-1]["context"]["trace_id"]
    names = {s["name"] for s in _spans(lm_worker[1]) if s["context"]["trace_id"] == trace_id}
    assert {"/gemma3serve.v1.LMWorker/Generate", "lm_worker.prefill", "lm_worker.decode",
            "lm_worker.embeddings"} <= names


def test_sixteen_concurrent_requests_get_their_solo_greedy_answers(gateway, reference):
    """Batching must not change results: each answer equals the library's own generate(), and every
    step's top-2 logit margin is far above float noise, so equality is a fair demand."""
    from concurrent.futures import ThreadPoolExecutor

    model, prompts = reference
    features = np.asarray(model.get_image_features(jnp.asarray(mk.random_pixels(1, seed=21))))
    key = f"test:{uuid.uuid4()}"

    services.cache_put(key, features)
    requests = services.mixed_requests(16, key)
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda r: _call(gateway, r, unary=True), requests))
    lm_requests = [services.lm_request(r) for r in requests]
    expected = expected_answers(reference, lm_requests, [features if len(r.images) else None for r in lm_requests])
    fulls = [ids + want for ids, want in expected]
    batch = np.zeros((len(fulls), max(map(len, fulls))), np.int32)  # right-padded: one forward, one compile
    mask = np.zeros_like(batch)
    for row, full in enumerate(fulls):
        batch[row, :len(full)], mask[row, :len(full)] = full, 1
    with_images = [i for i, r in enumerate(lm_requests) if len(r.images)]
    logits = np.asarray(model(jnp.asarray(batch), attention_mask=jnp.asarray(mask), token_type_ids=jnp.asarray(
        (batch == prompts.soft_id).astype(np.int32)), image_features=jnp.asarray(
        np.concatenate([features] * len(with_images)))).logits)
    for row, (answer, (ids, want)) in enumerate(zip(answers, expected)):
        assert list(answer.token_ids) == want
        top2 = np.sort(logits[row, len(ids) - 1:len(ids) + len(want) - 1], axis=-1)[:, -2:]
        # float32 noise between batched and solo runs is ~1e-6 here; a near-tie would make equality luck
        assert (top2[:, 1] - top2[:, 0]).min() > 1e-4


def test_seeded_sampling_is_reproducible_through_the_gateway(gateway):
    request = gateway_pb2.GenerateRequest(chat=chat("Where is the square?"), sampling=common_pb2.SamplingParams(
        max_new_tokens=8, temperature=1000.0, seed=1234))  # this random model is very peaked
    first, second = _call(gateway, request, unary=True), _call(gateway, request, unary=True)
    assert list(first.token_ids) == list(second.token_ids)
    request.sampling.seed = 99
    assert list(_call(gateway, request, unary=True).token_ids) != list(first.token_ids)


def test_two_lm_workers_behind_one_gateway_both_serve(lm_worker, served_checkpoint):
    from gemma3serve.v1 import lm_worker_pb2_grpc

    def finished(target):
        with grpc.insecure_channel(target) as channel:
            stats = lm_worker_pb2_grpc.LMWorkerStub(channel).GetStats(lm_worker_pb2.StatsRequest())
            return sum(stats.finished.values())

    first = lm_worker[1]
    with services.running("lm_worker", "gemma3serve.v1.LMWorker", "--model", served_checkpoint, "--dtype",
                          "float32", "--num-slots", "2", "--max-length", "256") as (_, second):
        targets = f"ipv4:{first},{second}"  # a list of addresses, balanced round robin
        with services.running("gateway", "gemma3serve.v1.Gateway", "--lm-target", targets) as (_, gateway):
            before = finished(first), finished(second)
            request = gateway_pb2.GenerateRequest(chat=chat("Which worker?"),
                                                  sampling=common_pb2.SamplingParams(max_new_tokens=2))
            answers = [_call(gateway, request, unary=True).token_ids for _ in range(8)]
            after = finished(first), finished(second)
    assert all(list(a) == list(answers[0]) for a in answers)
    assert after[0] - before[0] >= 2 and after[1] - before[1] >= 2
