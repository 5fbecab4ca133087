"""A site's durable state: one SQLite database per site, WAL, one writer (the site process).

Everything a backup must capture lives here: counters (transaction ID, incarnation,
allocators, SCF serial), the links' sequence state, the ``.trs`` watermarks, the outbox of
unacknowledged envelopes, and the data (site data held, global objects held).

Every apply happens inside ``transaction()``: the apply, the watermark advance, the
outbox rows it creates and the link state commit together or not at all.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from emulator.errors import CorruptBackup, StoreError
from emulator.protocol import codec
from emulator.protocol import retention as rules
from emulator.protocol.sequencing import LinkState

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS alloc (kind TEXT PRIMARY KEY, next INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS link (peer TEXT PRIMARY KEY, state TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    peer TEXT NOT NULL, seq INTEGER NOT NULL, body BLOB NOT NULL,
    PRIMARY KEY (peer, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS watermark (
    source TEXT NOT NULL, data_class TEXT NOT NULL, key TEXT NOT NULL, txn INTEGER NOT NULL,
    PRIMARY KEY (source, data_class, key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS applied (
    source TEXT NOT NULL, seq INTEGER NOT NULL, txn INTEGER NOT NULL, hash TEXT NOT NULL,
    data_class TEXT NOT NULL, key TEXT NOT NULL, origin TEXT NOT NULL, version INTEGER,
    at REAL NOT NULL, PRIMARY KEY (source, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS drops (
    id INTEGER PRIMARY KEY, source TEXT NOT NULL, seq INTEGER NOT NULL, txn INTEGER NOT NULL,
    incarnation INTEGER NOT NULL, reason TEXT NOT NULL, data_class TEXT NOT NULL,
    key TEXT NOT NULL, origin TEXT NOT NULL, hash TEXT NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS site_data (
    data_class TEXT NOT NULL, key TEXT NOT NULL, origin TEXT NOT NULL,
    version INTEGER NOT NULL, payload TEXT NOT NULL, updated REAL NOT NULL,
    PRIMARY KEY (data_class, key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS objects (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, origin TEXT NOT NULL, def_uid TEXT NOT NULL,
    name TEXT NOT NULL, revision INTEGER NOT NULL, deleted INTEGER NOT NULL,
    payload TEXT NOT NULL, updated REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS object_history (
    id TEXT NOT NULL, def_uid TEXT NOT NULL, name TEXT NOT NULL, first_seen REAL NOT NULL,
    via TEXT NOT NULL, PRIMARY KEY (id, def_uid)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS status_messages (
    id INTEGER PRIMARY KEY, component TEXT NOT NULL, message_id INTEGER NOT NULL,
    severity TEXT NOT NULL, text TEXT NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS control (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS commands (id TEXT PRIMARY KEY, answer TEXT NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    idx INTEGER PRIMARY KEY AUTOINCREMENT, run TEXT NOT NULL, at REAL NOT NULL, kind TEXT NOT NULL,
    link TEXT, seq INTEGER, txn INTEGER, data_class TEXT, key TEXT, hash TEXT, inc INTEGER,
    detail TEXT);
CREATE TABLE IF NOT EXISTS site_keys (
    site TEXT PRIMARY KEY, inc INTEGER NOT NULL, pub TEXT NOT NULL, since REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS signing_key (inc INTEGER PRIMARY KEY, seed TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (run TEXT PRIMARY KEY, first_idx INTEGER NOT NULL, started REAL NOT NULL);
CREATE TABLE IF NOT EXISTS watermark_floor (
    source TEXT NOT NULL, data_class TEXT NOT NULL, txn INTEGER NOT NULL,
    PRIMARY KEY (source, data_class)) WITHOUT ROWID;
"""

EVENT_COLUMNS = ("idx", "run", "at", "kind", "link", "seq", "txn", "data_class", "key", "hash", "inc", "detail")

_LINK_FIELDS = {f.name for f in fields(LinkState)}

_DEFERRED = {
    "wm": "INSERT OR REPLACE INTO watermark(source, data_class, key, txn) VALUES(?, ?, ?, ?)",
    "sd": "INSERT OR REPLACE INTO site_data(data_class, key, origin, version, payload, updated)"
          " VALUES(?, ?, ?, ?, ?, ?)",
    "ap": "INSERT INTO applied(source, seq, txn, hash, data_class, key, origin, version, at)"
          " VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?)",
    "ob": "INSERT INTO outbox(peer, seq, body) VALUES(?, ?, ?)",
    "ev": "INSERT INTO events(run, at, kind, link, seq, txn, data_class, key, hash, inc, detail)"
          " VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
}


