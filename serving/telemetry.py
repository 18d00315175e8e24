"""OpenTelemetry traces and metrics: every server and client call is a span, context crosses the services,
and each service records its own measurements (time to first token, cache hits, ...).

Exporters follow the standard variables: ``OTEL_TRACES_EXPORTER`` / ``OTEL_METRICS_EXPORTER`` name them
(``otlp``, ``console``, ``none``; comma-separated), and they default to ``otlp`` when an
``OTEL_EXPORTER_OTLP_*ENDPOINT`` is set and to nothing otherwise, so nothing leaves the process
unless asked. The OTLP exporter reads its own ``OTEL_EXPORTER_OTLP_*`` settings and
``OTEL_METRIC_EXPORT_INTERVAL`` sets how often metrics go out. ``GEMMA3_TRACE_FILE`` and
``GEMMA3_METRICS_FILE`` append spans and metrics as JSON lines to a file (the tests read them).

With no trace exporter the process records no spans and its gRPC calls go without tracing interceptors:
spans that nothing read took a demo request through the gateway from 15.6 to 20.3 ms (bench/RESULTS.md).
Likewise, with no metrics exporter the instruments are the API's no-ops.
"""

from __future__ import annotations

import logging
import os

from opentelemetry import metrics, trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

log = logging.getLogger(__name__)
_configured = False
_tracing = False


def exporter_names(signal: str) -> set[str]:
    """The exporters asked for ``signal`` ("traces" or "metrics") by the standard OTEL_* variables."""
    named = os.environ.get(f"OTEL_{signal.upper()}_EXPORTER")
    if named is None:
        endpoint = (os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                    or os.environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT"))
        return {"otlp"} if endpoint else set()
    names = {n.strip() for n in named.split(",") if n.strip()} - {"none"}
    unknown = names - {"otlp", "console"}
    if unknown:
        log.warning("ignoring unsupported OTEL_%s_EXPORTER values %s", signal.upper(), sorted(unknown))
    return names - unknown


def _otlp(signal: str):
    try:
        if signal == "traces":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            return OTLPSpanExporter()
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        return OTLPMetricExporter()
    except ImportError:
        log.warning("an OTLP %s exporter is asked for but opentelemetry-exporter-otlp-proto-grpc is missing", signal)
        return None


def _json_lines(path: str):
    return open(path, "a", buffering=1)  # open for the life of the process


def configure_telemetry(service: str) -> None:
    """Install this process's tracer and meter providers (once), where an exporter is asked for."""
    global _configured, _tracing
    if _configured:
        return
    resource = Resource.create({"service.name": service})

    processors = []
    names = exporter_names("traces")
    if "otlp" in names and (exporter := _otlp("traces")) is not None:
        processors.append(BatchSpanProcessor(exporter))
    if "console" in names:
        processors.append(BatchSpanProcessor(ConsoleSpanExporter()))
    if os.environ.get("GEMMA3_TRACE_FILE"):
        processors.append(SimpleSpanProcessor(ConsoleSpanExporter(
            out=_json_lines(os.environ["GEMMA3_TRACE_FILE"]), formatter=lambda s: s.to_json(indent=None) + "\n")))
    if processors:
        tracer_provider = TracerProvider(resource=resource)
        for processor in processors:
            tracer_provider.add_span_processor(processor)
        trace.set_tracer_provider(tracer_provider)
        _tracing = True

    readers = []
    names = exporter_names("metrics")
    if "otlp" in names and (exporter := _otlp("metrics")) is not None:
        readers.append(PeriodicExportingMetricReader(exporter))
    if "console" in names:
        readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter()))
    if os.environ.get("GEMMA3_METRICS_FILE"):
        readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter(
            out=_json_lines(os.environ["GEMMA3_METRICS_FILE"]), formatter=lambda m: m.to_json(indent=None) + "\n")))
    if readers:  # shuts down (one last export) at exit, like the tracer provider
        metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=readers))
    _configured = True


def server_interceptors() -> list:
    return [aio_server_interceptor()] if _tracing else []


def client_interceptors() -> list:
    return list(aio_client_interceptors()) if _tracing else []
