"""
An agent's index, and loading an agent's directory at start: the index
read and checked against the run files, torn lines cut, and a missing,
damaged or stale index rebuilt from the run files.
Plain blocking file work: the store runs it in its own threads.
"""

import json
import os
from dataclasses import dataclass, field

from car_twisted import disk
from car_twisted.interfaces import RUN_STATUSES
from car_twisted.store.naming import INDEX, RUN_SUFFIX, decode_name, encode_name
from car_twisted.store.runfiles import (
    RunFile,
    RunState,
    cut_torn_line,
    encode_line,
    read_run_file,
    state_from_file,
)


class StaleIndex(Exception):
    """An index that cannot be trusted: it must be rebuilt from the run files."""


def read_index(agent_dir: str) -> "tuple[str, list[RunState]]":
    """
    Read an agent's index: its agent id and its runs in start order.

    @raise StaleIndex: the index is missing, torn or damaged.
    """
    try:
        with disk.open_regular(os.path.join(agent_dir, INDEX)) as f:
            data = f.read()
    except FileNotFoundError:
        raise StaleIndex("missing")
    except disk.NotRegularFile:
        raise StaleIndex("not a regular file")
    if not data.endswith(b"\n"):
        raise StaleIndex("torn")
    runs = {}
    try:
        lines = [json.loads(line) for line in data.split(b"\n")[:-1]]
        agent_id = lines[0]["agent_id"]
        if not isinstance(agent_id, str):
            raise TypeError("agent_id")
        for entry in lines[1:]:
            if "start" in entry:
                run = RunState(
                    run_id=entry["start"],
                    agent_id=agent_id,
                    path=os.path.join(agent_dir, encode_name(entry["start"]) + RUN_SUFFIX),
                    intent=entry["intent"],
                    started_at=entry["started_at"],
                )
                if run.run_id in runs or not isinstance(run.intent, str):
                    raise ValueError("duplicate run")
                runs[run.run_id] = run
            elif "drop" in entry:
                del runs[entry["drop"]]
            else:
                run = runs[entry["end"]]
                run.ended_at = entry["ended_at"]
                run.status = entry["status"]
                run.outcome_status = entry["outcome_status"]
                run.turn_count = entry["turn_count"]
                if run.status not in RUN_STATUSES or type(run.turn_count) is not int:
                    raise ValueError("bad end entry")
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise StaleIndex(f"damaged ({e.__class__.__name__})")
    return agent_id, list(runs.values())


def write_index(agent_dir: str, agent_id: str, runs: list, sync: bool) -> None:
    """Replace an agent's index atomically with one listing C{runs}."""
    temporary = os.path.join(agent_dir, INDEX + ".new")
    fd = disk.create_file(temporary, exclusive=False)
    try:
        lines = [encode_line({"agent_id": agent_id})]
        for run in runs:
            lines.append(run.start_entry())
            if run.status != "in_progress":
                lines.append(run.end_entry())
        disk.write_all(fd, b"".join(lines))
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, os.path.join(agent_dir, INDEX))
    if sync:
        disk.sync_directory(agent_dir)


def open_index(agent_dir: str) -> int:
    """
    Open an agent's index to append entries. They are not synced: the index
    is rebuilt from the (synced) run files whenever it falls behind them.
    """
    return os.open(os.path.join(agent_dir, INDEX), os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)


def append_to_index(agent_dir: str, lines: bytes) -> None:
    """Append entries to an agent's index (see L{open_index})."""
    fd = open_index(agent_dir)
    try:
        disk.write_all(fd, lines)
    finally:
        os.close(fd)


@dataclass
class Findings:
    """What loading found wrong, for the store to log on the reactor thread."""

    notes: list = field(default_factory=list)
    #: Ids of runs with damaged lines (their readable records are served).
    corrupt: set = field(default_factory=set)

    def check(self, path: str, run_file: RunFile, sync: bool) -> None:
        """Cut a torn last line off a run file and note damaged lines."""
        if run_file.torn:
            self.notes.append(f"{path}: cut off a torn last line ({run_file.torn} bytes)")
            cut_torn_line(path, run_file, sync)
        if run_file.damaged:
            self.notes.append(f"{path}: damaged line(s) {run_file.damaged}; run marked corrupt")


def load_agent(agent_dir: str, sync: bool, findings: Findings):
    """
    Load one agent directory: C{(agent_id, runs in start order)}, or None if
    it holds nothing to serve. Runs the index holds open are checked against
    their files; a missing, damaged or stale index is rebuilt from the files.
    """
    dir_name = os.path.basename(agent_dir)
    names = {n for n in os.listdir(agent_dir) if n.endswith(RUN_SUFFIX) and not n.startswith(".")}
    try:
        agent_id, indexed = read_index(agent_dir)
        if encode_name(agent_id) != dir_name:
            raise StaleIndex("names another agent")
        if {os.path.basename(run.path) for run in indexed} != names:
            raise StaleIndex("out of step with the run files")
    except StaleIndex as e:
        findings.notes.append(f"{agent_dir}: index {e}; rebuilt from the run files")
        return _rebuild(agent_dir, names, sync, findings)
    ended, served = [], []
    for run in indexed:
        if run.status == "in_progress":
            try:
                run_file = read_run_file(run.path)
                findings.check(run.path, run_file, sync)
            except OSError as e:
                findings.notes.append(f"{run.path}: unreadable ({e}); not served")
                continue
            if run_file.damaged:
                findings.corrupt.add(run.run_id)
            state = state_from_file(run.path, run_file)
            if state is not None and state.run_id == run.run_id:
                run.take_summary(state.summary())
                if run.status != "in_progress":
                    ended.append(run.end_entry())
        served.append(run)
    if ended:
        append_to_index(agent_dir, b"".join(ended))
    return agent_id, served


def _rebuild(agent_dir: str, names: set, sync: bool, findings: Findings):
    dir_name = os.path.basename(agent_dir)
    try:
        agent_id, indexed = read_index(agent_dir)
        order = {run.run_id: i for i, run in enumerate(indexed)}
    except StaleIndex:
        agent_id, order = decode_name(dir_name), {}
    if agent_id is not None and encode_name(agent_id) != dir_name:
        agent_id, order = decode_name(dir_name), {}
    runs = []
    for name in sorted(names):
        path = os.path.join(agent_dir, name)
        try:
            run_file = read_run_file(path)
            findings.check(path, run_file, sync)
        except OSError as e:
            findings.notes.append(f"{path}: unreadable ({e}); not served")
            continue
        run = state_from_file(path, run_file)
        if run is None:
            findings.notes.append(f"{path}: no readable started record; not served")
            continue
        if agent_id is None and encode_name(run.agent_id) == dir_name:
            agent_id = run.agent_id
        if encode_name(run.run_id) + RUN_SUFFIX != name or run.agent_id != agent_id:
            findings.notes.append(f"{path}: holds run {run.run_id!r} of another place; not served")
            continue
        if run_file.damaged:
            findings.corrupt.add(run.run_id)
        runs.append(run)
    if agent_id is None:
        return None
    runs.sort(
        key=lambda r: (0, order[r.run_id], "") if r.run_id in order else (1, r.started_at, r.run_id)
    )
    write_index(agent_dir, agent_id, runs, sync)
    return agent_id, runs
