"""Serving benchmark through the gateway, like JetStream's benchmark_serving: ``python bench/serving.py``.

For each model (``--models demo,270m``) it starts its own stack with the launcher (a private
redis-server unless ``--redis-url`` / ``REDIS_URL``, the vision worker, the LM worker, the gateway; float32)
and drives it through the gateway's real gRPC stub, streaming:

* ``demo``: the bundled demo checkpoint, as a copy whose LM head never emits a stop token
  (``bench.checkpoints.never_stopping_copy``: it answers as the demo does, then keeps going), so that every
  request runs to ``--max-new-tokens``;
* ``270m``: a random multimodal model with gemma-3-270m's text shapes (``bench.model.SHAPES["270m"]``,
  vocabulary 262,144) and a small SigLIP tower chosen for this CPU (``VISION_270M``: 224 px, patch 14,
  6 layers of width 384, 64 image tokens): a gemma-3-4b tower (896 px, 27 layers of 1152, 256 tokens)
  takes ~30 s per image here. Written by ``bench.checkpoints.write_multimodal_checkpoint`` (stop tokens
  unreachable too), cached in ``--workdir``.

Every workload's requests are drawn first and tokenized here, which sizes the LM worker's context
(``--max-length``, default: the longest prompt + ``--max-new-tokens`` rounded up to a power of two) and
lists the prefill shapes the warm-up must compile. Before the stack starts, a subprocess loads the
library's own ``Gemma3ForConditionalGeneration.generate`` (batch 1, same dtype) and runs each request of
the paired workload once (compiling); it then waits beside the stack (see "Service against library").

Workloads, each after an unmeasured warm-up that compiles the prefill buckets and vision batch sizes:

* fixed concurrency (``--concurrencies 1,4,16,64``): that many client loops, each sending its next
  request when the previous one finishes, ``max(--requests, concurrency)`` requests in all;
* Poisson arrivals (open loop) at ``--rate-fractions`` of the capacity measured above (the best req/s of
  the concurrency sweep), or at ``--rates`` req/s; ``--requests`` requests each.

A full run (the defaults: both models, 16 requests per workload, 32 new tokens) takes about 13 minutes
on a quiet 2-core machine, most of it the 270m model; ``--models demo --concurrencies 1,2 --requests 3
--max-new-tokens 4 --no-library`` takes ~20 s.

Requests: greedy, ``--max-new-tokens`` each (the checkpoints cannot stop earlier; a shorter answer is
reported as a failure), a share ``--image-share`` with one image from a pool of ``--image-pool`` (each
workload gets a fresh pool, so it starts with misses and then hits the Redis cache as a service would),
question text of a uniform ``--prompt-words`` range of the demo's words (~1 token per word).

Measured per request at the client (``time.perf_counter``), JetStream's definitions:

* TTFT: request sent → first message carrying a token;
* E2E: request sent → last message (the one with ``finish_reason``);
* TPOT: (E2E − TTFT) / (tokens − 1), one value per request;
* ITL: every gap between consecutive token-carrying messages of a request. The LM worker sends one
  message per wake-up with every token that arrived meanwhile, so a message can carry several tokens
  when the client, gateway or worker falls behind; the share of tokens that came in multi-token messages
  is reported (``batched``) and such a gap counts once;
* throughput: output tokens (and requests) completed ÷ wall time of the workload (first send → last
  finish).

Percentiles are numpy's (linear interpolation). Also reported: the LM worker's slot count (GetStats)
and the image cache hit share.

Service against library (the target: ≥ 0.9 at concurrency 1): after the workloads, ``--paired-requests``
more requests (a fresh pool of ``--paired-image-pool`` images: misses, then hits), one at a time, each
bracketed by the library's ``generate`` of the same request just before and just after it (timed from the
encoded image: decoding, preprocessing and the vision tower included, as the service does them on a cache
miss). Per request, the library's mean time ÷ the service's E2E is the service's tokens/s ÷ the library's;
reported: the median over text requests, image requests that hit the cache and those that missed it, with a
95% bootstrap interval of that median (how far a median of this many noisy pairs can be trusted: a demo
request's ratio spreads ±20%) and the range. Pairing each request with itself, in the same seconds, leaves
out the prompts' spread and this machine's drift, which moved a comparison of the two sides' medians,
measured minutes apart, from 0.6x to 1.3x between runs of the demo model (bench/RESULTS.md).

Prints Markdown tables; ``--json`` writes every measurement; ``--plot`` (default ``bench/serving.png``)
draws throughput and p99 TTFT against concurrency for each model.

The client shares the machine with the services: on a 2-core machine its own work (up to 64 streams)
is part of what is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import time

import grpc
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from demo import MODEL_DIR, shapes  # noqa: E402
from gateway.client import build_request  # noqa: E402
from gemma3serve.v1 import common_pb2, gateway_pb2_grpc, lm_worker_pb2, lm_worker_pb2_grpc  # noqa: E402
from launcher.__main__ import Stack, StackError, bring_up, free_port, redis_server_binary, wait_redis  # noqa: E402

# The 270m model's vision tower: SigLIP-small-like, 16 x 16 patches pooled 2 x 2 to 64 image tokens.
VISION_270M = dict(image_size=224, patch_size=14, hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                   num_attention_heads=6)
MM_TOKENS_270M = 64
WORDS = sorted({w for text in [*shapes.SHAPES, *shapes.COLOURS, *shapes.POSITIONS, "what where how many is the",
                               "in this image are there of a and colour shape"] for w in text.split()})
FINISH_LENGTH = common_pb2.FINISH_REASON_LENGTH


# --------------------------------------------------------------------------------------- models
def prepare_model(name: str, workdir: str, seed: int) -> str:
    """The checkpoint directory of ``name`` (written once into ``workdir``, then reused)."""
    if name == "demo":
        from bench.checkpoints import never_stopping_copy

        return never_stopping_copy(MODEL_DIR, os.path.join(workdir, "demo-never-stop"))
    if name == "270m":
        path = os.path.join(workdir, f"gemma-3-270m-mm-random-seed{seed}")
        # a subprocess, so that torch and the float32 model never sit in this process's memory
        subprocess.run([sys.executable, os.path.abspath(__file__), "--_checkpoint", path, "--seed", str(seed)],
                       check=True)
        return path
    raise ValueError(f"unknown model {name!r} (demo or 270m)")


def write_270m(path: str, seed: int) -> None:
    from bench.checkpoints import write_multimodal_checkpoint
    from bench.model import SHAPES

    write_multimodal_checkpoint(path, SHAPES["270m"], VISION_270M, seed, mm_tokens_per_image=MM_TOKENS_270M)


def image_size(model: str) -> int:
    with open(os.path.join(model, "preprocessor_config.json")) as f:
        return json.load(f)["size"]["height"]


# ------------------------------------------------------------------------------------- requests
@dataclasses.dataclass
class Template:
    kind: str  # "text" or "image"
    question: str
    image: bytes | None

    def request(self, max_new_tokens: int):
        return build_request(self.question, [self.image] if self.image else [], max_new_tokens=max_new_tokens)


# Drawn once per run and mixed into every image: a shared --redis-url cannot hold a previous run's embeddings.
RUN_NONCE = random.SystemRandom().randrange(1 << 30)


def image_pool(n: int, size: int, pool: int) -> list[bytes]:
    """``n`` distinct PNG scenes at ``size`` px; ``pool`` numbers the pool (a fresh one per workload)."""
    out = []
    for i in range(n):
        png = io.BytesIO()
        shapes.render(shapes.scene_for(pool * 1000 + i, "test", seed=RUN_NONCE), size).save(png, format="PNG")
        out.append(png.getvalue())
    return out


def templates(n: int, args, size: int, pool: int, distinct: int | None = None) -> list[Template]:
    """``n`` requests: question lengths uniform in --prompt-words, a share --image-share with an image of
    the workload's pool (``distinct`` images, default --image-pool). The same arguments give the same
    requests."""
    rng = random.Random(args.seed * 7919 + pool)
    images = image_pool(args.image_pool if distinct is None else distinct, size, pool)
    lo, hi = args.prompt_words
    out = []
    for _ in range(n):
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) + "?"
        if rng.random() < args.image_share:
            out.append(Template("image", question, rng.choice(images)))
        else:
            out.append(Template("text", question, None))
    return out


# ------------------------------------------------------------------------------------- measuring
@dataclasses.dataclass
class Record:
    kind: str
    sent: float  # perf_counter at send
    status: str = "OK"
    detail: str = ""
    ttft: float | None = None
    e2e: float | None = None
    tokens: int = 0
    messages: int = 0  # token-carrying messages
    batched_tokens: int = 0  # tokens that came in a message with others
    gaps: list[float] = dataclasses.field(default_factory=list)
    finish: int = 0
    prompt_tokens: int = 0
    cache_hits: int = 0
    cached_tokens: int = 0  # prompt tokens the LM worker reused from a kept prefix
    end: float = 0.0
    index: int = -1  # a paired request's place in its list

    @property
    def complete(self) -> bool:
        return self.status == "OK" and self.finish == FINISH_LENGTH

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.tokens - 1) if self.complete and self.tokens > 1 else None


async def one(stub, template: Template, max_new_tokens: int, timeout: float, index: int = -1) -> Record:
    rec = Record(template.kind, time.perf_counter(), index=index)
    last = None
    try:
        async for chunk in stub.Generate(template.request(max_new_tokens), timeout=timeout):
            now = time.perf_counter()
            if chunk.token_ids:
                k = len(chunk.token_ids)
                if rec.ttft is None:
                    rec.ttft = now - rec.sent
                else:
                    rec.gaps.append(now - last)
                last = now
                rec.tokens += k
                rec.messages += 1
                rec.batched_tokens += k if k > 1 else 0
            if chunk.finish_reason:
                rec.e2e, rec.finish = now - rec.sent, chunk.finish_reason
                rec.prompt_tokens, rec.cache_hits = chunk.usage.prompt_tokens, chunk.usage.image_cache_hits
                rec.cached_tokens = chunk.usage.cached_prompt_tokens
    except grpc.aio.AioRpcError as e:
        rec.status, rec.detail = e.code().name, e.details()
    rec.end = time.perf_counter()
    return rec


async def closed_loop(stub, tpls: list[Template], concurrency: int, max_new_tokens: int,
                      timeout: float) -> tuple[list[Record], float]:
    """``concurrency`` client loops draining ``tpls`` in order; (records, wall seconds)."""
    todo = iter(tpls)
    records: list[Record] = []

    async def client():
        for template in todo:  # a shared iterator: each loop takes the next request when it is free
            records.append(await one(stub, template, max_new_tokens, timeout))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return records, max(r.end for r in records) - start


async def poisson(stub, tpls: list[Template], rate: float, max_new_tokens: int, timeout: float,
                  seed: int) -> tuple[list[Record], float]:
    """Open loop: request i sent at the i-th arrival of a Poisson process of ``rate`` per second."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, len(tpls)))
    arrivals -= arrivals[0]
    start = time.perf_counter()

    async def at(t: float, template: Template) -> Record:
        await asyncio.sleep(max(0.0, start + t - time.perf_counter()))
        return await one(stub, template, max_new_tokens, timeout)

    records = await asyncio.gather(*(at(t, tp) for t, tp in zip(arrivals, tpls)))
    return list(records), max(r.end for r in records) - start


