"""The lab's history: what every site decided, and what the harness did to the lab.

Theory of operation
-------------------
Each site writes its events into its own store, in the transaction of the decision they
record (``sites.store``: ``events`` and ``runs``), so the history is what happened, also across
kill -9: no event of committed work missing, none twice. The harness (the CLI, the lab's fault
daemon) writes its own events (faults on and off, kills, restores...) into ``harness.db`` in
the lab directory.

``merge`` appends what is new of both to ``history.jsonl``, one ``Event`` per line, and keeps
its cursors in ``history.state.json``. An event is named by (site, run, index): ``run`` is one
process run of a site, ``index`` its order in the site's store. A store restored from a backup
goes back in its indices; its next process run starts a new run, so nothing is skipped and
nothing merged twice. Events a site pruned (``history_retention``) before they were merged
are a gap, recorded in the state: whoever needs them (the checker) says so.

Merging takes a lock, so several commands (and the daemon) may merge at once.
"""

from __future__ import annotations

import fcntl
import gc
import heapq
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

from emulator.errors import ConfigError
from emulator.lab import LabDir, LabInfo
from sites.store import EVENT_COLUMNS, read_only

HARNESS = "lab"  # the ``site`` of the harness's events

# What each kind means; ``link`` is "SENDER->RECEIVER" for one direction, "A<->B" for both.
KINDS: dict[str, str] = {
    "start": "a site process started (detail: its counters and links as loaded)",
    "sent": "an envelope numbered and queued for a peer (link, seq, txn, class, key, hash)",
    "applied": "an envelope applied (its data taken, the link moved on)",
    "stale": "an envelope consumed but not applied: its txn is at or below the watermark",
    "duplicate": "an envelope dropped: its seq was applied before, same content",
    "conflict": "an envelope dropped: its seq was applied before with other content (the hole)",
    "gap": "an envelope held back: its seq is beyond the one expected",
    "fenced": "refused: from another incarnation of the sender (hardened)",
    "quarantined": "refused: the sender is quarantined (hardened)",
    "paused": "not taken: a recovery handshake holds the link",
    "refused": "a message refused whole, with its reason, and dead-lettered (malformed, or not"
               " possible from its sender: direction, origin, payload identity, counters)",
    "unappliable": "well formed but could not be applied: consumed, recorded, dead-lettered",
    "ack": "the peer acknowledged our envelopes through seq",
    "resend": "envelopes sent again from seq",
    "resend_unavailable": "a peer asked again for envelopes we no longer have",
    "rejected": "the peer refused one of our envelopes, with a reason (hardened)",
    "rollback": "the peer's counters went backwards",
    "self_rollback": "the peer has applied more than we ever sent: we went back",
    "quarantine": "a site quarantined (the peer, or itself)",
    "health": "a link's health changed",
    "link_reset": "a recovery reset a link's sequences",
    "recovery": "the recovering site's agent entered a phase",
    "void": "envelopes queued for a peer deleted before they were acknowledged (deljob, delsite)",
    "peer_recovery": "a neighbour's side of a recovery moved",
    "queue_restored": "the broker deleted a queue of the site; it was declared again",
    "fault_on": "a fault took effect",
    "fault_off": "a fault was healed",
    "relay": "what a link fault's relay did to one message (dropped, duplicated, held...)",
    "process": "the harness killed, stopped, started, paused or resumed a site",
    "store": "the harness replaced a site's store (restore from a backup, wipe) or backed it up",
}


@dataclass(frozen=True, slots=True, config=ConfigDict(extra="forbid"))
class Event:
    """One line of ``history.jsonl``: a pydantic dataclass with slots, validated like a model.
    A checker of a large lab holds every event of its history: as a model an event took 1.5 KB
    and 7 us to parse, as this 0.4 KB and 4 us."""

    time: float
    site: str  # where it happened; "lab" for the harness
    index: int  # its order at that site (within ``run``)
    run: str
    kind: str
    link: str | None = None
    seq: int | None = None
    txn: int | None = None
    data_class: str | None = None
    key: str | None = None
    hash: str | None = None
    incarnation: int | None = None
    fault: str | None = None
    detail: dict[str, Any] | None = None

    def to_json(self) -> str:
        """The line of ``history.jsonl`` (no line end), fields that are None left out."""
        return _EVENT.dump_json(self, exclude_none=True).decode()

    @staticmethod
    def from_json(raw: str | bytes) -> Event:
        """One line of ``history.jsonl``, validated (raises pydantic's ValidationError)."""
        return _EVENT.validate_json(raw)


_EVENT: TypeAdapter[Event] = TypeAdapter(Event)


