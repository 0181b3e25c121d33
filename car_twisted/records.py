"""
The run records and the values inside them: run ids, timestamps, outcomes.

Everything that turns hostile wire values into the records a store keeps is
here, so validation has one home. Errors name the field and what to send.
"""

import json
import math
import os
import re
import threading
import time
import uuid

from car_twisted.errors import InvalidParams
from car_twisted.limits import MAX_ID, MAX_TEXT, MAX_TURN_BYTES, MAX_TURNS_PER_CALL

TRUNCATION_MARKER = "…[truncated]"

OUTCOME_STATUSES = (
    "success",
    "partial_success",
    "give_up",
    "timeout",
    "failure",
    "done",
)
_COUNT_METRICS = ("turns", "tool_calls", "retries", "actions_succeeded", "actions_failed")
_MAX_COUNT = 2**63 - 1


def now() -> str:
    """The current UTC time as RFC 3339 with milliseconds."""
    global _second
    seconds, millis = divmod(time.time_ns() // 1_000_000, 1000)
    if seconds != _second[0]:
        # Formatted once a second: every record of a run costs one.
        _second = (seconds, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)))
    return f"{_second[1]}.{_MILLIS[millis]}Z"


#: The last second L{now} formatted: (Unix seconds, its text).
_second = (None, "")
#: The three digits of every millisecond, made once: a format spec per
#: timestamp costs more than the rest of L{now}.
_MILLIS = tuple(f"{ms:03d}" for ms in range(1000))


class _RunIdMinter:
    """
    UUIDv7 run ids: 48 bits of Unix milliseconds, then a 12-bit counter that
    keeps ids minted in the same millisecond in order, then random bits.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._last_ms = 0
        self._counter = 0
        #: The text of the current millisecond and the version digit.
        self._prefix = ""
        # Random bits read 512 ids at a time, as hex text: one system call,
        # not one per id, and no number to format per id.
        self._random = ""
        self._used = 0

    def __call__(self) -> str:
        with self._lock:
            ms = time.time_ns() // 1_000_000
            if ms > self._last_ms:
                self._next_ms(ms)
            else:
                self._counter += 1
                if self._counter > 0xFFF:
                    self._next_ms(self._last_ms + 1)
            prefix, counter, used = self._prefix, self._counter, self._used
            if used == len(self._random):
                self._random, used = os.urandom(4096).hex(), 0
            self._used = used + 16
            r = self._random[used : used + 16]
        # The canonical 8-4-4-4-12 form, without building a uuid.UUID: the
        # counter's three digits by hex() over a 13th bit (a format spec
        # costs more), then 62 random bits under the variant bits 0b10.
        return f"{prefix}{hex(0x1000 | counter)[3:]}-{_VARIANT[r[0]]}{r[1:4]}-{r[4:]}"

    def _next_ms(self, ms: int) -> None:
        self._last_ms, self._counter = ms, 0
        h = f"{ms:012x}"
        self._prefix = f"{h[:8]}-{h[8:]}-7"


#: A hex digit -> the digit with its top two bits set to the variant 0b10.
_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}

new_run_id = _RunIdMinter()

#: The namespace of the run ids minted from idempotency keys.
_KEYED_RUNS = uuid.UUID("6f1c2a3e-5d0b-4c8e-9a47-2b7d1e0c9f35")


def keyed_run_id(agent_id: str, idempotency_key: str) -> str:
    """
    The run id of C{agent_id}'s start with C{idempotency_key}: the same for
    the same pair on every daemon and store, another for any other agent, so
    a key neither reveals nor reaches another agent's runs (a name-based
    UUIDv5; minted ids are UUIDv7, so the two never meet).
    """
    return str(uuid.uuid5(_KEYED_RUNS, json.dumps([agent_id, idempotency_key])))


def agent_slug(name: str) -> str:
    """``"Bulldozer Agent"`` -> ``"bulldozer-agent"``; may be empty."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def clip_text(text: str) -> str:
    """Cut text longer than L{MAX_TEXT} characters, marking the cut."""
    if len(text) <= MAX_TEXT:
        return text
    return text[: MAX_TEXT - len(TRUNCATION_MARKER)] + TRUNCATION_MARKER


def text_param(params: dict, name: str, required: bool = False) -> "str | None":
    """A string parameter; empty or absent gives None unless required."""
    value = params.get(name)
    if value is None or value == "":
        if required:
            raise InvalidParams(f"invalid params: {name} is required (a non-empty string)")
        return None
    if not isinstance(value, str):
        raise InvalidParams(f"invalid params: {name} must be a string")
    return value


def id_param(params: dict, name: str, required: bool = False) -> "str | None":
    """An id parameter: a non-empty string of at most L{MAX_ID} characters."""
    value = text_param(params, name, required)
    if value is not None and len(value) > MAX_ID:
        raise InvalidParams(f"invalid params: {name} is longer than {MAX_ID} characters")
    return value


def int_param(params: dict, name: str, default: int, low: int, high: int) -> int:
    """An integer parameter within C{[low, high]}."""
    value = params.get(name, default)
    if value is None:
        return default
    if type(value) is not int or not low <= value <= high:
        raise InvalidParams(
            f"invalid params: {name} must be an integer from {low} to {high}"
        )
    return value