def percentiles(values) -> dict:
    if not len(values):
        return {"p50": None, "p99": None, "mean": None}
    a = np.asarray(values, np.float64)
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}


def summarize(name: str, records: list[Record], wall: float, max_new_tokens: int, **extra) -> dict:
    done = [r for r in records if r.complete]
    failed: dict[str, int] = {}
    for r in records:
        if not r.complete:
            key = r.status if r.status != "OK" else f"finish {r.finish} after {r.tokens} tokens"
            failed[key] = failed.get(key, 0) + 1
    tokens = sum(r.tokens for r in done)
    images = [r for r in done if r.kind == "image"]
    per_request = {kind: percentiles([r.tokens / r.e2e for r in done if r.kind == kind]) for kind in ("text", "image")}
    return {
        "workload": name, **extra, "requests": len(records), "completed": len(done), "failed": failed,
        "short": sum(r.status == "OK" and r.tokens != max_new_tokens for r in records),
        "wall_s": wall, "output_tokens": tokens, "output_tok_s": tokens / wall, "req_s": len(done) / wall,
        "ttft_s": percentiles([r.ttft for r in done]), "tpot_s": percentiles([r.tpot for r in done if r.tpot]),
        "itl_s": percentiles([g for r in done for g in r.gaps]), "e2e_s": percentiles([r.e2e for r in done]),
        "request_tok_s": per_request,
        "batched_token_share": sum(r.batched_tokens for r in done) / max(1, tokens),
        "prompt_tokens": percentiles([r.prompt_tokens for r in done]),
        "cached_prompt_share": sum(r.cached_tokens for r in done) / max(1, sum(r.prompt_tokens for r in done)),
        "image_requests": len(images), "image_cache_hit_share": (sum(r.cache_hits for r in images) / len(images)
                                                                 if images else None),
        "details": sorted({f"{r.status}: {r.detail}" for r in records if r.detail})[:3],
    }


