"""The LM engine: continuous batching over a fixed set of decode slots, on one thread that owns the device.

Like JetStream's orchestrator, reduced to its core: requests wait in a bounded queue; each is
prefilled alone (padded to a length bucket, so a few shapes compile once), its first token sampled,
and its cache row inserted into a free slot of the batched decode cache. A prompt longer than
``prefill_chunk`` tokens prefills a chunk at a time, one chunk between decode calls while other slots
decode, so a long prompt never stalls the running streams for more than a chunk's prefill (and its
activations are a chunk's, not the prompt's). Every step decodes the active slots together (several
steps per device call while nobody waits for a slot: ``_burst``); finished, cancelled or expired
requests give their slot back at once. Tokens leave through each request's own queue, so
detokenization and the network never block the decode loop.

The host runs one device call ahead: it dispatches the next decode call before it fetches and hands
out the tokens of the one before (``_step``), so the device never waits for the host's share of a call
(on an H200 at 32 slots that share cost as much as the call's steps). Each slot's last token and step
count stay on the device between calls. A request that stops in one call has decoded in the next
too; those tokens are dropped and the slot is given back when the host sees the stop.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from gemma3 import cache as kv
from gemma3 import cpu_kernels
from gemma3.generation import loop_compiler_options, sample_tokens, step_keys
from lm_worker.prefixes import MIN_REUSE, PrefixStore, prompt_keys

log = logging.getLogger(__name__)

BURST_MS = 80.0
"""How long one decode call may run by default where a request that comes meanwhile ends it after the step under
way, once SHORT_BURST_MS have run (a yield flag: the CPU kernel, no mesh); tokens then stream at least every
80 ms or every step. Each call costs a fixed host overhead (for gemma-3-270m on a 2-core CPU, 1.2 ms of dispatch
and 0.5 of fetch) that the decode threads lose to: at 80 ms rather than 20 that model's service went from 0.92x
to 0.98x the library's tokens/s at concurrency 1 in bfloat16 (four steps a call, not one), 0.91x to 0.93x in
float32 (two), and from 128 to 142 tok/s at 4 clients, with the same time to first token under Poisson
arrivals (bench/RESULTS.md)."""
SHORT_BURST_MS = 20.0
"""The default elsewhere: there a request that comes during a burst waits for its end to be prefilled."""

PREFIX_ROWS = 4
"""Prompts whose cache rows the engine keeps by default for later prompts that begin alike (`lm_worker.prefixes`;
``Engine(prefix_rows=...)``, the LM worker's --prefix-cache): each as large as one slot's cache (gemma-3-1b at
max-length 1024 in bfloat16: 16 MB; gemma-3-4b at 8192: 300 MB)."""

PREFILL_CHUNK = 512
"""Tokens a prompt prefills per device call by default (``Engine(prefill_chunk=...)``, the LM worker's
--prefill-chunk): the longest the running streams wait for a new prompt is one chunk's prefill (on a
2-core CPU, ~0.4 s for gemma-3-270m, ~2 s for gemma-3-1b; a run of adjacent images longer than a chunk
is prefilled in one), and a chunk's rows still fill the products' tiles."""

_yield_flags = itertools.count()


class QueueFull(Exception):
    """The admission queue is at capacity (the gRPC layer answers RESOURCE_EXHAUSTED)."""


class EngineBroken(Exception):
    """The engine can no longer serve (a multi-host group lost a process): UNAVAILABLE."""


@dataclasses.dataclass(frozen=True)
class Token:
    token_id: int
    logprob: float = 0.0  # under the model's distribution (before temperature and filters)
    top: tuple[tuple[int, float], ...] = ()  # the request's top_logprobs best (id, logprob), best first


@dataclasses.dataclass(frozen=True)
class Finished:
    reason: str  # "stop", "length", "cancelled", "deadline", "error", "unavailable"
    detail: str = ""


_ids = itertools.count()


@dataclasses.dataclass(eq=False)
class Request:
    """One generation; the engine fills ``events`` with Token(...) then exactly one Finished(...)."""

    prompt_ids: list[int]
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: frozenset[int] = frozenset()
    top_logprobs: int = 0  # alternatives reported with each token (at most the engine's max_top_logprobs)
    # each token's log-probability (Token.logprob); without it (and top_logprobs 0) greedy decode may take the
    # argmax without the logits (a split or screened head), and Token.logprob is 0
    logprobs: bool = True
    prefill_inputs: dict = dataclasses.field(default_factory=dict)  # image_features, token_type_ids
    deadline: float | None = None  # time.monotonic() after which the request is dropped
    notify: Callable[[], None] | None = None  # called (on the engine thread) after each new event
    id: int = dataclasses.field(default_factory=lambda: next(_ids))
    cached_tokens: int = 0  # set by the engine before the first token: prompt tokens reused from a kept prefix
    # prefixes.prompt_keys of the prompt where the caller computed them off its own thread (an image's digest reads
    # its features: ~3 ms for a gemma-3-4b image); else submit does
    prefix_keys: np.ndarray | None = None
    events: queue.SimpleQueue = dataclasses.field(default_factory=queue.SimpleQueue)
    _cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    _ended: bool = False  # a Finished was queued: nothing more is (fail_all, from another thread, may race)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    _keys: np.ndarray | None = None  # the prompt as prefixes.prompt_keys (None: no prefix caching for it)
    _reuse: bool = True  # it may start from a kept prefix
    _keep: bool = True  # its cache row is kept for later prompts

    def put(self, event, notify: bool = True) -> None:
        """Queue an event, none after the first Finished; ``notify=False`` leaves the wake-up to the caller
        (one per decode call: in the gRPC service a notify is a cross-thread wake of the event loop, a
        system call)."""
        with self._lock:
            if self._ended:
                return
            self._ended = isinstance(event, Finished)
            self.events.put(event)
        if notify and self.notify is not None:
            self.notify()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def stream(self, timeout: float | None = None):
        """Yield events until Finished (inclusive); for synchronous consumers and tests."""
        while True:
            event = self.events.get(timeout=timeout)
            yield event
            if isinstance(event, Finished):
                return


DEVICE_STOP_IDS = 8
"""Stop tokens per request that a decode burst checks on the device (it ends the burst early); a request
with more still stops at every one of them, found on the host, after the burst."""


def device_stop_ids(ids=frozenset()) -> np.ndarray:
    """A slot's row of the decode burst's stop ids: the first DEVICE_STOP_IDS, then -1 (no token)."""
    row = np.full(DEVICE_STOP_IDS, -1, np.int32)
    kept = sorted(ids)[:DEVICE_STOP_IDS]
    row[:len(kept)] = kept
    return row


@dataclasses.dataclass
class _Slot:
    request: Request
    generated: int = 1  # tokens handed out (the first comes from prefill)
    scheduled: int = 1  # at most this many tokens once the dispatched calls are in

    def __post_init__(self):
        self.stop_ids = device_stop_ids(self.request.stop_token_ids)
        self.sampling = _sampling(self.request)


@dataclasses.dataclass
class _Call:
    """A dispatched decode call: its pending picks, the request each row decoded for (None: not
    decoded), and the steps it may run."""
    pending: object
    owners: tuple
    limit: int


NEW_ROW, CONTINUED_ROW = -1, -2
"""Where a prefill call's cache row comes from: a new one, or the one the prompt's chunks before left; a handle
of 0 or more names a row the device keeps (a prefix: `prefixes.PrefixStore`), copied and cut to ``start`` tokens."""


@dataclasses.dataclass(eq=False)
class _Prefill:
    """A request being prefilled, a chunk per device call: the slot it will take, where each chunk ends, the
    kept row (``source``) its first ``start`` tokens come from, and where (a chunk's end) a copy of its row
    is kept too (``split``, 0: nowhere but at the end)."""
    request: Request
    slot: int
    ends: list[int]
    done: int = 0  # chunks prefilled
    start: int = 0
    source: int = NEW_ROW
    split: int = 0
    kept: list[int] = dataclasses.field(default_factory=list)  # handles of the rows it had kept


def prompt_chunks(n: int, chunk: int, image_tokens: np.ndarray | None = None) -> list[int]:
    """Where each prefill chunk of an ``n``-token prompt ends (the last at ``n``): every ``chunk`` tokens
    (0: one chunk), but never inside an image, whose tokens attend to each other both ways and so must
    be prefilled together: a boundary that would cut a run of ``image_tokens`` (bool, per token) moves
    back to the run's start, or past its end where the run starts the chunk (a run longer than a chunk)."""
    ends, start = [], 0
    while chunk and n - start > chunk:
        end = start + chunk
        if image_tokens is not None and image_tokens[end - 1] and image_tokens[end]:
            first = end - 1
            while first > start and image_tokens[first - 1]:
                first -= 1
            if first > start:
                end = first
            else:
                while end < n and image_tokens[end]:
                    end += 1
        ends.append(end)
        start = end
    return ends + [n] if start < n else ends


def image_bucket(n: int) -> int:
    """The images (crops) a prefill runs with for ``n``: the next power of two."""
    return 1 << max(0, (n - 1).bit_length())


def buckets_for(max_length: int, smallest: int = 16) -> tuple[int, ...]:
    """Prompt-length buckets from ``smallest`` up to ``max_length`` (always the last): the powers of two
    and, above ``smallest``, 1.5 times each (16, 32, 48, 64, 96, 128, 192, ...). A prompt over 32 tokens
    pads to at most 1.5 times its length, not up to twice, for twice as many programs to compile: a
    demo-model prompt of 65 to 96 tokens prefills in 6.0 ms at 96 rather than 7.5 at 128 (bench/RESULTS.md)."""
    out, b = [], smallest
    while b < max_length:
        out.append(b)
        if b > smallest and b * 3 // 2 < max_length:
            out.append(b * 3 // 2)
        b *= 2
    return tuple(out) + (max_length,)


class Engine:
    """Owns a causal-LM model (text or multimodal) and serves Requests with continuous batching."""

    def __init__(self, model, *, num_slots: int = 8, max_length: int = 1024, max_queue: int = 64,
                 prefill_buckets: tuple[int, ...] | None = None, max_top_logprobs: int = 5, mesh=None,
                 program: DeviceProgram | None = None, burst_ms: float | None = None,
                 prefill_chunk: int = PREFILL_CHUNK, prefix_rows: int = PREFIX_ROWS):
        """``mesh``: the model's mesh (its cache is sharded to match); ``program``: the device side to
        drive, by default a DeviceProgram of ``model`` (a multi-host leader passes one that also sends
        each call to its followers). ``burst_ms``: how long one device call may decode for (0: one
        token per call; by default BURST_MS, or SHORT_BURST_MS where a call cannot end early); see ``_burst``.
        ``prefill_chunk``: the most prompt tokens one prefill call takes (0: a whole prompt; at least an
        image's tokens, which a chunk never splits). ``prefix_rows``: prompts whose cache rows are kept for
        later prompts that begin alike (0: none; `lm_worker.prefixes`)."""
        self.model, self.num_slots, self.max_length, self.max_queue = model, num_slots, max_length, max_queue
        self.max_top_logprobs = max_top_logprobs
        self.buckets = prefill_buckets or buckets_for(max_length)
        image_tokens = getattr(model.config, "mm_tokens_per_image", 0)
        if prefill_chunk < 0 or 0 < prefill_chunk < image_tokens:
            raise ValueError(f"prefill_chunk must be 0 (whole prompts) or at least an image's {image_tokens} tokens, "
                             f"got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk if prefill_chunk < max_length else 0
        text = getattr(model.config, "text_config", model.config)
        ring = min(getattr(text, "sliding_window", None) or max_length, max_length)
        self.prefixes = PrefixStore(prefix_rows, ring) if prefix_rows else None
        self.device = program or DeviceProgram(model, num_slots, max_length, max_top_logprobs, mesh)
        self._yield_flag = self.device.yield_flag
        if burst_ms is None:
            burst_ms = SHORT_BURST_MS if self._yield_flag is None else BURST_MS
        self.burst_seconds = burst_ms / 1000
        self.broken: str | None = None  # why the engine can no longer serve (a multi-host group lost a process)
        self._admitting: Request | None = None  # the request being prefilled
        self._partial: _Prefill | None = None  # the prompt being prefilled, a long one over several calls
        self._overtook = False  # a short prompt went ahead of the partial one's next chunk (`_overtake`)
        self.slots: list[_Slot | None] = [None] * num_slots
        self._inflight: _Call | None = None  # the decode call dispatched and not yet handed out
        self._pending: queue.Queue[Request] = queue.Queue(maxsize=max_queue)
        self.finished: collections.Counter[str] = collections.Counter()  # requests ended, by reason
        self.prompt_tokens = self.cached_tokens = 0  # of the requests admitted: prompt tokens, those reused
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------- API (any thread)
    def submit(self, request: Request) -> Request:
        if self.broken:
            raise EngineBroken(self.broken)
        n = len(request.prompt_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        if not 0 <= request.top_logprobs <= self.max_top_logprobs:
            raise ValueError(f"top_logprobs must be between 0 and {self.max_top_logprobs}, got {request.top_logprobs}")
        types = request.prefill_inputs.get("token_type_ids")
        if types is not None and np.size(types) != n:
            raise ValueError(f"token_type_ids holds {np.size(types)} types for a prompt of {n} tokens")
        if n + request.max_new_tokens > self.max_length:
            raise ValueError(f"prompt ({n} tokens) + max_new_tokens ({request.max_new_tokens}) exceeds the "
                             f"context of {self.max_length} tokens")
        if self.prefixes is not None and (request._reuse or request._keep):  # (off the engine thread)
            request._keys = request.prefix_keys if request.prefix_keys is not None else prompt_keys(
                request.prompt_ids, types, request.prefill_inputs.get("image_features"))
        try:
            self._pending.put_nowait(request)
        except queue.Full:
            raise self._queue_full() from None
        if self._yield_flag is not None and None in self.slots:  # a slot is free: the burst under way ends early
            cpu_kernels.set_yield(self._yield_flag, True)
        self._wake.set()
        return request

    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._run, name="lm-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def free_slots(self) -> int:
        """Slots no request holds, nor one being prefilled (whose slot is kept for it)."""
        return sum(s is None for s in self.slots) - (self._partial is not None)

    def check_room(self) -> None:
        """Raise QueueFull where a submit now would (checked before costly work, such as embedding images)."""
        if self._pending.full():
            raise self._queue_full()

    def _queue_full(self) -> QueueFull:
        return QueueFull(f"the admission queue is full ({self.max_queue} requests waiting)")

    @property
    def queued(self) -> int:
        return self._pending.qsize()

    # ----------------------------------------------------------------- engine thread
    def fail_all(self, reason: str) -> None:
        """From any thread: refuse new requests and end every waiting and running one as "unavailable"
        (the engine thread may be stuck in a collective with a dead process, so it is not asked)."""
        self.broken = reason
        while True:
            try:
                self._pending.get_nowait().put(Finished("unavailable", reason))
            except queue.Empty:
                break
        admitting, partial = self._admitting, self._partial
        if admitting is not None:
            admitting.put(Finished("unavailable", reason))
        if partial is not None and partial.request is not admitting:  # (between two of its chunks)
            partial.request.put(Finished("unavailable", reason))
        for slot in list(self.slots):
            if slot is not None and slot.request is not admitting:
                slot.request.put(Finished("unavailable", reason))
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set() and not self.broken:
            self._admit()
            if self._inflight is not None or any(s is not None for s in self.slots):
                self._step()
            else:
                self._wake.wait(timeout=0.1)
                self._wake.clear()
        self._inflight = None
        partial = self._partial
        if partial is not None and not self.broken:
            self._release(partial)
            self.finished["cancelled"] += 1
            partial.request.put(Finished("cancelled", "the engine is shutting down"))
        for i, slot in enumerate(self.slots):
            if slot is not None and not self.broken:
                self._finish(i, Finished("cancelled", "the engine is shutting down"))

    def _admit(self) -> None:
        """Prefill waiting requests into free slots; while slots decode, one prefill call per step (no
        starvation): a whole prompt, or the next chunk of a long one, or every other time between two of
        its chunks a waiting prompt of one chunk (`_overtake`)."""
        busy = any(s is not None for s in self.slots)
        while not self.broken and (self._partial is not None or None in self.slots):
            if self._partial is None:
                try:
                    request = self._pending.get_nowait()
                except queue.Empty:
                    return
                if self._ended(request):
                    continue
                self._partial = self._begin(self._plan(request, self.slots.index(None)))
            elif self._overtake():
                if busy:
                    return
                continue
            self._prefill_chunk(self._partial)
            if busy:
                return

    def _plan(self, request: Request, slot: int) -> _Prefill:
        """``request``'s prefill into ``slot``: from the kept row that provides most of its prompt, if any,
        then the rest in chunks; where it shares more with a kept prompt than that row provides (whose
        rings lost the keys past it), a chunk ends there and the row is kept at that point too, for the next
        prompt that begins alike (not with whole prompts, whose chunks before the last compile for one bucket
        only, nor with room for one row, which the prompt's own would take). Changes nothing (`_begin`)."""
        source, start, split = NEW_ROW, 0, 0
        if self.prefixes is not None and request._reuse and request._keys is not None:
            source, start, shared = self.prefixes.match(request._keys)
            source = NEW_ROW if source < 0 else source
            split = shared if (shared > start and self.prefill_chunk and request._keep
                               and self.prefixes.capacity > 1) else 0
        ends = self._chunks(request, start, split) + self._chunks(request, split) if split else self._chunks(
            request, start)
        return _Prefill(request, slot, ends, start=start, source=source, split=split)

    def _begin(self, partial: _Prefill) -> _Prefill:
        """``partial``'s prompt is prefilled from now on: the kept row it starts from becomes the most recently
        used, and its reused tokens are counted (the request's usage, the engine's totals)."""
        if partial.source >= 0:
            self.prefixes.use(partial.source)
        partial.request.cached_tokens = partial.start
        self.prompt_tokens += len(partial.request.prompt_ids)
        self.cached_tokens += partial.start
        return partial

    def _chunks(self, request: Request, start: int = 0, stop: int | None = None) -> list[int]:
        """Where the prefill chunks of ``request``'s prompt from token ``start`` on (to ``stop``) end."""
        inputs = request.prefill_inputs
        stop = len(request.prompt_ids) if stop is None else stop
        types = inputs.get("token_type_ids")  # (images are found by their types: without, one chunk)
        chunk = 0 if types is None and "image_features" in inputs else self.prefill_chunk
        ends = prompt_chunks(stop - start, chunk,
                             None if types is None else np.asarray(types).reshape(-1)[start:stop] == 1)
        return [start + end for end in ends]

    def _overtake(self) -> bool:
        """Between two chunks of a long prompt, every other time, the waiting request at the head of the queue
        is prefilled into another free slot if what it has to prefill is one chunk (after a kept prefix): a
        short request does not wait for the whole of a long one's prefill (nor a long one for a stream of
        short ones)."""
        free = [i for i, s in enumerate(self.slots) if s is None and i != self._partial.slot]
        if self._overtook or not free:
            self._overtook = False
            return False
        with self._pending.mutex:  # (the head only if it is short; fail_all may take from the queue meanwhile)
            waiting = self._pending.queue
            plan = self._plan(waiting[0], free[0]) if waiting else None
            if plan is None or len(plan.ends) > 1:
                return False
            waiting.popleft()
        self._overtook = True
        if not self._ended(plan.request):
            self._prefill_chunk(self._begin(plan))
        return True

    def _ended(self, request: Request) -> bool:
        """End a request that was cancelled or expired before it took a slot."""
        if not (request.cancelled or request.expired(time.monotonic())):
            return False
        reason = "cancelled" if request.cancelled else "deadline"
        self.finished[reason] += 1
        request.put(Finished(reason))
        return True

    def _prefill_chunk(self, partial: _Prefill) -> None:
        """The next chunk of ``partial``'s prompt; after its last, the request takes its slot and its first token."""
        request = partial.request
        if partial.done and self._ended(request):
            self._release(partial)
            return
        self._admitting = request  # (fail_all reaches it while its prefill is stuck)
        try:
            last = partial.done + 1 == len(partial.ends)
            if last and self._inflight is not None:  # its tokens go out now, not after the prefill the host
                self._collect(next_call=None)  # waits for (the chunks before are only dispatched)
                if partial.done and self._partial is not partial:  # (the call failed, and its cache reset
                    return  # ended this prompt, whose chunks it held)
            picked = self._run_chunk(partial, last)
            partial.done += 1
            if last:
                self._release(partial)
                self.slots[partial.slot] = _Slot(request)
                token, logprob, top_ids, top_logprobs = (x[0].tolist() for x in picked)
                self._emit(partial.slot, token, logprob, top_ids, top_logprobs, time.monotonic())
        except Exception as e:  # a bad request must not take the engine down
            self._release(partial)
            self._drop_rows(partial)
            if self.broken:
                request.put(Finished("unavailable", self.broken))
                return
            log.exception("prefill failed for request %s", request.id)
            self.finished["error"] += 1
            request.put(Finished("error", str(e)))
        finally:
            self._admitting = None

    def _release(self, partial: _Prefill) -> None:
        """``partial`` is no longer prefilled a chunk at a time (done, failed or ended): its row, if any
        is left (not taken by its last chunk), is dropped at once, not kept until the next long prompt."""
        if self._partial is partial:
            self._partial = None
            if partial.done and partial.done < len(partial.ends) and not self.broken:
                self.device.drop_row()

    def _run_chunk(self, partial: _Prefill, last: bool):
        """Prefill tokens ends[done - 1]..ends[done] of the prompt (padded to a bucket) on the device: into a
        new cache row or a copy of the kept prefix for the first chunk, else the row the chunks before left;
        the last chunk samples the first token and inserts the row into the slot (its picks are returned),
        and the device keeps the row for later prompts that begin alike (and a copy of it after the chunk
        that ends at ``split``)."""
        request = partial.request
        source = np.int32(partial.source if partial.done == 0 else CONTINUED_ROW)
        start, end = partial.ends[partial.done - 1] if partial.done else partial.start, partial.ends[partial.done]
        n = end - start  # (a chunk before the last pads to a whole chunk's bucket: one shape, shorter or not)
        bucket = next(b for b in self.buckets if b >= (n if last else max(n, self.prefill_chunk)))
        ids = np.zeros((1, bucket), np.int32)
        ids[0, :n] = request.prompt_ids[start:end]
        # (zeros and a slice, not np.pad: its Python costs ~0.2 ms when cold, as after an idle moment)
        extra, features, inputs = {}, None, request.prefill_inputs
        if "token_type_ids" in inputs:
            kinds = np.asarray(inputs["token_type_ids"], np.int32).reshape(-1)
            if kinds[start:end].any():  # the chunk's own images, in order (a chunk holds whole images); a chunk
                types = np.zeros((1, bucket), np.int32)  # without any runs the text programs
                types[0, :n] = kinds[start:end]
                extra["token_type_ids"] = types
                if "image_features" in inputs:
                    per_image = np.shape(inputs["image_features"])[1]
                    first, count = (kinds[:start] == 1).sum() // per_image, (kinds[start:end] == 1).sum() // per_image
                    features = np.asarray(inputs["image_features"][first:first + count], np.float32)
        elif "image_features" in inputs:  # (images found without their types: one chunk, see _admit)
            features = np.asarray(inputs["image_features"], np.float32)
        if features is not None:  # padded to a power of two of images (crops), so that few shapes compile;
            extra["image_features"] = features  # the image tokens take the real ones, in order
            images = image_bucket(len(features))
            if images > len(features):
                extra["image_features"] = np.zeros((images, *features.shape[1:]), np.float32)
                extra["image_features"][:len(features)] = features
        keep, evicted = -1, []
        if self.prefixes is not None and request._keep and request._keys is not None and (last or end == partial.split):
            keep, evicted = self.prefixes.add(request._keys[:end])
            if keep >= 0:
                partial.kept.append(keep)
        try:
            if not last:
                return self.device.extend(ids, np.int32(n), extra, source, np.int32(partial.start), np.int32(keep),
                                          np.int32(end))
            return self.device.prefill(np.int32(partial.slot), ids, np.int32(n), extra, *_sampling(request),
                                       np.bool_(request.top_logprobs > 0), source, np.int32(partial.start),
                                       np.int32(keep))
        finally:
            self._forget(evicted)  # (after the call: the prefill may have started from one of them)

    def _drop_rows(self, partial: _Prefill) -> None:
        """After a failed prefill call, the rows it kept or started from are let go: a chunk is dispatched and
        not waited for, so its failure (out of memory) may show only later, in a row kept from it."""
        if self.prefixes is not None:
            handles = partial.kept + ([partial.source] if partial.source >= 0 else [])
            for handle in handles:
                self.prefixes.remove(handle)
            self._forget(handles)  # (a group's followers may have kept them)

    def _forget(self, handles: list[int]) -> None:
        """The device lets go of these kept rows (not when the group is broken: its followers are gone)."""
        for handle in handles if not self.broken else ():
            self.device.forget(np.int32(handle))

    @property
    def chunk_buckets(self) -> list[int]:
        """The prefill buckets a prompt's chunks take (a longer one only for a run of images past a chunk)."""
        last = next(b for b in self.buckets if b >= self.prefill_chunk) if self.prefill_chunk else self.buckets[-1]
        return [b for b in self.buckets if b <= last]

    def warm_up(self, token_id: int, image: tuple[int, int, int] | None = None, every_bucket: bool = True) -> int:
        """Compile before serving, as JetStream does, so that no request waits for XLA: a prompt of
        ``token_id`` at the shortest length of each prefill bucket a chunk may take (of the smallest only,
        without ``every_bucket``), the first one also decoding a token; and with ``image`` (image token id,
        tokens per image, feature width) one holding an image in each bucket with room for it. Where
        prompts prefill in chunks, each of those also as the last chunk of a longer prompt (one chunk
        before it), and prompts whose chunks before the last hold text, an image, or an image after a
        chunk of text (chunks before the last pad to one bucket). With a prefix store, prompts that start
        from a kept one (where prompts are not chunked, in each bucket: those programs take a row too); its
        row stays in the store, the others are neither matched nor kept. Runs on the started engine;
        returns the requests it ran."""
        runs, shorter, chunk = [], 0, self.prefill_chunk
        image_id, tokens, width = image or (None, 0, 0)

        def prompt(lead: int, n: int, with_image: bool = False) -> Request:
            """``lead`` text tokens (a chunk's), then ``n`` tokens, an image from the second of them."""
            types = np.zeros(lead + n, np.int32)
            if with_image:
                types[lead + 1:lead + 1 + tokens] = 1
            inputs = {"image_features": np.zeros((1, tokens, width), np.float32), "token_type_ids": types}
            return Request(prompt_ids=np.where(types == 1, image_id, token_id).tolist(),
                           max_new_tokens=1 if runs else 2, prefill_inputs=inputs if with_image else {})

        for b in self.chunk_buckets if every_bucket else self.chunk_buckets[:1]:
            n, shorter = shorter + 1, b
            m = max(n, tokens + 1)
            for lead in (0, chunk) if chunk and every_bucket else (0,):
                if lead + n < self.max_length:
                    runs.append(prompt(lead, n))
                if image is not None and m <= b and lead + m < self.max_length:
                    runs.append(prompt(lead, m, with_image=True))
        if chunk and every_bucket:  # chunks before the last: text, an image in the first, and one across the
            lead = chunk - tokens // 2 - 1  # first boundary (which moves back to it: the image in the second)
            more = [prompt(0, 2 * chunk + 1)]
            if image is not None and tokens < chunk:
                more += [prompt(0, chunk + 1, with_image=True), prompt(lead, chunk + 2, with_image=True)]
            runs += [r for r in more if len(r.prompt_ids) < self.max_length]
        for r in runs:
            r._reuse = r._keep = False
        if self.prefixes is not None and MIN_REUSE < self.max_length:
            runs.append(prompt(0, MIN_REUSE))  # kept, then reused by these:
            shorter, more = 0, []
            for b in self.chunk_buckets if not chunk and every_bucket else self.chunk_buckets[:1]:
                n, shorter = shorter + 1, b
                more.append(prompt(MIN_REUSE, n))
                if image is not None and not chunk and max(n, tokens + 1) <= b:
                    more.append(prompt(MIN_REUSE, max(n, tokens + 1), with_image=True))
            for r in more:
                r._keep = False
            runs += [r for r in more if len(r.prompt_ids) < self.max_length]
        for r in runs:
            finish = list(self.submit(r).stream())[-1]
            if finish.reason != "length":
                raise RuntimeError(f"warming up the prefill of {len(r.prompt_ids)} tokens failed: {finish.detail}")
        self.prompt_tokens = self.cached_tokens = 0  # (the counts are the requests' served; the engine thread
        return len(runs)  # is idle: the last run has ended)

    def _burst(self, active: np.ndarray, left: int) -> tuple[int, int]:
        """Decode steps for the next device call, and how many of them run whatever its yield flag says.
        One call costs a fixed host overhead (dispatch, the fetch, this loop) that rivals a small model's
        whole step, so when nobody waits for a slot the engine lets the device run several steps in one
        call, as many as fit in ``burst_seconds`` (by each bucket's measured step time). A burst never
        outlives a request's max_new_tokens (``left``: the fewest any active slot may still take), and
        the device ends it at a stop token, so a finished slot is free as soon as with single steps.
        Where the program has a yield flag, a request submitted while a slot is free sets it and the
        device ends the burst after the step under way, once SHORT_BURST_MS have run: a long burst does
        not hold back its prefill, and a short one is not cut (at 4 clients, cutting the demo model's
        3 ms bursts on every arrival cost more calls than the waits it saved)."""
        if self.burst_seconds <= 0:
            return 1, 1
        if self._yield_flag is not None:  # (cleared first: a request that comes after this sets it again)
            cpu_kernels.set_yield(self._yield_flag, False)
        if self._partial is not None or (None in self.slots and not self._pending.empty()):
            return 1, 1
        limit = max(1, min(self.device.steps_within(active, self.burst_seconds), left))
        return limit, min(limit, self.device.steps_within(active, SHORT_BURST_MS / 1000))

    def _step(self) -> None:
        """Dispatch the next decode call (when a slot has tokens to go), then hand out the tokens of the
        call before it, which the device finished while this one was queued behind it."""
        try:
            call = self._dispatch()
        except Exception as e:
            return self._failed(e)
        self._collect(next_call=call)

    def _drain(self) -> None:
        """Hand out the call in flight, dispatching nothing (tests drive the engine call by call)."""
        self._collect(next_call=None)

    def _collect(self, next_call: _Call | None) -> None:
        """Fetch and hand out the call in flight, leaving ``next_call`` in flight instead."""
        previous, self._inflight = self._inflight, next_call
        if previous is not None:
            try:
                picked = self.device.fetch(previous.pending)
            except Exception as e:  # (a call dispatched after it read its cache: it fails too)
                return self._failed(e)
            self._hand_out(previous, picked)

    def _dispatch(self) -> _Call | None:
        decoding = [s is not None and s.scheduled < s.request.max_new_tokens for s in self.slots]
        if not any(decoding):
            return None
        active = np.array(decoding)
        rows = [s if on else None for s, on in zip(self.slots, decoding)]
        temperature, top_k, top_p, seed = (np.array(col, dtype) for col, dtype in zip(
            zip(*(s.sampling if s else (0.0, 0, 1.0, 0) for s in rows)), (np.float32, np.int32, np.float32, np.uint32)))
        stop_ids = np.stack([s.stop_ids if s else device_stop_ids() for s in rows])
        wants_top = np.bool_(any(s is not None and s.request.top_logprobs > 0 for s in rows))
        # every active row greedy and wanting no log-probabilities: the argmax without the logits
        greedy_only = np.bool_(all(s is None or (s.sampling[0] == 0 and not s.request.logprobs
                                                 and s.request.top_logprobs == 0) for s in rows))
        limit, firm = self._burst(active, min(s.request.max_new_tokens - s.scheduled for s in rows if s is not None))
        pending = self.device.decode(active, seed, temperature, top_k, top_p, stop_ids, np.int32(limit), wants_top,
                                     greedy_only, np.int32(firm))
        for s in rows:
            if s is not None:
                s.scheduled += limit
        return _Call(pending, tuple(s.request if s else None for s in rows), limit)

    def _hand_out(self, call: _Call, picked: list[np.ndarray]) -> None:
        """Each request's tokens of a finished call, in order, then one wake-up per request."""
        tokens, logprobs, top_ids, top_logprobs, count = picked
        count = int(count)
        mine = [i for i, owner in enumerate(call.owners)  # rows whose request still holds the slot
                if owner is not None and self.slots[i] is not None and self.slots[i].request is owner]
        tokens, logprobs = tokens[:count].T.tolist(), logprobs[:count].T.tolist()  # (rows, count) lists
        now = time.monotonic()
        for i in mine:
            slot = self.slots[i]
            slot.scheduled -= call.limit - count  # (a stop token ended the call early)
            wants_top = slot.request.top_logprobs > 0
            for j in range(count):
                slot.generated += 1
                top = (top_ids[j, i].tolist(), top_logprobs[j, i].tolist()) if wants_top else ((), ())
                if not self._emit(i, tokens[i][j], logprobs[i][j], *top, now, notify=False):
                    break  # the request ended
            if slot.request.notify is not None:
                slot.request.notify()

    def _failed(self, e: Exception) -> None:
        """A decode call failed: its cache was donated, so every decoding request ends and the cache is new."""
        self._inflight = None
        if self.broken:
            return
        log.exception("decode step failed; failing the active requests")
        self.device.reset()
        partial = self._partial
        if partial is not None and partial.done:  # its first chunks' row went with the reset (one that has
            self._partial = None  # none yet is prefilled as if nothing happened)
            self.finished["error"] += 1
            partial.request.put(Finished("error", f"decode failed: {e}"))
        for i, slot in enumerate(self.slots):
            if slot is not None:
                self._finish(i, Finished("error", f"decode failed: {e}"))

    def _emit(self, slot: int, token: int, logprob: float, top_ids, top_logprobs, now: float,
              notify: bool = True) -> bool:
        """Deliver a token (with its request's top_logprobs alternatives), then free the slot if the
        request is done; False when the request has ended."""
        request = self.slots[slot].request
        if request.cancelled:
            return self._finish(slot, Finished("cancelled"), notify)
        if request.expired(now):
            return self._finish(slot, Finished("deadline"), notify)
        n = request.top_logprobs
        request.put(Token(token, logprob, tuple(zip(top_ids[:n], top_logprobs[:n]))), notify)
        if token in request.stop_token_ids:
            return self._finish(slot, Finished("stop"), notify)
        if self.slots[slot].generated >= request.max_new_tokens:
            return self._finish(slot, Finished("length"), notify)
        return True

    def _finish(self, slot: int, event: Finished, notify: bool = True) -> bool:
        self.finished[event.reason] += 1
        self.slots[slot].request.put(event, notify)
        self.slots[slot] = None
        return False


class DeviceProgram:
    """The engine's device side: the weights, the batched KV cache, each slot's last token and step
    count, and the jitted programs. Every call takes host (NumPy) values only, so a multi-host group
    runs the very same calls on every process, in lockstep (lm_worker.group sends the leader's calls to
    its followers); ``decode`` only dispatches, and ``fetch`` brings its picks to the host."""

    def __init__(self, model, num_slots: int, max_length: int, max_top_logprobs: int, mesh=None,
                 max_burst: int = 16):
        """``max_burst``: the most decode steps one call may run (the size of its token buffer)."""
        graphdef, state = nnx.split(model)
        # The weights travel as a flat list: jit flattens a list of arrays in C++, an nnx.State's
        # Variables in Python (a quarter of a millisecond per call for a small model).
        self.weights, treedef = jax.tree.flatten(state)
        self.max_burst = max_burst
        # A decode burst ends after the step under way once this flag is set (Engine.submit) and its firm steps
        # have run. Not with a mesh: every device (and every process of a group) must run the same steps.
        self.yield_flag = next(_yield_flags) % cpu_kernels.YIELD_FLAGS if (
            mesh is None and jax.default_backend() == "cpu" and cpu_kernels.available()) else None
        self._prefill, self._extend, self._insert, self._decode, self._cut, init = _compile(
            graphdef, treedef, num_slots, max_length, max_top_logprobs, max_burst, mesh, self.yield_flag is not None)
        self._row = None  # the cache row of a prompt prefilled a chunk at a time, its last chunk not yet in
        self._kept: dict[int, object] = {}  # prompts' rows kept for later prompts that begin alike, by handle
        self._behind_chunk = False  # a chunk was dispatched since the last decode call
        if mesh is not None:  # the cache laid out by the cache rules, as a multi-host group needs
            from gemma3.sharding import cache_sharding

            shardings = cache_sharding(jax.eval_shape(init, self.weights), mesh)
        else:  # committed to the weights' device, as decode's outputs are: jit keys its programs on that too, and
            # an uncommitted fresh cache compiled the first bucket's decode twice (5 s for gemma-3-270m on a CPU)
            shardings = jax.sharding.SingleDeviceSharding(next(iter(self.weights[0].devices())))
        self._init = jax.jit(init, out_shardings=shardings)
        self.reset()
        self._fetched_at = 0.0  # when the last fetch returned (the device's previous call had ended)
        # Decode runs on the first ``rows`` slots only, ``rows`` the smallest bucket holding every active slot
        # (slots fill from the lowest free one), so a lone request does not pay for a full batch. Every
        # bucket is compiled here, with all slots idle, and its one-step time measured: no request ever
        # waits for XLA, and the engine sizes its bursts from the timings.
        self.buckets = sorted({1 << i for i in range(num_slots.bit_length()) if 1 << i < num_slots} | {num_slots})
        self.step_seconds: dict[int, float] = {}
        z = lambda dtype: np.zeros(num_slots, dtype)  # noqa: E731
        idle = (z(bool), z(np.uint32), z(np.float32), z(np.int32), np.ones(num_slots, np.float32),
                np.tile(device_stop_ids(), (num_slots, 1)), np.int32(1), np.bool_(False), np.bool_(False))
        for rows in self.buckets:
            self._fetch_now(self._dispatch(rows, *idle))  # compiles
            started = time.perf_counter()  # a first figure; fetch() then follows the calls
            self._fetch_now(self._dispatch(rows, *idle))
            self.step_seconds[rows] = time.perf_counter() - started

    def prefill(self, slot, ids, length, extra, temperature, top_k, top_p, seed, wants_top,
                source=NEW_ROW, start=0, keep=-1) -> list[np.ndarray]:
        """Prefill one request (ids: (1, bucket), the first ``length`` real) into decode slot ``slot``; its
        first token's picks. ``source``: where the row comes from (`NEW_ROW`: the whole prompt;
        `CONTINUED_ROW`: its last chunk after those ``extend`` took; a kept row's handle: the prompt's first
        ``start`` tokens are that row's). ``keep`` (0 or more): the row is kept under that handle."""
        row = self._row_from(source, start)
        picked, row = self._prefill(self.weights, row, ids, length, extra, temperature, top_k, top_p, seed,
                                    wants_top)
        self.cache, self.tokens, self.steps = self._insert(self.cache, self.tokens, self.steps, row, picked[0], slot)
        if keep >= 0:  # (insert copied it into the slot: this row is the prompt's alone)
            self._kept[int(keep)] = row
        return [np.asarray(x) for x in picked]

    def extend(self, ids, length, extra, source, start=0, keep=-1, end=0) -> None:
        """Prefill a chunk of a prompt before its last (``source`` as for ``prefill``) into the row the next
        chunk continues; nothing is sampled (the LM head runs on the last chunk only). ``keep`` (0 or more):
        a copy of the row, which the next chunk takes, is kept under that handle (``end``: its tokens)."""
        self._row = self._extend(self.weights, self._row_from(source, start), ids, length, extra)
        if keep >= 0:
            self._kept[int(keep)] = self._cut(self._row, end)
        self._behind_chunk = True  # (the next decode call waits for it on the device)

    def forget(self, handle) -> None:
        """Let a kept row go (the prefix store made room)."""
        self._kept.pop(int(handle), None)

    def rows(self, active: np.ndarray) -> int:
        """The decode bucket for these active slots."""
        used = int(np.flatnonzero(active)[-1]) + 1 if active.any() else 1
        return next(b for b in self.buckets if b >= used)

    def steps_within(self, active: np.ndarray, seconds: float) -> int:
        """How many decode steps of this bucket fit in ``seconds`` (at least 1, at most max_burst), by its
        measured step time (at start, then a moving average over the calls)."""
        return max(1, min(self.max_burst, int(seconds / max(self.step_seconds[self.rows(active)], 1e-6))))

    def decode(self, active, seeds, temperature, top_k, top_p, stop_ids, limit, wants_top, greedy_only, firm=1):
        """Dispatch up to ``limit`` steps of the active slots, each from its last token, fewer when an
        active slot draws one of its ``stop_ids`` or, after ``firm`` steps, the yield flag is set (see
        ``yield_flag``); returns at once, with what ``fetch`` takes. ``greedy_only``
        (every active slot greedy, none wanting log-probabilities): the argmax alone, where the model takes it
        without the logits (`CausalLMMixin.greedy_without_logits`), with log-probabilities 0."""
        return self._dispatch(self.rows(active), active, seeds, temperature, top_k, top_p, stop_ids, limit, wants_top,
                              greedy_only, firm)

    def drop_row(self) -> None:
        """Forget the row of a prompt whose last chunk will not come (cancelled, expired or failed)."""
        self._row = None

    def _row_from(self, source, start):
        """The row a prefill call writes to (None: a new one); the row of a prompt's earlier chunks is taken
        (it is donated), a kept one copied and cut to its first ``start`` tokens."""
        if source == NEW_ROW:  # (a whole prompt leaves the row of another one's chunks alone: it may go between)
            return None
        if source == CONTINUED_ROW:
            if self._row is None:
                raise RuntimeError("no prompt chunks to continue (the cache was reset)")
            row, self._row = self._row, None
            return row
        return self._cut(self._kept[int(source)], np.int32(start))

    def fetch(self, pending) -> list[np.ndarray]:
        """A dispatched call's picks, in one host transfer: tokens and logprobs (max_burst, rows), the
        alternatives (max_burst, rows, n) (filled when ``wants_top``), and the steps run."""
        rows, dispatched_at, _ = pending
        previous = self._fetched_at
        picked = self._fetch_now(pending)
        # Follow the step time as it is now (the start-up figure may have been taken while other processes
        # compiled): a moving average of seconds per step, each call timed from when the device could
        # start it (its dispatch, or the end of the call before it) to its fetch; not a call that waited
        # behind a prompt's chunk (dispatched_at None).
        if dispatched_at is not None:
            per_step = (self._fetched_at - max(dispatched_at, previous)) / max(int(picked[-1]), 1)
            self.step_seconds[rows] += 0.25 * (per_step - self.step_seconds[rows])
        return picked

    def _dispatch(self, rows, active, seeds, temperature, top_k, top_p, stop_ids, limit, wants_top, greedy_only,
                  firm=1):
        per_slot = (x[:rows] for x in (active, seeds, temperature, top_k, top_p, stop_ids))
        active, seeds, temperature, top_k, top_p, stop_ids = per_slot
        picked, self.cache, self.tokens, self.steps = self._decode(
            self.weights, self.cache, self.tokens, self.steps, active, seeds, temperature, top_k, top_p, stop_ids,
            limit, wants_top, greedy_only, np.int32(self.yield_flag or 0), np.int32(firm))
        behind, self._behind_chunk = self._behind_chunk, False
        return rows, None if behind else time.perf_counter(), picked

    def _fetch_now(self, pending) -> list[np.ndarray]:
        out = [np.asarray(x) for x in jax.device_get(pending[2])]
        self._fetched_at = time.perf_counter()
        return out

    def reset(self) -> None:
        """A fresh cache, tokens and step counts (after a failed call, whose cache was donated; kept rows,
        never donated, stay)."""
        self.cache, self.tokens, self.steps = self._init(self.weights)
        self._row = None


def _sampling(r: Request):
    """Typed for the jitted programs (a Python int past int32 would not convert): a top_k that large
    filters nothing anyway, and a 64-bit seed folds into 32 bits (seeds under 2**32 stay as they are)."""
    seed = (r.seed & 0xFFFFFFFF) ^ (r.seed >> 32 & 0xFFFFFFFF)
    return np.float32(r.temperature), np.int32(min(r.top_k, 2**31 - 1)), np.float32(r.top_p), np.uint32(seed)


def pick(logits, keys, temperature, top_k, top_p, n_top: int, wants_top):
    """Sampled tokens with their log-probabilities and the ``n_top`` most likely alternatives (zeros
    unless ``wants_top``: a top-k over a 262k vocabulary costs milliseconds on a CPU). Log-probabilities
    are logits less their log-sum-exp, taken where needed (the whole log-softmax is never written)."""
    logits = logits.astype(jnp.float32)
    tokens = sample_tokens(logits, keys, temperature, top_k, top_p)
    log_total = jax.nn.logsumexp(logits, axis=-1)
    chosen = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0] - log_total
    k = max(n_top, 1)

    def top(x):
        best, ids = jax.lax.top_k(x, k)
        return best - log_total[:, None], ids

    none = lambda x: (jnp.zeros((*x.shape[:-1], k), x.dtype), jnp.zeros((*x.shape[:-1], k), jnp.int32))  # noqa: E731
    top_lp, top_ids = jax.lax.cond(wants_top, top, none, logits)
    return tokens, chosen, top_ids, top_lp


@functools.lru_cache(maxsize=8)
def _compile(graphdef, treedef, num_slots: int, max_length: int, n_top: int, max_burst: int, mesh=None,
             yields: bool = False):
    """Jitted prefill (one request, bucketed: a whole prompt or its last chunk), the chunks before a prompt's
    last (``extend``), slot insertion and batched decode bursts (cache donated), a kept row's cut copy,
    and the cache's creation (jitted by DeviceProgram, with the mesh's layout). The weights come as
    ``treedef``'s leaves. With a mesh the picks are replicated, so every process of a multi-host group
    can read them. ``yields``: a burst also ends after any step past its first ``firm`` ones that finds
    decode's ``flag`` set (cpu_kernels.yield_flag; one program serves every engine of the model's shapes)."""
    replicated = (lambda tree: tree) if mesh is None else (
        lambda tree: jax.lax.with_sharding_constraint(tree, NamedSharding(mesh, PartitionSpec())))

    def model_of(weights):
        return nnx.merge(graphdef, jax.tree.unflatten(treedef, weights))

    def init(weights):
        """The decode state: the batched cache, and each slot's last token and step count."""
        # (two distinct values: equal outputs may come back as one buffer, and both are donated)
        return model_of(weights).init_cache(num_slots, max_length), jnp.zeros(num_slots, jnp.int32), \
            jnp.ones(num_slots, jnp.int32)

    def forward(weights, row, ids, length, extra):
        """A prompt's chunk ``ids`` (the first ``length`` real) into the cache ``row`` (None: a new one):
        the chunk's hidden states and the row."""
        model = model_of(weights)
        valid = jnp.arange(ids.shape[1])[None, :] < length
        cache = kv.emptied(model.init_cache(1, max_length)) if row is None else row
        out = model.model(input_ids=ids, attention_mask=valid, past_key_values=cache, **extra)
        return out.last_hidden_state, out.past_key_values

    def extend(weights, row, ids, length, extra):
        return forward(weights, row, ids, length, extra)[1]

    def prefill(weights, row, ids, length, extra, temperature, top_k, top_p, seed, wants_top):
        model = model_of(weights)
        hidden, cache = forward(weights, row, ids, length, extra)
        last = hidden[:, length - 1]
        logits = model.apply_lm_head(last)
        seeds = jnp.asarray(seed, jnp.uint32)[None]
        picked = pick(logits, step_keys(seeds, jnp.int32(0)), jnp.asarray(temperature, jnp.float32)[None],
                      jnp.asarray(top_k, jnp.int32)[None], jnp.asarray(top_p, jnp.float32)[None], n_top, wants_top)
        return replicated(picked), cache

    def cut(row, start):
        """A copy of a kept ``row`` holding its first ``start`` tokens only (every later entry marked empty), for
        a prompt that begins with them; the copy is donated to the prefill, the kept row is not."""
        forget = lambda index: jnp.where(index >= start, kv.EMPTY, index)  # noqa: E731
        return kv.KVCache(keys=[k.copy() for k in row.keys], values=[v.copy() for v in row.values],
                          full_index=forget(row.full_index), sliding_index=forget(row.sliding_index),
                          length=jnp.full_like(row.length, start), next_position=row.next_position - row.length + start)

    def insert(cache, tokens, steps, row, token, slot):
        """A prefilled request into ``slot``: its cache row, its first token, and step 1 next."""
        cache = jax.tree.map(lambda big, small: jax.lax.dynamic_update_slice_in_dim(big, small, slot, axis=0),
                             cache, row)
        return cache, tokens.at[slot].set(token[0]), steps.at[slot].set(1)

    def decode(weights, cache, last_tokens, step_counts, active, seeds, temperature, top_k, top_p, stop_ids, limit,
               wants_top, greedy_only, flag, firm):
        """Up to ``limit`` steps of the cache's first len(active) slots (the rest are left as they are),
        in one while_loop; it ends early after a step in which an active slot drew one of its stop_ids.
        Each active slot starts from its last token and step count, and leaves its new ones."""
        rows, k = active.shape[0], max(n_top, 1)
        tokens, steps = last_tokens[:rows], step_counts[:rows]

        def body(carry):
            i, tok, cache, picks, _ = carry
            model = model_of(weights)
            out = model.model(input_ids=tok[:, None], attention_mask=active[:, None], past_key_values=cache)
            hidden = out.last_hidden_state[:, 0]

            def sampled(hidden):
                logits = model.apply_lm_head(hidden)
                return pick(logits, step_keys(seeds, steps + i), temperature, top_k, top_p, n_top, wants_top)

            def greedy(hidden):  # (a split head's argmax reads half its bytes; a screened one, a quarter)
                zeros = jnp.zeros((rows, k), jnp.float32)
                return model.greedy_tokens(hidden), jnp.zeros(rows, jnp.float32), zeros.astype(jnp.int32), zeros

            picked = (jax.lax.cond(greedy_only, greedy, sampled, hidden) if model.greedy_without_logits()
                      else sampled(hidden))
            picks = tuple(jax.lax.dynamic_update_index_in_dim(buf, x.astype(buf.dtype), i, 0)
                          for buf, x in zip(picks, picked))
            stopped = (active[:, None] & (picked[0][:, None] == stop_ids)).any()
            return i + 1, picked[0], out.past_key_values, picks, stopped

        picks = (jnp.zeros((max_burst, rows), jnp.int32), jnp.zeros((max_burst, rows), jnp.float32),
                 jnp.zeros((max_burst, rows, k), jnp.int32), jnp.zeros((max_burst, rows, k), jnp.float32))
        def go_on(c):
            i, more = c[0], (c[0] < limit) & ~c[4]
            return more & ((i < firm) | (cpu_kernels.yield_flag(flag, i) == 0)) if yields else more

        carry = (jnp.int32(0), tokens, cache, picks, jnp.bool_(False))
        count, last, cache, picks, _ = jax.lax.while_loop(go_on, body, carry)
        last_tokens = last_tokens.at[:rows].set(jnp.where(active, last, tokens))
        step_counts = step_counts.at[:rows].add(jnp.where(active, count, 0))
        return replicated((*picks, count)), cache, last_tokens, step_counts

    return (jax.jit(prefill, donate_argnums=(1,)), jax.jit(extend, donate_argnums=(1,)),
            jax.jit(insert, donate_argnums=(0, 1, 2)),
            jax.jit(decode, donate_argnums=(1, 2, 3), compiler_options=loop_compiler_options()), jax.jit(cut), init)
