"""The VisionWorker gRPC service: image bytes to projected image embeddings, cached in Redis by content.

Cache hits answer at once. Misses are decoded and preprocessed with Pillow in a thread (the process's
only request does it on the event loop when the image is small and the tower quick: no thread hops),
embedded by a micro-batcher that runs concurrent requests' images through the vision tower together, stored
with a TTL, and returned by key; when Redis cannot be reached the embedding travels inline and the
request still succeeds. An image already being embedded for another request (or twice in one) is
embedded once: the later ones wait for that work.

Embeddings of at most ``inline_max_bytes`` (small models: the demo's, gemma-3-270m's) also travel inline
with their key, hits and misses alike: for them a Redis round trip costs more than their bytes, so the LM
worker need not fetch them, and a miss's write to Redis starts once the reply has gone instead of before
it (until it lands, requests for that image share the embedding in memory). Larger ones (gemma-3-4b: 2.6 MB an image
in float32) go by key alone, off the gateway's wire.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import math
import os
import threading
import time

import grpc
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from opentelemetry import metrics, trace

from gemma3.checkpoint import Checkpoint
from gemma3.processing import DEFAULT_MAX_PIXELS
from gemma3serve.v1 import common_pb2, vision_worker_pb2, vision_worker_pb2_grpc
from serving.embedding_cache import CacheUnavailable, EmbeddingCache, embedding_key

log = logging.getLogger(__name__)
tracer = trace.get_tracer("vision_worker")
meter = metrics.get_meter("vision_worker")
cache_hits = meter.create_counter("gemma3.vision.cache.hits", unit="{image}", description="images found in Redis")
cache_misses = meter.create_counter("gemma3.vision.cache.misses", unit="{image}",
                                    description="images embedded by the vision tower (not in Redis, or corrupt)")
inflight_joins = meter.create_counter("gemma3.vision.inflight.joins", unit="{image}",
                                     description="misses that waited for the same image's embedding already under way")
batch_images = meter.create_histogram("gemma3.vision.batch.images", unit="{image}",
                                      description="images (crops included) per vision-tower call")
forward_time = meter.create_histogram("gemma3.vision.forward.duration", unit="s",
                                      description="time of one vision-tower call")


def weights_fingerprint(path: str, encoder) -> str:
    """SHA-256 over the bytes of every tensor the encoder uses (vision tower and projector), so a
    retrained checkpoint never reuses another's embeddings."""
    h = hashlib.sha256()
    ckpt = Checkpoint(path)
    for key in sorted(ckpt.where):
        if encoder.checkpoint_key(key) is not None:
            h.update(key.encode())
            h.update(np.ascontiguousarray(ckpt.where[key].array(key)).view(np.uint8))
    return h.hexdigest()


def bucket(n: int) -> int:
    """The batch shape that n images run in: the next power of two."""
    return 1 << max(0, (n - 1).bit_length())