class SiteStore:
    """The SQLite store of one site. Not thread-safe: one process, one writer."""

    def __init__(self, path: Path | str, *, readonly: bool = False) -> None:
        self.path = Path(path)
        try:
            if readonly:
                uri = f"file:{self.path}?mode=ro"
                self.db = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=10)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.db = sqlite3.connect(self.path, isolation_level=None, timeout=10)
                self.db.execute("PRAGMA journal_mode=WAL")
                # kill -9 never loses a committed transaction in WAL+NORMAL (research B.3);
                # the faults we inject are process and broker faults, not host power loss.
                self.db.execute("PRAGMA synchronous=NORMAL")
                self.db.executescript(SCHEMA)
            self.db.execute("PRAGMA busy_timeout=10000")
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot open site store {self.path}: {exc}") from exc
        self._in_tx = False
        self._began = False
        # Writes of the hot path (watermarks, site data, the applied log, the outbox, the
        # history), kept in order and written together (executemany) before anything reads
        # those tables from SQLite, before a savepoint must exist, and before a commit. Point
        # reads (a watermark, a version, an applied hash) see them at once.
        self._pending: list[tuple[str, tuple[Any, ...]]] = []
        self._wm: dict[tuple[str, str, str], int] = {}
        self._sd: dict[tuple[str, str], int] = {}
        self._ap: dict[tuple[str, int], str] = {}
        # What ``prefetch`` read of SQLite for the packet at hand (None: no row), until the next write.
        self._known_wm: dict[tuple[str, str, str], int | None] = {}
        self._known_sd: dict[tuple[str, str], int | None] = {}
        # Open savepoints: [name, pending writes before it, made in SQLite yet]. One is made in
        # SQLite only when something must be written while it is open.
        self._savepoints: list[list[Any]] = []
        # (source, data class) -> the highest transaction ID of the watermark rows retention
        # folded: the watermark of every key of that class without a row of its own.
        self._floors: dict[tuple[str, str], int] = self._load_floors()

    def _load_floors(self) -> dict[tuple[str, str], int]:
        try:
            return {(s, c): int(t) for s, c, t in self.db.execute("SELECT source, data_class, txn FROM watermark_floor")}
        except sqlite3.OperationalError:  # a read-only store from before retention: no floors
            return {}

    def close(self) -> None:
        self.db.close()

    # -- transactions -------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        if self._in_tx:
            raise StoreError("nested transaction on the site store")
        # BEGIN waits for the first write: a transaction that writes nothing (a heartbeat
        # that changed nothing) costs no BEGIN and no COMMIT. One writer per store: what was
        # read before it cannot have changed.
        self._in_tx = True
        self._began = False
        try:
            yield self.db
            self.flush_pending()
        except BaseException:
            self._drop_pending(0)
            if self._began:
                self.db.execute("ROLLBACK")
            raise
        else:
            if self._began:
                self.db.execute("COMMIT")
        finally:
            self._in_tx = False
            self._began = False
            self._savepoints.clear()

    def _begin(self) -> None:
        if self._in_tx and not self._began:
            self.db.execute("BEGIN IMMEDIATE")
            self._began = True

    def savepoint(self, name: str) -> None:
        self._savepoints.append([name, len(self._pending), False])

    def rollback_to(self, name: str) -> None:
        """Undo what was done since the savepoint (it stays open: ``release`` it)."""
        for i in range(len(self._savepoints) - 1, -1, -1):
            sp = self._savepoints[i]
            if sp[0] == name:
                if sp[2]:
                    self.db.execute(f"ROLLBACK TO {name}")
                self._drop_pending(sp[1])
                del self._savepoints[i + 1:]
                return
        raise StoreError(f"no savepoint {name}")

    def release(self, name: str) -> None:
        for i in range(len(self._savepoints) - 1, -1, -1):
            if self._savepoints[i][0] == name:
                if self._savepoints[i][2]:
                    self.db.execute(f"RELEASE {name}")
                del self._savepoints[i:]
                return
        raise StoreError(f"no savepoint {name}")

    def _defer(self, kind: str, row: tuple[Any, ...]) -> None:
        self._pending.append((kind, row))
        self._index(kind, row)
        if not self._in_tx:
            self.flush_pending()

    def _index(self, kind: str, row: tuple[Any, ...]) -> None:
        if kind == "wm":
            self._wm[(row[0], row[1], row[2])] = row[3]
        elif kind == "sd":
            self._sd[(row[0], row[1])] = row[3]
        elif kind == "ap":
            self._ap[(row[0], row[1])] = row[3]

    def _drop_pending(self, keep: int) -> None:
        """Forget the pending writes after the first ``keep`` (a rollback)."""
        del self._pending[keep:]
        self._wm.clear()
        self._sd.clear()
        self._ap.clear()
        for kind, row in self._pending:
            self._index(kind, row)

    def flush_pending(self) -> None:
        """Write what is pending, making the open savepoints in SQLite where they belong."""
        if self._pending:
            self._materialize()

    def _materialize(self) -> None:
        pending = self._pending
        self._begin()
        done = 0
        for sp in self._savepoints:
            if not sp[2]:
                self._write(pending[done:sp[1]])
                done = sp[1]
                self.db.execute(f"SAVEPOINT {sp[0]}")
                sp[2] = True
        self._write(pending[done:])
        self._pending = []
        for sp in self._savepoints:
            sp[1] = 0
        self._wm.clear()
        self._sd.clear()
        self._ap.clear()
        self._known_wm.clear()
        self._known_sd.clear()

    def prefetch(self, source: str, watermarks: list[tuple[str, str]], versions: list[tuple[str, str]]) -> None:
        """Read the watermarks of ``source`` for these (data class, key)s and the site data
        versions of these, one query for many, for the point reads that follow (until the
        next write to SQLite)."""
        self.flush_pending()
        for cls, key, txn in self._rows_for("t.txn FROM w CROSS JOIN watermark t ON t.source=? AND",
                                            (source,), watermarks):
            self._known_wm[(source, cls, key)] = txn
        for cls, key, version in self._rows_for("t.version FROM w CROSS JOIN site_data t ON", (), versions):
            self._known_sd[(cls, key)] = version

    def _rows_for(self, sql: str, tail: tuple[Any, ...],
                  pairs: list[tuple[str, str]]) -> Iterator[tuple[str, str, int | None]]:
        """(data class, key, value or None) of each pair, asked 400 at a time. The wanted
        pairs drive the join (CROSS JOIN keeps them the outer loop): one primary key lookup
        each. ``(data_class, key) IN (VALUES ...)`` scanned the whole table instead, so a
        packet cost grew with the store."""
        wanted = list(dict.fromkeys(pairs))
        for start in range(0, len(wanted), 400):
            chunk = wanted[start:start + 400]
            marks = ",".join("(?,?)" for _ in chunk)
            found = {(c, k): v for c, k, v in self.db.execute(
                f"WITH w(c, k) AS (VALUES {marks}) SELECT w.c, w.k, {sql} t.data_class=w.c AND t.key=w.k",
                (*(x for pair in chunk for x in pair), *tail))}
            for cls, key in chunk:
                yield cls, key, found.get((cls, key))

    def _write(self, rows: list[tuple[str, tuple[Any, ...]]]) -> None:
        """One executemany per table, each table's rows in their order (the tables are
        independent of each other: no triggers, no foreign keys)."""
        if not rows:
            return
        by_kind: dict[str, list[tuple[Any, ...]]] = {}
        for kind, row in rows:
            by_kind.setdefault(kind, []).append(row)
        for kind, kind_rows in by_kind.items():
            if len(kind_rows) == 1:
                self.db.execute(_DEFERRED[kind], kind_rows[0])
            else:
                self.db.executemany(_DEFERRED[kind], kind_rows)

    def _direct(self) -> None:
        """Before a statement that writes straight to SQLite: an open savepoint must exist
        there first (and what is pending before it)."""
        self._begin()
        if self._savepoints and not self._savepoints[-1][2]:
            self._materialize()

    # -- meta and counters --------------------------------------------------------------

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        row = self.db.execute("SELECT v FROM meta WHERE k=?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta(self, key: str, value: object) -> None:
        self._direct()
        self.db.execute("INSERT OR REPLACE INTO meta(k, v) VALUES(?, ?)", (key, str(value)))

    def delete_meta(self, key: str) -> None:
        self._direct()
        self.db.execute("DELETE FROM meta WHERE k=?", (key,))

    def meta(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT k, v FROM meta").fetchall())

    def get_int(self, key: str, default: int = 0) -> int:
        value = self.get_meta(key)
        return int(value) if value is not None else default

    # -- hardened mode's keys (emulator.protocol.signing) ----------------------------------

    def signing_seed(self, inc: int) -> bytes | None:
        """This site's signing key seed for an incarnation (kept out of ``meta``, which the
        status commands show)."""
        row = self.db.execute("SELECT seed FROM signing_key WHERE inc=?", (inc,)).fetchone()
        return bytes.fromhex(row[0]) if row else None

    def set_signing_seed(self, inc: int, seed: bytes) -> None:
        self._direct()
        self.db.execute("DELETE FROM signing_key WHERE inc<>?", (inc,))  # a retired key signs nothing
        self.db.execute("INSERT OR REPLACE INTO signing_key(inc, seed) VALUES(?, ?)", (inc, seed.hex()))

    def site_keys(self) -> dict[str, tuple[int, str]]:
        """The key pinned per origin: incarnation and public key."""
        return {site: (inc, pub) for site, inc, pub in self.db.execute("SELECT site, inc, pub FROM site_keys")}

    def pin_key(self, site: str, inc: int, pub: str, now: float) -> None:
        self._direct()
        self.db.execute("INSERT OR REPLACE INTO site_keys(site, inc, pub, since) VALUES(?, ?, ?, ?)",
                        (site, inc, pub, now))

    def allocators(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT kind, next FROM alloc").fetchall())

    def set_allocator(self, kind: str, next_number: int) -> None:
        self._direct()
        self.db.execute("INSERT OR REPLACE INTO alloc(kind, next) VALUES(?, ?)", (kind, next_number))

    def get_control(self, key: str) -> Any:
        row = self.db.execute("SELECT v FROM control WHERE k=?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def set_control(self, key: str, value: Any) -> None:
        self._direct()
        if value is None:
            self.db.execute("DELETE FROM control WHERE k=?", (key,))
        else:
            self.db.execute(
                "INSERT OR REPLACE INTO control(k, v) VALUES(?, ?)", (key, json.dumps(value))
            )

    def command_answer(self, command_id: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT answer FROM commands WHERE id=?", (command_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def record_command(self, command_id: str, answer: dict[str, Any], now: float) -> None:
        self._direct()
        self.db.execute("INSERT OR REPLACE INTO commands(id, answer, at) VALUES(?, ?, ?)",
                        (command_id, json.dumps(answer), now))

    # -- links ----------------------------------------------------------------------------

    def load_links(self) -> dict[str, LinkState]:
        links = {}
        for peer, state in self.db.execute("SELECT peer, state FROM link"):
            data = {k: v for k, v in json.loads(state).items() if k in _LINK_FIELDS}
            links[peer] = LinkState(**data)
        return links

    def save_link(self, link: LinkState) -> None:
        self.save_link_row(link.peer, codec.dumps(link.to_row()))

    def save_link_row(self, peer: str, row: str) -> None:
        self._direct()
        self.db.execute("INSERT OR REPLACE INTO link(peer, state) VALUES(?, ?)", (peer, row))

    # -- outbox ---------------------------------------------------------------------------

    def outbox_add(self, peer: str, seq: int, body: bytes) -> None:
        self._defer("ob", (peer, seq, body))

    def outbox_range(self, peer: str, from_seq: int, limit: int) -> list[tuple[int, bytes]]:
        self.flush_pending()
        return self.db.execute(
            "SELECT seq, body FROM outbox WHERE peer=? AND seq>=? ORDER BY seq LIMIT ?",
            (peer, from_seq, limit),
        ).fetchall()

    def outbox_purge(self, peer: str, through: int) -> None:
        self.flush_pending()
        self.db.execute("DELETE FROM outbox WHERE peer=? AND seq<=?", (peer, through))

    def outbox_clear(self, peer: str) -> int:
        self.flush_pending()
        return self.db.execute("DELETE FROM outbox WHERE peer=?", (peer,)).rowcount

    def outbox_counts(self) -> dict[str, int]:
        self.flush_pending()
        return dict(self.db.execute("SELECT peer, COUNT(*) FROM outbox GROUP BY peer").fetchall())

    def outbox_min_seq(self, peer: str) -> int | None:
        self.flush_pending()
        row = self.db.execute("SELECT MIN(seq) FROM outbox WHERE peer=?", (peer,)).fetchone()
        return int(row[0]) if row and row[0] is not None else None

    # -- the .trs watermarks and the applied log ------------------------------------------

    def watermark(self, source: str, data_class: str, key: str) -> int:
        pending = self._wm.get((source, data_class, key))
        if pending is not None:
            return pending
        floor = self._floors.get((source, data_class), 0)
        if (source, data_class, key) in self._known_wm:
            return rules.watermark_after_prune(self._known_wm[(source, data_class, key)], floor)
        row = self.db.execute(
            "SELECT txn FROM watermark WHERE source=? AND data_class=? AND key=?",
            (source, data_class, key),
        ).fetchone()
        return rules.watermark_after_prune(row[0] if row else None, floor)

    def set_watermark(self, source: str, data_class: str, key: str, txn: int) -> None:
        self._defer("wm", (source, data_class, key, txn))

    def max_watermark(self, source: str) -> int:
        self.flush_pending()
        row = self.db.execute("SELECT MAX(txn) FROM watermark WHERE source=?", (source,)).fetchone()
        floors = [t for (s, _), t in self._floors.items() if s == source]
        return max([row[0] or 0, *floors])

    def applied_hash(self, source: str, seq: int) -> str | None:
        pending = self._ap.get((source, seq))
        if pending is not None:
            return pending
        row = self.db.execute(
            "SELECT hash FROM applied WHERE source=? AND seq=?", (source, seq)
        ).fetchone()
        return row[0] if row else None

    def record_applied(
        self, source: str, seq: int, txn: int, hash_: str, data_class: str, key: str,
        origin: str, version: int | None, now: float,
    ) -> None:
        self._defer("ap", (source, seq, txn, hash_, data_class, key, origin, version, now))

    def record_drop(
        self, source: str, seq: int, txn: int, incarnation: int, reason: str, data_class: str,
        key: str, origin: str, hash_: str, now: float,
    ) -> None:
        self._direct()
        self.db.execute(
            "INSERT INTO drops(source, seq, txn, incarnation, reason, data_class, key, origin,"
            " hash, at) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (source, seq, txn, incarnation, reason, data_class, key, origin, hash_, now),
        )

    # -- data -----------------------------------------------------------------------------

    def site_data_version(self, data_class: str, key: str) -> int | None:
        pending = self._sd.get((data_class, key))
        if pending is not None:
            return pending
        if (data_class, key) in self._known_sd:
            return self._known_sd[(data_class, key)]
        row = self.db.execute(
            "SELECT version FROM site_data WHERE data_class=? AND key=?", (data_class, key)
        ).fetchone()
        return row[0] if row else None

    def upsert_site_data(
        self, data_class: str, key: str, origin: str, version: int, payload: dict[str, Any],
        now: float,
    ) -> None:
        self._defer("sd", (data_class, key, origin, version, codec.dumps(payload), now))

    def delete_site_data_of(self, origins: list[str], keep: tuple[str, ...] = ()) -> int:
        self.flush_pending()
        marks = ",".join("?" * len(origins))
        kept = ",".join("?" * len(keep)) or "''"
        return self.db.execute(
            f"DELETE FROM site_data WHERE origin IN ({marks}) AND data_class NOT IN ({kept})",
            [*origins, *keep],
        ).rowcount

    def max_site_data_version(self, data_class: str, origin: str) -> int:
        self.flush_pending()
        row = self.db.execute(
            "SELECT MAX(version) FROM site_data WHERE data_class=? AND origin=?", (data_class, origin)
        ).fetchone()
        return int(row[0] or 0)

    def site_data_page(self, *, after: tuple[str, str] | None, limit: int) -> list[dict[str, Any]]:
        """Site data in (data_class, key) order, after a cursor: for sending it in steps."""
        self.flush_pending()
        sql = "SELECT data_class, key, origin, version, payload FROM site_data"
        args: tuple[Any, ...] = ()
        if after is not None:
            sql += " WHERE (data_class, key) > (?, ?)"
            args = after
        sql += " ORDER BY data_class, key LIMIT ?"
        return [
            {"data_class": c, "key": k, "origin": o, "version": v, "payload": json.loads(p)}
            for c, k, o, v, p in self.db.execute(sql, (*args, limit))
        ]

    def site_data(self, data_class: str | None = None) -> list[dict[str, Any]]:
        self.flush_pending()
        sql = "SELECT data_class, key, origin, version, payload FROM site_data"
        args: tuple[Any, ...] = ()
        if data_class:
            sql += " WHERE data_class=?"
            args = (data_class,)
        return [
            {"data_class": c, "key": k, "origin": o, "version": v, "payload": json.loads(p)}
            for c, k, o, v, p in self.db.execute(sql, args)
        ]

    def get_object(self, object_id: str) -> dict[str, Any] | None:
        row = self.db.execute(
            "SELECT id, kind, origin, def_uid, name, revision, deleted, payload FROM objects"
            " WHERE id=?",
            (object_id,),
        ).fetchone()
        return _object_row(row) if row else None

    def upsert_object(self, obj: dict[str, Any], via: str, now: float) -> None:
        self._direct()
        self.db.execute(
            "INSERT OR REPLACE INTO objects(id, kind, origin, def_uid, name, revision, deleted,"
            " payload, updated) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                obj["id"], obj["kind"], obj["origin"], obj["def_uid"], obj["name"],
                obj["revision"], int(obj.get("deleted", False)), codec.dumps(obj), now,
            ),
        )
        self.db.execute(
            "INSERT OR IGNORE INTO object_history(id, def_uid, name, first_seen, via)"
            " VALUES(?, ?, ?, ?, ?)",
            (obj["id"], obj["def_uid"], obj["name"], now, via),
        )

    def objects(self, *, origin: str | None = None, include_deleted: bool = True) -> list[dict[str, Any]]:
        sql = "SELECT id, kind, origin, def_uid, name, revision, deleted, payload FROM objects"
        clauses, args = [], []
        if origin:
            clauses.append("origin=?")
            args.append(origin)
        if not include_deleted:
            clauses.append("deleted=0")
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        return [_object_row(r) for r in self.db.execute(sql + " ORDER BY id", args)]

    def add_status(self, component: str, message_id: int, severity: str, text: str, now: float) -> None:
        self._direct()
        self.db.execute(
            "INSERT INTO status_messages(component, message_id, severity, text, at)"
            " VALUES(?, ?, ?, ?, ?)",
            (component, message_id, severity, text, now),
        )

    # -- history ----------------------------------------------------------------------------
    # Every decision is an event, written in the transaction that makes the decision: the
    # history is what happened, also across kill -9. ``run`` names one process run; after a
    # restore from a backup the store's indices go back, and a new run tells the events apart.

    def begin_run(self, run: str, now: float) -> None:
        self.flush_pending()
        row = self.db.execute("SELECT seq FROM sqlite_sequence WHERE name='events'").fetchone()
        self.db.execute("INSERT OR IGNORE INTO runs(run, first_idx, started) VALUES(?, ?, ?)",
                        (run, (row[0] if row else 0) + 1, now))

    def add_event(self, run: str, at: float, kind: str, link: str | None = None, seq: int | None = None,
                  txn: int | None = None, data_class: str | None = None, key: str | None = None,
                  hash_: str | None = None, inc: int | None = None, detail: str | None = None) -> None:
        self._defer("ev", (run, at, kind, link, seq, txn, data_class, key, hash_, inc, detail))

    def runs(self) -> list[tuple[str, int, float]]:
        """(run, first index, started) of every run whose events the store holds, oldest first."""
        # A run killed before it wrote anything shares its first index with the next: the
        # order they began in (rowid) keeps the empty one first.
        return [(r, int(i), float(t)) for r, i, t in
                self.db.execute("SELECT run, first_idx, started FROM runs ORDER BY first_idx, rowid")]

    def events_between(self, run: str, after: int, before: int | None, limit: int = 50_000) -> list[tuple[Any, ...]]:
        """Event rows of ``run`` with ``after < idx < before``, in index order."""
        self.flush_pending()
        return self.db.execute(
            f"SELECT {', '.join(EVENT_COLUMNS)} FROM events WHERE idx>? AND idx<? AND run=? ORDER BY idx LIMIT ?",
            (after, before if before is not None else 2**62, run, limit)).fetchall()

    def first_event_index(self) -> int | None:
        self.flush_pending()
        row = self.db.execute("SELECT MIN(idx) FROM events").fetchone()
        return int(row[0]) if row and row[0] is not None else None

    def prune_events(self, before: float) -> int:
        """Delete events older than ``before`` (retention); returns how many went."""
        self.flush_pending()
        row = self.db.execute("SELECT idx FROM events WHERE at>=? ORDER BY idx LIMIT 1", (before,)).fetchone()
        if row is None:
            last = self.db.execute("SELECT MAX(idx) FROM events").fetchone()
            cut = (last[0] + 1) if last and last[0] is not None else None
        else:
            cut = int(row[0])
        if cut is None:
            return 0
        gone = self.db.execute("DELETE FROM events WHERE idx<?", (cut,)).rowcount
        if gone:
            self.set_meta("events_pruned_before", cut)
        return int(gone)

    # -- retention (the rules: emulator/protocol/retention.py) -------------------------------

    def floors(self) -> dict[tuple[str, str], int]:
        return dict(self._floors)

    def _fold(self, rows: list[tuple[str, str, int]]) -> None:
        """Raise the floors of (source, data class) to these folded rows' transaction IDs."""
        top: dict[tuple[str, str], list[int]] = {}
        for source, cls, txn in rows:
            top.setdefault((source, cls), []).append(int(txn))
        for key, txns in top.items():
            floor = rules.fold(self._floors.get(key, 0), txns)
            self.db.execute("INSERT OR REPLACE INTO watermark_floor(source, data_class, txn) VALUES(?, ?, ?)",
                            (*key, floor))
            self._floors[key] = floor

    def _fold_watermarks(self, where: str, args: tuple[Any, ...] = ()) -> int:
        rows = self.db.execute(f"SELECT source, data_class, txn FROM watermark WHERE {where}", args).fetchall()
        if not rows:
            return 0
        self._fold(rows)
        return int(self.db.execute(f"DELETE FROM watermark WHERE {where}", args).rowcount)

    def prune(self, cut: rules.Cutoffs) -> dict[str, int]:
        """Delete what the retention rules let go at ``cut``, in the open transaction; returns
        rows deleted per table (events: ``prune_events``)."""
        self.flush_pending()
        self._begin()
        gone: dict[str, int] = {}
        if cut.applied_before is not None:
            before = cut.applied_before
            # The site control changes applied before the cutoff: their watermark rows fold.
            tops = self.db.execute("SELECT source, MAX(txn) FROM applied WHERE at<? GROUP BY source",
                                   (before,)).fetchall()
            gone["applied"] = self.db.execute("DELETE FROM applied WHERE at<?", (before,)).rowcount
            for source, top in tops:
                for cls in rules.FOLDED_BY_AGE:
                    gone["watermark"] = gone.get("watermark", 0) + self._fold_watermarks(
                        "source=? AND data_class=? AND txn<=?", (source, cls, top))
            gone["drops"] = self.db.execute("DELETE FROM drops WHERE at<?", (before,)).rowcount
            gone["commands"] = self.db.execute("DELETE FROM commands WHERE at<?", (before,)).rowcount
        if cut.status_before is not None:
            newest = dict(self.db.execute("SELECT origin, MAX(version) FROM site_data WHERE data_class=?"
                                          " GROUP BY origin", (rules.STATUS,)).fetchall())
            old = [(key,) for key, origin, version, at in self.db.execute(
                       "SELECT key, origin, version, json_extract(payload, '$.at') FROM site_data"
                       " WHERE data_class=? AND json_extract(payload, '$.at') < ?", (rules.STATUS, cut.status_before))
                   if rules.status_prunable(float(at), int(version), int(newest.get(origin, 0)), cut.status_before)]
            if old:
                self.db.executemany(f"DELETE FROM site_data WHERE data_class='{rules.STATUS}' AND key=?", old)
                gone["site_data"] = len(old)
            # the watermarks of status messages no longer held fold into their sender's floor
            gone["watermark"] = gone.get("watermark", 0) + self._fold_watermarks(
                "data_class=? AND NOT EXISTS (SELECT 1 FROM site_data s WHERE s.data_class=watermark.data_class"
                " AND s.key=watermark.key)", (rules.STATUS,))
            gone["status_messages"] = self.db.execute(
                "DELETE FROM status_messages WHERE at<? AND id < (SELECT MAX(id) FROM status_messages)",
                (cut.status_before,)).rowcount
        if cut.tombstones_before is not None:
            dead = [oid for oid, payload in self.db.execute(
                        "SELECT id, payload FROM objects WHERE deleted=1 AND json_extract(payload, '$.deleted_at') < ?",
                        (cut.tombstones_before,))
                    if rules.tombstone_prunable(dict(json.loads(payload), deleted=True), cut.tombstones_before)]
            for start in range(0, len(dead), 400):
                chunk = dead[start:start + 400]
                marks = ",".join("?" * len(chunk))
                gone["objects"] = gone.get("objects", 0) + self.db.execute(
                    f"DELETE FROM objects WHERE id IN ({marks})", chunk).rowcount
                gone["object_history"] = gone.get("object_history", 0) + self.db.execute(
                    f"DELETE FROM object_history WHERE id IN ({marks})", chunk).rowcount
                gone["watermark"] = gone.get("watermark", 0) + self._fold_watermarks(
                    f"data_class IN ({','.join('?' * len(rules.OBJECT_CLASSES))}) AND key IN ({marks})",
                    (*rules.OBJECT_CLASSES, *chunk))
        return {k: int(v) for k, v in gone.items() if v}

    def table_sizes(self) -> dict[str, dict[str, int]]:
        """table -> {rows, bytes}: bytes from SQLite's dbstat (pages of the table and its
        indexes), else the table's page count is unknown (-1)."""
        self.flush_pending()
        tables = [t for (t,) in self.db.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
        size: dict[str, int] = {}
        try:
            for name, n in self.db.execute(
                    "SELECT m.tbl_name, SUM(d.pgsize) FROM dbstat d JOIN sqlite_master m ON m.name=d.name"
                    " GROUP BY m.tbl_name"):
                size[name] = int(n)
        except sqlite3.DatabaseError:  # a SQLite built without dbstat
            pass
        return {t: {"rows": int(self.db.execute(f'SELECT COUNT(*) FROM "{t}"').fetchone()[0]),
                    "bytes": size.get(t, -1)} for t in tables}

    # -- reading for diagnostics --------------------------------------------------------------

    def drop_counts(self) -> dict[str, dict[str, int]]:
        """source -> reason -> envelopes dropped."""
        out: dict[str, dict[str, int]] = {}
        for source, reason, n in self.db.execute("SELECT source, reason, COUNT(*) FROM drops GROUP BY source, reason"):
            out.setdefault(source, {})[reason] = n
        return out

    def watermark_summary(self) -> dict[str, dict[str, dict[str, int]]]:
        self.flush_pending()
        """source -> data class -> {keys, max_txn}: the ``.trs`` files at a glance."""
        out: dict[str, dict[str, dict[str, int]]] = {}
        for source, cls, keys, top in self.db.execute(
                "SELECT source, data_class, COUNT(*), MAX(txn) FROM watermark GROUP BY source, data_class"):
            out.setdefault(source, {})[cls] = {"keys": keys, "max_txn": top}
        return out

    def recent_status(self, limit: int = 10, *, skip: tuple[int, ...] = ()) -> list[dict[str, Any]]:
        where = f" WHERE message_id NOT IN ({','.join('?' * len(skip))})" if skip else ""
        rows = self.db.execute(
            "SELECT message_id, severity, component, text, at FROM status_messages"
            f"{where} ORDER BY id DESC LIMIT ?", (*skip, limit)).fetchall()
        return [{"id": m, "severity": s, "component": c, "text": t, "at": a} for m, s, c, t, a in rows]

    # -- backup ---------------------------------------------------------------------------

    def backup_to(self, target: Path) -> None:
        """An atomic snapshot of the whole store (SQLite online backup), taken while running."""
        dest = sqlite3.connect(target)
        try:
            self.db.backup(dest)
        finally:
            dest.close()


def backup_file(source: Path, target: Path) -> dict[str, Any]:
    """An atomic snapshot of a running site's store at ``source`` into ``target`` (SQLite's
    online backup, read-only on the source), made self-contained (no WAL); returns the
    counters it holds: meta, allocators and each link's sequences."""
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30)
    dst = sqlite3.connect(target)
    try:
        src.backup(dst)  # one consistent snapshot, even while the site writes
    finally:
        dst.close()
        src.close()
    db = sqlite3.connect(target)
    try:
        db.execute("PRAGMA journal_mode=DELETE")
        meta = dict(db.execute("SELECT k, v FROM meta").fetchall())
        alloc = dict(db.execute("SELECT kind, next FROM alloc").fetchall())
        links = {
            peer: {k: json.loads(state)[k] for k in ("next_send_seq", "acked_through", "next_expected")}
            for peer, state in db.execute("SELECT peer, state FROM link")
        }
    finally:
        db.close()
    return {"meta": meta, "alloc": alloc, "links": links}


@dataclass
class StoreSnapshot:
    """What the checker and ``status`` read of a store, in one consistent read."""

    meta: dict[str, str]
    links: dict[str, LinkState]
    outbox: dict[str, int]  # peer -> envelopes not yet acknowledged
    site_data: dict[tuple[str, str], tuple[int, str]]  # (data class, key) -> (version, origin)
    objects: dict[str, dict[str, Any]]
    object_history: dict[str, dict[str, float]]  # object ID -> definition -> first seen
    drops: dict[tuple[str, str], int]  # (data class, key) -> envelopes dropped as seen/stale
    max_txn: dict[str, int]  # sender -> highest transaction ID accepted from it (.trs, floors included)
    status_at: dict[str, float] = field(default_factory=dict)  # status message key -> when it was made


    def counter(self, name: str) -> int:
        return int(self.meta.get(name) or 0)


def snapshot(store: SiteStore) -> StoreSnapshot:
    db = store.db
    db.execute("BEGIN")  # one consistent snapshot of the store
    try:
        history: dict[str, dict[str, float]] = {}
        for oid, uid, seen in db.execute("SELECT id, def_uid, first_seen FROM object_history"):
            history.setdefault(oid, {})[uid] = seen
        return StoreSnapshot(
            meta=store.meta(),
            links=store.load_links(),
            outbox=store.outbox_counts(),
            site_data={(c, k): (v, o) for c, k, v, o in db.execute(
                "SELECT data_class, key, version, origin FROM site_data")},
            objects={o["id"]: o for o in store.objects()},
            object_history=history,
            drops={(c, k): n for c, k, n in db.execute(
                "SELECT data_class, key, COUNT(*) FROM drops WHERE reason IN ('conflict','stale')"
                " GROUP BY data_class, key")},
            max_txn=_max_txn(db),
            status_at={k: float(a) for k, a in db.execute(
                "SELECT key, json_extract(payload, '$.at') FROM site_data WHERE data_class='status'") if a is not None},
        )
    finally:
        db.execute("COMMIT")


def _max_txn(db: sqlite3.Connection) -> dict[str, int]:
    top = {s: int(t) for s, t in db.execute("SELECT source, MAX(txn) FROM watermark GROUP BY source")}
    try:
        floors = db.execute("SELECT source, MAX(txn) FROM watermark_floor GROUP BY source").fetchall()
    except sqlite3.OperationalError:  # a store from before retention
        floors = []
    for source, floor in floors:
        top[source] = max(top.get(source, 0), int(floor))
    return top


def read_snapshot(path: Path) -> StoreSnapshot | None:
    """A snapshot of the store at ``path``, or None if there is none (yet) or it is unreadable."""
    with read_only(path) as store:
        if store is None:
            return None
        try:
            return snapshot(store)
        except sqlite3.DatabaseError:
            return None


def read_meta(path: Path) -> dict[str, str] | None:
    with read_only(path) as store:
        if store is None:
            return None
        try:
            return store.meta()
        except sqlite3.DatabaseError:
            return None


@contextmanager
def read_only(path: Path) -> Iterator[SiteStore | None]:
    """A site's store opened read-only, or None if it does not exist or cannot be read yet
    (being created or replaced under us)."""
    if not path.exists():
        yield None
        return
    try:
        store = SiteStore(path, readonly=True)
    except StoreError:
        yield None
        return
    try:
        yield store
    finally:
        store.close()


def _object_row(row: tuple[Any, ...]) -> dict[str, Any]:
    payload: dict[str, Any] = json.loads(row[7])
    payload.update(
        id=row[0], kind=row[1], origin=row[2], def_uid=row[3], name=row[4], revision=row[5],
        deleted=bool(row[6]),
    )
    return payload


def check_backup_file(path: Path, *, site_code: str, lab: str) -> dict[str, str]:
    """Open a backup's database read-only and make sure it is a whole store of this site."""
    if not path.exists():
        raise CorruptBackup(f"backup database {path} is missing")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            (ok,) = db.execute("PRAGMA integrity_check").fetchone()
            if ok != "ok":
                raise CorruptBackup(f"backup database {path} fails its integrity check: {ok}")
            meta = dict(db.execute("SELECT k, v FROM meta").fetchall())
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        raise CorruptBackup(f"backup database {path} is not a readable site store: {exc}") from exc
    if meta.get("site_code") != site_code:
        raise CorruptBackup(
            f"backup {path.parent.name} belongs to site {meta.get('site_code')!r}, not {site_code}"
        )
    if meta.get("lab") != lab:
        raise CorruptBackup(
            f"backup {path.parent.name} belongs to lab {meta.get('lab')!r}, not {lab!r}"
        )
    return meta