class Gap(BaseModel):
    """Events of a site run pruned before they were merged."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    site: str
    run: str
    after: int  # the last index merged
    first_kept: int  # the first index the store still had


class MergeState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cursors: dict[str, dict[str, int]] = Field(default_factory=dict)  # site -> run -> last index merged
    gaps: list[Gap] = Field(default_factory=list)
    events: int = 0  # lines in history.jsonl


def history_path(lab_dir: LabDir) -> Path:
    return lab_dir.path / "history.jsonl"


def _state_path(lab_dir: LabDir) -> Path:
    return lab_dir.path / "history.state.json"


def harness_path(lab_dir: LabDir) -> Path:
    return lab_dir.path / "harness.db"


# -- the harness's own log ---------------------------------------------------------------------

_HARNESS_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    idx INTEGER PRIMARY KEY AUTOINCREMENT, run TEXT NOT NULL, at REAL NOT NULL, kind TEXT NOT NULL,
    link TEXT, seq INTEGER, txn INTEGER, data_class TEXT, key TEXT, hash TEXT, inc INTEGER,
    detail TEXT, fault TEXT);
"""


@contextmanager
def _harness_db(lab_dir: LabDir) -> Iterator[sqlite3.Connection]:
    lab_dir.path.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(harness_path(lab_dir), isolation_level=None, timeout=30)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA busy_timeout=30000")
        db.executescript(_HARNESS_SCHEMA)
        yield db
    finally:
        db.close()


def record(lab_dir: LabDir, kind: str, *, link: str | None = None, fault: str | None = None,
           seq: int | None = None, detail: dict[str, Any] | None = None, at: float | None = None,
           site: str | None = None) -> None:
    """Write one harness event (a fault on or off, a kill, a restore...)."""
    if site:
        detail = {**(detail or {}), "site": site}
    with _harness_db(lab_dir) as db:
        db.execute("INSERT INTO events(run, at, kind, link, seq, detail, fault) VALUES(?, ?, ?, ?, ?, ?, ?)",
                   ("harness", time.time() if at is None else at, kind, link, seq,
                    json.dumps(detail, separators=(",", ":")) if detail else None, fault))


# -- merging -----------------------------------------------------------------------------------