class Batcher:
    """Runs the encoder over images from many requests at once, in power-of-two batch shapes.

    The weights are an argument of the compiled function, not constants folded into it: that compiles
    in a fraction of the time and holds no second copy of them. Once started, the batcher compiles every
    batch shape up to ``max_batch`` (``warm_up``) before it takes the first batch (the worker's warm-up
    image), so no request waits for a compile. A batch is what waited while the tower ran the batch before
    (and ``wait_ms`` more, when set): a lone request never waits for company that is not coming, and
    when the tower is idle and nobody waits, it runs a lone request's images in the thread that
    preprocessed them (``embed_alone``); requests that arrive meanwhile form the next batch."""

    def __init__(self, encoder, max_batch: int = 8, wait_ms: float = 0.0):
        graphdef, state = nnx.split(encoder)
        # The weights travel as a flat list: a call flattens a list of arrays in C++, an nnx.State's
        # Variables in Python (as the LM engine's ``DeviceProgram`` found).
        self._weights, treedef = jax.tree.flatten(state)
        self._run = jax.jit(lambda weights, pixels: nnx.merge(graphdef, jax.tree.unflatten(treedef, weights))(pixels))
        self._compiled: dict[tuple[int, ...], jax.stages.Compiled] = {}
        v = encoder.config.vision_config
        self.image_shape = (v.num_channels, v.image_size, v.image_size)
        self.max_batch, self.wait = max_batch, wait_ms / 1000
        self.queue: asyncio.Queue = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self._tower = threading.Lock()  # one batch at a time through the tower
        self._waiting = 0  # calls of ``embed`` whose images are not yet through the tower
        self.lone_seconds = math.inf  # the last one-image call's time in the tower (load() runs the first)

    def compile(self, shape: tuple[int, ...]) -> jax.stages.Compiled:
        """The executable for float32 pixels of this (batch, C, H, W) shape, compiled once."""
        shape = tuple(shape)
        if shape not in self._compiled:
            pixels = jax.ShapeDtypeStruct(shape, jnp.float32)
            self._compiled[shape] = self._run.lower(self._weights, pixels).compile()
        return self._compiled[shape]

    def warm_up(self) -> list[int]:
        """Compile every batch shape that up to ``max_batch`` images run in, holding the tower (no lone
        request compiles a shape beside it); the batch sizes."""
        sizes = [1 << i for i in range(bucket(self.max_batch).bit_length())]
        with self._tower:
            for size in sizes:
                self.compile((size, *self.image_shape))
        return sizes

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()

    async def embed(self, pixels: np.ndarray) -> np.ndarray:
        """(n, 3, H, W) → (n, tokens, width) float32, batched with whatever else is waiting."""
        future = asyncio.get_running_loop().create_future()
        self._waiting += 1
        await self.queue.put((pixels, future))
        return await future

    def embed_alone(self, pixels: np.ndarray) -> np.ndarray | None:
        """From a worker thread: these images through the tower right here when it is idle and no request
        waits for it, else None (then ``embed``). A lone miss skips two thread hops through the event loop
        (a demo-model miss: ~0.7 of ~4.5 ms). Never with a ``wait_ms`` window, nor before the batcher
        started (warm-up holds the tower) or after it stopped."""
        if (self.wait or self._waiting or self._task is None or self._task.done()
                or not self._tower.acquire(blocking=False)):
            return None
        try:
            return self._forward(pixels)
        finally:
            self._tower.release()

    def _forward(self, pixels: np.ndarray) -> np.ndarray:
        """The tower over ``pixels`` (padded to a batch shape); the caller holds ``_tower``."""
        n = pixels.shape[0]
        size = bucket(n)
        padded = np.concatenate([pixels, np.zeros((size - n, *pixels.shape[1:]), pixels.dtype)]) if size > n else pixels
        padded = np.asarray(padded, np.float32)
        run = self.compile(padded.shape)  # compiled by warm_up unless a batch outgrew max_batch
        started = time.perf_counter()
        # (NumPy pixels go in as they are: the call's own transfer is cheaper than a device_put before it,
        # 0.1 of a demo tower's 0.9 ms, 0.5 of 2.4 after idle)
        out = np.asarray(run(self._weights, padded), np.float32)[:n]
        seconds = time.perf_counter() - started
        if size == 1:
            self.lone_seconds = seconds
        forward_time.record(seconds)
        batch_images.record(n)
        return out

    async def _loop(self) -> None:
        try:
            await asyncio.to_thread(self.warm_up)
        except Exception:  # the batches will meet the error again, and fail their requests with it
            log.exception("compiling the vision tower's batch shapes failed")
        while True:
            jobs = [await self.queue.get()]
            if not self._tower.acquire(blocking=False):  # a lone request's run: what queues meanwhile joins
                await asyncio.to_thread(self._tower.acquire)
            try:
                await asyncio.sleep(self.wait)  # (0: lets requests that are ready join)
                while not self.queue.empty() and sum(len(p) for p, _ in jobs) < self.max_batch:
                    jobs.append(self.queue.get_nowait())
                out = await asyncio.to_thread(self._forward, np.concatenate([p for p, _ in jobs]))
            except Exception as e:  # a failure fails this batch's requests, not the worker
                for _, future in jobs:
                    if not future.done():
                        future.set_exception(e)
                continue
            finally:
                self._tower.release()
                self._waiting -= len(jobs)
            start = 0
            for pixels, future in jobs:
                if not future.done():
                    future.set_result(out[start:start + len(pixels)])
                start += len(pixels)


