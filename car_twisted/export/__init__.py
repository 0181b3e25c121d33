"""Runs out to other systems: OpenTelemetry spans, OTLP export, JSONL."""
