"""The public Gateway service: images to the vision worker, then the LM worker's stream back to the client.

The gateway keeps image bytes and embeddings off the LM worker's wire: it forwards the prompt with
each image replaced by its embedding key (or inline embedding when the cache was down). Deadlines
travel with every downstream call and a client that goes away cancels them. When the LM worker no
longer finds an embedding (expired between the two calls) or is unavailable before the first token
(it died, or could not reach Redis), the gateway embeds the images again and tries once more.

With ``--vision-target lm`` there is no vision worker: the image bytes go to LM workers started with
``--embed-images``, which embed them in their own process (one hop fewer: on a small model at low load
that hop is a fifth of an image answer's time).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import time
import uuid

import grpc
from opentelemetry import metrics

from gemma3serve.v1 import (
    common_pb2,
    gateway_pb2_grpc,
    lm_worker_pb2,
    lm_worker_pb2_grpc,
    vision_worker_pb2,
    vision_worker_pb2_grpc,
)

log = logging.getLogger(__name__)
meter = metrics.get_meter("gateway")
requests_counter = meter.create_counter("gemma3.gateway.requests", unit="{request}",
                                        description="Generate calls ended, by gRPC status")
ttft = meter.create_histogram("gemma3.gateway.time_to_first_token", unit="s",
                              description="time to first token as the client sees it (images included)")
PASS_THROUGH = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED,
                grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE}


class Limits:
    """Input limits the gateway enforces before any work is done (0 streams per client: no limit)."""

    def __init__(self, max_images: int = 8, max_image_bytes: int = 20 << 20, max_streams_per_client: int = 64):
        self.max_images, self.max_image_bytes = max_images, max_image_bytes
        self.max_streams_per_client = max_streams_per_client


def client_of(context) -> str:
    """Who a call comes from, for per-client limits: its bearer token (hashed, never kept in clear) when
    it sends one, else its IP address (without the port, which changes per connection)."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return "token:" + hashlib.sha256(value.encode()).hexdigest()[:16]
    peer = context.peer() or ""
    kind, _, address = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return address.rsplit(":", 1)[0]
    return peer


def _images_of(request) -> list[common_pb2.Image]:
    kind = request.WhichOneof("prompt")
    if kind == "chat":
        return [p.image for t in request.chat.turns for p in t.parts if p.WhichOneof("part") == "image"]
    if kind == "raw":
        return list(request.raw.images)
    return []


