"""The embedding cache against a real Redis (REDIS_URL, default 127.0.0.1:6379)."""

import asyncio
import os
import uuid

import ml_dtypes
import numpy as np
import pytest

from serving.embedding_cache import CacheUnavailable, EmbeddingCache, decode, embedding_key, encode

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


def run(coro):
    return asyncio.run(coro)


def test_keys_are_content_addressed():
    base = embedding_key("m", b"img", "weights-a", {"size": 896, "pan_and_scan": False})
    assert base == embedding_key("m", b"img", "weights-a", {"pan_and_scan": False, "size": 896})
    assert base.startswith("m:emb:")
    for other in (embedding_key("m", b"img2", "weights-a", {"size": 896, "pan_and_scan": False}),
                  embedding_key("m", b"img", "weights-b", {"size": 896, "pan_and_scan": False}),
                  embedding_key("m", b"img", "weights-a", {"size": 896, "pan_and_scan": True}),
                  embedding_key("other", b"img", "weights-a", {"size": 896, "pan_and_scan": False})):
        assert other != base


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_round_trip_through_redis_with_ttl(dtype):
    array = np.random.default_rng(0).standard_normal((2, 9, 64)).astype(dtype)
    key = f"test:{uuid.uuid4()}"

    async def go():
        cache = EmbeddingCache(REDIS_URL, ttl_seconds=60)
        await cache.put(key, array)
        (raw,) = await cache.get_many([key])
        ttl = await cache.redis.ttl(key)
        await cache.redis.delete(key)
        await cache.close()
        return raw, ttl

    raw, ttl = run(go())
    back = decode(raw, expect_trailing_shape=(9, 64))
    assert back.dtype == array.dtype and np.array_equal(back, array) and 0 < ttl <= 60


def test_corrupt_foreign_or_misshaped_values_are_misses():
    good = encode(np.ones((1, 4, 8), np.float32))
    flipped = good[:-1] + bytes([good[-1] ^ 1])
    assert decode(good) is not None
    assert decode(flipped) is None  # checksum
    assert decode(good[:-4]) is None  # truncated
    assert decode(b"\x80\x04pickle-ish") is None  # foreign
    assert decode(None) is None
    assert decode(good, expect_trailing_shape=(4, 16)) is None  # another model's width
    forged = good.replace(b'"float32"', b'"float16"')
    assert decode(forged) is None


def test_unreachable_redis_raises_cache_unavailable_quickly():
    async def go():
        cache = EmbeddingCache("redis://127.0.0.1:1/0", timeout=0.5)
        try:
            await cache.get_many(["k"])
        finally:
            await cache.close()

    with pytest.raises(CacheUnavailable):
        run(go())
