"""Every configurable input limit, each through the gateway of a stack started with small limits: request
size, images per request, bytes and pixels per image, prompt tokens, max_new_tokens and calls open per
client. Each refusal has its status and a message naming the limit; just under each limit is served."""

import io
import threading

import grpc
import numpy as np
import pytest
from PIL import Image

from gemma3serve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests import services
from tests.services import chat

INVALID, EXHAUSTED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture(scope="module")
def limited(served_checkpoint):
    """A gateway, vision worker and LM worker started with small limits."""
    with services.running("lm_worker", "gemma3serve.v1.LMWorker", "--model", served_checkpoint, "--dtype",
                          "float32", "--num-slots", "2", "--max-length", "128", "--max-prompt-tokens", "96",
                          "--max-new-tokens-limit", "16", "--redis-url", services.REDIS_URL) as (_, lm), \
         services.running("vision_worker", "gemma3serve.v1.VisionWorker", "--model", served_checkpoint, "--dtype",
                          "float32", "--max-image-pixels", "2000", "--redis-url", services.REDIS_URL) as (_, vision), \
         services.running("gateway", "gemma3serve.v1.Gateway", "--lm-target", lm, "--vision-target", vision,
                          "--max-images", "2", "--max-image-bytes", "50000", "--max-request-bytes", "100000",
                          "--max-streams-per-client", "2") as (_, gateway):
        yield gateway


def image(width: int, height: int, seed: int = 0, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)).save(buf, fmt)
    return buf.getvalue()


def request(text="Hi", images=(), **sampling):
    conversation = chat(text, images=len(images))
    for part, data in zip(conversation.turns[0].parts, images):
        part.image.data = data
    return gateway_pb2.GenerateRequest(chat=conversation, sampling=common_pb2.SamplingParams(**sampling))


def outcome(target, req) -> tuple[grpc.StatusCode, str]:
    with grpc.insecure_channel(target) as channel:
        try:
            gateway_pb2_grpc.GatewayStub(channel).GenerateComplete(req, timeout=60)
        except grpc.RpcError as e:
            return e.code(), e.details()
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize("req,code,message", [
    (request(images=[image(200, 200)]), EXHAUSTED, "larger than max"),  # 120 kB of noise: over 100 kB
    (request(images=[image(8, 8, i) for i in range(3)]), INVALID, "3 images exceed the limit of 2"),
    (request(images=[image(140, 140)]), INVALID, "over the limit of 50000"),
    (request(images=[image(50, 50, fmt="JPEG")]), INVALID, "over the limit of 2000 pixels"),
    (request("count " * 70), INVALID, "over this server's limit of 96"),
    (request(max_new_tokens=17), INVALID, "max_new_tokens is 17, over this server's limit of 16"),
], ids=["request-bytes", "images", "image-bytes", "image-pixels", "prompt-tokens", "max-new-tokens"])
def test_over_a_limit_is_refused_with_its_name(limited, req, code, message):
    got, details = outcome(limited, req)
    assert got == code, details
    assert message in details


def test_just_under_every_limit_is_served(limited):
    req = request("count " * 10, images=[image(40, 40, 1), image(44, 44, 2)], max_new_tokens=16)
    got = outcome(limited, req)
    assert got == (grpc.StatusCode.OK, ""), got


def test_a_client_may_keep_only_its_quota_of_calls_open(limited):
    barrier, results = threading.Barrier(12), []

    def call():
        with grpc.insecure_channel(limited) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            barrier.wait()
            try:
                chunks = list(stub.Generate(request("Tell me more", max_new_tokens=16), timeout=60))
                results.append((grpc.StatusCode.OK, chunks[-1].finish_reason))
            except grpc.RpcError as e:
                results.append((e.code(), e.details()))

    threads = [threading.Thread(target=call) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = [code for code, _ in results]
    assert set(codes) <= {grpc.StatusCode.OK, EXHAUSTED}, results
    assert codes.count(EXHAUSTED) >= 1 and codes.count(grpc.StatusCode.OK) >= 2, results
    assert all("already has 2 calls open" in d for code, d in results if code == EXHAUSTED)
    # the count goes back down: one after another, calls are served again
    assert [outcome(limited, request("Again", max_new_tokens=4))[0] for _ in range(3)] == [grpc.StatusCode.OK] * 3