class GatewayService(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, vision: vision_worker_pb2_grpc.VisionWorkerStub | None, lm: lm_worker_pb2_grpc.LMWorkerStub,
                 limits: Limits | None = None, downstream_timeout: float = 600.0):
        """``vision`` None: the LM workers embed images themselves (``--embed-images``); they get the bytes."""
        self.vision, self.lm = vision, lm
        self.limits = limits or Limits()
        self.timeout = downstream_timeout
        self.open_streams: collections.Counter[str] = collections.Counter()

    def _remaining(self, context) -> float:
        left = context.time_remaining()
        return self.timeout if left is None else max(0.0, min(left, self.timeout))

    async def _embed(self, request, images, context, request_id) -> tuple[list[lm_worker_pb2.ImageInput], int]:
        """ImageInputs for the request's images, in order, and how many came from the cache."""
        if self.vision is None:  # the LM worker embeds them, and reports keys and hits itself
            return [lm_worker_pb2.ImageInput(data=i.data) if i.WhichOneof("source") == "data"
                    else lm_worker_pb2.ImageInput(key=i.embedding_key) for i in images], 0
        data = [i.data for i in images if i.WhichOneof("source") == "data"]
        embedded = iter(())
        hits = 0
        if data:
            try:
                reply = await self.vision.EmbedImages(
                    vision_worker_pb2.EmbedImagesRequest(request_id=request_id, images=data,
                                                         pan_and_scan=request.pan_and_scan),
                    timeout=self._remaining(context))
            except grpc.aio.AioRpcError as e:
                await _relay_error(context, e, "vision worker")
            hits = sum(e.cache_hit for e in reply.embeddings)
            embedded = iter(reply.embeddings)
        out = []
        for image in images:
            if image.WhichOneof("source") == "data":
                e = next(embedded)
                out.append(lm_worker_pb2.ImageInput(key=e.key, inline=e.inline if e.HasField("inline") else None,
                                                    num_crops=e.num_crops))
            else:
                out.append(lm_worker_pb2.ImageInput(key=image.embedding_key))
        return out, hits

    def _validate(self, request, images) -> str | None:
        if request.WhichOneof("prompt") is None:
            return "the request has no prompt: set chat or raw"
        if len(images) > self.limits.max_images:
            return f"{len(images)} images exceed the limit of {self.limits.max_images} per request"
        for i, image in enumerate(images):
            kind = image.WhichOneof("source")
            if kind is None or (kind == "data" and not image.data):
                return f"image {i} is empty: send its bytes or an embedding_key"
            if kind == "data" and len(image.data) > self.limits.max_image_bytes:
                return f"image {i} has {len(image.data)} bytes, over the limit of {self.limits.max_image_bytes}"
        return None

    async def Generate(self, request, context):
        status = "OK"
        client = client_of(context)
        limit = self.limits.max_streams_per_client
        if limit and self.open_streams[client] >= limit:
            requests_counter.add(1, {"grpc.status": "RESOURCE_EXHAUSTED"})
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"this client already has {limit} calls open, the most it may have at once; "
                                "wait for one to finish")
        self.open_streams[client] += 1
        try:
            # aclosing: when the client leaves, the inner generator's finally (which cancels the LM
            # worker's call and so frees its slot) runs now, not whenever the generator is collected
            async with contextlib.aclosing(self._generate(request, context)) as chunks:
                async for chunk in chunks:
                    yield chunk
        except asyncio.CancelledError:
            status = "CANCELLED"
            raise
        except BaseException:
            code = context.code()
            status = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
            raise
        finally:
            requests_counter.add(1, {"grpc.status": status})
            self.open_streams[client] -= 1
            if not self.open_streams[client]:
                del self.open_streams[client]

    async def _generate(self, request, context):
        started = time.monotonic()
        request_id = request.request_id or uuid.uuid4().hex
        images = _images_of(request)
        problem = self._validate(request, images)
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        for attempt in (0, 1):
            inputs, hits = await self._embed(request, images, context, request_id)
            lm_request = lm_worker_pb2.LMGenerateRequest(request_id=request_id, images=inputs,
                                                         sampling=request.sampling, pan_and_scan=request.pan_and_scan)
            if request.WhichOneof("prompt") == "chat":
                lm_request.chat.CopyFrom(_without_image_bytes(request.chat))
            else:
                lm_request.raw.text = request.raw.text
            sent, first_token_at = 0, None
            call = self.lm.Generate(lm_request, timeout=self._remaining(context))
            try:
                async for chunk in call:
                    if chunk.token_ids and first_token_at is None:
                        first_token_at = time.monotonic()
                        ttft.record(first_token_at - started)
                    if chunk.finish_reason:  # usage as the client sees it: from the gateway's clock
                        chunk.usage.time_to_first_token_s = (first_token_at or time.monotonic()) - started
                        if self.vision is not None:  # else the LM worker embedded them, and counted its hits
                            chunk.usage.image_cache_hits = hits
                        if not chunk.usage.image_embedding_keys:  # (listed by an LM worker that embedded images)
                            chunk.usage.image_embedding_keys.extend(i.key for i in inputs)
                    sent += 1
                    yield chunk
                log.info("done", extra={"request_id": request_id, "seconds": time.monotonic() - started})
                return
            except grpc.aio.AioRpcError as e:
                expired = e.code() == grpc.StatusCode.NOT_FOUND and self.vision is not None
                if attempt == 0 and sent == 0 and expired and any(i.WhichOneof("source") == "data" for i in images):
                    log.warning("embedding expired, embedding again", extra={"request_id": request_id})
                    continue
                if attempt == 0 and sent == 0 and e.code() == grpc.StatusCode.UNAVAILABLE:
                    # Nothing reached the client yet, so one more try is invisible to it: round robin picks
                    # another LM worker when this one died, and when it could not read Redis, the images
                    # are embedded again (inline if Redis is down for the vision worker too).
                    log.warning("LM worker unavailable, trying again", extra={"request_id": request_id,
                                                                              "error": e.details()})
                    continue
                await _relay_error(context, e, "LM worker")
            finally:
                call.cancel()  # no-op once it ended; when the client left, the LM worker frees the slot now

    async def GenerateComplete(self, request, context):
        whole = common_pb2.GenerateResponse()
        async with contextlib.aclosing(self.Generate(request, context)) as chunks:
            async for chunk in chunks:
                whole.request_id = chunk.request_id
                whole.text += chunk.text
                whole.token_ids.extend(chunk.token_ids)
                whole.logprobs.extend(chunk.logprobs)
                if chunk.finish_reason:
                    whole.finish_reason = chunk.finish_reason
                    whole.usage.CopyFrom(chunk.usage)
        return whole


def _without_image_bytes(chat: common_pb2.Chat) -> common_pb2.Chat:
    """The chat with each image part reduced to a placeholder (the LM worker gets images separately)."""
    out = common_pb2.Chat()
    out.CopyFrom(chat)
    for turn in out.turns:
        for part in turn.parts:
            if part.WhichOneof("part") == "image":
                part.image.Clear()
                part.image.embedding_key = ""
    return out


async def _relay_error(context, error: grpc.aio.AioRpcError, who: str):
    code = error.code()
    if code in PASS_THROUGH:
        await context.abort(code, error.details() if code != grpc.StatusCode.UNAVAILABLE
                            else f"the {who} is unavailable: {error.details()}")
    await context.abort(grpc.StatusCode.INTERNAL, f"the {who} failed: {code.name}: {error.details()}")
