"""The LM worker as a real process on a loopback port, through real gRPC channels and real Redis."""

import asyncio
import os
import socket
import subprocess
import sys
import time
import uuid

import grpc
import jax.numpy as jnp
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gemma3 import Gemma3ForConditionalGeneration
from gemma3serve.v1 import common_pb2, lm_worker_pb2, lm_worker_pb2_grpc
from lm_worker.prompts import PromptBuilder
from serving.embedding_cache import EmbeddingCache
from tests import gemma_tokenizer
from tests import make_checkpoints as mk

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("lm-worker-model"))
    tok = gemma_tokenizer.write(path)
    ids = {s: tok.token_to_id(s) for s in ("<start_of_image>", "<end_of_image>", "<image_soft_token>")}
    hf = mk.hf_multimodal_model(seed=11, text={"vocab_size": tok.get_vocab_size()},
                                image_token_index=ids["<image_soft_token>"], boi_token_index=ids["<start_of_image>"],
                                eoi_token_index=ids["<end_of_image>"])
    hf.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(checkpoint):
    model = Gemma3ForConditionalGeneration.from_pretrained(checkpoint)
    return model, PromptBuilder.from_pretrained(checkpoint, model.config)


@pytest.fixture(scope="module")
def worker(checkpoint):
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": ROOT}
    proc = subprocess.Popen([sys.executable, "-m", "lm_worker", "--model", checkpoint, "--port", str(port),
                             "--dtype", "float32", "--num-slots", "2", "--max-length", "256", "--max-queue", "4",
                             "--log-format", "text", "--drain-seconds", "2", "--redis-url", REDIS_URL],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    target = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                status = health.Check(health_pb2.HealthCheckRequest(service="gemma3serve.v1.LMWorker"), timeout=1)
                if status.status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, "the worker did not become healthy"
            time.sleep(0.5)
    yield proc, target
    proc.terminate()
    try:
        assert proc.wait(30) == 0
    finally:
        proc.kill()


def _chat(text, images=0, system=None):
    turns = []
    if system:
        turns.append(common_pb2.Turn(role="system", parts=[common_pb2.ContentPart(text=system)]))
    parts = [common_pb2.ContentPart(image=common_pb2.Image(embedding_key="x")) for _ in range(images)]
    turns.append(common_pb2.Turn(role="user", parts=parts + [common_pb2.ContentPart(text=text)]))
    return common_pb2.Chat(turns=turns)


def _stream(target, request, timeout=60):
    with grpc.insecure_channel(target) as channel:
        return list(lm_worker_pb2_grpc.LMWorkerStub(channel).Generate(request, timeout=timeout))


def _expected(reference, request, features=None):
    model, prompts = reference
    crops = [0] * len(request.images)
    ids, types = prompts.build(request, crops)
    extra = {} if features is None else {"image_features": features, "token_type_ids": types[None]}
    out = model.generate([ids], max_new_tokens=request.sampling.max_new_tokens, eos_token_id=prompts.stop_token_ids,
                         **extra)
    return ids, out.new_tokens[0, : out.num_new_tokens[0]].tolist()


def test_text_chat_streams_the_greedy_answer(worker, reference):
    _, target = worker
    request = lm_worker_pb2.LMGenerateRequest(request_id="t1", chat=_chat("What is in this image?", system="Be brief."),
                                              sampling=common_pb2.SamplingParams(max_new_tokens=12))
    chunks = _stream(target, request)
    ids, want = _expected(reference, request)
    got = [t for c in chunks for t in c.token_ids]
    assert got == want
    last = chunks[-1]
    assert last.finish_reason in (common_pb2.FINISH_REASON_LENGTH, common_pb2.FINISH_REASON_STOP)
    assert last.usage.prompt_tokens == len(ids) and last.usage.completion_tokens == len(want)
    assert all(c.request_id == "t1" for c in chunks)
    text = "".join(c.text for c in chunks)
    assert text == reference[1].tokenizer.decode(want, skip_special_tokens=True)


def test_images_inline_and_from_redis_give_the_same_answer(worker, reference):
    _, target = worker
    model, _ = reference
    features = np.asarray(model.get_image_features(jnp.asarray(mk.random_pixels(2, seed=5))))
    key = f"test:{uuid.uuid4()}"

    async def put():
        cache = EmbeddingCache(REDIS_URL, ttl_seconds=60)
        await cache.put(key, features[1:])
        await cache.close()

    asyncio.run(put())
    inline = common_pb2.Tensor(dtype="float32", shape=list(features[:1].shape), data=features[:1].tobytes())
    request = lm_worker_pb2.LMGenerateRequest(
        chat=_chat("Where is the square?", images=2), sampling=common_pb2.SamplingParams(max_new_tokens=10),
        images=[lm_worker_pb2.ImageInput(inline=inline), lm_worker_pb2.ImageInput(key=key)])
    got = [t for c in _stream(target, request) for t in c.token_ids]
    _, want = _expected(reference, request, features)
    assert got == want


def test_missing_embedding_is_not_found_naming_the_key(worker):
    _, target = worker
    request = lm_worker_pb2.LMGenerateRequest(chat=_chat("hi", images=1),
                                              images=[lm_worker_pb2.ImageInput(key="test:missing-key")])
    with pytest.raises(grpc.RpcError) as e:
        _stream(target, request)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "test:missing-key" in e.value.details()


@pytest.mark.parametrize("request_, message", [
    (lm_worker_pb2.LMGenerateRequest(chat=_chat("hi"), sampling=common_pb2.SamplingParams(temperature=-1)),
     "temperature"),
    (lm_worker_pb2.LMGenerateRequest(chat=_chat("hi"), sampling=common_pb2.SamplingParams(top_p=float("nan"))),
     "top_p"),
    (lm_worker_pb2.LMGenerateRequest(chat=_chat("hi", images=1)), "1 image placeholders but 0 images"),
    (lm_worker_pb2.LMGenerateRequest(raw=common_pb2.RawPrompt(text="x" * 10), sampling=common_pb2.SamplingParams(
        max_new_tokens=300)), "exceeds the context"),
    (lm_worker_pb2.LMGenerateRequest(), "no prompt"),
])
def test_bad_requests_get_invalid_argument(worker, request_, message):
    _, target = worker
    with pytest.raises(grpc.RpcError) as e:
        _stream(target, request_)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in e.value.details()


def test_stop_strings_cut_the_text(worker, reference):
    _, target = worker
    request = lm_worker_pb2.LMGenerateRequest(raw=common_pb2.RawPrompt(text="Two shapes"),
                                              sampling=common_pb2.SamplingParams(max_new_tokens=20))
    full = "".join(c.text for c in _stream(target, request))
    assert len(full) > 4
    stop = full[2:4]
    request.sampling.stop.append(stop)
    chunks = _stream(target, request)
    assert "".join(c.text for c in chunks) == full[: full.index(stop)]
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_STOP


def test_cancel_and_deadline_free_the_slots(worker, reference):
    _, target = worker
    long_ = lm_worker_pb2.LMGenerateRequest(raw=common_pb2.RawPrompt(text="What colour"),
                                            sampling=common_pb2.SamplingParams(max_new_tokens=80))
    with grpc.insecure_channel(target) as channel:
        stub = lm_worker_pb2_grpc.LMWorkerStub(channel)
        for _ in range(3):  # more cancelled streams than slots: each must give its slot back
            call = stub.Generate(long_)
            next(call)
            call.cancel()
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(long_, timeout=0.05))
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    request = lm_worker_pb2.LMGenerateRequest(chat=_chat("How many shapes are there?"),
                                              sampling=common_pb2.SamplingParams(max_new_tokens=6))
    assert [t for c in _stream(target, request, timeout=30) for t in c.token_ids] == _expected(reference, request)[1]
