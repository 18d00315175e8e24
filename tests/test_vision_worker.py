"""The vision worker as a real process with the real Redis: cache keys, hits, poisoned entries, outages."""

import asyncio
import concurrent.futures
import io
import time

import grpc
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from gemma3 import Gemma3ImageEncoder
from gemma3.processing import Gemma3ImageProcessor
from gemma3serve.v1 import vision_worker_pb2, vision_worker_pb2_grpc
from serving.embedding_cache import EmbeddingCache, decode
from tests import services
from vision_worker.service import INLINE_IMAGE_BYTES


def png(seed: int, size=(40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def embed(target, images, pan_and_scan=False, timeout=60):
    with grpc.insecure_channel(target) as channel:
        return vision_worker_pb2_grpc.VisionWorkerStub(channel).EmbedImages(
            vision_worker_pb2.EmbedImagesRequest(images=images, pan_and_scan=pan_and_scan), timeout=timeout)


def redis(op):
    async def go():
        cache = EmbeddingCache(services.REDIS_URL, ttl_seconds=120)
        try:
            return await op(cache)
        finally:
            await cache.close()

    return asyncio.run(go())


@pytest.fixture(scope="module")
def expected(served_checkpoint):
    encoder = Gemma3ImageEncoder.from_pretrained(served_checkpoint)
    processor = Gemma3ImageProcessor.from_pretrained(served_checkpoint)
    return lambda data: np.asarray(encoder(jnp.asarray(processor([data])["pixel_values"])))


def inline(item) -> np.ndarray:
    assert item.HasField("inline") and item.inline.dtype == "float32"
    return np.frombuffer(item.inline.data, np.float32).reshape(item.inline.shape)


def stored(keys, timeout=10.0, usable=False) -> list[bytes]:
    """The Redis values of ``keys`` once all are there (a small embedding is written after its reply) and,
    when ``usable``, every one decodes (a corrupt one was overwritten)."""
    def there(values) -> bool:
        return None not in values and not (usable and any(decode(v) is None for v in values))

    return services.landed(lambda: redis(lambda c: c.get_many(keys)), there, timeout)


def test_embeddings_are_cached_by_content(vision_worker, expected):
    """The tiny model's embeddings are small, so they also travel inline, hits and misses alike (the LM
    worker skips Redis for them), and are written to Redis after the reply."""
    _, target = vision_worker
    a, b = png(100 + np.random.default_rng().integers(1 << 30)), png(7)
    key_b = embed(target, [b]).embeddings[0].key
    stored([key_b])  # its write follows the reply: let it land before taking it out
    redis(lambda c: c.redis.delete(key_b))
    first = embed(target, [a, b, a])
    assert [e.cache_hit for e in first.embeddings] == [False, False, False]
    assert first.embeddings[0].key == first.embeddings[2].key != first.embeddings[1].key
    for item, image in zip(first.embeddings, [a, b, a]):
        np.testing.assert_allclose(inline(item), expected(image), atol=1e-5)
    for value, image in zip(stored([first.embeddings[0].key, first.embeddings[1].key]), [a, b]):
        np.testing.assert_allclose(decode(value), expected(image), atol=1e-5)
    again = embed(target, [b, a])
    assert [e.cache_hit for e in again.embeddings] == [True, True]
    for item, image in zip(again.embeddings, [b, a]):
        np.testing.assert_allclose(inline(item), expected(image), atol=1e-5)


def test_a_lone_small_miss_is_embedded_as_in_a_batch(vision_worker, expected):
    """A request alone in the worker with one small new image, which the worker embeds on its event loop
    (no thread hops), gets the reference embedding, inline and in Redis, as requests in a batch do."""
    _, target = vision_worker
    image = png(300 + np.random.default_rng().integers(1 << 30))
    assert len(image) <= INLINE_IMAGE_BYTES
    miss = embed(target, [image]).embeddings[0]
    assert not miss.cache_hit
    np.testing.assert_allclose(inline(miss), expected(image), atol=1e-5)
    np.testing.assert_allclose(decode(stored([miss.key])[0]), expected(image), atol=1e-5)


def test_embeddings_over_the_inline_limit_go_by_key_stored_before_the_reply(served_checkpoint, expected):
    with services.running("vision_worker", "gemma3serve.v1.VisionWorker", "--model", served_checkpoint,
                          "--dtype", "float32", "--redis-url", services.REDIS_URL, "--inline-max-bytes", "0"
                          ) as (_, target):
        image = png(200 + np.random.default_rng().integers(1 << 30))
        miss = embed(target, [image]).embeddings[0]
        value = redis(lambda c: c.get_many([miss.key]))[0]  # at once: the reply waited for the write
        hit = embed(target, [image]).embeddings[0]
    assert not miss.cache_hit and hit.cache_hit and hit.key == miss.key
    assert not miss.HasField("inline") and not hit.HasField("inline")
    np.testing.assert_allclose(decode(value), expected(image), atol=1e-5)


def _images_embedded(target: str) -> float:
    """Images the worker's tower has run over (the sum of its per-call batch sizes), from an export
    that began after this call: the latest line of the metrics file may predate the last replies."""
    def lines() -> int:
        with open(services.metrics_file(target)) as f:
            return sum(1 for line in f if line.strip())

    wanted, deadline = lines() + 2, time.monotonic() + 15
    while lines() < wanted:  # exports happen every second (OTEL_METRIC_EXPORT_INTERVAL in tests/services.py)
        assert time.monotonic() < deadline, "no metrics export"
        time.sleep(0.2)
    return sum(p["sum"] for p in services.metric_points(target).get("gemma3.vision.batch.images", []))


def test_one_image_wanted_by_requests_at_once_is_embedded_once(vision_worker, expected):
    """Requests that miss the cache for the same image at the same time, and an image twice in one
    request, share one embedding: the tower runs over that image once, and every reply carries it."""
    _, target = vision_worker
    image = png(int(np.random.default_rng().integers(1 << 30)), size=(900, 700))  # a slow decode: overlap
    before = _images_embedded(target)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda _: embed(target, [image, image]), range(4)))
    assert len({e.key for r in replies for e in r.embeddings}) == 1
    for item in (e for r in replies for e in r.embeddings):
        np.testing.assert_allclose(inline(item), expected(image), atol=1e-5)
    assert _images_embedded(target) - before == 1
    key = replies[0].embeddings[0].key
    np.testing.assert_allclose(decode(stored([key])[0]), expected(image), atol=1e-5)


