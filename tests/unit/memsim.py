"""A lab of real ``SiteRuntime``s, real SQLite stores and real client stores, wired over the
in-memory broker and driven by its virtual clock: whole-lab tests without RabbitMQ or
processes, fast and replayable from a seed.

The lab directory has the layout of ``emulator.lab.LabDir`` (``sites/<CODE>/site.db``,
``clients.db``), so ``emulator.checker`` judges it from the stores. Every site is "down" to
the checker (no process), so ``violations()`` leaves those out.
"""

from __future__ import annotations

import json
import random
import shutil
import sqlite3
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker import names
from broker.memory import Loop, MemoryBroker, MemoryTransport, Message
from emulator import checker, history
from emulator.lab import LabDir, LabInfo
from emulator.topology import Topology, parse_topology
from sites.clients import ClientStore
from sites.runtime import SiteRuntime
from sites.store import SiteStore

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


@dataclass
class SimSite:
    code: str
    store: SiteStore
    clients: ClientStore | None
    transport: MemoryTransport
    runtime: SiteRuntime
    alive: bool = True


class SimLab:
    def __init__(self, root: Path, topology: Topology | None = None, *, seed: int = 0,
                 lab_id: str = LAB_ID) -> None:
        self.topology = topology or three_sites()
        self.lab_id = lab_id
        self.loop = Loop(seed)
        self.broker = MemoryBroker(self.loop)
        self.broker.declare_lab(lab_id, self.topology.codes, self.topology.settings.queue_type,
                                self.topology.links())
        self.dir = LabDir(root / "lab")
        self.info = LabInfo(lab_id=lab_id, amqp_url="memory://", created=0.0, topology=self.topology)
        self.sites: dict[str, SimSite] = {}
        self.seed = seed
        self._starts: dict[str, int] = {}
        self._requests = 0

    # -- sites ----------------------------------------------------------------------------

    def start_all(self) -> None:
        for code in self.topology.depth_order():
            self.start(code)

    def start(self, code: str, *, recover: str | None = None) -> SimSite:
        """What ``python -m sites`` does, with a memory transport and the virtual clock."""
        assert code not in self.sites or not self.sites[code].alive, f"{code} is running"
        topo = self.topology
        store = SiteStore(self.dir.site_db(code))
        SiteRuntime.initialize_store(store, lab=self.lab_id, topology=topo, site=code,
                                     store_id=f"{code}-{self.seed}", created=self.loop.now)
        self._starts[code] = self._starts.get(code, 0) + 1
        rng = random.Random(f"{self.seed}:{code}:{self._starts[code]}")  # run ids, object definitions
        spec = topo.site(code)
        clients = (ClientStore(self.dir.clients_db(code), code, topo.clients_of(code))
                   if spec.type != "central" or topo.clients_of(code) else None)
        transport = MemoryTransport(self.broker, lab=self.lab_id, site=code,
                                    prefetch=topo.settings.prefetch, queue_type=topo.settings.queue_type,
                                    neighbours=[p for p in [topo.parent(code), *topo.children(code)] if p])
        # The ignores: broker.memory has its own Delivery (broker.transport's module imports pika).
        runtime = SiteRuntime(lab=self.lab_id, topology=topo, site=code, store=store, clients=clients,
                              transport=transport, clock=self.loop.time, rng=rng)  # type: ignore[arg-type]
        if recover:
            runtime.recovery.begin(recover, None)
        transport.connect(runtime)  # type: ignore[arg-type]
        site = self.sites[code] = SimSite(code, store, clients, transport, runtime)
        return site

    def crash(self, code: str) -> None:
        """kill -9: the connection drops, the process's files are closed as they are."""
        site = self.sites[code]
        site.transport.crash()
        site.store.close()
        if site.clients:
            site.clients.close()
        site.alive = False

    def stop(self, code: str) -> None:
        site = self.sites[code]
        site.runtime.shutdown()
        self.loop.run_for(0.05)  # the close frame reaches the broker
        site.store.close()
        if site.clients:
            site.clients.close()
        site.alive = False

    def close(self) -> None:
        for code, site in self.sites.items():
            if site.alive:
                self.crash(code)

    def backup(self, code: str, dest: Path) -> Path:
        """``smslab backup``: an SQLite online backup of the running site's store."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        self.sites[code].store.backup_to(dest)
        return dest

    def restore(self, code: str, backup: Path) -> None:
        """``backup.replace_store`` on a stopped site: its history merged first, then the store
        is replaced (the clients are not), and the harness records it."""
        assert not self.sites[code].alive
        history.merge(self.dir, self.info)
        history.record(self.dir, "store", link=code, site=code, at=self.loop.now,
                       detail={"action": "restore", "backup": str(backup)})
        db = self.dir.site_db(code)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        shutil.copyfile(backup, db)

    # -- driving ----------------------------------------------------------------------------

    def run(self, seconds: float) -> None:
        self.loop.run_for(seconds)

    def run_until(self, what: str, predicate: Any, timeout: float = 30.0) -> None:
        if not self.loop.run_until_true(predicate, timeout=timeout):
            raise AssertionError(f"not within {timeout} virtual seconds: {what}")

    def control(self, code: str, command: dict[str, Any], request_id: str | None = None,
                timeout: float = 5.0) -> dict[str, Any]:
        """``broker.admin.control_request`` on the memory broker."""
        self._requests += 1
        reply = f"amq.gen-mem-{self._requests}"
        self.broker.declare_queue(reply)
        corr = request_id or f"req-{self._requests}"
        routed = self.broker.publish(names.exchange(self.lab_id), names.control_key(code),
                                     json.dumps(command).encode(), reply_to=reply, correlation_id=corr,
                                     mandatory=True)
        assert routed, f"no control queue for {code}"
        answer: dict[str, Any] = {}

        def answered() -> bool:
            msg = self.broker.get(reply)
            if msg is not None and msg.correlation_id == corr:
                answer.update(json.loads(msg.body))
            return bool(answer)

        self.run_until(f"{code} to answer {command}", answered, timeout=timeout)
        self.broker.delete_queue(reply)
        return answer

    def pause(self) -> None:
        for code in self.topology.depth_order():
            assert self.control(code, {"cmd": "pause-workload"})["ok"]

    def violations(self) -> list[checker.Violation]:
        report = checker.check(self.dir, self.info, confirm=0)
        # no processes here: every site is "down"; a loss a recovery could not undo is history
        return [v for v in report.violations if v.kind not in ("down", "lost_before_recovery")]

    def settle(self, timeout: float = 30.0) -> None:
        """Pause the workload and run until the checker finds nothing (but no processes)."""
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
            dump = {t: sorted(self.query(code, f"SELECT * FROM {t}"), key=repr) for t in sorted(tables)}
            # made at the first start from the wall clock and uuid4 (see the report)
            dump["meta"] = [r for r in dump["meta"] if r[0] not in ("created", "store_id")]
            out[code] = dump
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
    import random

    rng = random.Random(seed)

    def uuid4() -> uuid.UUID:
        return uuid.UUID(int=rng.getrandbits(128), version=4)

    return uuid4
