"""Load and faults through the whole stack, with nothing lost: ``python bench/reliability.py [--requests 200]``.

Starts its own stack on loopback (a private redis-server, one vision worker, two LM workers behind one
gateway balancing round robin; the demo model unless ``--model``; with ``--vision-in-lm`` no vision worker:
the LM workers embed images, and step 4 is skipped), then runs, in order:

1. solo: each request template alone, greedy: the answer every later copy of it must get;
2. load: ``--requests`` concurrent streams of those templates with Redis emptied first (misses and hits
   mixed), a share cancelled by the client at a random point and a share with a deadline shorter than
   the answer; afterwards every slot is free and each worker's memory is back at its baseline (taken
   after a warm-up wave, so that compiled shapes and grown pools are in it);
3. redis: Redis killed during a wave (images go on, their embeddings inline), restarted on its port,
   then a repeated image is a cache hit again;
4. vision: the vision worker killed during a wave (image requests UNAVAILABLE quickly, text ones
   unaffected), restarted, image requests succeed again;
5. lm: one LM worker killed mid-stream (its clients get UNAVAILABLE within seconds, never a hang; the
   other keeps serving every new request).

A stream ends with a finish reason or a gRPC status; one that does neither within ``--hang-seconds``
is *lost*. Every finished answer (and every partial one, as a prefix) must equal its template's solo
answer: a mismatch would mean a request received another's tokens. Prints a table (and ``--json``
writes the figures and checks); exit status 1 when any check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import io
import json
import os
import random
import signal
import sys
import time

import grpc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from demo import MODEL_DIR, shapes  # noqa: E402
from gateway.client import build_request  # noqa: E402
from gemma3serve.v1 import gateway_pb2_grpc, lm_worker_pb2, lm_worker_pb2_grpc  # noqa: E402
from launcher.__main__ import Stack, free_port, redis_server_binary, wait_healthy, wait_redis  # noqa: E402

LM_SERVICE, VISION_SERVICE, GATEWAY_SERVICE = (f"gemma3serve.v1.{s}" for s in ("LMWorker", "VisionWorker", "Gateway"))
TEXT_PROMPTS = ["Hello!", "Tell me a story about a square.", "What is two plus two?", "Name a colour.",
                "Why is the sky blue?", "Describe a triangle.", "Count to three.", "Say something."]


@dataclasses.dataclass
class Template:
    name: str
    request: object  # gateway_pb2.GenerateRequest
    has_image: bool


@dataclasses.dataclass
class Outcome:
    template: int
    status: str  # "OK" or a gRPC status name
    tokens: list[int]
    ttft: float | None
    seconds: float
    lost: bool = False
    cache_hits: int = 0
    detail: str = ""
    ended: float = dataclasses.field(default_factory=time.monotonic)


def templates(n_images: int, max_new_tokens: int) -> list[Template]:
    """Image questions about held-out scenes, then text-only prompts."""
    out = []
    for i in range(n_images):
        scene = shapes.scene_for(i, "test", seed=4242)
        question, _ = random.Random(i).choice(shapes.questions(scene))
        png = io.BytesIO()
        shapes.render(scene).save(png, format="PNG")
        out.append(Template(f"image-{i}", build_request(question, [png.getvalue()], max_new_tokens=max_new_tokens),
                            True))
    for i, prompt in enumerate(TEXT_PROMPTS):
        out.append(Template(f"text-{i}", build_request(prompt, max_new_tokens=max_new_tokens), False))
    return out


class Cluster:
    """The stack's processes, each of which can be killed and started again on its own port."""

    def __init__(self, model: str, num_slots: int, max_queue: int, startup_timeout: float, vision_in_lm: bool = False):
        self.stack = Stack("text")
        self.model, self.num_slots, self.max_queue, self.timeout = model, num_slots, max_queue, startup_timeout
        self.vision_in_lm = vision_in_lm  # no vision worker: the LM workers embed images
        self.redis_port, self.vision_port = free_port(), free_port()
        self.lm_ports = [free_port(), free_port()]
        self.gateway_port = free_port()
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.procs: dict[str, object] = {}

    def start_redis(self) -> None:
        self.procs["redis"] = self.stack.start("redis", [
            redis_server_binary(), "--bind", "127.0.0.1", "--port", str(self.redis_port), "--save", "",
            "--appendonly", "no", "--maxmemory", "256mb", "--maxmemory-policy", "allkeys-lru"])
        wait_redis(self.redis_url, self.procs["redis"], 30)

    def start_vision(self) -> None:
        self.procs["vision-worker"] = self.stack.service(
            "vision-worker", "vision_worker", self.vision_port, "--model", self.model, "--dtype", "float32",
            "--redis-url", self.redis_url, "--log-level", "WARNING")

    def start_lm(self, i: int) -> None:
        self.procs[f"lm-worker-{i}"] = self.stack.service(
            f"lm-worker-{i}", "lm_worker", self.lm_ports[i], "--model", self.model, "--dtype", "float32",
            "--redis-url", self.redis_url, "--num-slots", str(self.num_slots), "--max-queue", str(self.max_queue),
            "--max-length", "256", "--log-level", "WARNING", *(["--embed-images"] if self.vision_in_lm else []))

    def wait(self, name: str, port: int, service: str) -> None:
        wait_healthy(name, f"127.0.0.1:{port}", service, self.procs[name], self.timeout)

    def up(self) -> None:
        self.start_redis()
        if not self.vision_in_lm:
            self.start_vision()
        for i in range(2):
            self.start_lm(i)
        if not self.vision_in_lm:
            self.wait("vision-worker", self.vision_port, VISION_SERVICE)
        for i, port in enumerate(self.lm_ports):
            self.wait(f"lm-worker-{i}", port, LM_SERVICE)
        lm_targets = "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in self.lm_ports)
        self.procs["gateway"] = self.stack.service(
            "gateway", "gateway", self.gateway_port, "--lm-target", lm_targets,
            "--vision-target", "lm" if self.vision_in_lm else f"127.0.0.1:{self.vision_port}", "--log-level", "WARNING",
            "--max-streams-per-client", "0")  # all the load comes from this one process
        self.wait("gateway", self.gateway_port, GATEWAY_SERVICE)

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.kill()
        proc.wait()
        self.stack.procs = [(n, p) for n, p in self.stack.procs if p is not proc]

    def rss_mb(self, name: str) -> float:
        with open(f"/proc/{self.procs[name].pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise RuntimeError(f"no VmRSS for {name}")

    def stats(self, i: int) -> lm_worker_pb2.LMWorkerStats:
        with grpc.insecure_channel(f"127.0.0.1:{self.lm_ports[i]}") as channel:
            return lm_worker_pb2_grpc.LMWorkerStub(channel).GetStats(lm_worker_pb2.StatsRequest(), timeout=5)

    def flush_redis(self) -> None:
        import redis

        with redis.Redis.from_url(self.redis_url) as client:
            client.flushdb()


async def one(stub, index: int, template: Template, *, cancel_after: int | None = None,
              deadline: float | None = None, hang_seconds: float = 120.0) -> Outcome:
    """One streamed call; ``cancel_after`` chunks then the client cancels; never more than ``hang_seconds``."""
    started = time.monotonic()
    tokens, ttft, hits, detail = [], None, 0, ""
    call = stub.Generate(template.request, timeout=deadline)

    async def consume() -> str:
        nonlocal ttft, hits
        chunks = 0
        async for chunk in call:
            if chunk.token_ids and ttft is None:
                ttft = time.monotonic() - started
            tokens.extend(chunk.token_ids)
            chunks += 1
            if chunk.finish_reason:
                hits = chunk.usage.image_cache_hits
                return "OK"
            if cancel_after is not None and chunks >= cancel_after:
                call.cancel()
                return "CANCELLED"
        return "OK"  # the stream ended without a finish reason: the check on answers catches it

    try:
        status = await asyncio.wait_for(consume(), hang_seconds)
    except grpc.aio.AioRpcError as e:
        status, detail = e.code().name, e.details()
    except asyncio.CancelledError:
        status = "CANCELLED"
    except asyncio.TimeoutError:
        call.cancel()
        return Outcome(index, "LOST", tokens, ttft, time.monotonic() - started, lost=True)
    return Outcome(index, status, tokens, ttft, time.monotonic() - started, cache_hits=hits, detail=detail)


async def wave(target: str, tpls: list[Template], picks: list[int], *, cancel_share: float = 0.0,
               deadline_share: float = 0.0, seed: int = 0, hang_seconds: float = 120.0,
               during=None) -> list[Outcome]:
    """``picks`` (template indices) all at once; ``during`` (a coroutine function) runs meanwhile, given an
    event set once every stream has ended."""
    rng = random.Random(seed)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        jobs = []
        for i in picks:
            r = rng.random()
            kwargs = {}
            if r < cancel_share:
                kwargs["cancel_after"] = rng.randint(1, 4)
            elif r < cancel_share + deadline_share:
                kwargs["deadline"] = rng.uniform(0.05, 0.6)
            jobs.append(one(stub, i, tpls[i], hang_seconds=hang_seconds, **kwargs))
        if during is None:
            return list(await asyncio.gather(*jobs))
        done = asyncio.Event()

        async def all_jobs():
            try:
                return await asyncio.gather(*jobs)
            finally:
                done.set()

        outcomes, _ = await asyncio.gather(all_jobs(), during(done))
        return list(outcomes)


STARTED = time.monotonic()


def progress(message: str) -> None:
    """One line on stderr per step, so that a run stopped from outside shows where it was."""
    print(f"reliability: {time.monotonic() - STARTED:6.1f} s: {message}", file=sys.stderr, flush=True)


def mismatches(outcomes: list[Outcome], solo: list[list[int]]) -> list[str]:
    """Answers that are not their template's solo answer (finished ones) or not a prefix of it."""
    bad = []
    for o in outcomes:
        want = solo[o.template]
        if (o.status == "OK" and o.tokens != want) or (o.status != "OK" and o.tokens != want[:len(o.tokens)]):
            bad.append(f"template {o.template} ({o.status}): got {o.tokens}, alone {want}")
    return bad


def summary(name: str, outcomes: list[Outcome]) -> dict:
    failed: dict[str, int] = {}
    for o in outcomes:
        if o.status != "OK" and not o.lost:
            failed[o.status] = failed.get(o.status, 0) + 1
    ttfts = sorted(o.ttft for o in outcomes if o.ttft is not None)

    def pct(q):
        return ttfts[min(len(ttfts) - 1, int(q * len(ttfts)))] if ttfts else float("nan")

    details = sorted({f"{o.status}: {o.detail}" for o in outcomes if o.detail})
    return {"phase": name, "sent": len(outcomes), "completed": sum(o.status == "OK" for o in outcomes),
            "failed": failed, "lost": sum(o.lost for o in outcomes), "ttft_p50_s": pct(0.5), "ttft_p99_s": pct(0.99),
            "details": details[:3]}


def record(phases: list[dict], name: str, outcomes: list[Outcome]) -> None:
    phases.append(summary(name, outcomes))
    p = phases[-1]
    progress(f"{name}: {p['completed']} of {p['sent']} completed, failed {p['failed']}, lost {p['lost']}")


async def slots_free(cluster: Cluster, lms: list[int], within: float = 15.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        stats = [await asyncio.to_thread(cluster.stats, i) for i in lms]
        if all(s.active_slots == 0 and s.queued == 0 for s in stats):
            return True
        await asyncio.sleep(0.2)
    return False


async def run(args) -> dict:
    cluster = Cluster(args.model, args.num_slots, args.max_queue, args.startup_timeout, args.vision_in_lm)
    checks: dict[str, bool] = {}
    notes: dict[str, object] = {}
    phases = []
    rng = random.Random(args.seed)
    try:
        progress("starting the stack")
        cluster.up()
        target = f"127.0.0.1:{cluster.gateway_port}"
        tpls = templates(args.images, args.max_new_tokens)
        images = [i for i, t in enumerate(tpls) if t.has_image]
        texts = [i for i, t in enumerate(tpls) if not t.has_image]

        # 1. solo answers, then a warm-up wave, then the memory baseline.
        progress("solo answers")
        solo = []
        for i in range(len(tpls)):
            (o,) = await wave(target, tpls, [i])
            if o.status != "OK":
                raise RuntimeError(f"template {i} failed alone: {o.status}")
            solo.append(o.tokens)
        progress("warm-up wave")
        cluster.flush_redis()  # the warm-up embeds too, so the vision worker's batch shapes are compiled
        await wave(target, tpls, [rng.randrange(len(tpls)) for _ in range(args.requests // 2)],
                   cancel_share=0.2, deadline_share=0.1, seed=1)
        await slots_free(cluster, [0, 1])
        workers = [w for w in cluster.procs if w != "redis"]
        baseline = {w: cluster.rss_mb(w) for w in workers}

        # 2. load: misses and hits, client cancels and short deadlines.
        progress("load")
        cluster.flush_redis()
        picks = [rng.randrange(len(tpls)) for _ in range(args.requests)]
        outcomes = await wave(target, tpls, picks, cancel_share=0.15, deadline_share=0.15, seed=2,
                              hang_seconds=args.hang_seconds)
        record(phases, "load", outcomes)
        bad = mismatches(outcomes, solo)
        checks["load: every answer is its own (as alone)"] = not bad
        notes["mismatches"] = bad[:5]
        checks["load: every slot free afterwards"] = await slots_free(cluster, [0, 1])
        await asyncio.sleep(1.0)
        after = {w: cluster.rss_mb(w) for w in workers}
        notes["rss_mb"] = {w: {"baseline": round(baseline[w], 1), "after": round(after[w], 1)} for w in workers}
        checks["load: memory back at its baseline (+10% or 32 MB)"] = all(
            after[w] <= baseline[w] + max(32.0, 0.1 * baseline[w]) for w in workers)
        checks["load: finished cleanly (statuses OK, CANCELLED, DEADLINE_EXCEEDED)"] = all(
            o.status in ("OK", "CANCELLED", "DEADLINE_EXCEEDED") for o in outcomes)

        # 3. Redis killed during a wave, then restarted; a repeated image hits the cache again.
        progress("redis fault")
        async def kill_redis(_done):
            await asyncio.sleep(0.3)
            cluster.kill("redis")

        cluster.flush_redis()
        picks = [rng.choice(images + texts) for _ in range(args.fault_requests)]
        outcomes = await wave(target, tpls, picks, during=kill_redis, seed=3, hang_seconds=args.hang_seconds)
        down = await wave(target, tpls, [rng.choice(images) for _ in range(8)], seed=4)
        outcomes += down
        record(phases, "redis killed", outcomes)
        checks["redis down: image requests still answered (inline)"] = all(o.status == "OK" for o in down)
        checks["redis down: answers unchanged"] = not mismatches(outcomes, solo)
        cluster.start_redis()
        await asyncio.sleep(0.5)
        first, again = await wave(target, tpls, [images[0]]), await wave(target, tpls, [images[0]])
        record(phases, "redis restarted", first + again)
        checks["redis back: a repeated image is a cache hit"] = again[0].status == "OK" and again[0].cache_hits == 1

        # 4. the vision worker killed during a wave, then restarted (none to kill when the LM workers embed).
        killed_at = {}
        if not cluster.vision_in_lm:
            progress("vision fault")

            async def kill_vision(_done):
                await asyncio.sleep(0.3)
                killed_at["t"] = time.monotonic()
                cluster.kill("vision-worker")

            cluster.flush_redis()
            picks = [rng.choice(images + texts) for _ in range(args.fault_requests)]
            outcomes = await wave(target, tpls, picks, during=kill_vision, seed=5, hang_seconds=args.hang_seconds)
            after_kill = await wave(target, tpls, [images[1]] * 4 + texts[:4], seed=6)
            outcomes += after_kill
            record(phases, "vision killed", outcomes)
            image_fail = [o for o in after_kill if tpls[o.template].has_image]
            checks["vision down: image requests UNAVAILABLE within 5 s"] = all(
                o.status == "UNAVAILABLE" and o.seconds < 5 for o in image_fail)
            checks["vision down: text requests unaffected"] = all(
                o.status == "OK" for o in outcomes if not tpls[o.template].has_image)
            checks["vision down: every request ended OK or UNAVAILABLE"] = all(
                o.status in ("OK", "UNAVAILABLE") for o in outcomes)
            checks["vision down: answers unchanged"] = not mismatches(outcomes, solo)
            cluster.start_vision()
            cluster.wait("vision-worker", cluster.vision_port, VISION_SERVICE)
            restarted = time.monotonic()
            while True:
                (o,) = await wave(target, tpls, [images[1]])
                if o.status == "OK" or time.monotonic() - restarted > 30:
                    break
                await asyncio.sleep(0.2)
            notes["vision back: seconds until the gateway used it again"] = round(time.monotonic() - restarted, 2)
            checks["vision back: image requests succeed again"] = o.status == "OK" and o.tokens == solo[images[1]]

        # 5. one LM worker killed mid-stream; the other keeps serving. The kill waits until that worker is
        # decoding; a wave that ends before it was seen busy (short answers on a fast CPU) is sent again.
        progress("lm fault")

        async def kill_lm(done: asyncio.Event):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{cluster.lm_ports[1]}") as channel:
                stub = lm_worker_pb2_grpc.LMWorkerStub(channel)
                while not done.is_set():
                    active = (await stub.GetStats(lm_worker_pb2.StatsRequest(), timeout=5)).active_slots
                    if active:
                        notes["lm killed: requests decoding on it at the kill"] = active
                        killed_at["lm"] = time.monotonic()
                        cluster.kill("lm-worker-1")
                        return
                    await asyncio.sleep(0.002)

        outcomes, waves = [], 0
        while "lm" not in killed_at and waves < 5:
            waves += 1
            picks = [rng.choice(texts + images) for _ in range(args.fault_requests)]
            outcomes += await wave(target, tpls, picks, during=kill_lm, seed=6 + waves,
                                   hang_seconds=args.hang_seconds)
        notes["lm killed: waves sent until the kill found requests decoding"] = waves
        record(phases, "lm worker killed", outcomes)
        failed = [o for o in outcomes if o.status != "OK"]
        checks["lm killed: the kill hit requests in flight"] = "lm" in killed_at
        checks["lm killed: its streams end UNAVAILABLE (or ABORTED) within 5 s"] = all(
            o.status in ("UNAVAILABLE", "ABORTED") and o.ended - killed_at.get("lm", 0.0) < 5 for o in failed)
        checks["lm killed: the rest finish with their own answers"] = not mismatches(outcomes, solo)
        notes["lm killed: streams failed (the others were retried on the other worker or ran there)"] = len(failed)
        afterwards = await wave(target, tpls, [rng.choice(texts + images) for _ in range(16)], seed=8)
        record(phases, "after lm killed", afterwards)
        checks["lm killed: every new request is served by the other worker"] = all(
            o.status == "OK" for o in afterwards) and not mismatches(afterwards, solo)
    finally:
        cluster.stack.stop()
    checks["nothing lost"] = all(p["lost"] == 0 for p in phases)
    return {"phases": phases, "checks": checks, "notes": notes,
            "config": {k: v for k, v in vars(args).items() if k != "json"}}


def table(result: dict) -> str:
    lines = ["| phase | sent | completed | failed, by status | lost | TTFT p50 | TTFT p99 |",
             "|---|---:|---:|---|---:|---:|---:|"]
    for p in result["phases"]:
        failed = ", ".join(f"{k} {v}" for k, v in sorted(p["failed"].items())) or "–"
        lines.append(f"| {p['phase']} | {p['sent']} | {p['completed']} | {failed} | {p['lost']} | "
                     f"{p['ttft_p50_s'] * 1000:.0f} ms | {p['ttft_p99_s'] * 1000:.0f} ms |")
    lines.append("")
    lines += [f"- [{'x' if ok else ' '}] {name}" for name, ok in result["checks"].items()]
    lines += [f"- {k}: {v}" for k, v in result["notes"].items() if v != []]
    lines += [f"- {p['phase']}: {d}" for p in result["phases"] for d in p["details"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=MODEL_DIR)
    p.add_argument("--requests", type=int, default=200, help="concurrent streams in the load phase")
    p.add_argument("--fault-requests", type=int, default=48, help="concurrent streams during each fault")
    p.add_argument("--images", type=int, default=16, help="distinct images among the templates")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--num-slots", type=int, default=8, help="decode slots per LM worker")
    p.add_argument("--max-queue", type=int, default=256, help="admission queue per LM worker")
    p.add_argument("--hang-seconds", type=float, default=120.0, help="a stream silent for longer is lost")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vision-in-lm", action="store_true", help="no vision worker: the LM workers embed images "
                   "(--embed-images); the vision worker's fault is skipped")
    p.add_argument("--json", help="also write the figures and checks here")
    args = p.parse_args(argv)
    # SIGTERM (a test's timeout) as Ctrl-C: the run's tasks are cancelled and its finally stops the stack
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    result = asyncio.run(run(args))
    print(table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if all(result["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
