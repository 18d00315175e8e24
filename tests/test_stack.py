"""The whole stack through the gateway: image bytes → vision worker → Redis → LM worker → client."""

import io
import json

import grpc
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from gemma3.processing import Gemma3ImageProcessor
from gemma3serve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, lm_worker_pb2
from tests import services
from tests.services import chat


def png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def ask(target, request):
    with grpc.insecure_channel(target) as channel:
        return gateway_pb2_grpc.GatewayStub(channel).GenerateComplete(request, timeout=120)


def image_request(images, text="What is in this image?", max_new_tokens=8):
    conversation = chat(text, images=len(images))
    for part, data in zip(conversation.turns[0].parts, images):
        part.image.data = data
    return gateway_pb2.GenerateRequest(chat=conversation, sampling=common_pb2.SamplingParams(
        max_new_tokens=max_new_tokens))


def library_answer(reference, served_checkpoint, request):
    """The library alone: Hugging Face preprocessing, prompt, generate() with pixel values."""
    model, prompts = reference
    images = [p.image.data for p in request.chat.turns[0].parts if p.WhichOneof("part") == "image"]
    lm = lm_worker_pb2.LMGenerateRequest(chat=request.chat, images=[lm_worker_pb2.ImageInput()] * len(images))
    ids, types = prompts.build(lm, [0] * len(images))
    pixels = Gemma3ImageProcessor.from_pretrained(served_checkpoint)(images)["pixel_values"]
    out = model.generate([ids], pixel_values=jnp.asarray(pixels), token_type_ids=types[None],
                         max_new_tokens=request.sampling.max_new_tokens, eos_token_id=prompts.stop_token_ids)
    return out.new_tokens[0, : out.num_new_tokens[0]].tolist()


def test_image_answer_equals_the_library_and_repeats_hit_the_cache(stack, reference, served_checkpoint):
    request = image_request([png(np.random.default_rng().integers(1 << 30)), png(2)])
    first = ask(stack, request)
    assert list(first.token_ids) == library_answer(reference, served_checkpoint, request)
    assert len(first.usage.image_embedding_keys) == 2
    second = ask(stack, request)
    assert list(second.token_ids) == list(first.token_ids)
    assert second.usage.image_cache_hits == 2 and first.usage.image_cache_hits <= 1


def test_one_trace_spans_all_three_services(stack, lm_worker, vision_worker):
    request = image_request([png(np.random.default_rng().integers(1 << 30))], max_new_tokens=2)
    ask(stack, request)

    def spans(target):
        with open(services.trace_file(target)) as f:
            return [json.loads(line) for line in f if line.strip()]

    trace_id = [s for s in spans(stack) if s["name"].endswith("Gateway/GenerateComplete")][-1]["context"]["trace_id"]
    vision = {s["name"]: s for s in spans(vision_worker[1]) if s["context"]["trace_id"] == trace_id}
    lm = {s["name"] for s in spans(lm_worker[1]) if s["context"]["trace_id"] == trace_id}
    assert {"/gemma3serve.v1.VisionWorker/EmbedImages", "vision_worker.cache_lookup", "vision_worker.forward"} <= set(
        vision)
    assert vision["vision_worker.cache_lookup"]["attributes"]["hit"] is False
    assert {"/gemma3serve.v1.LMWorker/Generate", "lm_worker.prefill", "lm_worker.decode"} <= lm


def _ask_with_vision_on_another_redis(lm_worker, served_checkpoint, inline_max_bytes: str):
    """One image request through a gateway whose vision worker writes to another Redis database than the
    LM worker reads: (the reply or None, the error or None, the vision worker's EmbedImages calls)."""
    elsewhere = services.REDIS_URL.rsplit("/", 1)[0] + "/1"
    with services.running("vision_worker", "gemma3serve.v1.VisionWorker", "--model", served_checkpoint,
                          "--dtype", "float32", "--redis-url", elsewhere,
                          "--inline-max-bytes", inline_max_bytes) as (_, vision):
        with services.running("gateway", "gemma3serve.v1.Gateway", "--lm-target", lm_worker[1],
                              "--vision-target", vision) as (_, gateway):
            reply = error = None
            try:
                reply = ask(gateway, image_request([png(3)]))
            except grpc.RpcError as e:
                error = e
            with open(services.trace_file(vision)) as f:
                calls = [s for s in map(json.loads, f) if s["name"].endswith("VisionWorker/EmbedImages")]
    return reply, error, calls


def test_an_embedding_the_lm_worker_cannot_find_is_embedded_again_once(lm_worker, served_checkpoint):
    """Embeddings by key alone: the key is never found, so the gateway re-embeds exactly once, then
    answers NOT_FOUND naming the key."""
    _, error, calls = _ask_with_vision_on_another_redis(lm_worker, served_checkpoint, "0")
    assert error is not None and error.code() == grpc.StatusCode.NOT_FOUND
    assert "is not in the cache" in error.details()
    assert len(calls) == 2


def test_an_inline_embedding_needs_no_redis_at_the_lm_worker(lm_worker, served_checkpoint):
    """The tiny model's embeddings travel inline too: the LM worker never needs Redis, and the answer
    comes from one embedding."""
    reply, error, calls = _ask_with_vision_on_another_redis(lm_worker, served_checkpoint, "1048576")
    assert error is None and reply.token_ids and len(calls) == 1


def test_metrics_record_latency_slots_and_cache_hits(stack, lm_worker, vision_worker):
    """Each service exports its metrics through the OpenTelemetry SDK (here to a JSON-lines file)."""
    import time

    image = png(np.random.default_rng().integers(1 << 30))
    for _ in range(2):  # a miss, then a hit
        ask(stack, image_request([image], max_new_tokens=3))
    with pytest.raises(grpc.RpcError):
        ask(stack, gateway_pb2.GenerateRequest())

    def total(points):
        return sum(p.get("value", p.get("count", 0)) for p in points)

    def check():
        vision, lm, gateway = (services.metric_points(t) for t in (vision_worker[1], lm_worker[1], stack))
        assert total(vision["gemma3.vision.cache.hits"]) >= 1 and total(vision["gemma3.vision.cache.misses"]) >= 1
        assert total(vision["gemma3.vision.forward.duration"]) >= 1 and total(vision["gemma3.vision.batch.images"])
        assert total(lm["gemma3.lm.time_to_first_token"]) >= 2 and total(lm["gemma3.lm.time_per_output_token"]) >= 2
        assert all(p["sum"] > 0 for p in lm["gemma3.lm.time_to_first_token"])
        assert {p["attributes"]["kind"] for p in lm["gemma3.lm.tokens"]} == {"prompt", "cached_prompt", "completion"}
        assert lm["gemma3.lm.queue_depth"] and lm["gemma3.lm.active_slots"]
        assert any(p["attributes"]["finish_reason"] == "length" for p in lm["gemma3.lm.requests"])
        statuses = {p["attributes"]["grpc.status"] for p in gateway["gemma3.gateway.requests"]}
        assert {"OK", "INVALID_ARGUMENT"} <= statuses
        assert total(gateway["gemma3.gateway.time_to_first_token"]) >= 2

    deadline = time.monotonic() + 15
    while True:  # exports happen every second (OTEL_METRIC_EXPORT_INTERVAL in tests/services.py)
        try:
            return check()
        except (AssertionError, KeyError):
            if time.monotonic() > deadline:
                raise
        time.sleep(0.3)
