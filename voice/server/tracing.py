"""Optional OpenTelemetry traces: one span per answered turn, one child span
per stage, so a slow turn shows where its milliseconds went.

Built from the times a turn already records (:class:`voice.call.turn.TurnTimes`)
when its ``turn.metrics`` event goes out, not by wrapping the pipeline in
spans: the hot path stays free of tracing calls, and a turn that was
aborted (the caller resumed speaking) leaves no trace.

Off unless asked for (``--otel-endpoint`` or the standard
``OTEL_EXPORTER_OTLP_ENDPOINT``). Needs the ``otel`` extra
(``pip install -e '.[otel]'``): opentelemetry-sdk and the OTLP/HTTP exporter.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger(__name__)

# (span name, start field, end field) of TurnTimes; a stage whose times are
# missing (e.g. no LLM token before an error) is left out.
STAGE_SPANS = (
    ("endpoint", "speech_end", "endpoint"),
    ("asr_final", "asr_start", "asr_final"),
    ("llm_first_token", "asr_final", "llm_first_token"),
    ("first_sentence", "llm_first_token", "first_sentence"),
    ("rest_of_reply", "first_sentence", "done"),
)
# turn.metrics fields copied onto the turn span as attributes.
ATTRIBUTES = (
    "ttfs_ms",
    "endpoint_ms",
    "asr_decode_ms",
    "llm_ttft_ms",
    "preemptive",
    "wasted_generations",
    "speculative_acceptance",
    "completion_tokens",
    "cached_tokens",
)


class TracingUnavailable(RuntimeError):
    """Tracing was asked for but the OpenTelemetry SDK is not installed."""


class TurnTracer:
    """Turns -> spans on one TracerProvider (the server's, or a test's)."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("firstline")

    @classmethod
    def to_otlp(cls, endpoint: str | None, service_name: str = "firstline") -> TurnTracer:
        """Batching OTLP/HTTP export to ``endpoint`` (None: the OTEL_* env vars)."""
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError as exc:
            raise TracingUnavailable(
                f"OpenTelemetry tracing needs the otel extra: pip install -e '.[otel]' ({exc})"
            ) from None
        provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        exporter = OTLPSpanExporter(endpoint=endpoint) if endpoint else OTLPSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
        log.info("OpenTelemetry traces to %s", endpoint or "the OTEL_EXPORTER_OTLP_* endpoint")
        return cls(provider)

    def record_turn(self, call_id: str, turn: int, times: Any, metrics: dict[str, Any], error: str | None) -> None:
        """One finished turn. ``times`` holds monotonic seconds; spans need
        wall-clock nanoseconds, so each is shifted by the clocks' offset now."""
        start_s = times.speech_end if times.speech_end is not None else times.endpoint
        end_s = times.done
        if start_s is None or end_s is None:
            return
        offset_ns = time.time_ns() - time.monotonic_ns()

        def ns(t: float) -> int:
            return int(t * 1e9) + offset_ns

        attributes: dict[str, Any] = {"firstline.call_id": call_id, "firstline.turn": turn}
        for field in ATTRIBUTES:
            value = metrics.get(field)
            if isinstance(value, bool | int | float | str):
                attributes[f"firstline.{field}"] = value
        span = self.tracer.start_span("turn", start_time=ns(start_s), attributes=attributes)
        if error is not None:
            from opentelemetry.trace import Status, StatusCode

            span.set_status(Status(StatusCode.ERROR, error))
        from opentelemetry import trace

        context = trace.set_span_in_context(span)
        for name, first, last in STAGE_SPANS:
            t0, t1 = getattr(times, first), getattr(times, last)
            if t0 is None or t1 is None or t1 < t0:
                continue
            self.tracer.start_span(name, context=context, start_time=ns(t0)).end(end_time=ns(t1))
        span.end(end_time=ns(end_s))

    def shutdown(self) -> None:
        """Flush what is batched (server shutdown)."""
        self.provider.shutdown()
