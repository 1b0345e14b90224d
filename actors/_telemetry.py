"""Which observers a runtime gets: metrics and traces, each from an optional extra.

`Runtime.start(metrics=..., tracing=...)` is decided here, and only here are
`actors.metrics` (prometheus_client) and `actors.tracing` (OpenTelemetry) imported, and
only when asked for: without the extras installed everything else works as before.

Example:
    >>> observer, metrics = runtime_observer(metrics=True, tracing=True)
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from actors._observer import Observer, combine

if TYPE_CHECKING:
    from actors.metrics import RuntimeMetrics

METRICS_HINT = "pip install 'sleeptime-runtime[metrics]' (prometheus_client)"
TRACING_HINT = "pip install 'sleeptime-runtime[tracing]' (opentelemetry-sdk)"


def runtime_observer(metrics: Any, tracing: Any) -> tuple[Observer, RuntimeMetrics | None]:
    """The observer of a new runtime, and its metrics (None when off).

    `metrics`: False (off), True (a registry of the runtime's own) or a prometheus
    `CollectorRegistry` to register them in. `tracing`: True (the tracer provider the host
    configured, if any), False (off) or a `TracerProvider`.
    """
    observers: list[Observer] = []
    made: RuntimeMetrics | None = None
    if metrics is not False:
        try:
            from actors.metrics import RuntimeMetrics  # noqa: PLC0415  # an optional extra
        except ImportError as error:
            raise ImportError(f"metrics need prometheus_client: {METRICS_HINT}") from error
        made = RuntimeMetrics(None if metrics is True else metrics)
        observers.append(made)
    provider = tracer_provider(tracing)
    if provider is not None:
        try:
            from actors.tracing import RuntimeTracing  # noqa: PLC0415  # an optional extra
        except ImportError as error:
            raise ImportError(f"tracing needs OpenTelemetry: {TRACING_HINT}") from error
        observers.append(RuntimeTracing(provider))
    return combine(observers), made


def tracer_provider(tracing: Any) -> Any | None:
    """The tracer provider to trace with; None when tracing is off or nobody configured
    one. With `True`, that is the global provider, looked up only if the host imported
    OpenTelemetry already (it did, to set one): otherwise it is not even imported."""
    if tracing is False:
        return None
    if tracing is not True:
        return tracing
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return None
    provider = trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        return None  # the API's stand-ins: no SDK (or other implementation) was set
    return provider
