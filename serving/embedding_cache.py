"""The Redis embedding cache: content-addressed keys and a self-describing, checked value format.

A value is ``MAGIC | u32 header length | JSON header | raw array bytes``; the header names the
dtype and shape and carries the SHA-256 of the bytes. Anything that does not parse, has another
dtype or shape than expected, or fails the checksum is treated as a miss (and overwritten by the
caller), never fed to the model. Nothing here unpickles or evaluates what Redis returns.
"""

from __future__ import annotations

import hashlib
import json
import struct

import ml_dtypes
import numpy as np
import redis.asyncio as aioredis
from redis.exceptions import RedisError

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


def encode(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array)
    dtype = str(array.dtype)
    if dtype not in DTYPES:
        raise ValueError(f"unsupported embedding dtype {dtype}")
    data = array.tobytes()
    header = json.dumps({"dtype": dtype, "shape": list(array.shape),
                         "sha256": hashlib.sha256(data).hexdigest()}).encode()
    return MAGIC + struct.pack("<I", len(header)) + header + data


def decode(value: bytes | None, expect_trailing_shape: tuple[int, ...] | None = None) -> np.ndarray | None:
    """The array in ``value``, or None when it is absent, foreign, corrupt or of an unexpected shape."""
    if not value or not value.startswith(MAGIC) or len(value) < len(MAGIC) + 4:
        return None
    (n,) = struct.unpack_from("<I", value, len(MAGIC))
    start = len(MAGIC) + 4
    try:
        header = json.loads(value[start:start + n])
        dtype, shape = DTYPES[header["dtype"]], tuple(int(d) for d in header["shape"])
        checksum = str(header["sha256"])
    except (ValueError, KeyError, TypeError):
        return None
    data = value[start + n:]
    if len(data) != int(np.prod(shape)) * np.dtype(dtype).itemsize or hashlib.sha256(data).hexdigest() != checksum:
        return None
    if expect_trailing_shape is not None and shape[-len(expect_trailing_shape):] != tuple(expect_trailing_shape):
        return None
    return np.frombuffer(data, dtype).reshape(shape)


class EmbeddingCache:
    """Async GET/SET of embeddings; every Redis failure surfaces as CacheUnavailable."""

    def __init__(self, url: str, ttl_seconds: int = 3600, timeout: float = 1.0):
        self.ttl = ttl_seconds
        self.redis = aioredis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)

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
            await self.redis.set(key, encode(array), ex=self.ttl)
        except (RedisError, OSError) as e:
            raise CacheUnavailable(str(e)) from e

    async def close(self) -> None:
        await self.redis.aclose()