INLINE_IMAGE_BYTES = 64 << 10
"""The largest encoded image that a lone request may preprocess on the event loop (a few ms to decode)."""
INLINE_TOWER_SECONDS = 0.02
"""The longest one-image tower call (``Batcher.lone_seconds``) that a lone request may run on the event
loop: what a new request arriving meanwhile could wait."""


def call_ended(context) -> asyncio.Future:
    """A future done when this gRPC call ends: the ``replied`` that Redis writes behind its answer wait for."""
    ended = asyncio.get_running_loop().create_future()
    context.add_done_callback(lambda _: ended.done() or ended.set_result(None))
    return ended


class BadImage(ValueError):
    """An image that cannot be decoded or breaks a limit; ``index``: its place among the images sent."""

    def __init__(self, index: int, reason: str):
        super().__init__(f"image {index}: {reason}")
        self.index, self.reason = index, reason


@dataclasses.dataclass
class Embedded:
    key: str
    embedding: np.ndarray  # (1 + crops, tokens, width) float32
    cache_hit: bool
    stored: bool  # in Redis, or being written there behind the reply
    write: asyncio.Future | None = None  # that write behind the reply, until it lands (else None)


class VisionWorkerService(vision_worker_pb2_grpc.VisionWorkerServicer):
    """Registered before the server starts; answers UNAVAILABLE until ``attach``."""

    def __init__(self, cache: EmbeddingCache, namespace: str, max_pixels: int = DEFAULT_MAX_PIXELS,
                 inline_max_bytes: int = 1 << 20):
        self.cache, self.namespace, self.max_pixels = cache, namespace, max_pixels
        self.inline_max_bytes = inline_max_bytes
        self.processor = self.batcher = None
        self.fingerprint = ""
        self.shape: tuple[int, int] | None = None
        self._inflight: dict[str, asyncio.Task] = {}  # key -> the embedding under way (shared by requests)
        self._writing: dict[str, asyncio.Task] = {}  # key -> its Redis write behind a reply, until it lands
        self._calls = 0  # EmbedImages calls in progress

    def attach(self, processor, batcher: Batcher, fingerprint: str, shape: tuple[int, int]) -> None:
        self.processor, self.batcher, self.fingerprint, self.shape = processor, batcher, fingerprint, shape
        # the preprocessing part of the keys, built once (to_dict took 60 of a key's ~120 us)
        self._settings = {pan: {**processor.to_dict(), "do_pan_and_scan": pan} for pan in (False, True)}

    def _key(self, image: bytes, pan_and_scan: bool) -> str:
        return embedding_key(self.namespace, image, self.fingerprint, self._settings[pan_and_scan])

    async def EmbedImages(self, request, context):
        if self.batcher is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the vision model is still loading")
        replied = call_ended(context)
        self._calls += 1
        context.add_done_callback(lambda _: setattr(self, "_calls", self._calls - 1))
        try:
            embedded = await self.embed(list(request.images), request.pan_and_scan, replied, alone=self._calls == 1)
        except BadImage as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        out = vision_worker_pb2.EmbedImagesResponse()
        for e in embedded:
            item = out.embeddings.add(key=e.key, cache_hit=e.cache_hit, num_crops=len(e.embedding) - 1)
            if e.embedding.nbytes <= self.inline_max_bytes or not e.stored:
                item.inline.CopyFrom(common_pb2.Tensor(dtype="float32", shape=list(e.embedding.shape),
                                                       data=np.ascontiguousarray(e.embedding, np.float32).tobytes()))
        return out

    async def embed(self, images: list[bytes], pan_and_scan: bool, replied: asyncio.Future,
                    alone: bool = False) -> list[Embedded]:
        """The images' embeddings, in order: from Redis, or computed (each distinct image once, shared
        with other requests that want it meanwhile) and stored. ``replied``: done once the caller no longer
        waits for Redis writes (small embeddings are written behind it). ``alone``: the caller is the only
        request in this process, so a lone small miss may be computed on the event loop (``_embed``).
        Raises ``BadImage`` for the first image that cannot be decoded or breaks a limit."""
        if sum(map(len, images)) > 1 << 20:  # hashing large images (~1.5 ms a MB) off the event loop
            keys = await asyncio.to_thread(lambda: [self._key(image, pan_and_scan) for image in images])
        else:
            keys = [self._key(image, pan_and_scan) for image in images]
        cache_up = True
        with tracer.start_as_current_span("vision_worker.cache_lookup", attributes={"images": len(keys)}) as span:
            try:
                values = await self.cache.get_many(keys)
            except CacheUnavailable as e:
                log.warning("cache unreachable, embeddings go inline", extra={"error": str(e)})
                values, cache_up = [None] * len(keys), False
            found = [self.cache.decode(k, v, expect_trailing_shape=self.shape) for k, v in zip(keys, values)]
            misses = [i for i, f in enumerate(found) if f is None]
            span.set_attribute("hits", len(keys) - len(misses))
            span.set_attribute("hit", not misses)
            span.set_attribute("cache_reachable", cache_up)
        cache_hits.add(len(keys) - len(misses))
        cache_misses.add(len(misses))
        work, joined = {}, 0
        on_loop = (alone and not pan_and_scan and len({keys[i] for i in misses}) == 1
                   and len(images[misses[0]]) <= INLINE_IMAGE_BYTES
                   and self.batcher.lone_seconds <= INLINE_TOWER_SECONDS)
        for i in misses:  # one embedding per distinct image, shared with requests that want it too
            key = keys[i]
            if key not in work:
                task = self._inflight.get(key)
                if task is None:
                    task = self._embed(key, images[i], pan_and_scan, cache_up, replied, on_loop)
                else:
                    joined += 1
                work[key] = task
            else:
                joined += 1
        inflight_joins.add(joined)
        computed = {}
        with tracer.start_as_current_span("vision_worker.forward",
                                          attributes={"images": len(work), "joined": joined}):
            for i in misses:  # in order, so the first undecodable image is the one named
                try:  # (shielded: a request that goes away does not cancel what others wait for)
                    computed[i] = await asyncio.shield(work[keys[i]])
                except ValueError as e:
                    raise BadImage(i, str(e)) from None
        out = []
        for i, key in enumerate(keys):
            if found[i] is not None:
                out.append(Embedded(key, found[i], cache_hit=True, stored=True))
            else:
                embedding, stored = computed[i]
                out.append(Embedded(key, embedding, cache_hit=False, stored=stored, write=self._writing.get(key)))
        return out

    def _embed(self, key: str, image: bytes, pan_and_scan: bool, store: bool, replied: asyncio.Future,
               on_loop: bool = False) -> asyncio.Task:
        """Start embedding one image (preprocess, the batched tower, then Redis when ``store``), listed
        under its key until done (and stored); the task's result is (embedding, stored in Redis or being
        written there while it travels inline). ``replied``: done when the request that started it has
        ended (an inline embedding's write waits for it). ``on_loop``: preprocess and run the tower here, on
        the event loop, rather than in a worker thread: for the process's only request, with a small image
        and a quick tower (``INLINE_TOWER_SECONDS``), the two thread hops cost more than the loop's pause
        (on a 2-vCPU VM a hop to a thread that idled cost ~0.5-1.5 ms, a demo-model image's whole
        preprocessing and tower ~2-4)."""

        def prepare() -> tuple[np.ndarray, np.ndarray | None]:
            batch = self.processor([image], do_pan_and_scan=pan_and_scan, max_pixels=self.max_pixels)
            pixels = np.asarray(batch["pixel_values"], np.float32)
            return pixels, self.batcher.embed_alone(pixels)

        behind = False  # the Redis write goes on behind the reply, and unlists the key when it lands

        async def run():
            nonlocal behind
            pixels, embedding = prepare() if on_loop else await asyncio.to_thread(prepare)
            if embedding is None:
                embedding = await self.batcher.embed(pixels)
            if store and embedding.nbytes <= self.inline_max_bytes:
                behind = True
                self._write_behind(key, embedding, replied)
                return embedding, True
            if store:
                try:
                    await self.cache.put(key, embedding)
                    return embedding, True
                except CacheUnavailable as e:
                    log.warning("cache unreachable, embeddings go inline", extra={"error": str(e)})
            return embedding, False

        def done(task: asyncio.Task) -> None:
            if not behind:
                self._inflight.pop(key, None)
            if not task.cancelled():
                task.exception()  # retrieved: a request that aborted at an earlier image never awaits it

        task = self._inflight[key] = asyncio.ensure_future(run())
        task.add_done_callback(done)
        return task

    def _write_behind(self, key: str, embedding: np.ndarray, replied: asyncio.Future) -> None:
        """Store an inline embedding in Redis once ``replied``, without holding up the reply; the key stays
        listed as under way until it lands, so a request whose lookup missed meanwhile shares this
        embedding, and ``Embedded.write`` lets a caller wait for it. (Started at once, the write's first
        step ran ahead of the reply in the event loop's queue: 0.3 ms of a demo-model miss's 4 in the
        worker.)"""
        async def write():
            try:
                await replied
                await self.cache.put(key, embedding)
            except CacheUnavailable as e:
                log.warning("cache unreachable, an inline embedding was not stored", extra={"error": str(e)})
            finally:
                self._inflight.pop(key, None)
                self._writing.pop(key, None)

        self._writing[key] = asyncio.ensure_future(write())

    async def flush(self) -> None:
        """Wait for the Redis writes under way (before the cache closes)."""
        if self._writing:
            await asyncio.wait(set(self._writing.values()))

    async def load(self, model: str, dtype: str, max_batch: int, wait_ms: float, encoder=None) -> str:
        """Load the checkpoint's vision tower and projector (unless ``encoder`` holds them already),
        compile the tower's batch shapes, run one image end to end, then serve with them; the weights'
        fingerprint."""
        from gemma3 import Gemma3ImageEncoder
        from gemma3.processing import Gemma3ImageProcessor

        if encoder is None:
            encoder = await asyncio.to_thread(Gemma3ImageEncoder.from_pretrained, model, dtype=getattr(jnp, dtype))
        fingerprint = await asyncio.to_thread(weights_fingerprint, model, encoder)
        processor = Gemma3ImageProcessor.from_pretrained(model)
        batcher = Batcher(encoder, max_batch, wait_ms)
        batcher.start()
        c = encoder.config
        size = c.vision_config.image_size
        await batcher.embed(np.zeros((1, 3, size, size), np.float32))  # all sizes compiled; one image end to end
        self.attach(processor, batcher, fingerprint, (c.mm_tokens_per_image, c.text_config.hidden_size))
        return fingerprint

    async def stop(self) -> None:
        """Stop the batcher and let the writes under way land (the cache is closed by its owner)."""
        if self.batcher is not None:
            await self.batcher.stop()
        await self.flush()


def namespace_for(path: str) -> str:
    """Keys are namespaced per model directory name (the fingerprint makes them exact anyway)."""
    return "gemma3:" + os.path.basename(os.path.normpath(path))

