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


SECRET = b"0123456789abcdef0123456789abcdef"


def _with_header(value: bytes, **changes) -> bytes:
    """``value`` with header fields replaced (its length prefix fixed): what someone with write access
    to Redis can do without the secret."""
    import json
    import struct

    from serving.embedding_cache import MAGIC

    (n,) = struct.unpack_from("<I", value, len(MAGIC))
    start = len(MAGIC) + 4
    header = {**json.loads(value[start:start + n]), **changes}
    raw = json.dumps(header).encode()
    return MAGIC + struct.pack("<I", len(raw)) + raw + value[start + n:]


def test_signed_entries_verify_only_under_their_key_and_secret():
    array = np.random.default_rng(1).standard_normal((2, 4, 8)).astype(np.float32)
    signed = encode(array, "m:emb:1", SECRET)
    assert np.array_equal(decode(signed, key="m:emb:1", secret=SECRET), array)
    assert np.array_equal(decode(signed), array)  # a worker without a secret ignores the signature
    assert decode(signed, key="m:emb:2", secret=SECRET) is None  # moved to another key
    assert decode(signed, key="m:emb:1", secret=SECRET[::-1]) is None  # signed with another secret
    assert decode(encode(array), key="m:emb:1", secret=SECRET) is None  # unsigned, though its SHA-256 is right
    reshaped = _with_header(signed, shape=[4, 2, 8])  # same bytes, same SHA-256, another header
    assert decode(reshaped) is not None and decode(reshaped, key="m:emb:1", secret=SECRET) is None
    assert decode(_with_header(signed, hmac=None), key="m:emb:1", secret=SECRET) is None
    assert decode(_with_header(signed, hmac=["x"]), key="m:emb:1", secret=SECRET) is None
    with pytest.raises(ValueError):
        encode(array, secret=SECRET)  # a signature binds a key


def test_a_cache_with_a_secret_signs_what_it_puts_and_refuses_what_it_did_not_sign():
    array = np.ones((1, 4, 8), np.float32)
    key, foreign = f"test:{uuid.uuid4()}", f"test:{uuid.uuid4()}"

    async def go():
        signing = EmbeddingCache(REDIS_URL, ttl_seconds=60, secret=SECRET)
        try:
            await signing.put(key, array)
            await signing.redis.set(foreign, encode(array), ex=60)  # written by someone without the secret
            raw, unsigned = await signing.get_many([key, foreign])
            out = signing.decode(key, raw), signing.decode(foreign, unsigned), decode(raw)
            await signing.redis.delete(key, foreign)
            return out
        finally:
            await signing.close()

    mine, forged, unchecked = run(go())
    assert np.array_equal(mine, array) and forged is None and np.array_equal(unchecked, array)
