"""DESIGN.md's error table, row by row, through the gateway of the whole stack (real processes and Redis).

Each bad input must get its documented gRPC status with a message a person can act on, and must
leave the workers serving: the last test asks a normal question after all of them.
"""

import io
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import redis
from PIL import Image

from gemma3serve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, lm_worker_pb2, lm_worker_pb2_grpc
from serving.embedding_cache import encode
from tests import services
from tests.services import chat

INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND


def png(seed: int, size=(24, 32)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def bomb(width: int = 60_000, height: int = 60_000) -> bytes:
    """A valid PNG header declaring a huge image over a few bytes of data."""
    data = bytearray(png(0, (1, 1)))
    ihdr = 8 + 4  # signature, chunk length; then b"IHDR" and 13 bytes of fields, then the CRC
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    return bytes(data)


def with_images(text, images, **sampling):
    conversation = chat(text, images=len(images))
    for part, data in zip(conversation.turns[0].parts, images):
        part.image.data = data
    return gateway_pb2.GenerateRequest(chat=conversation, sampling=common_pb2.SamplingParams(**sampling))


def text(prompt="What colour is the circle?", **sampling):
    return gateway_pb2.GenerateRequest(chat=chat(prompt), sampling=common_pb2.SamplingParams(**sampling))


def stream(target, request, timeout=60):
    with grpc.insecure_channel(target) as channel:
        return list(gateway_pb2_grpc.GatewayStub(channel).Generate(request, timeout=timeout))


def status_of(target, request, timeout=60) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        stream(target, request, timeout)
    return e.value.code(), e.value.details()


def long_answer():
    """A raw prompt the served random model answers at length: no stop token within 250 tokens (the
    most its 256-token context allows), so a client can leave or time out mid-answer."""
    return gateway_pb2.GenerateRequest(raw=common_pb2.RawPrompt(text="What colour"),
                                       sampling=common_pb2.SamplingParams(max_new_tokens=250))


def lm_stats(lm_target) -> lm_worker_pb2.LMWorkerStats:
    with grpc.insecure_channel(lm_target) as channel:
        return lm_worker_pb2_grpc.LMWorkerStub(channel).GetStats(lm_worker_pb2.StatsRequest(), timeout=10)


def wait_for_free_slots(lm_target, condition=lambda stats: True, seconds=15) -> lm_worker_pb2.LMWorkerStats:
    deadline = time.monotonic() + seconds
    while True:
        stats = lm_stats(lm_target)
        if (stats.active_slots == 0 and condition(stats)) or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


@pytest.mark.parametrize("request_, code, message", [
    (with_images("What is this?", [b"GIF89a broken"]), INVALID, "image 0: cannot decode the image"),
    (with_images("What is this?", [b"%PDF-1.4 not an image at all"]), INVALID, "cannot decode"),
    (with_images("What is this?", [b""]), INVALID, "image 0 is empty"),
    (with_images("What is this?", [bomb()]), INVALID, "image 0: the image is over the limit of 64000000 pixels"),
    (with_images("What is this?", [bomb(9000, 9000)]), INVALID, "the image is 9000x9000, over the limit"),
    (with_images("Compare them", [png(1)] * 9), INVALID, "9 images exceed the limit of 8"),
    (gateway_pb2.GenerateRequest(raw=common_pb2.RawPrompt(
        text="<start_of_image> and <start_of_image>", images=[common_pb2.Image(data=png(2))])),
     INVALID, "the prompt has 2 image placeholders but 1 images"),
    (text("A <start_of_image> typed by hand"), INVALID, "1 image placeholders but 0 images"),
    (text("Fill the window", max_new_tokens=250), INVALID, "exceeds the context of 256 tokens"),
    (text("word " * 300), INVALID, "fills the context of 256 tokens"),  # max_new_tokens unset
    (text(temperature=float("nan")), INVALID, "sampling.temperature must be a finite number"),
    (text(temperature=-0.5), INVALID, "sampling.temperature must be a finite number >= 0"),
    (text(top_p=1.5), INVALID, "sampling.top_p must be at most 1"),
    (text(top_p=float("inf")), INVALID, "sampling.top_p must be a finite number"),
    (text(top_logprobs=50), INVALID, "top_logprobs must be between 0 and 5"),
    (gateway_pb2.GenerateRequest(chat=common_pb2.Chat(turns=[common_pb2.Turn(role="robot")])), INVALID,
     "role 'robot' is not allowed"),
    (gateway_pb2.GenerateRequest(), INVALID, "no prompt"),
    (gateway_pb2.GenerateRequest(chat=common_pb2.Chat(turns=[common_pb2.Turn(role="user", parts=[
        common_pb2.ContentPart(image=common_pb2.Image(embedding_key="gemma3:nowhere:0123"))])])),
     NOT_FOUND, "embedding gemma3:nowhere:0123 is not in the cache"),
], ids=["undecodable", "not-an-image-format", "zero-bytes", "decompression-bomb", "too-many-pixels", "too-many-images",
        "placeholder-mismatch", "placeholder-in-text", "beyond-context", "prompt-fills-context", "nan-temperature",
        "negative-temperature", "top-p-above-1", "infinite-top-p", "too-many-logprobs", "unknown-role", "no-prompt",
        "unknown-embedding-key"])
def test_bad_input_gets_its_status_and_a_readable_message(stack, request_, code, message):
    got_code, details = status_of(stack, request_)
    assert got_code == code, details
    assert message in details


def test_a_full_queue_is_resource_exhausted_and_nothing_is_lost(stack, lm_worker):
    request = text("Queue", max_new_tokens=200)  # long enough that 60 clients outrun 4 slots and a 32-deep queue

    def one(_):
        try:
            stream(stack, request, timeout=180)
            return "ok"
        except grpc.RpcError as e:
            return e.code(), e.details()

    with ThreadPoolExecutor(60) as pool:  # 4 slots + 32 waiting: the rest must be refused, not lost
        outcomes = list(pool.map(one, range(60)))
    refused = [o for o in outcomes if o != "ok"]
    assert refused and all(o == (grpc.StatusCode.RESOURCE_EXHAUSTED, "the admission queue is full (32 requests "
                                 "waiting)") for o in refused)
    assert outcomes.count("ok") + len(refused) == 60
    assert wait_for_free_slots(lm_worker[1]).active_slots == 0


def test_a_client_that_cancels_mid_stream_frees_its_slot(stack, lm_worker):
    before = lm_stats(lm_worker[1]).finished["cancelled"]
    with grpc.insecure_channel(stack) as channel:
        # more than the 4 slots: a slot that a cancel did not free would end by length, not be counted here.
        # Each call is cancelled at its first token, before the next starts: calls opened together ran to
        # their full 250 tokens (tens of ms for the tiny model) while the client was still cancelling others
        for _ in range(6):
            call = gateway_pb2_grpc.GatewayStub(channel).Generate(long_answer())
            next(call)
            call.cancel()
    stats = wait_for_free_slots(lm_worker[1], lambda s: s.finished["cancelled"] - before >= 6)
    assert stats.active_slots == 0 and stats.finished["cancelled"] - before >= 6


def timed_stream(target, request, timeout=60) -> tuple[list, list[float], grpc.RpcError | None]:
    """The chunks a stream gave, when each arrived (seconds since the call), and the error it ended with."""
    chunks, times, started = [], [], time.monotonic()
    with grpc.insecure_channel(target) as channel:
        try:
            for chunk in gateway_pb2_grpc.GatewayStub(channel).Generate(request, timeout=timeout):
                chunks.append(chunk)
                times.append(time.monotonic() - started)
        except grpc.RpcError as e:
            return chunks, times, e
    return chunks, times, None


def test_a_deadline_shorter_than_the_answer_is_deadline_exceeded_and_frees_the_slot(stack, lm_worker):
    """The deadline is set from this machine's own timing of the whole answer, so that it passes
    while tokens are streaming however fast the tiny model decodes; a run that still beats it
    (a hiccup) is retried with a deadline half as far."""
    chunks, times, error = timed_stream(stack, long_answer())
    assert error is None and chunks[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    first, last = times[0], times[-1]
    ended = lambda stats: stats.finished["deadline"] + stats.finished["cancelled"]  # noqa: E731
    before = ended(lm_stats(lm_worker[1]))
    expired = None
    for fraction in (0.5, 0.25, 0.125):
        timeout = first + fraction * (last - first)
        chunks, _, error = timed_stream(stack, long_answer(), timeout=timeout)
        if error is not None:
            expired = error, chunks
            break
        assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert expired is not None, f"250 tokens kept beating a deadline of {timeout:.3f} s"
    error, chunks = expired
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error.details()
    assert sum(len(c.token_ids) for c in chunks) < 250
    stats = wait_for_free_slots(lm_worker[1], lambda s: ended(s) > before)
    assert stats.active_slots == 0 and ended(stats) > before


def test_a_corrupt_cache_entry_is_recomputed_never_used(stack):
    request = with_images("What is in this image?", [png(int(np.random.default_rng().integers(1 << 30)))],
                          max_new_tokens=6)
    first = stream(stack, request)
    key = first[-1].usage.image_embedding_keys[0]
    r = redis.Redis.from_url(services.REDIS_URL)
    try:
        good = services.landed(lambda: r.get(key))
        for poison in (good[:-1] + bytes([good[-1] ^ 1]),  # one flipped bit: the checksum fails
                       good[:200],  # a truncated value
                       encode(np.zeros((1, 3, 5), np.float32)),  # well formed, of the wrong shape
                       b"pickle.loads would run this"):  # a foreign value
            r.set(key, poison)
            again = stream(stack, request)
            assert again[-1].usage.image_cache_hits == 0
            assert [t for c in again for t in c.token_ids] == [t for c in first for t in c.token_ids]
            services.landed(lambda: r.get(key), lambda value: value == good)  # overwritten with the recomputation
    finally:
        r.close()


def test_a_worker_that_is_down_is_unavailable_quickly(vision_worker):
    nobody = f"127.0.0.1:{services.free_port()}"
    with services.running("gateway", "gemma3serve.v1.Gateway", "--lm-target", nobody,
                          "--vision-target", vision_worker[1]) as (_, gateway):
        started = time.monotonic()
        code, details = status_of(gateway, text(), timeout=30)
    assert code == grpc.StatusCode.UNAVAILABLE and "LM worker is unavailable" in details
    assert time.monotonic() - started < 10


def test_the_stack_still_answers_after_all_of_that(stack, lm_worker):
    chunks = stream(stack, text("How many shapes are there?", max_new_tokens=4))
    assert chunks[-1].finish_reason in (common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH)
    assert wait_for_free_slots(lm_worker[1]).active_slots == 0
