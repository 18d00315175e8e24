"""The LM engine: continuous batching over a fixed set of decode slots, on one thread that owns the device.

Like JetStream's orchestrator, reduced to its core: requests wait in a bounded queue; each is
prefilled alone (padded to a length bucket, so a few shapes compile once), its first token sampled,
and its cache row inserted into a free slot of the batched decode cache. Every step decodes the
active slots together (several steps per device call while nobody waits for a slot: ``_burst``);
finished, cancelled or expired requests give their slot back at once. Tokens leave through each
request's own queue, so detokenization and the network never block the decode loop.
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

from gemma3.generation import sample_tokens, step_keys

log = logging.getLogger(__name__)


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
    prefill_inputs: dict = dataclasses.field(default_factory=dict)  # image_features, token_type_ids
    deadline: float | None = None  # time.monotonic() after which the request is dropped
    notify: Callable[[], None] | None = None  # called (on the engine thread) after each new event
    id: int = dataclasses.field(default_factory=lambda: next(_ids))
    events: queue.SimpleQueue = dataclasses.field(default_factory=queue.SimpleQueue)
    _cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)

    def put(self, event) -> None:
        self.events.put(event)
        if self.notify is not None:
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
    generated: int = 1  # the first token comes from prefill

    def __post_init__(self):
        self.stop_ids = device_stop_ids(self.request.stop_token_ids)


def buckets_for(max_length: int, smallest: int = 16) -> tuple[int, ...]:
    """Powers of two from ``smallest`` up to ``max_length`` (which is always the last bucket)."""
    out, b = [], smallest
    while b < max_length:
        out.append(b)
        b *= 2
    return tuple(out) + (max_length,)


class Engine:
    """Owns a causal-LM model (text or multimodal) and serves Requests with continuous batching."""

    def __init__(self, model, *, num_slots: int = 8, max_length: int = 1024, max_queue: int = 64,
                 prefill_buckets: tuple[int, ...] | None = None, max_top_logprobs: int = 5, mesh=None,
                 program: DeviceProgram | None = None, burst_ms: float = 20.0):
        """``mesh``: the model's mesh (its cache is sharded to match); ``program``: the device side to
        drive, by default a DeviceProgram of ``model`` (a multi-host leader passes one that also sends
        each call to its followers). ``burst_ms``: how long one device call may decode for (0: one
        token per call); see ``_burst``."""
        self.model, self.num_slots, self.max_length, self.max_queue = model, num_slots, max_length, max_queue
        self.max_top_logprobs = max_top_logprobs
        self.burst_seconds = burst_ms / 1000
        self.buckets = prefill_buckets or buckets_for(max_length)
        self.device = program or DeviceProgram(model, num_slots, max_length, max_top_logprobs, mesh)
        self.tokens = np.zeros(num_slots, np.int32)
        self.broken: str | None = None  # why the engine can no longer serve (a multi-host group lost a process)
        self._admitting: Request | None = None  # the request being prefilled
        self.slots: list[_Slot | None] = [None] * num_slots
        self._pending: queue.Queue[Request] = queue.Queue(maxsize=max_queue)
        self.finished: collections.Counter[str] = collections.Counter()  # requests ended, by reason
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
        if n + request.max_new_tokens > self.max_length:
            raise ValueError(f"prompt ({n} tokens) + max_new_tokens ({request.max_new_tokens}) exceeds the "
                             f"context of {self.max_length} tokens")
        try:
            self._pending.put_nowait(request)
        except queue.Full:
            raise QueueFull(f"the admission queue is full ({self.max_queue} requests waiting)") from None
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
        return sum(s is None for s in self.slots)

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
        admitting = self._admitting
        if admitting is not None:
            admitting.put(Finished("unavailable", reason))
        for slot in list(self.slots):
            if slot is not None and slot.request is not admitting:
                slot.request.put(Finished("unavailable", reason))
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set() and not self.broken:
            self._admit()
            if any(s is not None for s in self.slots):
                self._step()
            else:
                self._wake.wait(timeout=0.1)
                self._wake.clear()
        for i, slot in enumerate(self.slots):
            if slot is not None and not self.broken:
                self._finish(i, Finished("cancelled", "the engine is shutting down"))

    def _admit(self) -> None:
        """Prefill waiting requests into free slots; while slots decode, one per step (no starvation)."""
        busy = any(s is not None for s in self.slots)
        while None in self.slots:
            try:
                request = self._pending.get_nowait()
            except queue.Empty:
                return
            if request.cancelled or request.expired(time.monotonic()):
                reason = "cancelled" if request.cancelled else "deadline"
                self.finished[reason] += 1
                request.put(Finished(reason))
                continue
            self._admitting = request  # (fail_all reaches it while its prefill is stuck)
            try:
                self._prefill_into(self.slots.index(None), request)
            except Exception as e:  # a bad request must not take the engine down
                if self.broken:
                    request.put(Finished("unavailable", self.broken))
                    return
                log.exception("prefill failed for request %s", request.id)
                self.finished["error"] += 1
                request.put(Finished("error", str(e)))
            finally:
                self._admitting = None
            if busy:
                return

    def _prefill_into(self, slot: int, request: Request) -> None:
        n = len(request.prompt_ids)
        bucket = next(b for b in self.buckets if b >= n)
        ids = np.zeros((1, bucket), np.int32)
        ids[0, :n] = request.prompt_ids
        extra = {k: np.asarray(v, np.float32 if k == "image_features" else np.int32)
                 for k, v in request.prefill_inputs.items()}
        if "token_type_ids" in extra:
            extra["token_type_ids"] = np.pad(extra["token_type_ids"][None], ((0, 0), (0, bucket - n)))
        picked = self.device.prefill(np.int32(slot), ids, np.int32(n), extra, *_sampling(request),
                                     np.bool_(request.top_logprobs > 0))
        self.slots[slot] = _Slot(request)
        self._emit(slot, *(x[0] for x in picked))

    def _burst(self, active: np.ndarray) -> int:
        """Decode steps for the next device call. One call costs a fixed host overhead (dispatch, the
        fetch, this loop) that rivals a small model's whole step, so when nobody waits for a slot the
        engine lets the device run several steps in one call, as many as fit in ``burst_seconds``
        (by each bucket's measured step time). A burst never outlives a request's max_new_tokens, and the
        device ends it at a stop token, so a finished slot is free as soon as with single steps."""
        if self.burst_seconds <= 0 or (None in self.slots and not self._pending.empty()):
            return 1
        left = min((s.request.max_new_tokens - s.generated for s in self.slots if s is not None), default=1)
        return max(1, min(self.device.steps_within(active, self.burst_seconds), left))

    def _step(self) -> None:
        active = np.array([s is not None for s in self.slots])
        params = [_sampling(s.request) if s else (0.0, 0, 1.0, 0) for s in self.slots]
        temperature, top_k, top_p, seed = (np.array(col, dtype) for col, dtype in
                                           zip(zip(*params), (np.float32, np.int32, np.float32, np.uint32)))
        steps = np.array([s.generated if s else 0 for s in self.slots], np.int32)
        stop_ids = np.stack([s.stop_ids if s else device_stop_ids() for s in self.slots])
        wants_top = np.bool_(any(s is not None and s.request.top_logprobs > 0 for s in self.slots))
        try:
            picked = self.device.decode(self.tokens.copy(), active, seed, steps, temperature, top_k, top_p,
                                        stop_ids, np.int32(self._burst(active)), wants_top)
        except Exception as e:
            if self.broken:
                return
            log.exception("decode step failed; failing the active requests")
            self.device.reset()
            for i, slot in enumerate(self.slots):
                if slot is not None:
                    self._finish(i, Finished("error", f"decode failed: {e}"))
            return
        *per_step, count = picked
        for j in range(int(count)):
            for i, slot in enumerate(self.slots):
                if slot is not None:  # (a slot that ended earlier in the burst is None: nothing joins mid-burst)
                    slot.generated += 1
                    self._emit(i, *(x[j, i] for x in per_step))

    def _emit(self, slot: int, token, logprob, top_ids, top_logprobs) -> None:
        """Deliver a token, then free the slot if the request is done."""
        token = int(token)
        s = self.slots[slot]
        request = s.request
        if request.cancelled:
            return self._finish(slot, Finished("cancelled"))
        if request.expired(time.monotonic()):
            return self._finish(slot, Finished("deadline"))
        self.tokens[slot] = token
        n = request.top_logprobs
        request.put(Token(token, float(logprob), tuple(zip(top_ids[:n].tolist(), top_logprobs[:n].tolist()))))
        if token in request.stop_token_ids:
            self._finish(slot, Finished("stop"))
        elif s.generated >= request.max_new_tokens:
            self._finish(slot, Finished("length"))

    def _finish(self, slot: int, event: Finished) -> None:
        self.finished[event.reason] += 1
        self.slots[slot].request.put(event)
        self.slots[slot] = None


class DeviceProgram:
    """The engine's device side: the weights, the batched KV cache and the jitted programs. Every call
    takes host (NumPy) values only and returns host values, so a multi-host group runs the very same
    calls on every process, in lockstep (lm_worker.group sends the leader's calls to its followers)."""

    def __init__(self, model, num_slots: int, max_length: int, max_top_logprobs: int, mesh=None,
                 max_burst: int = 16):
        """``max_burst``: the most decode steps one call may run (the size of its token buffer)."""
        graphdef, state = nnx.split(model)
        # The weights travel as a flat list: jit flattens a list of arrays in C++, an nnx.State's
        # Variables in Python (a quarter of a millisecond per call for a small model).
        self.weights, treedef = jax.tree.flatten(state)
        self.max_burst = max_burst
        self._prefill, self._insert, self._decode, init = _compile(graphdef, treedef, num_slots, max_length,
                                                                   max_top_logprobs, max_burst, mesh)
        shardings = None
        if mesh is not None:  # the cache laid out by the cache rules, as a multi-host group needs
            from gemma3.sharding import cache_sharding

            shardings = cache_sharding(jax.eval_shape(init, self.weights), mesh)
        self._init = jax.jit(init, out_shardings=shardings)
        self.cache = self._init(self.weights)
        # Decode runs on the first ``rows`` slots only, ``rows`` the smallest bucket holding every active slot
        # (slots fill from the lowest free one), so a lone request does not pay for a full batch. Every
        # bucket is compiled here, with all slots idle, and its one-step time measured: no request ever
        # waits for XLA, and the engine sizes its bursts from the timings.
        self.buckets = sorted({1 << i for i in range(num_slots.bit_length()) if 1 << i < num_slots} | {num_slots})
        self.step_seconds: dict[int, float] = {}
        z = lambda dtype: np.zeros(num_slots, dtype)  # noqa: E731
        idle = (z(np.int32), z(bool), z(np.uint32), z(np.int32), z(np.float32), z(np.int32),
                np.ones(num_slots, np.float32), np.tile(device_stop_ids(), (num_slots, 1)), np.int32(1),
                np.bool_(False))
        for rows in self.buckets:
            self._run_decode(rows, *idle)  # compiles
            started = time.perf_counter()  # a first figure; decode() then follows the calls
            self._run_decode(rows, *idle)
            self.step_seconds[rows] = time.perf_counter() - started

    def prefill(self, slot, ids, length, extra, temperature, top_k, top_p, seed, wants_top) -> list[np.ndarray]:
        """Prefill one request (ids: (1, bucket)) into decode slot ``slot``; its first token's picks."""
        picked, row = self._prefill(self.weights, ids, length, extra, temperature, top_k, top_p, seed, wants_top)
        self.cache = self._insert(self.cache, row, slot)
        return [np.asarray(x) for x in picked]

    def rows(self, active: np.ndarray) -> int:
        """The decode bucket for these active slots."""
        used = int(np.flatnonzero(active)[-1]) + 1 if active.any() else 1
        return next(b for b in self.buckets if b >= used)

    def steps_within(self, active: np.ndarray, seconds: float) -> int:
        """How many decode steps of this bucket fit in ``seconds`` (at least 1, at most max_burst), by its
        measured step time (at start, then a moving average over the calls)."""
        return max(1, min(self.max_burst, int(seconds / max(self.step_seconds[self.rows(active)], 1e-6))))

    def decode(self, tokens, active, seeds, steps, temperature, top_k, top_p, stop_ids, limit,
               wants_top) -> list[np.ndarray]:
        """Up to ``limit`` steps of the active slots, fewer when an active slot draws one of its
        ``stop_ids``. The picks come back in one host transfer: tokens and logprobs (max_burst, rows),
        the alternatives (max_burst, rows, n) (filled when ``wants_top``), and the steps run."""
        rows, started = self.rows(active), time.perf_counter()
        picked = self._run_decode(rows, tokens, active, seeds, steps, temperature, top_k, top_p, stop_ids, limit,
                                  wants_top)
        # Follow the step time as it is now (the start-up figure may have been taken while other processes
        # compiled): a moving average of this call's seconds per step.
        per_step = (time.perf_counter() - started) / max(int(picked[-1]), 1)
        self.step_seconds[rows] += 0.25 * (per_step - self.step_seconds[rows])
        return picked

    def _run_decode(self, rows, tokens, active, seeds, steps, temperature, top_k, top_p, stop_ids, limit,
                    wants_top) -> list[np.ndarray]:
        per_slot = (x[:rows] for x in (tokens, active, seeds, steps, temperature, top_k, top_p, stop_ids))
        tokens, active, seeds, steps, temperature, top_k, top_p, stop_ids = per_slot
        picked, self.cache = self._decode(self.weights, tokens, self.cache, active, seeds, steps, temperature,
                                          top_k, top_p, stop_ids, limit, wants_top)
        return [np.asarray(x) for x in picked]

    def reset(self) -> None:
        """A fresh cache (after a failed step, whose cache was donated)."""
        self.cache = self._init(self.weights)


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
def _compile(graphdef, treedef, num_slots: int, max_length: int, n_top: int, max_burst: int, mesh=None):
    """Jitted prefill (one request, bucketed), slot insertion and batched decode bursts (cache donated),
    and the cache's creation (jitted by DeviceProgram, with the mesh's layout). The weights come as
    ``treedef``'s leaves. With a mesh the picks are replicated, so every process of a multi-host group
    can read them."""
    replicated = (lambda tree: tree) if mesh is None else (
        lambda tree: jax.lax.with_sharding_constraint(tree, NamedSharding(mesh, PartitionSpec())))

    def model_of(weights):
        return nnx.merge(graphdef, jax.tree.unflatten(treedef, weights))

    def init(weights):
        return model_of(weights).init_cache(num_slots, max_length)

    def prefill(weights, ids, length, extra, temperature, top_k, top_p, seed, wants_top):
        model = model_of(weights)
        valid = jnp.arange(ids.shape[1])[None, :] < length
        cache = model.init_cache(1, max_length)
        out = model.model(input_ids=ids, attention_mask=valid, past_key_values=cache, **extra)
        last = out.last_hidden_state[:, length - 1]
        logits = model.apply_lm_head(last)
        seeds = jnp.asarray(seed, jnp.uint32)[None]
        picked = pick(logits, step_keys(seeds, jnp.int32(0)), jnp.asarray(temperature, jnp.float32)[None],
                      jnp.asarray(top_k, jnp.int32)[None], jnp.asarray(top_p, jnp.float32)[None], n_top, wants_top)
        return replicated(picked), out.past_key_values

    def insert(cache, row, slot):
        return jax.tree.map(lambda big, small: jax.lax.dynamic_update_slice_in_dim(big, small, slot, axis=0),
                            cache, row)

    def decode(weights, tokens, cache, active, seeds, steps, temperature, top_k, top_p, stop_ids, limit, wants_top):
        """Up to ``limit`` steps of the cache's first len(tokens) slots (the rest are left as they are),
        in one while_loop; it ends early after a step in which an active slot drew one of its stop_ids."""
        rows, k = tokens.shape[0], max(n_top, 1)

        def body(carry):
            i, tok, cache, picks, _ = carry
            model = model_of(weights)
            out = model.model(input_ids=tok[:, None], attention_mask=active[:, None], past_key_values=cache)
            logits = model.apply_lm_head(out.last_hidden_state[:, 0])
            picked = pick(logits, step_keys(seeds, steps + i), temperature, top_k, top_p, n_top, wants_top)
            picks = tuple(jax.lax.dynamic_update_index_in_dim(buf, x.astype(buf.dtype), i, 0)
                          for buf, x in zip(picks, picked))
            stopped = (active[:, None] & (picked[0][:, None] == stop_ids)).any()
            return i + 1, picked[0], out.past_key_values, picks, stopped

        picks = (jnp.zeros((max_burst, rows), jnp.int32), jnp.zeros((max_burst, rows), jnp.float32),
                 jnp.zeros((max_burst, rows, k), jnp.int32), jnp.zeros((max_burst, rows, k), jnp.float32))
        carry = (jnp.int32(0), tokens, cache, picks, jnp.bool_(False))
        count, _, cache, picks, _ = jax.lax.while_loop(lambda c: (c[0] < limit) & ~c[4], body, carry)
        return replicated((*picks, count)), cache

    return jax.jit(prefill), jax.jit(insert, donate_argnums=(0,)), jax.jit(decode, donate_argnums=(2,)), init
