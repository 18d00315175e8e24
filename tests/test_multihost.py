"""A multi-host LM worker on loopback: 2 JAX processes of 4 CPU devices each (gloo collectives) hold
one model on one 8-device mesh (fsdp across the processes, tensor within each), each process reading
only its half of the weights. Through a gateway, its greedy answers equal the library's own generate()
on one process; a follower killed mid-stream ends the streams with UNAVAILABLE within seconds and the
leader's health with NOT_SERVING."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import jax.numpy as jnp
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gemma3serve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests import make_checkpoints as mk
from tests import services
from tests.services import chat, expected_answers

FOUR_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}


@contextlib.contextmanager
def running_group(checkpoint: str, log_dir, *extra: str):
    """A 2-process LM worker group and a gateway: (leader target, follower process, gateway target, log)."""
    coordinator = f"127.0.0.1:{services.free_port()}"
    common = ["--model", checkpoint, "--dtype", "float32", "--num-slots", "4", "--max-length", "256",
              "--fsdp", "2", "--tensor-parallel", "4", "--coordinator-address", coordinator, "--num-processes", "2",
              "--group-port", str(services.free_port()), "--redis-url", services.REDIS_URL, *extra]
    log = log_dir / "follower.log"
    follower_port = services.free_port()
    with open(log, "w") as out:
        follower = subprocess.Popen([sys.executable, "-m", "lm_worker", "--log-format", "json", "--process-id", "1",
                                     "--port", str(follower_port), *common],
                                    env={**os.environ, **FOUR_DEVICES, "PYTHONPATH": services.ROOT},
                                    cwd=services.ROOT, stdout=out, stderr=subprocess.STDOUT)
    follower.target = f"127.0.0.1:{follower_port}"
    try:
        with services.running("lm_worker", "gemma3serve.v1.LMWorker", "--process-id", "0", *common,
                              env=FOUR_DEVICES, expect_exit_code=None) as (_, leader), \
                services.running("gateway", "gemma3serve.v1.Gateway", "--lm-target", leader) as (_, gateway):
            yield leader, follower, gateway, log
    finally:
        if follower.poll() is None:
            follower.kill()
        follower.wait()


@pytest.fixture(scope="module")
def group(served_checkpoint, tmp_path_factory):
    # (prompts in chunks of 16 tokens: the group's processes run each chunk's call alike)
    with running_group(served_checkpoint, tmp_path_factory.mktemp("multihost"), "--prefill-chunk", "16") as running:
        yield running


def _complete(target, request):
    with grpc.insecure_channel(target) as channel:
        return gateway_pb2_grpc.GatewayStub(channel).GenerateComplete(request, timeout=120)



def test_two_processes_answer_exactly_as_one(group, reference):
    _, follower, gateway, log = group
    model, _ = reference
    features = np.asarray(model.get_image_features(jnp.asarray(mk.random_pixels(1, seed=21))))
    key = f"test:{uuid.uuid4()}"
    services.cache_put(key, features)
    requests = services.mixed_requests(8, key)
    with ThreadPoolExecutor(8) as pool:  # more requests than slots: continuous batching across the group
        answers = list(pool.map(lambda r: _complete(gateway, r), requests))
    lm_requests = [services.lm_request(r) for r in requests]
    expected = expected_answers(reference, lm_requests, [features if len(r.images) else None for r in lm_requests])
    assert [list(a.token_ids) for a in answers] == [want for _, want in expected]
    again = [_complete(gateway, requests[6]) for _ in range(2)]  # the second from the first's row, kept on both
    assert [list(a.token_ids) for a in again] == [expected[6][1]] * 2  # processes (its image by its features)
    assert again[1].usage.cached_prompt_tokens == again[1].usage.prompt_tokens - 1
    assert follower.poll() is None, log.read_text()
    assert _health(follower.target) == health_pb2.HealthCheckResponse.SERVING  # the follower's probes pass
    (read,) = [json.loads(line) for line in log.read_text().splitlines()
               if line.startswith("{") and json.loads(line)["message"] == "weights read"]
    assert 0.4 < read["bytes_read"] / read["tensor_bytes"] < 0.75, read  # its fsdp half (norms are whole)


def _health(target) -> int:
    with grpc.insecure_channel(target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="gemma3serve.v1.LMWorker"), timeout=5).status


def _kill_mid_stream_and_check(leader, gateway, stop_follower, within: float):
    """Streams in flight, then ``stop_follower``: each stream ends (UNAVAILABLE when cut) within
    ``within`` seconds, the leader turns NOT_SERVING, and new requests get UNAVAILABLE naming the group."""
    assert _health(leader) == health_pb2.HealthCheckResponse.SERVING
    request = gateway_pb2.GenerateRequest(chat=chat("Tell me a long story"), sampling=common_pb2.SamplingParams(
        max_new_tokens=200, temperature=1.0, seed=7))
    outcomes = []
    with grpc.insecure_channel(gateway) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        calls = [stub.Generate(request, timeout=120) for _ in range(4)]
        next(calls[0])  # the group is decoding
        stop_follower()
        stopped_at = time.monotonic()
        for call in calls:
            try:
                for _ in call:
                    pass
                outcomes.append(("OK", time.monotonic()))
            except grpc.RpcError as e:
                outcomes.append((e.code().name, time.monotonic(), e.details()))
    assert all(o[1] - stopped_at < within for o in outcomes), [(o[0], o[1] - stopped_at, o[2:]) for o in outcomes]
    assert any(o[0] == "UNAVAILABLE" for o in outcomes), outcomes
    assert {o[0] for o in outcomes} <= {"OK", "UNAVAILABLE"}, outcomes
    deadline = time.monotonic() + 10
    while _health(leader) != health_pb2.HealthCheckResponse.NOT_SERVING:
        assert time.monotonic() < deadline, "the leader still reports SERVING"
        time.sleep(0.2)
    with pytest.raises(grpc.RpcError) as e:
        _complete(gateway, gateway_pb2.GenerateRequest(chat=chat("Anyone there?")))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "group" in e.value.details()


def test_a_follower_killed_mid_stream_ends_the_streams_and_takes_the_leader_out(group):
    leader, follower, gateway, _ = group
    _kill_mid_stream_and_check(leader, gateway, follower.kill, within=15)


def test_a_follower_that_stops_answering_is_noticed_within_the_group_timeout(served_checkpoint, tmp_path):
    with running_group(served_checkpoint, tmp_path, "--group-timeout", "2") as (leader, follower, gateway, _):
        try:
            _kill_mid_stream_and_check(leader, gateway, lambda: follower.send_signal(signal.SIGSTOP), within=2 + 10)
        finally:
            follower.send_signal(signal.SIGCONT)
