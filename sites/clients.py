"""Simulated clients and the workload generator of one site.

Clients are not part of their site: like real client machines, their state (the inventory
version each has reached) lives in its own database beside the site's and is never
restored with the site. The site asks them for a full report after a recovery.
"""

from __future__ import annotations

import random
import sqlite3
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from emulator.topology import Workload


def client_ids(site: str, count: int) -> list[str]:
    return [f"{site}-C{i:03d}" for i in range(1, count + 1)]


class ClientStore:
    """Each client's own counters: inventory and discovery versions."""

    def __init__(self, path: Path, site: str, count: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None, timeout=10)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS client (id TEXT PRIMARY KEY, inventory INTEGER NOT NULL,"
            " discovery INTEGER NOT NULL)"
        )
        self.ids = client_ids(site, count)
        self.db.executemany(
            "INSERT OR IGNORE INTO client(id, inventory, discovery) VALUES(?, 0, 0)",
            [(c,) for c in self.ids],
        )

    def bump(self, client: str, what: Literal["inventory", "discovery"]) -> int:
        """The client makes a new report: its version moves on, whatever the site does."""
        self.db.execute(f"UPDATE client SET {what}={what}+1 WHERE id=?", (client,))
        (version,) = self.db.execute(f"SELECT {what} FROM client WHERE id=?", (client,)).fetchone()
        return int(version)

    def inventory_of(self, clients: list[str]) -> dict[str, int]:
        """The inventory versions these clients have reached (0 for one never seen)."""
        have: dict[str, int] = {}
        for start in range(0, len(clients), 500):
            part = clients[start:start + 500]
            marks = ",".join("?" * len(part))
            have.update(self.db.execute(f"SELECT id, inventory FROM client WHERE id IN ({marks})", part))
        return {c: int(have.get(c, 0)) for c in clients}

    def reported(self, reports: list[tuple[str, int]]) -> None:
        """Synthetic clients (a burst's) made these inventory reports: each is a client from
        its first report on, its version kept here like any client's (never rolled back with
        the site), so the checker knows what it produced and a restored site catches up."""
        self.db.execute("BEGIN")
        try:
            self.db.executemany(
                "INSERT INTO client(id, inventory, discovery) VALUES(?, ?, 0)"
                " ON CONFLICT(id) DO UPDATE SET inventory=max(inventory, excluded.inventory)", reports)
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def versions(self) -> dict[str, tuple[int, int]]:
        return {
            c: (i, d)
            for c, i, d in self.db.execute("SELECT id, inventory, discovery FROM client")
        }

    def close(self) -> None:
        self.db.close()


def read_client_versions(path: Path) -> dict[str, tuple[int, int]]:
    if not path.exists():
        return {}
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {c: (i, d) for c, i, d in db.execute("SELECT id, inventory, discovery FROM client")}
    finally:
        db.close()


def inventory_payload(client: str, version: int) -> dict[str, object]:
    """A client's hardware and software inventory at a version: the same every time."""
    h = zlib.crc32(f"{client}:{version}".encode())  # cheaper than seeding a Random per report
    return {
        "client": client,
        "version": version,
        "hw": {"ram_mb": (64, 128, 256)[h % 3], "disk_gb": 2 + (h >> 2) % 39},
        "sw": [f"app{1 + (h >> s) % 50}" for s in (8, 14, 20)],
    }


@dataclass
class Due:
    inventory: list[str] = field(default_factory=list)
    discovery: list[str] = field(default_factory=list)
    status: int = 0
    objects: int = 0
    control: int = 0

    def __bool__(self) -> bool:
        return bool(self.inventory or self.discovery or self.status or self.objects or self.control)


class WorkloadClock:
    """Decides what is due at each tick from the configured intervals (seeded jitter)."""

    def __init__(self, site: str, clients: list[str], workload: Workload, *, has_objects: bool,
                 has_children: bool, now: float) -> None:
        self.rng = random.Random(site)
        self.w = workload
        self.has_objects = has_objects
        self.has_children = has_children
        self.next_inv = {c: now + self._first(workload.inventory_interval) for c in clients}
        self.next_disc = {c: now + self._first(workload.discovery_interval) for c in clients}
        self.next_status = now + self._first(workload.status_interval)
        self.next_object = now + self._first(workload.object_interval)
        self.next_control = now + self._first(workload.scf_interval)

    def set(self, workload: Workload, now: float) -> None:
        """New rates from now on; what they change is due again within one new interval."""
        old, self.w = self.w, workload
        if workload.inventory_interval != old.inventory_interval:
            self.next_inv = {c: now + self._first(workload.inventory_interval) for c in self.next_inv}
        if workload.discovery_interval != old.discovery_interval:
            self.next_disc = {c: now + self._first(workload.discovery_interval) for c in self.next_disc}
        if workload.status_interval != old.status_interval:
            self.next_status = now + self._first(workload.status_interval)
        if workload.object_interval != old.object_interval:
            self.next_object = now + self._first(workload.object_interval)
        if workload.scf_interval != old.scf_interval:
            self.next_control = now + self._first(workload.scf_interval)

    def _first(self, interval: float) -> float:
        return self.rng.uniform(0, interval) if interval > 0 else float("inf")

    def _again(self, interval: float) -> float:
        return interval * self.rng.uniform(0.8, 1.2) if interval > 0 else float("inf")

    def next_at(self) -> float:
        """When something is due next (inf: never)."""
        at = min(self.next_status, min(self.next_inv.values(), default=float("inf")),
                 min(self.next_disc.values(), default=float("inf")))
        if self.has_objects:
            at = min(at, self.next_object)
        if self.has_children:
            at = min(at, self.next_control)
        return at

    def due(self, now: float) -> Due:
        out = Due()
        for client, at in self.next_inv.items():
            if at <= now:
                out.inventory.append(client)
                self.next_inv[client] = now + self._again(self.w.inventory_interval)
        for client, at in self.next_disc.items():
            if at <= now:
                out.discovery.append(client)
                self.next_disc[client] = now + self._again(self.w.discovery_interval)
        if self.next_status <= now:
            out.status = 1
            self.next_status = now + self._again(self.w.status_interval)
        if self.has_objects and self.next_object <= now:
            out.objects = 1
            self.next_object = now + self._again(self.w.object_interval)
        if self.has_children and self.next_control <= now:
            out.control = 1
            self.next_control = now + self._again(self.w.scf_interval)
        return out