def started_record(run_id, agent_id, client_id, intent, outcome_description) -> dict:
    return {
        "record": "started",
        "run_id": run_id,
        "agent_id": agent_id,
        "client_id": client_id,
        "intent": intent,
        "outcome_description": outcome_description,
        "started_at": now(),
    }


def ended_record(termination: str, **details) -> dict:
    """An ``ended`` record: C{outcome=}, C{reason=} or C{reason_digest=}."""
    return {"record": "ended", "termination": termination, "ended_at": now(), **details}


def parse_outcome(value) -> dict:
    """
    Read an outcome from the wire: tolerant of missing and unknown keys,
    strict about the type of every known one. Returns the complete object.
    """
    if not isinstance(value, dict):
        raise InvalidParams("invalid params: outcome must be an object with a status")
    status = value.get("status")
    if status not in OUTCOME_STATUSES:
        raise InvalidParams(
            "invalid params: outcome.status must be one of " + ", ".join(OUTCOME_STATUSES)
        )
    summary = value.get("summary", "")
    if not isinstance(summary, str):
        raise InvalidParams("invalid params: outcome.summary must be a string")
    evidence = value.get("evidence", [])
    if not isinstance(evidence, list) or not all(isinstance(e, str) for e in evidence):
        raise InvalidParams("invalid params: outcome.evidence must be a list of strings")
    timestamp = value.get("timestamp") or now()
    if not isinstance(timestamp, str) or len(timestamp) > 64:
        raise InvalidParams("invalid params: outcome.timestamp must be an RFC 3339 string")
    return {
        "status": status,
        "summary": clip_text(summary),
        "evidence": [clip_text(e) for e in evidence],
        "metrics": _parse_metrics(value.get("metrics", {})),
        "timestamp": timestamp,
    }


def _parse_metrics(value) -> dict:
    if not isinstance(value, dict):
        raise InvalidParams("invalid params: outcome.metrics must be an object")
    metrics = {
        name: _count(value.get(name, 0), f"outcome.metrics.{name}") for name in _COUNT_METRICS
    }
    metrics["duration_ms"] = _duration_ms(value.get("duration_ms", 0.0), "outcome.metrics.duration_ms")
    return metrics


def _count(value, field: str) -> int:
    """A non-negative 64-bit integer."""
    if type(value) is not int or not 0 <= value <= _MAX_COUNT:
        raise InvalidParams(f"invalid params: {field} must be a non-negative integer")
    return value


def _duration_ms(value, field: str) -> float:
    """A non-negative, finite number of milliseconds."""
    if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
        raise InvalidParams(f"invalid params: {field} must be a non-negative number")
    return float(value)


def _optional(value, kinds, field):
    if value is not None and not isinstance(value, kinds):
        raise InvalidParams(f"invalid params: {field} has the wrong type")
    return value


def _optional_text(value, field):
    value = _optional(value, str, field)
    return None if value is None else clip_text(value)


def parse_turns(value) -> list:
    """Read ``runs.record_turns``' ``turns`` into ``turn`` records (no index yet)."""
    if not isinstance(value, list):
        raise InvalidParams("invalid params: turns must be a list of turn objects")
    if len(value) > MAX_TURNS_PER_CALL:
        raise InvalidParams(f"invalid params: turns holds at most {MAX_TURNS_PER_CALL} turns per call")
    records = []
    for n, turn in enumerate(value):
        field = f"turns[{n}]"
        if not isinstance(turn, dict):
            raise InvalidParams(f"invalid params: {field} must be an object")
        verdict = _optional_text(turn.get("verifier_verdict"), f"{field}.verifier_verdict")
        records.append(
            {
                "record": "turn",
                "prompt": _optional_text(turn.get("prompt"), f"{field}.prompt"),
                "tool": _optional_text(turn.get("tool"), f"{field}.tool"),
                "parameters": turn.get("parameters"),
                "output": _optional_text(turn.get("output"), f"{field}.output"),
                "cli_outcome": _optional(turn.get("cli_outcome"), (dict, str), f"{field}.cli_outcome"),
                "verifier_verdict": verdict or "not_run",
                "policy_rejected": _optional(turn.get("policy_rejected"), (bool, str), f"{field}.policy_rejected"),
                "recorded_at": now(),
            }
        )
    return records


def parse_model_turn(params: dict) -> dict:
    """Read ``runs.record_model_turn``'s params into a ``model_turn`` record."""
    duration = params.get("duration_ms")
    turn_index = params.get("turn_index")
    return {
        "record": "model_turn",
        "turn_index": None if turn_index is None else _count(turn_index, "turn_index"),
        "assistant_text": _optional_text(params.get("assistant_text"), "assistant_text"),
        "requested_tool_calls": _optional(params.get("requested_tool_calls"), list, "requested_tool_calls") or [],
        "model_id": _optional_text(params.get("model_id"), "model_id"),
        "token_usage": _optional(params.get("token_usage"), dict, "token_usage"),
        "duration_ms": None if duration is None else _duration_ms(duration, "duration_ms"),
        "recorded_at": now(),
    }


def encoded_size(value) -> int:
    """The bytes of C{value} as compact UTF-8 JSON (at most a few more than
    the wire encoding)."""
    return len(json.dumps(value, ensure_ascii=False).encode())


def too_large(record: dict) -> bool:
    """Whether a record is over L{MAX_TURN_BYTES} once encoded."""
    return encoded_size(record) > MAX_TURN_BYTES
