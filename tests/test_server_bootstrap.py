"""The shared server bootstrap over a real loopback channel: health states, reflection, drain."""

import asyncio
import os
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from serving.server import Server, run
from tests.services import ROOT

NAME = "gemma3serve.v1.LMWorker"


async def _status(channel, service=NAME):
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
    return reply.status


def test_not_serving_until_warm_then_serving_then_drained():
    async def scenario():
        server = Server([NAME], "127.0.0.1", 0, drain_seconds=0.5)
        warm = asyncio.Event()
        seen = {}

        async def warm_up():
            await warm.wait()

        task = asyncio.create_task(server.serve(warm_up))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            await asyncio.sleep(0.2)
            seen["cold"] = await _status(channel)
            warm.set()
            await asyncio.sleep(0.2)
            seen["warm"] = await _status(channel)
            seen["overall"] = await _status(channel, "")
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            async for reply in stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
                    list_services="")])):
                seen["services"] = {s.name for s in reply.list_services_response.service}
                break
            server.stopping.set()
            await asyncio.wait_for(task, 5)
            try:
                seen["after"] = await asyncio.wait_for(_status(channel), 2)
            except grpc.aio.AioRpcError as e:
                seen["after"] = e.code()
        return seen

    seen = asyncio.run(scenario())
    assert seen["cold"] == health_pb2.HealthCheckResponse.NOT_SERVING
    assert seen["warm"] == seen["overall"] == health_pb2.HealthCheckResponse.SERVING
    assert {NAME, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= seen["services"]
    assert seen["after"] in (grpc.StatusCode.UNAVAILABLE, health_pb2.HealthCheckResponse.NOT_SERVING)


def test_tracing_only_where_an_exporter_is_asked_for(tmp_path):
    """Spans nobody reads cost every request: without a trace exporter a process installs no tracer
    provider and no tracing interceptors; with one (here the JSON-lines file) it has both."""
    probe = ("from opentelemetry import trace; from opentelemetry.sdk.trace import TracerProvider; "
             "from serving.telemetry import configure_telemetry, server_interceptors, client_interceptors; "
             "configure_telemetry('probe'); "
             "print(isinstance(trace.get_tracer_provider(), TracerProvider), len(server_interceptors()), "
             "len(client_interceptors()) > 0)")
    quiet = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "GEMMA3_TRACE", "GEMMA3_METRICS"))}
    off = subprocess.run([sys.executable, "-c", probe], env=quiet, cwd=ROOT, capture_output=True, text=True)
    on = subprocess.run([sys.executable, "-c", probe], env={**quiet, "GEMMA3_TRACE_FILE": str(tmp_path / "t.jsonl")},
                        cwd=ROOT, capture_output=True, text=True)
    assert off.stdout.split() == ["False", "0", "False"], off.stderr
    assert on.stdout.split() == ["True", "1", "True"], on.stderr


@pytest.mark.parametrize("choice, module", [(None, "uvloop"), ("uvloop", "uvloop"), ("asyncio", "asyncio")])
def test_services_run_on_uvloop_unless_told_otherwise(monkeypatch, choice, module):
    if choice is None:
        monkeypatch.delenv("GEMMA3_EVENT_LOOP", raising=False)
    else:
        monkeypatch.setenv("GEMMA3_EVENT_LOOP", choice)
    seen = []

    async def main():
        seen.append(type(asyncio.get_running_loop()).__module__)

    run(main())
    assert seen and seen[0].split(".")[0] == module


def test_an_unknown_event_loop_is_refused(monkeypatch):
    monkeypatch.setenv("GEMMA3_EVENT_LOOP", "trio")

    async def main():
        raise AssertionError("ran")

    coro = main()
    with pytest.raises(SystemExit, match="GEMMA3_EVENT_LOOP must be uvloop or asyncio"):
        run(coro)
    coro.close()
