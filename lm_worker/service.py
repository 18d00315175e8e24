"""The LMWorker gRPC service: prompts in, streamed text out, over the continuous-batching engine.

The asyncio front never touches the device: it builds the prompt, fetches image embeddings from
Redis in one round trip, hands a Request to the engine thread and relays its events, detokenized
and cut at stop strings. A client that goes away or runs out of time cancels its request, which
frees the decode slot at the engine's next step.

With ``--embed-images`` it also takes images as bytes and embeds them with the vision worker's own code
(``VisionWorkerService.embed``: the same cache and keys; the tower runs in its batcher's threads).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid

import grpc
import numpy as np
from opentelemetry import metrics, trace

from gemma3serve.v1 import common_pb2, lm_worker_pb2, lm_worker_pb2_grpc
from lm_worker.detokenize import StopMatcher, StreamDecoder
from lm_worker.engine import Engine, EngineBroken, Finished, QueueFull, Request, Token
from lm_worker.prefixes import prompt_keys
from lm_worker.prompts import InvalidRequest
from serving.embedding_cache import DTYPES, CacheUnavailable, EmbeddingCache
from vision_worker.service import BadImage, call_ended

log = logging.getLogger(__name__)
tracer = trace.get_tracer("lm_worker")
meter = metrics.get_meter("lm_worker")
ttft = meter.create_histogram("gemma3.lm.time_to_first_token", unit="s",
                              description="from the request's arrival to its first token (queueing and prefill)")
tpot = meter.create_histogram("gemma3.lm.time_per_output_token", unit="s",
                              description="per request: decode time over the tokens after the first")
finished_requests = meter.create_counter("gemma3.lm.requests", unit="{request}",
                                         description="requests ended, by finish reason")
token_counter = meter.create_counter("gemma3.lm.tokens", unit="{token}",
                                     description="prompt, cached prompt (reused prefixes) and completion tokens")

FINISH = {"stop": common_pb2.FINISH_REASON_STOP, "length": common_pb2.FINISH_REASON_LENGTH}


def check_sampling(s: common_pb2.SamplingParams, default_max_new_tokens: int) -> dict:
    """Validated sampling parameters for the engine."""
    for name in ("temperature", "top_p"):
        value = getattr(s, name)
        if not math.isfinite(value) or value < 0:
            raise InvalidRequest(f"sampling.{name} must be a finite number >= 0, got {value}")
    if s.top_p > 1:
        raise InvalidRequest(f"sampling.top_p must be at most 1, got {s.top_p}")
    return dict(max_new_tokens=s.max_new_tokens or default_max_new_tokens, temperature=float(s.temperature),
                top_k=int(s.top_k), top_p=float(s.top_p) if s.top_p > 0 else 1.0,
                seed=int(s.seed) if s.HasField("seed") else 0, top_logprobs=int(s.top_logprobs),
                logprobs=s.logprobs or s.top_logprobs > 0)


class LMWorkerService(lm_worker_pb2_grpc.LMWorkerServicer):
    """Registered before the server starts; answers UNAVAILABLE until ``attach`` gives it a warm engine."""

    def __init__(self, cache: EmbeddingCache | None, *, default_max_new_tokens: int = 256,
                 max_new_tokens_limit: int = 0, max_prompt_tokens: int = 0):
        """Limits of 0 leave only the context window (``--max-length``) as the bound."""
        self.engine: Engine | None = None
        self.prompts = None
        self.cache = cache
        self.default_max_new_tokens = default_max_new_tokens
        if max_new_tokens_limit:
            self.default_max_new_tokens = min(default_max_new_tokens, max_new_tokens_limit)
        self.max_new_tokens_limit, self.max_prompt_tokens = max_new_tokens_limit, max_prompt_tokens
        self.stop_token_ids: frozenset[int] = frozenset()
        self.vision = None  # a VisionWorkerService run in this process (--embed-images): embeds images sent as data
        self._calls = 0  # Generate calls in progress

    def attach(self, engine: Engine, prompts) -> None:
        self.engine, self.prompts = engine, prompts
        self.stop_token_ids = frozenset(prompts.stop_token_ids)
        meter.create_observable_gauge("gemma3.lm.queue_depth", [lambda _: [metrics.Observation(engine.queued)]],
                                      unit="{request}", description="requests waiting for a decode slot")
        meter.create_observable_gauge(
            "gemma3.lm.active_slots", [lambda _: [metrics.Observation(engine.num_slots - engine.free_slots)]],
            unit="{slot}", description="decode slots in use")

    async def _embed_images(self, request, replied: asyncio.Future, context) -> dict:
        """The images sent as bytes, embedded here (index -> ``Embedded``); Redis writes of new ones wait
        for ``replied``. The only request in the process computes a small image on the event loop."""
        sent = [i for i, image in enumerate(request.images) if image.data]
        if not sent:
            return {}
        if self.prompts.embedding_shape is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "this model is text-only: it takes no images")
        if self.vision is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "this LM worker does not embed images (start it with --embed-images): send their "
                                "embeddings, as a gateway with a vision worker does")
        try:
            self.engine.check_room()  # before the tower's work, which a full queue would waste
        except QueueFull as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        try:
            embedded = await self.vision.embed([request.images[i].data for i in sent], request.pan_and_scan, replied,
                                               alone=self._calls == 1)
        except BadImage as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"image {sent[e.index]}: {e.reason}")
        except Exception as e:  # the tower failed (e.g. out of device memory): this request, not the worker
            log.exception("embedding images failed", extra={"request_id": request.request_id})
            await context.abort(grpc.StatusCode.INTERNAL, f"embedding the images failed: {type(e).__name__}: {e}")
        return dict(zip(sent, embedded))

    async def _image_features(self, images, embedded: dict, context) -> np.ndarray | None:
        """(total crops, tokens, width) for the request's images: ``embedded`` here, the rest inline or
        Redis values fetched in one MGET."""
        if not images:
            return None
        keys = [i.key for n, i in enumerate(images) if n not in embedded and not i.HasField("inline")]
        values = {}
        if keys:
            if self.cache is None:
                await context.abort(grpc.StatusCode.NOT_FOUND, "no embedding cache is configured; send images inline")
            try:
                values = dict(zip(keys, await self.cache.get_many(keys)))
            except CacheUnavailable as e:
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"the embedding cache is unreachable: {e}")
        width = self.prompts.embedding_shape
        out = []
        for n, image in enumerate(images):
            if n in embedded:
                array = embedded[n].embedding
            elif image.HasField("inline"):
                t = image.inline
                array = _tensor(t, width)
                if array is None:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"inline embedding has dtype {t.dtype} and shape {list(t.shape)}; "
                                        f"expected (crops, {', '.join(map(str, width))})")
            else:
                array = self.cache.decode(image.key, values.get(image.key), expect_trailing_shape=width)
                if array is None:
                    await context.abort(grpc.StatusCode.NOT_FOUND,
                                        f"embedding {image.key} is not in the cache (expired, evicted or corrupt)")
            out.append(np.asarray(array, np.float32).reshape(-1, *width))
        return np.concatenate(out)

    async def GetStats(self, request, context):
        if self.engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading")
        e = self.engine
        return lm_worker_pb2.LMWorkerStats(num_slots=e.num_slots, active_slots=e.num_slots - e.free_slots,
                                           queued=e.queued, finished=dict(e.finished),
                                           kept_prefixes=len(e.prefixes) if e.prefixes is not None else 0,
                                           prompt_tokens=e.prompt_tokens, cached_prompt_tokens=e.cached_tokens)

    async def Generate(self, request, context):
        if self.engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading")
        started = time.monotonic()
        request_id = request.request_id or uuid.uuid4().hex
        try:
            sampling = check_sampling(request.sampling, self.default_max_new_tokens)
            if self.max_new_tokens_limit and request.sampling.max_new_tokens > self.max_new_tokens_limit:
                raise InvalidRequest(f"max_new_tokens is {request.sampling.max_new_tokens}, over this server's "
                                     f"limit of {self.max_new_tokens_limit}")
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        # Redis writes of embeddings made here start with the answer's first token (or its end, when it fails first),
        # away from its prefill, and its last message waits for them: a repeat sent after the answer hits the cache
        # in any LM worker (one sent at once to another worker missed when the writes went on after the answer)
        replied = call_ended(context)
        self._calls += 1
        context.add_done_callback(lambda _: setattr(self, "_calls", self._calls - 1))
        try:
            embedded = await self._embed_images(request, replied, context)
            crops = [len(embedded[n].embedding) - 1 if n in embedded else i.num_crops
                     for n, i in enumerate(request.images)]
            ids, token_types = self.prompts.build(request, crops)
            if self.max_prompt_tokens and len(ids) > self.max_prompt_tokens:
                raise InvalidRequest(f"the prompt has {len(ids)} tokens (images included), over this server's "
                                     f"limit of {self.max_prompt_tokens}")
            if not request.sampling.max_new_tokens:  # unset: the default, or what the context has left
                sampling["max_new_tokens"] = min(self.default_max_new_tokens, self.engine.max_length - len(ids))
                if sampling["max_new_tokens"] < 1:
                    raise InvalidRequest(f"the prompt ({len(ids)} tokens) fills the context of "
                                         f"{self.engine.max_length} tokens")
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        span = tracer.start_span("lm_worker.embeddings", attributes={"images": len(request.images)})
        try:
            features = await self._image_features(request.images, embedded, context)
        finally:
            span.end()
        prefill_inputs = {}
        if features is not None:
            soft = int(token_types.sum())
            if soft != features.shape[0] * features.shape[1]:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"the images' embeddings hold {features.shape[0]} images (crops included) but the "
                                    f"prompt has room for {soft // features.shape[1]}: check num_crops")
            prefill_inputs = {"image_features": features, "token_type_ids": np.asarray(token_types, np.int32)}
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        remaining = context.time_remaining()
        prefix_keys = None
        if features is not None and self.engine.prefixes is not None and features.nbytes >= 1 << 20:
            # (an image's digest for the prefix cache reads its features: ~3 ms for gemma-3-4b's, not on the loop)
            prefix_keys = await asyncio.to_thread(prompt_keys, ids, prefill_inputs["token_type_ids"], features)
        job = Request(prompt_ids=ids, stop_token_ids=self.stop_token_ids | set(request.sampling.stop_token_ids),
                      prefix_keys=prefix_keys,
                      prefill_inputs=prefill_inputs, notify=lambda: loop.call_soon_threadsafe(wake.set),
                      deadline=None if remaining is None else time.monotonic() + remaining, **sampling)
        phase = tracer.start_span("lm_worker.prefill", attributes={"prompt_tokens": len(ids)})  # queue + prefill
        try:
            self.engine.submit(job)
        except QueueFull as e:
            phase.end()
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except EngineBroken as e:
            phase.end()
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"this LM worker cannot serve: {e}")
        except ValueError as e:
            phase.end()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        log.debug("admitted", extra={"request_id": request_id, "prompt_tokens": len(ids)})

        text = StreamDecoder(self.prompts.tokenizer)
        stops = StopMatcher(list(request.sampling.stop))
        want_logprobs = request.sampling.logprobs or request.sampling.top_logprobs > 0
        completion, first_token_at, finished = 0, None, None
        try:
            while finished is None:
                await wake.wait()
                wake.clear()
                delta, token_ids, logprobs = "", [], []
                while not job.events.empty():
                    event = job.events.get_nowait()
                    if isinstance(event, Token):
                        completion += 1
                        if first_token_at is None:
                            first_token_at = time.monotonic()
                            if not replied.done():
                                replied.set_result(None)
                            phase.set_attribute("cached_prompt_tokens", job.cached_tokens)
                            phase.end()
                            phase = tracer.start_span("lm_worker.decode")
                        token_ids.append(event.token_id)
                        if want_logprobs:
                            logprobs.append(common_pb2.TokenLogprob(
                                token_id=event.token_id, logprob=event.logprob,
                                top=[common_pb2.TopLogprob(token_id=i, logprob=p) for i, p in event.top]))
                        piece = text.push(event.token_id)
                        delta += stops.push(piece)
                        if stops.stopped:
                            job.cancel()
                            finished = Finished("stop")
                            break
                    else:
                        finished = event
                        if finished.reason in ("stop", "length"):
                            delta += stops.push(text.flush()) + stops.flush()
                        break
                if finished is not None and finished.reason not in ("stop", "length"):
                    if finished.reason == "deadline":
                        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed while generating")
                    if finished.reason == "cancelled":
                        await context.abort(grpc.StatusCode.CANCELLED, finished.detail or "cancelled")
                    if finished.reason == "unavailable":
                        await context.abort(grpc.StatusCode.UNAVAILABLE, finished.detail)
                    await context.abort(grpc.StatusCode.INTERNAL, f"generation failed: {finished.detail}")
                chunk = common_pb2.GenerateResponse(request_id=request_id, text=delta, token_ids=token_ids,
                                                    logprobs=logprobs)
                if finished is not None:
                    if not replied.done():  # (an end with no token: else the wait below would never end)
                        replied.set_result(None)
                    writes = [e.write for e in embedded.values() if e.write is not None and not e.write.done()]
                    if writes:  # (shielded: they outlive this call when it is cancelled meanwhile)
                        await asyncio.wait([asyncio.shield(w) for w in writes])
                    chunk.finish_reason = FINISH[finished.reason]
                    chunk.usage.CopyFrom(common_pb2.Usage(
                        prompt_tokens=len(ids), completion_tokens=completion, cached_prompt_tokens=job.cached_tokens,
                        time_to_first_token_s=(first_token_at or time.monotonic()) - started))
                    if embedded:  # else the gateway knows the keys and hits (its vision worker's)
                        chunk.usage.image_cache_hits = sum(e.cache_hit for e in embedded.values())
                        chunk.usage.image_embedding_keys.extend(
                            embedded[n].key if n in embedded else i.key for n, i in enumerate(request.images))
                if delta or token_ids or finished is not None:
                    yield chunk
        finally:
            job.cancel()  # no-op when finished; frees the slot when the client left or failed
            reason = finished.reason if finished else "client-gone"
            phase.set_attribute("completion_tokens", completion)
            phase.set_attribute("finish", reason)
            phase.end()
            _record(started, first_token_at, len(ids), job.cached_tokens, completion, reason)
            log.info("finished", extra={"request_id": request_id, "completion_tokens": completion, "reason": reason})


def _record(started: float, first_token_at: float | None, prompt: int, cached: int, completion: int,
            reason: str) -> None:
    finished_requests.add(1, {"finish_reason": reason})
    token_counter.add(prompt, {"kind": "prompt"})
    token_counter.add(cached, {"kind": "cached_prompt"})  # (of the prompt's: reused from a kept prefix)
    token_counter.add(completion, {"kind": "completion"})
    if first_token_at is not None:
        ttft.record(first_token_at - started)
        if completion > 1:
            tpot.record((time.monotonic() - first_token_at) / (completion - 1))


def _tensor(t: common_pb2.Tensor, trailing: tuple[int, ...]) -> np.ndarray | None:
    """The array in an inline Tensor message, or None when its dtype, shape or size is wrong."""
    dtype = DTYPES.get(t.dtype)
    shape = tuple(t.shape)
    if dtype is None or not shape or shape[-len(trailing):] != tuple(trailing):
        return None
    if len(t.data) != int(np.prod(shape)) * np.dtype(dtype).itemsize:
        return None
    return np.frombuffer(t.data, dtype).reshape(shape)
