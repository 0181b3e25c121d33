"""
A finished run's records as OpenTelemetry spans, following the GenAI
semantic conventions (docs/export.md has the mapping).

Pure: records in, L{ReadableSpan}s out, no network and no clock. Ids derive
from the run id, so exporting a run twice gives the same spans.
"""

import hashlib
import json
from datetime import datetime

from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

#: Outcome statuses that mean the agent did not do what it was asked.
FAILED_OUTCOMES = frozenset({"failure", "give_up", "timeout"})

SCOPE = InstrumentationScope("car_twisted.export")


def default_resource() -> Resource:
    """``service.name=car-twisted`` unless C{OTEL_SERVICE_NAME} / C{OTEL_RESOURCE_ATTRIBUTES} say otherwise."""
    return Resource.create({SERVICE_NAME: "car-twisted"})


def trace_id_of(run_id: str) -> int:
    """The run's trace id: the run id itself when it is a UUID (run ids are
    UUIDv7), else 128 bits of its SHA-256."""
    digits = run_id.replace("-", "")
    if len(digits) == 32 and all(c in "0123456789abcdef" for c in digits):
        value = int(digits, 16)
    else:
        value = int.from_bytes(_digest(run_id, "trace")[:16], "big")
    return value or 1


def _span_id(run_id: str, part: str) -> int:
    return int.from_bytes(_digest(run_id, part)[:8], "big") or 1


def _digest(run_id: str, part: str) -> bytes:
    return hashlib.sha256(f"{part}\0{run_id}".encode("utf-8", "surrogatepass")).digest()


def nanoseconds(stamp) -> "int | None":
    """An RFC 3339 timestamp as Unix nanoseconds; None if it is not one."""
    if not isinstance(stamp, str):
        return None
    try:
        moment = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        return None
    whole = int(moment.timestamp())
    return whole * 1_000_000_000 + moment.microsecond * 1000


def run_spans(records: list, content: bool = False, resource: "Resource | None" = None) -> list:
    """
    The spans of one ended run: ``invoke_agent {agent}``, parent of a
    ``chat {model}`` per model turn and an ``execute_tool {tool}`` per turn
    with a tool. C{content} adds prompt and output text (sensitive).

    @param records: the run's records, ``started`` first, ``ended`` last.
    """
    started, ended = records[0], records[-1]
    if started.get("record") != "started" or ended.get("record") != "ended":
        raise ValueError("a run exports once it has its started and ended records")
    resource = resource or default_resource()
    run_id, agent_id = started["run_id"], started["agent_id"]
    trace_id = trace_id_of(run_id)
    root = SpanContext(trace_id, _span_id(run_id, "run"), False, TraceFlags(TraceFlags.SAMPLED))
    run_start = nanoseconds(started.get("started_at")) or 0
    run_end = max(nanoseconds(ended.get("ended_at")) or run_start, run_start)

    children = []
    previous = run_start
    for record in records[1:-1]:
        at = min(max(nanoseconds(record.get("recorded_at")) or previous, run_start), run_end)
        child = _child_span(record, content)
        if child is not None:
            name, kind, attributes, duration = child
            start = previous if duration is None else max(at - duration, run_start)
            context = SpanContext(
                trace_id,
                _span_id(run_id, f"record {record.get('index')}"),
                False,
                TraceFlags(TraceFlags.SAMPLED),
            )
            children.append(
                ReadableSpan(
                    name=name,
                    context=context,
                    parent=root,
                    resource=resource,
                    attributes=attributes,
                    kind=kind,
                    start_time=min(start, at),
                    end_time=at,
                    instrumentation_scope=SCOPE,
                )
            )
        previous = at

    attributes, status = _outcome(ended)
    attributes.update(
        {
            "gen_ai.operation.name": "invoke_agent",
            "gen_ai.agent.id": agent_id,
            "gen_ai.agent.name": agent_id,
            "gen_ai.conversation.id": run_id,
        }
    )
    outcome = ended.get("outcome") if isinstance(ended.get("outcome"), dict) else {}
    if content:
        attributes["gen_ai.input.messages"] = _messages("user", started.get("intent"))
        if outcome.get("summary"):
            attributes["gen_ai.output.messages"] = _messages("assistant", outcome["summary"])
    span = ReadableSpan(
        name=f"invoke_agent {agent_id}",
        context=root,
        parent=None,
        resource=resource,
        attributes=_present(attributes),
        kind=SpanKind.INTERNAL,
        status=status,
        start_time=run_start,
        end_time=run_end,
        instrumentation_scope=SCOPE,
    )
    return [span, *children]


def _outcome(ended: dict):
    """The root span's status attributes and its L{Status}, from the ``ended`` record."""
    termination = ended.get("termination")
    run_status = {"outcome": "completed", "incomplete": "incomplete", "cancelled": "cancelled"}
    attributes = {"car.run.status": run_status.get(termination, "unknown")}
    if termination == "incomplete":
        attributes["error.type"] = "incomplete"
        return attributes, Status(StatusCode.ERROR, f"incomplete: {ended.get('reason')}")
    if termination != "outcome" or not isinstance(ended.get("outcome"), dict):
        return attributes, Status(StatusCode.UNSET)
    outcome_status = ended["outcome"].get("status")
    attributes["car.outcome.status"] = outcome_status
    if outcome_status in FAILED_OUTCOMES:
        attributes["error.type"] = outcome_status
        return attributes, Status(StatusCode.ERROR, f"outcome {outcome_status}")
    return attributes, Status(StatusCode.OK)


def _child_span(record: dict, content: bool):
    """C{(name, kind, attributes, duration in ns or None)} of a turn record,
    or None if it makes no span. A span without a duration starts at the
    previous record's time."""
    kind = record.get("record")
    if kind == "model_turn":
        model = record.get("model_id")
        usage = record.get("token_usage") if isinstance(record.get("token_usage"), dict) else {}
        attributes = {
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": model,
            "gen_ai.usage.input_tokens": _count(usage.get("prompt_tokens")),
            "gen_ai.usage.output_tokens": _count(usage.get("completion_tokens")),
            "car.turn.index": record.get("index"),
        }
        if content and record.get("assistant_text"):
            attributes["gen_ai.output.messages"] = _messages("assistant", record["assistant_text"])
        duration = record.get("duration_ms")
        duration = int(duration * 1_000_000) if isinstance(duration, (int, float)) else None
        return (f"chat {model}" if model else "chat"), SpanKind.CLIENT, _present(attributes), duration
    if kind == "turn" and record.get("tool"):
        tool = record["tool"]
        attributes = {
            "gen_ai.operation.name": "execute_tool",
            "gen_ai.tool.name": tool,
            "car.turn.index": record.get("index"),
            "car.turn.verifier_verdict": record.get("verifier_verdict"),
        }
        if content:
            if record.get("parameters") is not None:
                attributes["gen_ai.tool.call.arguments"] = json.dumps(record["parameters"])
            attributes["gen_ai.tool.call.result"] = record.get("output")
            attributes["car.turn.prompt"] = record.get("prompt")
        return f"execute_tool {tool}", SpanKind.INTERNAL, _present(attributes), None
    return None


def _count(value):
    return value if type(value) is int and value >= 0 else None


def _messages(role: str, text) -> "str | None":
    """Text as the conventions' JSON message list."""
    if not isinstance(text, str):
        return None
    return json.dumps([{"role": role, "parts": [{"type": "text", "content": text}]}])


def _present(attributes: dict) -> dict:
    return {k: v for k, v in attributes.items() if v is not None}