# ------------------------------------------------------------------------------ library baseline
class Library:
    """The library's generate in a subprocess (``--_library``), one request per line on its stdin, its
    time on its stdout: it waits beside the stack, idle, between the requests it is given (its model and
    compiled programs stay in memory through the workloads: 1-2 GB for the 270m model in float32)."""

    def __init__(self, model: str, args):
        spec = json.dumps({"model": model, "dtype": args.dtype, "max_new_tokens": args.max_new_tokens})
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--_library", spec],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(self, template: Template) -> dict:
        """{"seconds", "prompt_tokens"} of one generate of ``template``'s request."""
        self.proc.stdin.write(json.dumps([template.question, template.image.hex() if template.image else None]) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the library subprocess ended (exit code {self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        from bench.harness import end_process

        end_process(self.proc)


def library_worker(spec_json: str) -> None:
    """The ``Library`` subprocess: generate for each request read from stdin."""
    replies = os.fdopen(os.dup(1), "w", buffering=1)  # the protocol's own; whatever else prints goes to stderr
    os.dup2(2, 1)
    spec = json.loads(spec_json)
    from serving.settings import use_cpu_threads

    use_cpu_threads("auto", spec["model"])  # as the stack's workers do: the same XLA threads on both sides
    import jax.numpy as jnp

    from gemma3 import Gemma3ForConditionalGeneration
    from gemma3.processing import Gemma3Processor, decode_image
    from lm_worker.prompts import PromptBuilder, chat_text

    model = Gemma3ForConditionalGeneration.from_pretrained(spec["model"], dtype=jnp.dtype(spec["dtype"]),
                                                           progress=False)
    builder = PromptBuilder.from_pretrained(spec["model"], model.config)
    processor = Gemma3Processor.from_pretrained(spec["model"])
    n = spec["max_new_tokens"]
    for line in sys.stdin:
        question, image = json.loads(line)
        images = [bytes.fromhex(image)] if image else []
        text = chat_text(build_request(question, images).chat.turns)  # the service's own prompt
        t0 = time.perf_counter()  # from the encoded image, as the service gets it: decoding and preprocessing
        inputs = processor(text, [decode_image(i) for i in images] or None, add_special_tokens=False)
        extra = {k: inputs[k] for k in ("pixel_values", "token_type_ids") if k in inputs and images}
        out = model.generate(inputs["input_ids"], inputs["attention_mask"], max_new_tokens=n,
                             eos_token_id=builder.stop_token_ids, **extra)
        new = int(np.asarray(out.num_new_tokens)[0])
        seconds = time.perf_counter() - t0
        if new != n:
            raise RuntimeError(f"the library stopped after {new} of {n} tokens: the checkpoint can stop")
        print(json.dumps({"seconds": seconds, "prompt_tokens": int(inputs["input_ids"].shape[1])}), file=replies)


async def paired(stub, library: Library, tpls: list[Template], max_new_tokens: int, timeout: float) -> list[dict]:
    """Each request through the library, the service, the library again; one dict per request."""
    out = []
    for i, template in enumerate(tpls):
        before = await asyncio.to_thread(library.run, template)
        rec = await one(stub, template, max_new_tokens, timeout, i)
        after = await asyncio.to_thread(library.run, template)
        out.append({**dataclasses.asdict(rec), "library_s": [before["seconds"], after["seconds"]],
                    "library_prompt_tokens": before["prompt_tokens"]})
    return out


# -------------------------------------------------------------------------------------- one model
def lm_port(stack: Stack) -> int:
    proc = next(p for name, p in stack.procs if name == "lm-worker")
    return int(proc.args[proc.args.index("--port") + 1])


def start_stack(stack: Stack, model: str, args, max_length: int) -> str:
    """The launcher's bring_up with the benchmark's settings; returns the gateway's address."""
    redis_url = args.redis_url
    if not redis_url:
        port = free_port()
        proc = stack.start("redis", [redis_server_binary(), "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                                     "--appendonly", "no", "--maxmemory", "512mb", "--maxmemory-policy",
                                     "allkeys-lru"])
        redis_url = f"redis://127.0.0.1:{port}/0"
        wait_redis(redis_url, proc, 30)
    launch = argparse.Namespace(model=model, redis_url=redis_url, redis_ca_cert=None, dtype=args.dtype,
                                num_slots=args.num_slots, max_length=max_length,
                                startup_timeout=args.startup_timeout, host="127.0.0.1", port=0, tls_cert=None,
                                tls_key=None, token_file=None, ca_cert=None, tls_server_name=None, tokens=[],
                                compilation_cache_dir=os.environ.get("JAX_COMPILATION_CACHE_DIR", ""),
                                vision_in_lm=args.vision_in_lm)
    # what bring_up does not pass as flags, the services read from their environment (Stack.start copies it)
    env = {"GEMMA3_LM_MAX_QUEUE": str(max(256, 2 * max(args.concurrencies, default=1))),
           "GEMMA3_GATEWAY_MAX_STREAMS_PER_CLIENT": "0",  # all the load comes from this one process
           **({} if args.prefix_cache is None else {"GEMMA3_LM_PREFIX_CACHE": str(args.prefix_cache)}),
           **{f"GEMMA3_{s}_LOG_LEVEL": args.log_level for s in ("LM", "VISION", "GATEWAY")}}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return bring_up(stack, launch)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclasses.dataclass
class Plan:
    """Every workload's requests, fixed before the stack starts, and what they need of it."""
    sweep: list[tuple[int, list[Template]]]  # (concurrency, requests)
    arrivals: list[list[Template]]  # one list per Poisson rate
    paired: list[Template]  # each run by the library and the service in turn (empty without --library)
    lengths: list[int]  # prompt tokens (images expanded) of every request
    max_length: int  # the LM worker's context: --max-length, else the longest prompt + max_new_tokens, rounded up
    shapes: dict[tuple[str, int], Template]  # one request per (kind, prefill bucket) reached


def plan(model: str, args) -> Plan:
    from gemma3.processing import Gemma3Processor
    from lm_worker.engine import buckets_for
    from lm_worker.prompts import chat_text

    size = image_size(model)
    sweep = [(c, templates(max(args.requests, c), args, size, pool=1 + i)) for i, c in enumerate(args.concurrencies)]
    arrivals = [templates(args.requests, args, size, pool=100 + i)
                for i in range(len(args.rates or args.rate_fractions))]
    paired = (templates(args.paired_requests, args, size, pool=200, distinct=args.paired_image_pool)
              if args.library else [])
    every = [t for _, tpls in sweep for t in tpls] + [t for tpls in arrivals for t in tpls] + paired
    processor = Gemma3Processor.from_pretrained(model)
    lengths = [len(processor.tokenizer.encode(
        processor.expand_images(chat_text(t.request(1).chat.turns), [0] * (t.image is not None)),
        add_special_tokens=False).ids) for t in every]
    max_length = args.max_length or max(128, 1 << (max(lengths) + args.max_new_tokens - 1).bit_length())
    buckets = buckets_for(max_length)
    shapes_needed = {}
    for t, n in zip(every, lengths):  # an image prompt's prefill takes image features: its own program
        shapes_needed.setdefault((t.kind, next((b for b in buckets if b >= n), max_length)), t)
    return Plan(sweep, arrivals, paired, lengths, max_length, shapes_needed)


async def warm_up(stub, args, size: int, timeout: float, shapes_needed: dict) -> None:
    """Unmeasured: one request per prefill shape the workloads reach, one at a time, then 2, 4, 8 image
    misses at once (the vision worker's batch sizes, up to the largest concurrency); two new tokens each,
    on images of their own (the workloads' images stay uncached)."""
    batches = [n for n in (2, 4, 8) if n <= max(args.concurrencies, default=1)]
    for j, n in enumerate(batches):
        fresh = image_pool(n, size, pool=600 + j)
        _check_warm(await asyncio.gather(*(one(stub, Template("image", "what is in this image?", img), 2, timeout)
                                           for img in fresh)))
    own = image_pool(len(shapes_needed), size, pool=500)
    for _, tpl in sorted(shapes_needed.items()):
        tpl = dataclasses.replace(tpl, image=own.pop() if tpl.image else None)
        _check_warm([await one(stub, tpl, 2, timeout)])


def _check_warm(recs: list[Record]) -> None:
    bad = [r for r in recs if r.status != "OK"]
    if bad:
        raise RuntimeError(f"warm-up request failed: {bad[0].status} {bad[0].detail}")


async def drive(target: str, stats_target: str, model: str, args, work: Plan, library: Library | None) -> dict:
    size = image_size(model)
    timeout = args.request_timeout
    out: dict = {"workloads": []}
    with grpc.insecure_channel(stats_target) as channel:
        stats = lm_worker_pb2_grpc.LMWorkerStub(channel).GetStats(lm_worker_pb2.StatsRequest(), timeout=10)
    out["num_slots"] = stats.num_slots
    async with grpc.aio.insecure_channel(target) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        t0 = time.perf_counter()
        await warm_up(stub, args, size, timeout, work.shapes)
        out["warmup_s"] = time.perf_counter() - t0
        out["prefill_shapes"] = sorted(f"{kind} {bucket}" for kind, bucket in work.shapes)
        print(f"# warm-up {out['warmup_s']:.0f}s ({len(work.shapes)} prefill shapes)", file=sys.stderr, flush=True)
        for c, tpls in work.sweep:
            recs, wall = await closed_loop(stub, tpls, c, args.max_new_tokens, timeout)
            s = summarize(f"concurrency {c}", recs, wall, args.max_new_tokens, concurrency=c)
            out["workloads"].append(s)
            if c == 1:
                out["concurrency_1_records"] = [dataclasses.asdict(r) for r in recs]
            print(f"# {s['workload']}: {s['output_tok_s']:.1f} tok/s, {wall:.0f}s", file=sys.stderr, flush=True)
        capacity = max((w["req_s"] for w in out["workloads"]), default=None)
        out["capacity_req_s"] = capacity
        rates = args.rates or ([f * capacity for f in args.rate_fractions] if capacity else [])
        for i, (rate, tpls) in enumerate(zip(rates, work.arrivals)):
            recs, wall = await poisson(stub, tpls, rate, args.max_new_tokens, timeout, seed=args.seed + i)
            s = summarize(f"Poisson {rate:.2f} req/s", recs, wall, args.max_new_tokens, rate=rate)
            out["workloads"].append(s)
            print(f"# {s['workload']}: {s['output_tok_s']:.1f} tok/s, {wall:.0f}s", file=sys.stderr, flush=True)
        if library is not None and work.paired:
            out["paired"] = await paired(stub, library, work.paired, args.max_new_tokens, timeout)
            print(f"# paired with the library: {len(out['paired'])} requests", file=sys.stderr, flush=True)
    return out


def run_model(name: str, args) -> dict:
    t0 = time.perf_counter()
    model = prepare_model(name, args.workdir, args.seed)
    work = plan(model, args)
    result = {"model": name, "checkpoint": model, "max_length": work.max_length,
              "prompt_tokens": {"min": min(work.lengths), "max": max(work.lengths),
                                "median": float(np.median(work.lengths))}}
    library = None
    stack = Stack("text")
    try:
        if work.paired:
            print(f"# {name}: library generate, compiling the paired requests' shapes", file=sys.stderr, flush=True)
            library = Library(model, args)
            for template in work.paired:
                library.run(template)
        print(f"# {name}: starting the stack", file=sys.stderr, flush=True)
        started = time.perf_counter()
        target = start_stack(stack, model, args, work.max_length)
        result["startup_s"] = time.perf_counter() - started
        result.update(asyncio.run(drive(target, f"127.0.0.1:{lm_port(stack)}", model, args, work, library)))
    finally:
        try:
            stack.stop()
        finally:
            if library is not None:
                library.close()
    result["ratio"] = library_ratio(result)
    result["seconds"] = time.perf_counter() - t0
    return result


def median_interval(values, level: float = 0.95, resamples: int = 4000, seed: int = 0) -> tuple[float, float]:
    """A percentile-bootstrap interval of the median of ``values`` (the requests resampled with replacement)."""
    v = np.asarray(values, float)
    medians = np.median(v[np.random.default_rng(seed).integers(0, len(v), (resamples, len(v)))], axis=1)
    lo, hi = np.quantile(medians, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def library_ratio(result: dict) -> dict | None:
    """Per paired request: the library's mean time ÷ the service's E2E (equal token counts: the service's
    tokens/s ÷ the library's); per group (text, image hit, image miss): median, its 95% interval, range,
    count, and the two sides' median tokens/s."""
    groups: dict[str, list[tuple[float, float, float]]] = {}
    for r in result.get("paired", []):
        if r["status"] != "OK" or r["finish"] != FINISH_LENGTH:
            continue
        group = r["kind"] if r["kind"] == "text" else "image, cache hit" if r["cache_hits"] else "image, cache miss"
        library_s = float(np.mean(r["library_s"]))
        groups.setdefault(group, []).append((library_s / r["e2e"], r["tokens"] / library_s, r["tokens"] / r["e2e"]))
    out = {}
    for g, v in sorted(groups.items(), key=lambda kv: kv[0] != "text"):
        ratios, library_tok_s, service_tok_s = (np.asarray(column) for column in zip(*v))
        out[g] = {"median": float(np.median(ratios)), "ci95": median_interval(ratios), "min": float(ratios.min()),
                  "max": float(ratios.max()), "requests": len(v), "library_tok_s": float(np.median(library_tok_s)),
                  "service_tok_s": float(np.median(service_tok_s))}
    return out or None


# ---------------------------------------------------------------------------------------- report
def ms(x) -> str:
    return "–" if x is None else f"{x * 1000:.0f}" if x >= 0.1 else f"{x * 1000:.1f}"


def tables(results: list[dict], args) -> str:
    lines = [f"max_new_tokens {args.max_new_tokens}, question words {args.prompt_words[0]}–{args.prompt_words[1]}, "
             f"image share {args.image_share}, image pool {args.image_pool} per workload, dtype {args.dtype}, "
             f"images embedded {'in the LM worker' if args.vision_in_lm else 'by the vision worker'}. "
             "Times in ms.", ""]
    for r in results:
        lines.append(f"**{r['model']}** ({r.get('num_slots', '?')} slots, max_length {r['max_length']}; capacity "
                     f"{r.get('capacity_req_s') or 0:.2f} req/s; stack up in {r.get('startup_s', 0):.0f} s, "
                     f"warm-up {r.get('warmup_s', 0):.0f} s)")
        lines.append("")
        lines.append("| workload | done/sent | prompt tok p50 | out tok/s | req/s | TTFT p50 | TTFT p99 | TPOT p50 | "
                     "TPOT p99 | ITL p50 | ITL p99 | E2E p50 | E2E p99 | batched | cache hits | prompt reused |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for w in r["workloads"]:
            hits = w["image_cache_hit_share"]
            lines.append(
                f"| {w['workload']} | {w['completed']}/{w['requests']} | {w['prompt_tokens']['p50'] or 0:.0f} | "
                f"{w['output_tok_s']:.1f} | {w['req_s']:.2f} | {ms(w['ttft_s']['p50'])} | {ms(w['ttft_s']['p99'])} | "
                f"{ms(w['tpot_s']['p50'])} | {ms(w['tpot_s']['p99'])} | {ms(w['itl_s']['p50'])} | "
                f"{ms(w['itl_s']['p99'])} | {ms(w['e2e_s']['p50'])} | {ms(w['e2e_s']['p99'])} | "
                f"{w['batched_token_share']:.0%} | {'–' if hits is None else f'{hits:.0%}'} | "
                f"{w.get('cached_prompt_share', 0):.0%} |")
        if r.get("ratio"):
            lines.append("")
        for group, x in (r.get("ratio") or {}).items():
            lo, hi = x["ci95"]
            lines.append(f"- service ÷ library, paired requests, {group} ({x['requests']}): **{x['median']:.2f}×** "
                         f"median (95% interval {lo:.2f}–{hi:.2f}; range {x['min']:.2f}–{x['max']:.2f}); tokens/s "
                         f"per request (median): library generate {x['library_tok_s']:.1f} (batch 1, prefill "
                         f"included), service {x['service_tok_s']:.1f}")
        for w in r["workloads"]:
            if w["failed"] or w["details"]:
                lines.append(f"- {w['workload']}: failed {w['failed']} {w['details']}")
        lines.append("")
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    """Throughput and p99 TTFT against concurrency, one line per model; dotted: the library's batch-1
    generate; dashed vertical: the slot count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    fig, (ax_tp, ax_ttft) = plt.subplots(1, 2, figsize=(11, 4.2))
    ticks, slots = set(), set()
    for r in results:
        pts = [(w["concurrency"], w["output_tok_s"], w["ttft_s"]["p99"]) for w in r["workloads"] if "concurrency" in w]
        if not pts:
            continue
        c, tp, ttft = zip(*pts)
        ticks.update(c)
        slots.add(r.get("num_slots"))
        line, = ax_tp.plot(c, tp, "o-", label=r["model"])
        ax_ttft.plot(c, [t * 1000 if t is not None else np.nan for t in ttft], "o-", color=line.get_color(),
                     label=r["model"])
        lib = (r.get("ratio") or {}).get("text")
        if lib:
            ax_tp.axhline(lib["library_tok_s"], color=line.get_color(), ls=":", lw=1,
                          label=f"{r['model']}: library generate, batch 1")
    for ax, title, unit in ((ax_tp, "throughput", "output tokens/s"), (ax_ttft, "p99 time to first token", "ms")):
        for n in sorted(s for s in slots if s):
            ax.axvline(n, color="grey", ls="--", lw=0.8, label=f"{n} decode slots")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sorted(ticks))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("gemma3-serve through the gateway (streaming, float32, CPU)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ main
def floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x]


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="demo,270m", help="comma-separated: demo, 270m")
    p.add_argument("--concurrencies", type=ints, default=[1, 4, 16, 64])
    p.add_argument("--requests", type=int, default=16, help="requests per workload (at least the concurrency)")
    p.add_argument("--rate-fractions", type=floats, default=[0.5, 0.9],
                   help="Poisson rates as fractions of the capacity the concurrency sweep measured")
    p.add_argument("--rates", type=floats, default=[], help="Poisson rates in req/s (instead of --rate-fractions)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--prompt-words", type=ints, default=[8, 40], help="LO,HI: question length range in words")
    p.add_argument("--image-share", type=float, default=0.5)
    p.add_argument("--image-pool", type=int, default=4, help="distinct images per workload")
    p.add_argument("--num-slots", type=int, default=8, help="LM decode slots")
    p.add_argument("--max-length", type=int, default=0, help="LM context per request (sizes the KV cache; default: "
                   "the longest prompt + --max-new-tokens, rounded up to a power of two, at least 128)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--vision-in-lm", action="store_true", help="no vision worker: the LM worker embeds images "
                   "(the launcher's --vision-in-lm)")
    p.add_argument("--prefix-cache", type=int, help="the LM worker's --prefix-cache (default: its own, 4; a "
                   "request whose image came before starts from the kept row of the prompt that had it)")
    p.add_argument("--library", action=argparse.BooleanOptionalAction, default=True,
                   help="end with requests paired with the library's generate")
    p.add_argument("--paired-requests", type=int, default=32, help="requests paired with the library's")
    p.add_argument("--paired-image-pool", type=int, default=8, help="distinct images among the paired requests "
                   "(each one's first request misses the cache)")
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL", ""),
                   help="Redis for the embedding cache (default: a private redis-server) [env REDIS_URL]")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "gemma3-bench-serving"),
                   help="checkpoints are written here once and reused")
    p.add_argument("--startup-timeout", type=float, default=900.0)
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--log-level", default="WARNING", help="the services' log level")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write every measurement here")
    p.add_argument("--plot", default=os.path.join(ROOT, "bench", "serving.png"), help="PNG path ('' for none)")
    p.add_argument("--output", help="also write the Markdown tables here")
    p.add_argument("--_library", help=argparse.SUPPRESS)
    p.add_argument("--_checkpoint", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if len(args.prompt_words) != 2 or not 1 <= args.prompt_words[0] <= args.prompt_words[1]:
        p.error("--prompt-words takes LO,HI with 1 <= LO <= HI")
    args.models = [m for m in args.models.split(",") if m]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._library:
        library_worker(args._library)
        return 0
    if args._checkpoint:
        write_270m(args._checkpoint, args.seed)
        return 0
    os.makedirs(args.workdir, exist_ok=True)
    results = []
    try:
        for name in args.models:
            results.append(run_model(name, args))
    except StackError as e:
        print(f"serving bench: {e}", file=sys.stderr)
        return 1
    report = tables(results, args)
    print(report)
    if args.output:
        with open(args.output, "w") as f:
            f.write(report + "\n")
    if args.json:
        config = {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ("json", "plot", "output")}
        with open(args.json, "w") as f:
            json.dump({"config": config, "results": results}, f, indent=2)
    if args.plot:
        plot(results, args.plot)
    ok = (all(w["completed"] == w["requests"] for r in results for w in r["workloads"])
          and all(p["status"] == "OK" and p["finish"] == FINISH_LENGTH for r in results for p in r.get("paired", [])))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
