"""The Redis embedding cache: content-addressed keys and a self-describing, checked value format.

A value is ``MAGIC | u32 header length | JSON header | raw array bytes``; the header names the
dtype and shape and carries the SHA-256 of the bytes. Anything that does not parse, has another
dtype or shape than expected, or fails the checksum is treated as a miss (and overwritten by the
caller), never fed to the model. Nothing here unpickles or evaluates what Redis returns.

The SHA-256 catches corruption, not forgery: whoever can write to Redis can recompute it. With a
secret shared by the workers, the header also carries an HMAC-SHA256 over the key, the rest of the
header and the bytes, and a value without a valid one is a miss too (so an entry cannot be moved to
another key either).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import struct

import ml_dtypes
import numpy as np
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger(__name__)
MAGIC = b"G3EMB1"
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


class CacheUnavailable(Exception):
    """Redis could not be reached or answered with an error."""


def embedding_key(namespace: str, image: bytes, model_fingerprint: str, preprocessing: dict) -> str:
    """SHA-256 over the image bytes, the weights' fingerprint and the preprocessing config."""
    h = hashlib.sha256()
    for part in (image, model_fingerprint.encode(), json.dumps(preprocessing, sort_keys=True).encode()):
        h.update(hashlib.sha256(part).digest())
    return f"{namespace}:emb:{h.hexdigest()}"


def signature(secret: bytes, key: str, header: dict, data: bytes) -> str:
    """HMAC-SHA256 over the key, the header (without its "hmac", canonical JSON) and the data, each
    length-prefixed so that no two different triples sign the same bytes."""
    mac = hmac.new(secret, digestmod=hashlib.sha256)
    for part in (key.encode(), json.dumps(header, sort_keys=True).encode()):
        mac.update(struct.pack("<Q", len(part)))
        mac.update(part)
    mac.update(data)
    return mac.hexdigest()


def encode(array: np.ndarray, key: str | None = None, secret: bytes | None = None) -> bytes:
    """The value stored under ``key``; signed when ``secret`` is given."""
    array = np.ascontiguousarray(array)
    dtype = str(array.dtype)
    if dtype not in DTYPES:
        raise ValueError(f"unsupported embedding dtype {dtype}")
    data = array.tobytes()
    header = {"dtype": dtype, "shape": list(array.shape), "sha256": hashlib.sha256(data).hexdigest()}
    if secret is not None:
        if key is None:
            raise ValueError("a signed entry needs its key")
        header["hmac"] = signature(secret, key, header, data)
    raw = json.dumps(header, sort_keys=True).encode()
    return MAGIC + struct.pack("<I", len(raw)) + raw + data


def decode(value: bytes | None, expect_trailing_shape: tuple[int, ...] | None = None, *, key: str | None = None,
           secret: bytes | None = None) -> np.ndarray | None:
    """The array in ``value``, or None when it is absent, foreign, corrupt or of an unexpected shape,
    or, given ``secret``, not signed with it for ``key``."""
    if not value or not value.startswith(MAGIC) or len(value) < len(MAGIC) + 4:
        return None
    (n,) = struct.unpack_from("<I", value, len(MAGIC))
    start = len(MAGIC) + 4
    try:
        header = json.loads(value[start:start + n])
        dtype, shape = DTYPES[header["dtype"]], tuple(int(d) for d in header["shape"])
        checksum = str(header["sha256"])
        tag = header.pop("hmac", None)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    data = value[start + n:]
    if len(data) != int(np.prod(shape)) * np.dtype(dtype).itemsize or hashlib.sha256(data).hexdigest() != checksum:
        return None
    if secret is not None:
        if key is None:
            raise ValueError("checking a signed entry needs its key")
        if not isinstance(tag, str) or not hmac.compare_digest(tag, signature(secret, key, header, data)):
            return None
    if expect_trailing_shape is not None and shape[-len(expect_trailing_shape):] != tuple(expect_trailing_shape):
        return None
    return np.frombuffer(data, dtype).reshape(shape)


class EmbeddingCache:
    """Async GET/SET of embeddings; every Redis failure surfaces as CacheUnavailable. ``url`` goes to
    redis-py untouched (``rediss://user:password@host:port/db`` for TLS and a password); ``ssl_ca_certs``
    verifies a rediss server; ``secret`` signs what ``put`` writes and is required by ``decode``."""

    def __init__(self, url: str, ttl_seconds: int = 3600, timeout: float = 1.0, *, secret: bytes | None = None,
                 ssl_ca_certs: str | None = None):
        self.ttl = ttl_seconds
        self.secret = secret
        tls = {"ssl_ca_certs": ssl_ca_certs} if ssl_ca_certs else {}
        # One immediate retry on a fresh connection: after Redis restarts, every pooled connection is
        # stale and would otherwise fail one request each (GET, MGET and SET are safe to repeat).
        retry = {"retry": Retry(NoBackoff(), 1), "retry_on_error": [RedisConnectionError, RedisTimeoutError]}
        self.redis = aioredis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout, **retry, **tls)

    def decode(self, key: str, value: bytes | None, expect_trailing_shape: tuple[int, ...] | None = None
               ) -> np.ndarray | None:
        """The array stored under ``key``, or None (a miss); a value that is there but unusable is logged."""
        array = decode(value, expect_trailing_shape, key=key, secret=self.secret)
        if array is None and value:
            log.warning("unusable cache entry treated as a miss (corrupt, foreign, of another shape%s)",
                        ", or not signed with this secret" if self.secret else "", extra={"key": key})
        return array

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        """Raw values for ``keys`` in one round trip (MGET)."""
        if not keys:
            return []
        try:
            return await self.redis.mget(keys)
        except (RedisError, OSError) as e:
            raise CacheUnavailable(str(e)) from e

    async def put(self, key: str, array: np.ndarray) -> None:
        try:
            await self.redis.set(key, encode(array, key, self.secret), ex=self.ttl)
        except (RedisError, OSError) as e:
            raise CacheUnavailable(str(e)) from e

    async def close(self) -> None:
        await self.redis.aclose()