@contextmanager
def _lock(lab_dir: LabDir) -> Iterator[None]:
    lab_dir.path.mkdir(parents=True, exist_ok=True)
    with open(lab_dir.path / "history.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_state(lab_dir: LabDir) -> MergeState:
    path = _state_path(lab_dir)
    if not path.exists():
        return MergeState()
    try:
        return MergeState.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        raise ConfigError(f"{path} is damaged: {exc.errors()[0].get('msg')}",
                          hint=f"delete {path} and history.jsonl to merge the history again") from exc


def _row_event(site: str, row: tuple[Any, ...], fault: str | None = None) -> Event:
    values = dict(zip(EVENT_COLUMNS, row, strict=True))
    detail = values["detail"]
    return Event(time=values["at"], site=site, index=values["idx"], run=values["run"], kind=values["kind"],
                 link=values["link"], seq=values["seq"], txn=values["txn"], data_class=values["data_class"],
                 key=values["key"], hash=values["hash"], incarnation=values["inc"], fault=fault,
                 detail=json.loads(detail) if detail else None)


def _site_events(lab_dir: LabDir, code: str, state: MergeState) -> list[Event]:
    out: list[Event] = []
    with read_only(lab_dir.site_db(code)) as store:
        if store is None:
            return out
        try:
            runs = store.runs()
            first_kept = store.first_event_index()
        except sqlite3.DatabaseError:
            return out  # being created or replaced under us: next merge
        cursors = state.cursors.setdefault(code, {})
        for i, (run, first_idx, _started) in enumerate(runs):
            before = runs[i + 1][1] if i + 1 < len(runs) else None
            after = cursors.get(run, first_idx - 1)
            if first_kept is not None and after + 1 < first_kept and (before is None or after + 1 < before):
                state.gaps.append(Gap(site=code, run=run, after=after, first_kept=first_kept))
                after = (first_kept if before is None else min(first_kept, before)) - 1
            while True:
                rows = store.events_between(run, after, before)
                if not rows:
                    break
                out.extend(_row_event(code, row) for row in rows)
                after = int(rows[-1][0])
            cursors[run] = after
    return out


def _harness_events(lab_dir: LabDir, state: MergeState) -> list[Event]:
    if not harness_path(lab_dir).exists():
        return []
    cursors = state.cursors.setdefault(HARNESS, {})
    after = cursors.get("harness", 0)
    with _harness_db(lab_dir) as db:
        rows = db.execute(f"SELECT {', '.join(EVENT_COLUMNS)}, fault FROM events WHERE idx>? ORDER BY idx",
                          (after,)).fetchall()
    if rows:
        cursors["harness"] = int(rows[-1][0])
    return [_row_event(HARNESS, row[:-1], row[-1]) for row in rows]


def merge(lab_dir: LabDir, info: LabInfo | None = None) -> int:
    """Append every new event of every site and of the harness to history.jsonl, in time
    order (each site's in its index order); return how many were added."""
    info = info or lab_dir.load()
    with _lock(lab_dir):
        state = load_state(lab_dir)
        streams = [_site_events(lab_dir, code, state) for code in info.topology.depth_order()]
        streams.append(_harness_events(lab_dir, state))
        # Interleaved by time, each site's events in its own order (its index is the truth;
        # two events of one transaction may carry clocks read a moment apart).
        new = list(heapq.merge(*streams, key=lambda e: e.time))
        if new:
            path = history_path(lab_dir)
            with path.open("a") as out:
                before = out.tell()
                out.writelines(e.to_json() + "\n" for e in new)
                out.flush()
                os.fsync(out.fileno())
                _appended(path, os.fstat(out.fileno()), before, out.tell(), new)
            state.events += len(new)
        tmp = _state_path(lab_dir).with_suffix(".tmp")
        tmp.write_text(state.model_dump_json())
        os.replace(tmp, _state_path(lab_dir))
        return len(new)


def read(lab_dir: LabDir, *, offset: int = 0) -> Iterator[Event]:
    """The merged history, from byte ``offset`` of history.jsonl (0: the start)."""
    path = history_path(lab_dir)
    if not path.exists():
        return
    with path.open() as handle:
        handle.seek(offset)
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield Event.from_json(line)
            except ValidationError as exc:
                raise ConfigError(f"{path}: line {number} after offset {offset} is not an event:"
                                  f" {exc.errors()[0].get('msg')}") from exc


def read_new(lab_dir: LabDir, offset: int) -> tuple[list[Event], int]:
    """The events of the whole lines from byte ``offset`` on, and the offset after them: what
    ``history --follow`` prints each time. A line another process is still writing waits for
    the next call, and nothing is read twice."""
    path = history_path(lab_dir)
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            chunk = handle.read()
    except FileNotFoundError:
        return [], offset
    events: list[Event] = []
    return events, offset + _whole_lines(path, chunk, offset, events)


@contextmanager
def no_collection() -> Iterator[None]:
    """Many objects made and kept at once (a history read, a lab judged): no cyclic garbage
    collection while they are made. Each collection scans every object alive, and hundreds of
    thousands of events made in a row trigger one every few hundred: that doubled the time of a
    check on a large lab. Nothing made here needs the cycle collector (reference counting frees
    it); the collector runs again at the end, as it was."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _whole_lines(path: Path, chunk: bytes, offset: int, events: list[Event]) -> int:
    """Append the events of the whole lines of ``chunk`` (read from byte ``offset``) to
    ``events``; the bytes they took (a writer may be mid-line: the rest waits)."""
    end = chunk.rfind(b"\n") + 1
    parse = _EVENT.validate_json
    with no_collection():
        for number, line in enumerate(chunk[:end].splitlines(), 1):
            if not line.strip():
                continue
            try:
                events.append(parse(line))
            except ValidationError as exc:
                raise ConfigError(f"{path}: line {number} after offset {offset} is not an event:"
                                  f" {exc.errors()[0].get('msg')}") from exc
    return end


# The events of each history.jsonl this process has read, and up to which byte: the file only
# grows (merge appends), so a checker polling a long run parses each line once, not once per
# look. Keyed by path; (device, inode) and the size tell a replaced or truncated file.
_LOADED: dict[Path, tuple[tuple[int, int], int, list[Event]]] = {}


def _appended(path: Path, st: os.stat_result, before: int, after: int, new: list[Event]) -> None:
    """What this process just appended joins what it had read, if it had read up to there.
    A process that only merges (the lab's daemon, every second for the life of the lab) keeps
    nothing: the cache is made by ``load`` alone."""
    key = path.resolve()
    ident = (st.st_dev, st.st_ino)
    cached = _LOADED.get(key)
    if cached is not None and cached[0] == ident and cached[1] == before:
        cached[2].extend(new)
        _LOADED[key] = (ident, after, cached[2])


def load(lab_dir: LabDir, info: LabInfo | None = None, *, merge_first: bool = True) -> list[Event]:
    """The whole merged history (merged first), as a new list."""
    if merge_first:
        merge(lab_dir, info)
    path = history_path(lab_dir).resolve()
    try:
        st = path.stat()
    except FileNotFoundError:
        _LOADED.pop(path, None)
        return []
    ident = (st.st_dev, st.st_ino)
    cached = _LOADED.get(path)
    if cached is None or cached[0] != ident or st.st_size < cached[1]:
        cached = (ident, 0, [])
    _, offset, events = cached
    if st.st_size > offset:
        with path.open("rb") as handle:
            handle.seek(offset)
            chunk = handle.read(st.st_size - offset)
        offset += _whole_lines(path, chunk, offset, events)
    _LOADED[path] = (ident, offset, events)
    return list(events)


def render(e: Event) -> str:
    """One event as a line for people."""
    clock = time.strftime("%H:%M:%S", time.localtime(e.time)) + f".{int(e.time * 1000) % 1000:03d}"
    parts = [clock, f"{e.site}#{e.index}", e.kind]
    if e.link:
        parts.append(e.link)
    if e.seq is not None:
        parts.append(f"seq {e.seq}")
    if e.txn is not None:
        parts.append(f"txn {e.txn}")
    if e.data_class:
        parts.append(f"{e.data_class} {e.key}")
    if e.incarnation is not None and e.kind not in ("sent",):
        parts.append(f"inc {e.incarnation}")
    if e.fault:
        parts.append(f"fault {e.fault}")
    if e.detail:
        parts.append(json.dumps(e.detail, separators=(",", ":"), sort_keys=True))
    return " ".join(parts)
