"""The simulator's lab (``emulator.sim.SimLab``: real ``SiteRuntime``s, SQLite stores and
client stores on the in-memory broker and its virtual clock) with the shortcuts the unit
tests use: a three-site topology, raw backups to a file, assertions that wait."""

from __future__ import annotations

import json
import random
import shutil
import sqlite3
import uuid
from pathlib import Path
from typing import Any

from broker.memory import Message
from emulator import checker, history, sim
from emulator.lab import LabDir
from emulator.topology import Topology, parse_topology

LAB_ID = "mem-000001"

TOPOLOGY = """
lab: mem
mode: {mode}
defaults:
  clients: 2
  workload:
    inventory_interval: 0.5
    discovery_interval: 2.0
    status_interval: 2.0
    object_interval: 1.0
    scf_interval: 3.0
settings:
  sync_interval: 0.3
  resend_after: 1.0
  degraded_after: 4
  failed_after: 8
sites:
  - {{code: CEN, type: central, clients: 0}}
  - {{code: P01, type: primary, parent: CEN}}
  - {{code: S01, type: secondary, parent: P01, clients: 3}}
"""


def three_sites(mode: str = "sms20") -> Topology:
    return parse_topology(TOPOLOGY.format(mode=mode), "memsim-topology.yaml")


def data_from(source: str) -> Any:
    """A fault filter: packets from ``source`` that carry data envelopes."""
    marker = f'"source":"{source}"'.encode()

    def where(msg: Message) -> bool:
        return marker in msg.body[:120] and b'"kind":"data"' in msg.body

    return where


class SimLab(sim.SimLab):
    """``emulator.sim.SimLab`` with the shortcuts these tests use."""

    def __init__(self, root: Path, topology: Topology | None = None, *, seed: int = 0,
                 lab_id: str = LAB_ID, identities: bool = False) -> None:
        super().__init__(LabDir(root / "lab"), topology or three_sites(), seed=seed, lab_id=lab_id,
                         identities=identities)

    def start_all(self, *, timeout: float = 30.0) -> None:
        for code in self.topology.depth_order():
            self.start(code, wait=False)

    def crash(self, code: str) -> None:
        self.kill(code)

    def backup(self, code: str, dest: Path) -> Path:  # type: ignore[override]
        """An SQLite online backup of the running site's store, to a file of the test's."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        self.sites[code].store.backup_to(dest)
        return dest

    def restore(self, code: str, backup: Path) -> None:
        """``backup.replace_store`` on a stopped site: its history merged first, then the store
        is replaced (the clients are not), and the harness records it."""
        assert not self.running(code)
        history.merge(self.dir, self.info)
        history.record(self.dir, "store", link=code, site=code, at=self.loop.now,
                       detail={"action": "restore", "backup": str(backup)})
        db = self.dir.site_db(code)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        shutil.copyfile(backup, db)

    def run_until(self, what: str, predicate: Any, timeout: float = 30.0) -> None:
        if not self.wait_for(predicate, timeout=timeout):
            raise AssertionError(f"not within {timeout} virtual seconds: {what}")

    def control(self, code: str, command: dict[str, Any], request_id: str | None = None,  # type: ignore[override]
                timeout: float = 5.0) -> dict[str, Any]:
        return super().control(code, command, timeout=timeout, request_id=request_id)

    def pause(self) -> None:  # type: ignore[override]
        for code in self.topology.depth_order():
            assert self.control(code, {"cmd": "pause-workload"})["ok"]

    def violations(self) -> list[checker.Violation]:
        report = self.check()
        # a loss a recovery could not undo is history
        return [v for v in report.violations if v.kind not in ("down", "lost_before_recovery")]

    def settle(self, timeout: float = 30.0) -> None:
        """Pause the workload and run until the checker finds nothing."""
        self.pause()
        last: list[checker.Violation] = []

        def converged() -> bool:
            nonlocal last
            last = self.violations()
            return not last

        if not self.loop.run_until_true(converged, timeout=timeout, poll=0.5):
            shown = "\n".join(f"  {v.kind} {v.site}: {v.detail}" for v in last[:20])
            raise AssertionError(f"the lab did not converge in {timeout} virtual seconds:\n{shown}")

    # -- reading the stores ---------------------------------------------------------------

    def query(self, code: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        db = sqlite3.connect(f"file:{self.dir.site_db(code)}?mode=ro", uri=True)
        try:
            return db.execute(sql, args).fetchall()
        finally:
            db.close()

    def link(self, code: str, peer: str) -> dict[str, Any]:
        (state,) = self.query(code, "SELECT state FROM link WHERE peer=?", peer)[0]
        return json.loads(state)  # type: ignore[no-any-return]

    def snapshot(self) -> dict[str, dict[str, list[tuple[Any, ...]]]]:
        """Every table of every store, sorted: two equal runs give equal snapshots."""
        out: dict[str, dict[str, list[tuple[Any, ...]]]] = {}
        for code in self.topology.codes:
            tables = [t for (t,) in self.query(code, "SELECT name FROM sqlite_master WHERE type='table'")]
            out[code] = {t: sorted(self.query(code, f"SELECT * FROM {t}"), key=repr) for t in sorted(tables)}
            clients = self.dir.clients_db(code)
            if clients.exists():
                db = sqlite3.connect(clients)
                try:
                    out[code]["clients"] = sorted(db.execute("SELECT * FROM client").fetchall())
                finally:
                    db.close()
        return out


def seeded_uuid4(seed: int) -> Any:
    """A stand-in for ``uuid.uuid4`` that repeats for a seed (object definition IDs)."""

    rng = random.Random(seed)

    def uuid4() -> uuid.UUID:
        return uuid.UUID(int=rng.getrandbits(128), version=4)

    return uuid4
