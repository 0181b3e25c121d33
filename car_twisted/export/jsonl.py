"""Runs as JSON Lines: one line per run, its id, agent and every record."""

import json


def run_line(records: list) -> str:
    """One run as one line of ASCII JSON (no text inside can break the line)."""
    started = records[0]
    run = {"run_id": started["run_id"], "agent_id": started["agent_id"], "records": records}
    return json.dumps(run, ensure_ascii=True, separators=(",", ":")) + "\n"


class JsonlSink:
    """Writes each run as a line of C{stream} (a text file)."""

    def __init__(self, stream):
        self._stream = stream
        self.failed = 0

    def write(self, records: list) -> None:
        self._stream.write(run_line(records))

    def close(self) -> None:
        self._stream.flush()
