"""Start the project's services as real processes on free loopback ports, and wait for their health."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time

import grpc

from gemma3serve.v1 import common_pb2
from launcher.__main__ import StackError, free_port, wait_healthy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


def cache_put(key: str, array, ttl_seconds: int = 120) -> None:
    """Store an embedding in the real Redis, as the vision worker would."""
    import asyncio

    from serving.embedding_cache import EmbeddingCache

    async def put():
        cache = EmbeddingCache(REDIS_URL, ttl_seconds=ttl_seconds)
        try:
            await cache.put(key, array)
        finally:
            await cache.close()

    asyncio.run(put())


def landed(get, ok=lambda value: value is not None, timeout: float = 10.0):
    """``get()`` once ``ok`` of it: a small (inline) embedding is written to Redis after the vision
    worker's reply, so a test reads it, or its overwrite, when it has landed."""
    deadline = time.monotonic() + timeout
    while not ok(value := get()):
        assert time.monotonic() < deadline, f"the Redis value did not land within {timeout} s: {value!r:.80}"
        time.sleep(0.02)
    return value


def trace_file(target: str) -> str:
    """Where the service at ``target`` appends its spans (JSON lines) in the tests."""
    return os.path.join(tempfile.gettempdir(), f"gemma3-trace-{target.rsplit(':', 1)[1]}.jsonl")


def metrics_file(target: str) -> str:
    """Where the service at ``target`` appends its metrics (JSON lines, one export per line)."""
    return os.path.join(tempfile.gettempdir(), f"gemma3-metrics-{target.rsplit(':', 1)[1]}.jsonl")


def metric_points(target: str) -> dict[str, list[dict]]:
    """The service's latest exported metrics: name -> data points (cumulative since it started)."""
    import json

    with open(metrics_file(target)) as f:
        lines = [line for line in f if line.strip()]
    out: dict[str, list[dict]] = {}
    if lines:
        for resource in json.loads(lines[-1])["resource_metrics"]:
            for scope in resource["scope_metrics"]:
                for metric in scope["metrics"]:
                    out.setdefault(metric["name"], []).extend(metric["data"]["data_points"])
    return out


def _output(proc: subprocess.Popen, log: str | None) -> str:
    if log:
        with open(log) as f:
            return f.read()
    return proc.stdout.read()


def wait_serving(target: str, service: str, proc: subprocess.Popen, timeout: float = 180,
                 credentials: grpc.ChannelCredentials | None = None, log: str | None = None) -> None:
    """The launcher's wait for SERVING, failing the test with the service's output."""
    try:
        wait_healthy(service, target, service, proc, timeout, credentials)
    except StackError as e:
        raise AssertionError(f"{e}:\n{_output(proc, log)}") from None


def log_file(module: str, target: str) -> str:
    """Where ``running`` writes the output of ``module`` serving at ``target`` unless told otherwise."""
    return os.path.join(tempfile.gettempdir(), f"gemma3-{module}-{target.rsplit(':', 1)[1]}.log")


