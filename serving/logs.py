"""Structured logs: one JSON object per line on stderr, with the service name in every record."""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter


def _not_a_stream_closed_elsewhere(record: logging.LogRecord) -> bool:
    """opentelemetry-instrumentation-grpc's aio server interceptor logs an error with a traceback
    whenever a client leaves a server stream early: the generator is closed in another context than
    the one its span was attached in. The span still ends; the message is noise, so it is dropped."""
    return not record.getMessage().startswith("Failed to detach context")


def configure_logging(service: str, level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s",
                                           static_fields={"service": service}))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("opentelemetry.context").addFilter(_not_a_stream_closed_elsewhere)