def test_a_poisoned_entry_is_recomputed(vision_worker, expected):
    _, target = vision_worker
    image = png(8)
    key = embed(target, [image]).embeddings[0].key
    (good,) = stored([key])
    redis(lambda c: c.redis.set(key, good[:-4] + b"\x00\x00\x00\x00"))  # checksum no longer matches
    reply = embed(target, [image]).embeddings[0]
    assert not reply.cache_hit
    np.testing.assert_allclose(decode(stored([key], usable=True)[0]), expected(image), atol=1e-5)
    wrong_shape = np.zeros((1, 4, 4), np.float32)
    redis(lambda c: c.put(key, wrong_shape))  # well-formed but the wrong shape: a foreign entry
    assert not embed(target, [image]).embeddings[0].cache_hit


def test_bad_image_bytes_are_invalid_argument(vision_worker):
    _, target = vision_worker
    with pytest.raises(grpc.RpcError) as e:
        embed(target, [png(1), b"not an image"])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "image 1: cannot decode" in e.value.details()


def test_pan_and_scan_changes_the_key_and_adds_crops(vision_worker):
    _, target = vision_worker
    wide = png(9, size=(1024, 300))  # crops must be at least pan_and_scan_min_crop_size (256) a side
    plain, panned = embed(target, [wide]).embeddings[0], embed(target, [wide], pan_and_scan=True).embeddings[0]
    assert plain.key != panned.key and plain.num_crops == 0 and panned.num_crops > 0


def test_without_redis_embeddings_come_inline(served_checkpoint, expected):
    with services.running("vision_worker", "gemma3serve.v1.VisionWorker", "--model", served_checkpoint,
                          "--dtype", "float32", "--redis-url", "redis://127.0.0.1:1/0") as (_, target):
        image = png(10)
        reply = embed(target, [image]).embeddings[0]
    assert not reply.cache_hit
    np.testing.assert_allclose(inline(reply), expected(image), atol=1e-5)