@contextlib.contextmanager
def running(module: str, service: str, *args: str, credentials: grpc.ChannelCredentials | None = None,
            env: dict | None = None, log: str | None = None, expect_exit_code: int | None = 0):
    """Run ``python -m module --port P *args`` on one CPU device; yield (process, target); SIGTERM
    at the end, which must drain and exit 0. ``credentials``: how to reach a TLS server's health;
    ``env``: extra variables; ``expect_exit_code``: None when a test leaves it broken; ``log``: a file
    for its output (else a temporary one: a pipe nobody reads fills up and blocks the service at its
    next log line)."""
    port = free_port()
    target = f"127.0.0.1:{port}"
    for path in (trace_file(target), metrics_file(target)):
        if os.path.exists(path):
            os.remove(path)
    # LM workers compile their smallest prefill bucket only (the default, set here against a caller's
    # environment), unless a test asks for --warm-up all (the session's lm_worker does).
    env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": ROOT, "GEMMA3_TRACE_FILE": trace_file(target),
           "GEMMA3_METRICS_FILE": metrics_file(target), "OTEL_METRIC_EXPORT_INTERVAL": "1000",
           "GEMMA3_LM_WARM_UP": "smallest", **(env or {})}
    if log is None:
        log = log_file(module, target)
    out = open(log, "w")
    proc = subprocess.Popen([sys.executable, "-m", module, "--port", str(port), "--log-format", "text",
                             "--drain-seconds", "2", *args], env=env, cwd=ROOT, stdout=out,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_serving(target, service, proc, credentials=credentials, log=log)
        yield proc, target
        proc.terminate()
        if expect_exit_code is None:  # whatever it exits with, it must exit
            proc.wait(30)
        else:
            assert proc.wait(30) == expect_exit_code, _output(proc, log)
    finally:
        if proc.poll() is None:
            proc.kill()
        out.close()


def chat(text, images=0, system=None):
    """A chat: an optional system turn, then one user turn with ``images`` image parts and the text."""
    turns = []
    if system:
        turns.append(common_pb2.Turn(role="system", parts=[common_pb2.ContentPart(text=system)]))
    parts = [common_pb2.ContentPart(image=common_pb2.Image(embedding_key="x")) for _ in range(images)]
    turns.append(common_pb2.Turn(role="user", parts=parts + [common_pb2.ContentPart(text=text)]))
    return common_pb2.Chat(turns=turns)


def expected_answer(reference, request, features=None):
    """(prompt ids, greedy answer ids) of an LMGenerateRequest, computed in this process."""
    return expected_answers(reference, [request], [features])[0]


def expected_answers(reference, requests, features):
    """The library's own greedy generate() over LMGenerateRequests, as one left-padded batch (one
    compilation): [(prompt ids, answer ids)], each answer cut at its request's max_new_tokens."""
    import numpy as np

    model, prompts = reference
    built = [prompts.build(r, [0] * len(r.images)) for r in requests]
    width = max(len(ids) for ids, _ in built)
    ids = np.zeros((len(built), width), np.int64)
    mask, types = np.zeros_like(ids), np.zeros_like(ids)
    for row, (prompt, token_types) in enumerate(built):
        ids[row, width - len(prompt):], mask[row, width - len(prompt):] = prompt, 1
        types[row, width - len(prompt):] = token_types
    extra = {}
    used = [f for f in features if f is not None]
    if used:
        extra = {"image_features": np.concatenate(used), "token_type_ids": types}
    longest = max(r.sampling.max_new_tokens for r in requests)
    out = model.generate(ids, mask, max_new_tokens=longest, eos_token_id=prompts.stop_token_ids, **extra)
    answers = []
    for row, (request, (prompt, _)) in enumerate(zip(requests, built)):
        n = min(int(out.num_new_tokens[row]), request.sampling.max_new_tokens)
        answers.append((prompt, out.new_tokens[row, :n].tolist()))
    return answers


def mixed_requests(n: int, embedding_key: str):
    """``n`` gateway chats of growing length, every third with one image (by ``embedding_key``), each
    asking 4 to 8 new tokens: a batch whose requests join and leave at different steps."""
    from gemma3serve.v1 import gateway_pb2

    words = "what colour shape where circle square triangle left right top bottom red blue green".split()
    requests = []
    for i in range(n):
        conversation = chat(" ".join(words[: 2 + i % 11]) + "?", images=i % 3 == 0)
        if i % 3 == 0:
            conversation.turns[0].parts[0].image.embedding_key = embedding_key
        requests.append(gateway_pb2.GenerateRequest(chat=conversation, sampling=common_pb2.SamplingParams(
            max_new_tokens=4 + i % 5)))
    return requests


def lm_request(request):
    """What the gateway forwards to the LM worker for a gateway request, for computing its expected answer."""
    from gemma3serve.v1 import lm_worker_pb2

    n = sum(p.WhichOneof("part") == "image" for t in request.chat.turns for p in t.parts)
    return lm_worker_pb2.LMGenerateRequest(chat=request.chat, sampling=request.sampling,
                                           images=[lm_worker_pb2.ImageInput()] * n)
