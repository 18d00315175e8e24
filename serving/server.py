"""Server bootstrap shared by the three services.

Health answers NOT_SERVING from the moment the port opens until ``warm_up`` has loaded and compiled
the model, then SERVING; on SIGTERM or SIGINT it flips back to NOT_SERVING (so load balancers stop
sending), in-flight calls get ``drain_seconds`` to finish, and the server stops.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Coroutine

import grpc
from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from serving.telemetry import configure_telemetry, server_interceptors

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
# Servers close each connection after a few minutes (streams in flight get up to 10 more to finish):
# clients then resolve dns:/// targets again, so a gateway finds worker replicas added since it started.
SERVER_OPTIONS = [*CHANNEL_OPTIONS, ("grpc.max_connection_age_ms", 5 * 60_000),
                  ("grpc.max_connection_age_grace_ms", 10 * 60_000)]


def run(main: Coroutine) -> None:
    """Run a service's main coroutine on uvloop where it is installed (``GEMMA3_EVENT_LOOP=asyncio``: the
    standard loop). gRPC's asyncio stack and the Redis client spend most of a small request in the event
    loop's own code: uvloop took 1.3-2.8 ms off each demo-model request through the gateway (bench/RESULTS.md)."""
    choice = os.environ.get("GEMMA3_EVENT_LOOP", "uvloop")
    if choice not in ("uvloop", "asyncio"):
        raise SystemExit(f"GEMMA3_EVENT_LOOP must be uvloop or asyncio, got {choice!r}")
    if choice == "uvloop":
        try:
            import uvloop
        except ImportError:  # not built for this platform (Windows): the standard loop
            choice = "asyncio"
    log.info("event loop: %s", choice, extra={"loop": choice})
    if choice == "uvloop":
        uvloop.run(main)
    else:
        asyncio.run(main)


class _Malformed:
    def __init__(self, error: Exception):
        self.error = error


class RejectMalformed(grpc.aio.ServerInterceptor):
    """Bytes that do not parse as the method's request message (broken protobuf, invalid UTF-8 in a
    string field) get INVALID_ARGUMENT with the parser's reason; grpc alone would answer UNKNOWN."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer

        def deserializer(data: bytes):
            try:
                return parse(data)
            except Exception as e:  # noqa: BLE001 - whatever the parser raises, the caller sent it
                return _Malformed(e)

        async def refuse(request, context):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the request is not a valid {details.method.rsplit('/', 1)[-1]} message: "
                                f"{request.error}")

        if handler.unary_unary is not None:
            behaviour = handler.unary_unary

            async def unary_unary(request, context):
                if isinstance(request, _Malformed):
                    await refuse(request, context)
                return await behaviour(request, context)

            return handler._replace(request_deserializer=deserializer, unary_unary=unary_unary)
        behaviour = handler.unary_stream
        if inspect.isasyncgenfunction(behaviour):
            async def unary_stream(request, context):
                if isinstance(request, _Malformed):
                    await refuse(request, context)
                async for response in behaviour(request, context):
                    yield response
        else:  # a coroutine that writes through context.write (health's Watch)
            async def unary_stream(request, context):
                if isinstance(request, _Malformed):
                    await refuse(request, context)
                return await behaviour(request, context)

        return handler._replace(request_deserializer=deserializer, unary_stream=unary_stream)


class Server:
    """A grpc.aio server with health, reflection and tracing; ``serve`` runs until a signal."""

    def __init__(self, service_names: list[str], host: str, port: int, drain_seconds: float = 10.0,
                 credentials: grpc.ServerCredentials | None = None, interceptors: list | tuple = (),
                 max_request_bytes: int = MAX_MESSAGE_BYTES):
        """``credentials``: TLS (None: plaintext); ``interceptors`` run inside tracing, so refused calls
        are traced too."""
        configure_telemetry(service_names[0])
        self.service_names = service_names
        self.drain_seconds = drain_seconds
        self.tls = credentials is not None
        options = [(k, v) for k, v in SERVER_OPTIONS if k != "grpc.max_receive_message_length"]
        options.append(("grpc.max_receive_message_length", max_request_bytes))
        self.grpc = grpc.aio.server(interceptors=[*server_interceptors(), RejectMalformed(), *interceptors],
                                    options=options)
        self.health = health_async.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self.grpc)
        address = f"{host}:{port}"
        self.port = (self.grpc.add_secure_port(address, credentials) if credentials is not None
                     else self.grpc.add_insecure_port(address))
        if self.port == 0:
            raise OSError(f"cannot listen on {host}:{port}")
        self.stopping = asyncio.Event()

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def serve(self, warm_up: Callable[[], Awaitable[None]] | None = None,
                    on_stop: Callable[[], Awaitable[None]] | None = None) -> None:
        await self.set_serving(False)
        await self.grpc.start()
        log.info("listening", extra={"port": self.port, "services": self.service_names, "tls": self.tls})
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self.stopping.set)
            except (NotImplementedError, RuntimeError):  # not the main thread (tests)
                pass
        if warm_up is not None:
            await warm_up()
        if not self.stopping.is_set():
            await self.set_serving(True)
            log.info("serving")
        await self.stopping.wait()
        log.info("draining", extra={"seconds": self.drain_seconds})
        await self.health.enter_graceful_shutdown()
        await self.grpc.stop(self.drain_seconds)
        if on_stop is not None:
            await on_stop()
        log.info("stopped")
