"""``smslab sim``: a whole lab in one process, on the in-memory broker and a virtual clock.

Theory of operation
-------------------
Every site is its real ``SiteRuntime`` with its real SQLite store, client store and the pure
protocol core, exactly as ``python -m sites`` builds it, but on a ``broker.memory``
transport and the ``Loop``'s virtual clock instead of pika and the wall clock. Nothing in
``sites/`` or the core knows: they get a clock, a random generator (run ids, object
definitions) and a process id, as they do in a process.

The harness's verbs have the same meaning as on real processes (``emulator.faults``,
``emulator.orchestrator``, ``emulator.recover``) and leave the same events in the same lab
directory, so the same checker judges it and the same report draws it:

    kill / stop / start / restart   the site's transport crashes (kill -9: nothing more runs,
                                    the broker requeues what it had not acked) or closes; a
                                    start builds the site again from its store
    pause / resume                  SIGSTOP: the site's frames and timers wait; the broker
                                    closes its connection after missed heartbeats
    restore / wipe / recover        the store replaced from a backup (``emulator.backup``),
                                    the recovery agent started with its recovery id
    partition drop duplicate        the link's routing key diverted to its relay queue, whose
    reorder delay                   messages the fault's seeded ``Shaper`` releases, as the
                                    lab's fault daemon does on RabbitMQ
    disconnect                      the site's connections closed and refused until healed
    alarm                           the broker's memory alarm: publishers blocked
    broker-restart                  every connection lost, none taken for a moment; durable
                                    queues keep their messages

Everything random comes from the seed: the loop's tie breaks and latencies, the sites'
generators, the faults' shapers, the ids of backups and recoveries. The same seed gives the
same run: the same history and the same stores, byte for byte.
"""

from __future__ import annotations

import atexit
import json
import os
import random
import shutil
import tempfile
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker import names
from broker.memory import Loop, MemoryBroker, MemoryTransport, Message
from emulator import backup, checker, faults, history, recover
from emulator.errors import ConfigError, LabError
from emulator.lab import BrokerRef, LabDir, LabInfo
from emulator.protocol import admission
from emulator.protocol.shaping import Release, Shaper, envelopes_in
from emulator.runner import RunResult, run_scenario
from emulator.scenario import Scenario
from emulator.topology import Topology
from sites.clients import ClientStore
from sites.runtime import SiteRuntime
from sites.store import SiteStore

Progress = Callable[[str], None]

SCRATCH = Path("/dev/shm")  # tmpfs: the stores of a run live here while it runs
SCRATCH_FREE = 2 << 30  # ... when it has this much room
BROKER_RESTART_DOWNTIME = 3.0  # seconds a restarted broker takes no connection (stop_app, start_app)
ATTACH_TIMEOUT = 30.0


def _quiet(_msg: str) -> None:
    pass


@dataclass
class SimSite:
    code: str
    pid: int
    store: SiteStore
    clients: ClientStore | None
    transport: MemoryTransport
    runtime: SiteRuntime
    alive: bool = True


@dataclass
class SimFault:
    """A fault that is on, as ``emulator.faults.FaultSpec`` is on RabbitMQ."""

    id: str
    kind: str
    target: str
    seed: int
    since: float
    links: list[tuple[str, str]] = field(default_factory=list)
    site: str | None = None
    params: dict[str, float] = field(default_factory=dict)
    until: float | None = None
    stats: faults.FaultStats = field(default_factory=faults.FaultStats)
    relays: list[Relay] = field(default_factory=list)

    def describe(self) -> str:
        params = " ".join(f"{k}={v:g}" for k, v in sorted(self.params.items()))
        return f"{self.kind} {self.target}" + (f" {params}" if params else "")


class Relay:
    """One directed link's relay: what ``broker.relay.LinkRelay`` does on RabbitMQ. Its queue's
    messages go to the fault's shaper as they are routed; what the shaper releases is
    republished to the receiver's own key (which no fault diverts), in order."""

    def __init__(self, lab: SimLab, fault: SimFault, sender: str, receiver: str, shaper: Shaper) -> None:
        self.lab = lab
        self.fault = fault
        self.sender = sender
        self.receiver = receiver
        self.shaper = shaper
        self.name = f"{sender}->{receiver}"
        self.stats = fault.stats.links.setdefault(self.name, faults.LinkStats())
        self.held: dict[int, Message] = {}  # with its publisher's user_id, which the relay keeps
        self.next_mid = 0
        self._out: deque[Message] = deque()
        self._out_last = 0.0
        self._due_at: float | None = None
        self.queue = lab.broker.divert_link(lab.lab_id, sender, receiver)
        self.queue.tap = self._arrived

    def _arrived(self, msg: Message) -> None:
        self.next_mid += 1
        self.held[self.next_mid] = msg
        self.stats.seen += 1
        self.stats.envelopes_seen += envelopes_in(msg.body)[0]
        self._release(self.shaper.arrive(self.next_mid, self.lab.loop.now))
        self._arm()

    def _arm(self) -> None:
        due = self.shaper.next_due()
        if due is None or (self._due_at is not None and self._due_at <= due):
            return
        self._due_at = due
        self.lab.loop.call_at(due, self._tick)

    def _tick(self) -> None:
        self._due_at = None
        if self.queue.tap is None:
            return  # healed
        self._release(self.shaper.due(self.lab.loop.now))
        self._arm()

    def _release(self, releases: list[Release]) -> None:
        for release in releases:
            held = self.held.pop(release.mid, None)
            if held is None:
                continue
            count, first, last = envelopes_in(held.body) if release.copies != 1 else (0, None, None)
            for _ in range(release.copies):
                self._forward(held)
            if release.copies == 0:
                self.stats.dropped += 1
                self.stats.envelopes_dropped += count
                self._event("dropped", count, first, last)
            elif release.copies > 1:
                self.stats.duplicated += release.copies - 1
                self.stats.envelopes_duplicated += count * (release.copies - 1)
                self._event("duplicated", count, first, last)
        self.stats.held = len(self.held)

    def _forward(self, msg: Message) -> None:
        """Republish on the relay's own connection: one latency later, in order."""
        loop, broker = self.lab.loop, self.lab.broker
        self._out.append(msg)
        self._out_last = max(loop.now + broker.latency, self._out_last)
        loop.call_at(self._out_last, self._publish_head)

    def _publish_head(self) -> None:
        if not self._out:
            return
        broker = self.lab.broker
        head = self._out[0]
        if not broker.publish(names.exchange(self.lab.lab_id), names.site_key(self.receiver), head.body,
                              user_id=head.user_id):
            # the receiver's inbox is gone for a moment (deleted, not yet declared again)
            self.lab.loop.call_later(0.5, self._publish_head)
            return
        self._out.popleft()
        self.stats.forwarded += 1

    def _event(self, action: str, count: int, first: int | None, last: int | None) -> None:
        history.record(self.lab.dir, "relay", link=self.name, fault=self.fault.id, seq=first, at=self.lab.loop.now,
                       detail={"action": action, "envelopes": count, "last_seq": last})

    def shut(self) -> None:
        """Healed: the link goes to the inbox again, and what the relay held goes, in the order
        it arrived."""
        self.lab.broker.restore_link(self.lab.lab_id, self.sender, self.receiver)
        self.queue.tap = None
        for release in self.shaper.release_all():
            held = self.held.pop(release.mid, None)
            if held is not None:
                self._forward(held)
        for held in list(self.held.values()):
            self._forward(held)
        self.held.clear()
        self.stats.held = 0

    @property
    def drained(self) -> bool:
        return not self._out and not self.held


class SimLab:
    """A lab of real site runtimes on the in-memory broker; see the module's text."""

    def __init__(self, lab_dir: LabDir, topology: Topology, *, seed: int = 0, lab_id: str | None = None,
                 latency: float = 0.002, jitter: float = 0.002, identities: bool = False) -> None:
        self.topology = topology
        self.seed = seed
        self.lab_id = lab_id or f"{topology.lab}-sim{seed}"
        # Per-site broker identities, as RabbitMQ's validated user_id gives them: each site's
        # transport publishes as its own user, the harness as the controller.
        self.identities = (admission.Identities(
            sites={code: names.broker_user(self.lab_id, code) for code in topology.codes},
            controller=names.broker_user(self.lab_id, names.CONTROLLER)) if identities else None)
        self.controller = self.identities.controller if self.identities else None
        self.loop = Loop(seed)
        self.broker = MemoryBroker(self.loop, latency=latency, jitter=jitter)
        self.broker.declare_lab(self.lab_id, topology.codes, topology.settings.queue_type, topology.links())
        self.dir = lab_dir
        self._scratch = _scratch_sites(lab_dir)
        self.info = LabInfo(lab_id=self.lab_id, amqp_urls=["memory://"], created=self.loop.now, topology=topology,
                            broker=BrokerRef(kind="simulated", owned=False))
        lab_dir.save(self.info)
        self.rng = random.Random(f"smslab-sim:{seed}")  # ids of backups, recoveries, fault seeds
        self.sites: dict[str, SimSite] = {}
        self.faults: dict[str, SimFault] = {}
        self._starts: dict[str, int] = {}
        self._pids = 1000
        self._fault_ids = 0
        self._requests = 0

    # -- time ---------------------------------------------------------------------------------

    @property
    def now(self) -> float:
        return self.loop.now

    def run(self, seconds: float) -> None:
        self.loop.run_for(seconds)

    def wait_for(self, predicate: Callable[[], object], *, timeout: float, poll: float = 0.1) -> bool:
        return self.loop.run_until_true(predicate, timeout=timeout, poll=poll)

    def _record(self, kind: str, **fields: Any) -> None:
        history.record(self.dir, kind, at=self.loop.now, **fields)

    def new_id(self, length: int = 12) -> str:
        return f"{self.rng.getrandbits(4 * length):0{length}x}"

    # -- sites ----------------------------------------------------------------------------------

    def running(self, code: str) -> bool:
        site = self.sites.get(code)
        return site is not None and site.alive

    def running_codes(self) -> set[str]:
        return {code for code, site in self.sites.items() if site.alive}

    def start_all(self, *, timeout: float = ATTACH_TIMEOUT) -> None:
        for code in self.topology.depth_order():
            self.start(code, wait=False)
        self.wait_attached(self.topology.depth_order(), timeout=timeout)

    def start(self, code: str, *, restore: str | None = None, wipe: bool = False, recover: str | None = None,
              reference: str | None = None, wait: bool = True, progress: Progress = _quiet) -> SimSite:
        """``smslab start`` (``restore``/``wipe``: the store replaced first, with no recovery);
        the site is what ``python -m sites`` builds, on the memory transport."""
        topo = self.topology
        topo.site(code)
        if self.running(code):
            raise LabError(f"site {code} is already running (pid {self.sites[code].pid})",
                           hint=f"smslab stop {code} (or kill) first")
        done = backup.replace_store(self.dir, self.info, code, backup_id=restore, wipe=wipe, at=self.loop.now)
        if done:
            progress(f"  {done}, no recovery")
        self.dir.site_dir(code).mkdir(parents=True, exist_ok=True)
        store = SiteStore(self.dir.site_db(code))
        SiteRuntime.initialize_store(store, lab=self.lab_id, topology=topo, site=code,
                                     store_id=f"{code}-{self.seed}-{self.new_id(8)}", created=self.loop.now)
        n = self._starts[code] = self._starts.get(code, 0) + 1
        self._pids += 1
        spec = topo.site(code)
        clients = (ClientStore(self.dir.clients_db(code), code, topo.clients_of(code))
                   if spec.type != "central" or topo.clients_of(code) else None)
        transport = MemoryTransport(self.broker, lab=self.lab_id, site=code, prefetch=topo.settings.prefetch,
                                    queue_type=topo.settings.queue_type,
                                    neighbours=[p for p in [topo.parent(code), *topo.children(code)] if p],
                                    user=self.identities.sites[code] if self.identities else None)
        runtime = SiteRuntime(lab=self.lab_id, topology=topo, site=code, store=store, clients=clients,
                              transport=transport, clock=self.loop.time,
                              rng=random.Random(f"{self.seed}:{code}:{n}"), process_id=self._pids,
                              identities=self.identities)
        if recover:
            runtime.recovery.begin(recover, reference)
        transport.connect(runtime)
        site = self.sites[code] = SimSite(code, self._pids, store, clients, transport, runtime)
        self._record("process", link=code, site=code,
                     detail={"action": "start", "pid": site.pid, "restore": restore, "wipe": wipe})
        if wait:
            self.wait_attached([code], timeout=ATTACH_TIMEOUT)
        return site

    def wait_attached(self, codes: list[str], *, timeout: float) -> None:
        def attached() -> bool:
            return all(self.sites[c].transport.ready for c in codes if self.running(c))

        if not self.wait_for(attached, timeout=timeout):
            late = [c for c in codes if self.running(c) and not self.sites[c].transport.ready]
            raise LabError(f"not attached to the broker within {timeout:.0f}s: {', '.join(late)}",
                           hint="is a disconnect fault or a broker restart on? (smslab faults)")

    def _unpause(self, code: str) -> None:
        for fault in list(self.faults.values()):
            if fault.kind == "pause" and fault.site == code:
                self.heal(fault.id)

    def kill(self, code: str) -> int:
        """kill -9: the connection drops, the process's files are closed as they are."""
        site = self._site(code)
        self._unpause(code)
        site.transport.crash()
        self._close_files(site)
        self._record("process", link=code, site=code, detail={"action": "kill", "pid": site.pid})
        return site.pid

    def stop(self, code: str) -> int:
        """SIGTERM: the site stops between two deliveries; its last frames reach the broker."""
        site = self._site(code)
        self._unpause(code)
        site.runtime.shutdown()
        self.wait_for(lambda: site.transport.connection is None or not site.transport.connection.open,
                       timeout=5.0, poll=0.01)
        site.transport.crash()  # whatever did not close in time: SIGKILL
        self._close_files(site)
        self._record("process", link=code, site=code, detail={"action": "stop", "pid": site.pid})
        return site.pid

    def restart(self, code: str) -> int:
        if self.running(code):
            self.stop(code)
        return self.start(code).pid

    def _site(self, code: str) -> SimSite:
        self.topology.site(code)
        site = self.sites.get(code)
        if site is None or not site.alive:
            raise LabError(f"site {code} is not running", hint=f"smslab start {code}")
        return site

    @staticmethod
    def _close_files(site: SimSite) -> None:
        site.store.close()
        if site.clients:
            site.clients.close()
        site.alive = False

    def close(self) -> None:
        """The end of the run: every site stops as it is (its stores are closed)."""
        for fault in list(self.faults.values()):
            if fault.kind in ("pause", "alarm", "disconnect"):
                self._undo(fault)
        for site in self.sites.values():
            if site.alive:
                site.transport.crash()
                self._close_files(site)
        self._unscratch()

    def _unscratch(self) -> None:
        """The stores back into the lab directory from the scratch space (once)."""
        scratch, self._scratch = self._scratch, None
        if scratch is not None:
            atexit.unregister(scratch.restore)
            scratch.restore()

    # -- backups and recovery -----------------------------------------------------------------

    def backup(self, code: str) -> backup.BackupRecord:
        stamp = f"{int(self.loop.now - self.info.created):07d}"
        return backup.create(self.dir, self.info, code, backup_id=f"{code}-sim{stamp}-{self.new_id(4)}",
                             now=self.loop.now)

    def recover(self, code: str, *, backup_id: str | None = None, wipe: bool = False,
                reference: str | None = None, timeout: float = 120.0, progress: Progress = _quiet) -> dict[str, Any]:
        """``smslab recover``: the store replaced, the recovery agent started, followed to the end."""
        record = recover.in_progress(self.dir, self.info, code, backup_id=backup_id, wipe=wipe, reference=reference)
        if record is None:
            if backup_id:
                backup.verify(self.dir, self.info, backup_id, code)
            record = {"recovery_id": self.new_id(), "site": code, "backup": backup_id, "wipe": wipe,
                      "reference": reference, "started": self.loop.now, "phase": "prepare"}
            if self.running(code):
                self.stop(code)
                progress(f"stopped the running {code}")
            done = backup.replace_store(self.dir, self.info, code, backup_id=backup_id, wipe=wipe, at=self.loop.now)
            if done:
                progress(done)
            recover.save_record(self.dir, code, record)
            progress(f"recovery {record['recovery_id']} of {code}: the agent joins under the reused site code")
        rid = record["recovery_id"]
        if not self.running(code):
            self.start(code, recover=rid, reference=record["reference"], wait=False)
        site = self.sites[code]

        def complete() -> bool:
            return (site.alive and site.store.get_meta("recovery_id") == rid
                    and site.store.get_meta("recovery_phase") == "complete")

        if not self.wait_for(complete, timeout=timeout, poll=0.1):
            phase = site.store.get_meta("recovery_phase") if site.alive else "exited"
            waiting = (site.store.get_meta("recovery_waiting") or "") if site.alive else ""
            record["phase"] = phase or record["phase"]
            recover.save_record(self.dir, code, record)
            raise LabError(f"recovery {rid} of {code} did not finish in {timeout:.0f}s: phase {phase or 'start'},"
                           f" waiting for {waiting.replace(',', ', ') or 'nothing'}",
                           hint=f"the agent keeps trying; smslab recover {code} follows it again")
        record["phase"] = "complete"
        record["finished"] = self.loop.now
        recover.save_record(self.dir, code, record)
        progress(f"recovery {rid} of {code} complete: transaction ID {site.store.get_meta('txn_id')},"
                 f" incarnation {site.store.get_meta('incarnation')}")
        return record

    # -- control commands -----------------------------------------------------------------------

    def control(self, code: str, command: dict[str, Any], *, timeout: float = 10.0,
                request_id: str | None = None) -> dict[str, Any]:
        """``broker.admin.control_request`` on the memory broker: a reply queue, a request, the
        answer (or ``LabError`` when none comes)."""
        self.topology.site(code)
        self._requests += 1
        reply = f"amq.gen-sim-{self._requests}"
        self.broker.declare_queue(reply)
        corr = request_id or f"req-{self._requests}"
        if not self.broker.publish(names.exchange(self.lab_id), names.control_key(code), json.dumps(command).encode(),
                                   reply_to=reply, correlation_id=corr, mandatory=True, user_id=self.controller):
            self.broker.delete_queue(reply)
            raise LabError(f"no control queue for {code}")
        answer: dict[str, Any] = {}

        def answered() -> bool:
            msg = self.broker.get(reply)
            if msg is not None and msg.correlation_id == corr:
                answer.update(json.loads(msg.body))
            return bool(answer)

        got = self.wait_for(answered, timeout=timeout, poll=0.01)
        self.broker.delete_queue(reply)
        if not got:
            raise LabError(f"site {code} did not answer {command.get('cmd')!r} within {timeout:.0f}s",
                           hint=f"is {code} running? (smslab status)")
        return answer

    # -- faults ---------------------------------------------------------------------------------

    def _new_fault(self, kind: str, target: str, *, seed: int | None, for_s: float | None, **fields: Any) -> SimFault:
        self._fault_ids += 1
        fault = SimFault(id=f"f{self._fault_ids}", kind=kind, target=target,
                         seed=seed if seed is not None else self.rng.randrange(2**31), since=self.loop.now,
                         until=self.loop.now + for_s if for_s else None, **fields)
        self.faults[fault.id] = fault
        if for_s:  # the fault daemon's timed heal
            def timed() -> None:
                self.heal(fault.id, wait=False)

            self.loop.call_later(for_s, timed)
        return fault

    def link_fault(self, kind: str, a: str, b: str, *, oneway: bool = False, params: dict[str, float] | None = None,
                   seed: int | None = None, for_s: float | None = None, verify: float | None = None,
                   progress: Progress = _quiet) -> SimFault:
        """``emulator.faults.apply_link_fault``."""
        params = dict(params or {})
        a, b = faults.check_link_fault(self.info.topology, kind, a, b, params)
        links = [(a, b)] if oneway else [(a, b), (b, a)]
        busy = {link: f for f in self.faults.values() for link in f.links}
        for link in links:
            if link in busy:
                other = busy[link]
                raise LabError(f"link {link[0]}->{link[1]} already has fault {other.id} ({other.describe()})",
                               hint=f"heal it first: smslab heal {other.id}")
        fault = self._new_fault(kind, f"{a}->{b}" if oneway else f"{a}<->{b}", seed=seed, for_s=for_s,
                                links=links, params=params)
        for sender, receiver in links:
            fault.relays.append(Relay(self, fault, sender, receiver, faults.shaper_for(kind, fault.seed, params)))
        self._record("fault_on", link=fault.target, fault=fault.id,
                     detail={"kind": kind, "seed": fault.seed, "params": params,
                             "links": [f"{s}->{r}" for s, r in links]})
        progress(f"fault {fault.id}: {fault.describe()} (seed {fault.seed}) is on; checking it on traffic")
        wait = verify if verify is not None else faults.verify_window(self.topology.settings)
        if not self.wait_for(lambda: all(r.stats.seen > 0 for r in fault.relays) or fault.id not in self.faults,
                              timeout=wait, poll=0.05):
            pending = sorted(r.name for r in fault.relays if r.stats.seen == 0)
            down = sorted({p.split("->")[0] for p in pending if not self.running(p.split("->")[0])})
            self.heal(fault.id, verified=False)
            why = f" ({', '.join(down)} not running)" if down else ""
            raise LabError(f"fault {fault.id} did not take effect: no message crossed {', '.join(pending)}"
                           f" within {wait:.0f}s{why}; it was healed",
                           hint=f"start {down[0]} first (smslab start {down[0]})" if down else None)
        return fault

    def disconnect(self, code: str, *, for_s: float | None = None, progress: Progress = _quiet) -> SimFault:
        code = code.upper()
        self.topology.site(code)
        for f in self.faults.values():
            if f.kind == "disconnect" and f.site == code:
                raise LabError(f"{code} is already disconnected by fault {f.id}", hint=f"smslab heal {f.id}")
        fault = self._new_fault("disconnect", code, seed=None, for_s=for_s, site=code)
        closed = self.broker.refuse(names.connection_name(self.lab_id, code))
        fault.stats.closed = closed
        self._record("fault_on", link=code, fault=fault.id, site=code,
                     detail={"kind": "disconnect", "closed": closed, "for": for_s})
        if closed == 0:
            self.heal(fault.id, verified=False)
            raise LabError(f"site {code} has no broker connection to close: fault {fault.id} did not take effect;"
                           " it was healed", hint=f"is {code} running? (smslab status)")
        progress(f"fault {fault.id}: {code} disconnected ({closed} connection(s) closed)")
        return fault

    def pause(self, code: str, *, for_s: float | None = None, progress: Progress = _quiet) -> SimFault:
        code = code.upper()
        site = self._site(code)
        for f in self.faults.values():
            if f.kind == "pause" and f.site == code:
                raise LabError(f"{code} is already paused by fault {f.id}", hint=f"smslab resume {code}")
        fault = self._new_fault("pause", code, seed=None, for_s=for_s, site=code, params={"pid": float(site.pid)})
        site.transport.freeze()
        self._record("fault_on", link=code, fault=fault.id, site=code, detail={"kind": "pause", "pid": site.pid})
        progress(f"fault {fault.id}: {code} paused")
        return fault

    def resume(self, code: str) -> None:
        for fault in list(self.faults.values()):
            if fault.kind == "pause" and fault.site == code:
                self.heal(fault.id)

    def alarm(self, *, for_s: float | None = None, progress: Progress = _quiet) -> SimFault:
        for f in self.faults.values():
            if f.kind == "alarm":
                raise LabError(f"a memory alarm is already on (fault {f.id})", hint=f"smslab heal {f.id}")
        fault = self._new_fault("alarm", "broker", seed=None, for_s=for_s)
        self.broker.set_alarm(True)
        self._record("fault_on", link="broker", fault=fault.id, detail={"kind": "alarm", "for": for_s})
        progress(f"fault {fault.id}: memory alarm on the simulated broker: publishers are blocked")
        return fault

    def broker_restart(self, *, timeout: float = 120.0, progress: Progress = _quiet) -> None:
        running = sorted(self.running_codes())
        before = {c: self.sites[c].transport.connects for c in running}
        self._record("fault_on", link="broker", detail={"kind": "broker-restart"})
        self.broker.restart(BROKER_RESTART_DOWNTIME)
        self.run(BROKER_RESTART_DOWNTIME)
        self._record("fault_off", link="broker", detail={"kind": "broker-restart"})

        def reconnected() -> bool:
            return all(self.sites[c].transport.connects > before[c] for c in running if self.running(c))

        if not self.wait_for(reconnected, timeout=timeout):
            late = [c for c in running if self.running(c) and self.sites[c].transport.connects <= before[c]]
            raise LabError(f"after the broker restart, not reconnected within {timeout:.0f}s: {', '.join(late)}")
        progress(f"broker restarted; {len(running)} site(s) reconnected")

    def _undo(self, fault: SimFault) -> None:
        if fault.relays:
            for relay in fault.relays:
                relay.shut()
        elif fault.kind == "disconnect":
            self.broker.admit(names.connection_name(self.lab_id, fault.site or ""))
        elif fault.kind == "alarm":
            self.broker.set_alarm(False)
        elif fault.kind == "pause":
            site = self.sites.get(fault.site or "")
            if site is not None:
                site.transport.thaw()

    def heal(self, fault_id: str, *, verified: bool = True, wait: bool = True,
             progress: Progress = _quiet) -> SimFault | None:
        """``emulator.faults.heal`` (idempotent: a fault healed meanwhile is None). A link
        fault is off once its relays have forwarded what they held; ``wait=False`` (a timed
        heal, from inside the loop) lets the loop finish that."""
        fault = self.faults.pop(fault_id, None)
        if fault is None:
            return None
        self._undo(fault)
        done: list[bool] = []
        deadline = self.loop.now + 30.0

        def finish() -> None:
            if fault.relays and not all(r.drained for r in fault.relays) and self.loop.now < deadline:
                self.loop.call_later(0.01, finish)
                return
            for relay in fault.relays:
                self.broker.delete_queue(relay.queue.name)
            fault.stats.drained = True
            off: dict[str, Any] = {"kind": fault.kind, "stats": faults.summarize(fault.stats)}
            if not verified:
                off["verified"] = False
            self._record("fault_off", link=fault.target, fault=fault.id, detail=off)
            done.append(True)

        finish()
        if wait:
            self.wait_for(lambda: done, timeout=31.0, poll=0.01)
        progress(f"fault {fault.id} ({fault.describe()}) healed")
        return fault

    def heal_all(self, *, progress: Progress = _quiet) -> list[SimFault]:
        healed = []
        for fault_id in list(self.faults):
            done = self.heal(fault_id, progress=progress)
            if done is not None:
                healed.append(done)
        return healed

    # -- judging --------------------------------------------------------------------------------

    def check(self, *, with_history: bool = True) -> checker.Report:
        return checker.check(self.dir, self.info, confirm=0, with_history=with_history,
                             running=self.running_codes(), now=self.loop.time())

    def applied(self) -> int:
        """Envelopes applied on every link of every running site (from the runtimes)."""
        return sum(link.applied for site in self.sites.values() if site.alive
                   for link in site.runtime.links.values())

    def quiet(self) -> bool:
        """Every link of every running site has nothing in flight (a cheap look before the
        checker reads every store)."""
        for site in self.sites.values():
            if not site.alive:
                return False
            for peer, link in site.runtime.links.items():
                other = self.sites.get(peer)
                if other is None or not other.alive:
                    return False
                back = other.runtime.links.get(site.code)
                if back is None or back.applied_through != link.sent_through or link.acked_through != link.sent_through:
                    return False
        return True


@dataclass
class _Scratch:
    """A lab's ``sites/`` (every store, client store and backup) on tmpfs while the run goes,
    behind a symlink in the lab directory, moved back when the lab closes (or the process
    exits). A simulated kill -9 loses no buffered write, so the stores need no disk while the
    run goes: the same files, written in RAM (a third less CPU for a 500-site lab)."""

    link: Path
    place: Path

    def restore(self) -> None:
        try:
            if self.link.is_symlink():
                self.link.unlink()
                shutil.move(str(self.place), str(self.link))
        except OSError:
            pass  # the lab directory went first (a test's temporary directory)
        shutil.rmtree(self.place, ignore_errors=True)


def _scratch_sites(lab_dir: LabDir) -> _Scratch | None:
    """``SMSLAB_SIM_SCRATCH=off``, no writable tmpfs with room, or a lab directory that has
    sites already: the stores stay where they are."""
    link = lab_dir.path / "sites"
    if os.environ.get("SMSLAB_SIM_SCRATCH", "").lower() in ("off", "0", "no") or os.path.lexists(link):
        return None
    try:
        if shutil.disk_usage(SCRATCH).free < SCRATCH_FREE or not os.access(SCRATCH, os.W_OK):
            return None
        place = Path(tempfile.mkdtemp(prefix="smslab-sim-", dir=SCRATCH))
    except OSError:
        return None
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(place, target_is_directory=True)
    scratch = _Scratch(link, place)
    atexit.register(scratch.restore)
    return scratch


# -- the runner's backend ------------------------------------------------------------------------


class SimBackend:
    """``emulator.runner.Backend`` on a ``SimLab``: a scenario's steps on the virtual clock."""

    poll = 0.5

    def __init__(self, lab_dir: LabDir, *, seed: int, topology: Topology | None = None,
                 lab_id: str | None = None) -> None:
        self.lab_dir = lab_dir
        self.seed = seed
        self.topology = topology
        self.lab_id = lab_id
        self.sim: SimLab | None = None

    def _sim(self) -> SimLab:
        if self.sim is None:
            raise LabError("the simulated lab is not up yet", hint="the first step brings it up")
        return self.sim

    def up(self, topology_path: Path, *, timeout: float, progress: Progress) -> LabInfo:
        from emulator.topology import load_topology

        topology = self.topology or load_topology(topology_path)
        self.sim = SimLab(self.lab_dir, topology, seed=self.seed, lab_id=self.lab_id)
        progress(f"simulated lab {self.sim.lab_id}: {len(topology.codes)} site(s) in this process, seed {self.seed}")
        self.sim.start_all(timeout=timeout)
        progress(f"all {len(topology.codes)} site(s) attached at {self.sim.now - self.sim.info.created:.2f}s"
                 " (virtual)")
        return self.sim.info

    def load(self) -> LabInfo:
        return self._sim().info

    def now(self) -> float:
        return self._sim().loop.now

    def sleep(self, seconds: float) -> None:
        self._sim().run(seconds)

    def running(self, site: str) -> bool:
        return self._sim().running(site)

    def kill(self, site: str) -> None:
        self._sim().kill(site)

    def stop(self, site: str) -> None:
        self._sim().stop(site)

    def restart(self, site: str) -> None:
        self._sim().restart(site)

    def start(self, site: str, *, restore: str | None = None, wipe: bool = False, progress: Progress) -> None:
        self._sim().start(site, restore=restore, wipe=wipe, progress=progress)

    def pause(self, site: str, *, for_s: float | None = None) -> None:
        self._sim().pause(site, for_s=for_s)

    def resume(self, site: str) -> None:
        self._sim().resume(site)

    def backup(self, site: str) -> str:
        return self._sim().backup(site).id

    def recover(self, site: str, *, backup_id: str | None, wipe: bool, reference: str | None, timeout: float,
                progress: Progress) -> None:
        self._sim().recover(site, backup_id=backup_id, wipe=wipe, reference=reference, timeout=timeout,
                            progress=progress)

    def link_fault(self, kind: str, a: str, b: str, *, oneway: bool, params: dict[str, float], seed: int,
                   for_s: float | None, progress: Progress) -> tuple[str, str]:
        fault = self._sim().link_fault(kind, a, b, oneway=oneway, params=params, seed=seed, for_s=for_s,
                                       progress=progress)
        return fault.id, fault.describe()

    def disconnect(self, site: str, *, for_s: float | None, progress: Progress) -> str:
        return self._sim().disconnect(site, for_s=for_s, progress=progress).id

    def alarm(self, *, for_s: float | None, progress: Progress) -> str:
        return self._sim().alarm(for_s=for_s, progress=progress).id

    def broker_restart(self, *, progress: Progress) -> None:
        self._sim().broker_restart(progress=progress)

    def heal(self, fault_id: str, *, progress: Progress) -> None:
        self._sim().heal(fault_id, progress=progress)

    def heal_all(self, *, progress: Progress) -> None:
        self._sim().heal_all(progress=progress)

    def control(self, site: str, command: dict[str, Any]) -> dict[str, Any]:
        return self._sim().control(site, command)

    def applied(self) -> int:
        return self._sim().applied()

    def quiet(self) -> bool:
        return self._sim().quiet()

    def check(self, *, with_history: bool = True) -> checker.Report:
        return self._sim().check(with_history=with_history)

    def simulated(self) -> float | None:
        return None if self.sim is None else round(self.sim.now - self.sim.info.created, 6)

    def down(self, *, progress: Progress) -> None:
        sim = self._sim()
        sim.heal_all(progress=progress)
        sim.close()
        history.merge(self.lab_dir, sim.info)
        progress(f"stopped {len(sim.topology.codes)} simulated site(s) at {sim.now - sim.info.created:.1f}s"
                 f" (virtual); {sim.loop.events_run} events run")


# -- runs and sweeps -------------------------------------------------------------------------------


def replay_command(source: str, seed: int, extra: str = "") -> str:
    return f"smslab sim {source} --seed {seed}" + (f" {extra}" if extra else "")


def simulate(scenario: Scenario, *, seed: int | None = None, run_dir: Path, scenario_path: Path | None = None,
             progress: Progress = print, replay_extra: str = "") -> RunResult:
    """Run a scenario in the simulator and keep everything in ``run_dir`` (as ``smslab run``
    does: scenario, schedule, history, verdict, report)."""
    import logging

    seed = scenario.seed if seed is None else seed
    replay = replay_command(str(scenario_path or scenario.source), seed, replay_extra)
    # What the sites log goes to the run directory's sites.log, as each process's site.log
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "sites.log")
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s: %(message)s"))
    loggers = [logging.getLogger(name) for name in ("sites", "broker", "emulator.protocol")]
    saved = [(lg.propagate, lg.level) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.propagate = False
        if lg.level == logging.NOTSET:
            lg.setLevel(logging.INFO)
    try:
        return run_scenario(scenario, seed=seed, run_dir=run_dir, scenario_path=scenario_path, progress=progress,
                            backend=lambda d: SimBackend(d, seed=seed, topology=scenario.topology), replay=replay)
    finally:
        for lg, (propagate, level) in zip(loggers, saved, strict=True):
            lg.removeHandler(handler)
            lg.propagate = propagate
            lg.setLevel(level)
        handler.close()


def parse_seeds(text: str) -> list[int]:
    """``1..500``, ``3,7,9`` or both (``1..10,42``): the seeds of a sweep, in order, once each."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if ".." in part:
                low, high = (int(x) for x in part.split("..", 1))
                if high < low:
                    raise ValueError
                seeds.extend(range(low, high + 1))
            elif part:
                seeds.append(int(part))
        except ValueError:
            raise ConfigError(f"--seeds: {part!r} is not a seed or a range LOW..HIGH",
                              hint="e.g. --seeds 1..500 or --seeds 3,7,9") from None
    if not seeds:
        raise ConfigError("--seeds names no seed", hint="e.g. --seeds 1..500")
    return list(dict.fromkeys(seeds))


@dataclass
class SeedOutcome:
    """One seed of a sweep: passed or how it failed, and the line that replays it."""

    seed: int
    exit_code: int
    verdict: str | None
    error: str | None
    violations: list[str]
    replay: str
    run_dir: str | None
    wall: float
    simulated: float

    @property
    def passed(self) -> bool:
        return self.exit_code == 0

    def line(self) -> str:
        what = self.error or (f"verdict {self.verdict}" if self.verdict else "failed")
        shown = "; ".join(self.violations[:3])
        return (f"seed {self.seed}: FAILED: {what}" + (f" [{shown}]" if shown else "")
                + f"\n  replay: {self.replay}" + (f"\n  run: {self.run_dir}" if self.run_dir else ""))


@dataclass
class SweepJob:
    scenario_path: str | None
    scenario_text: str | None  # a scenario made from a topology and options
    source: str
    out_root: str
    replay_extra: str
    keep: bool


def _scenario_of(job: SweepJob) -> Scenario:
    from emulator.scenario import load_scenario, parse_scenario

    if job.scenario_text is not None:
        return parse_scenario(job.scenario_text, job.source, Path(job.source).parent)
    assert job.scenario_path is not None
    return load_scenario(job.scenario_path)


def run_seed(job: SweepJob, seed: int) -> SeedOutcome:
    """One seed, quietly (its log is in its run directory); the directory is deleted when the
    seed passed, unless ``keep``."""
    import shutil
    import time

    scenario = _scenario_of(job)
    run_dir = Path(job.out_root) / f"seed-{seed}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    started = time.monotonic()
    result = simulate(scenario, seed=seed, run_dir=run_dir,
                      scenario_path=Path(job.scenario_path) if job.scenario_path else None,
                      progress=_quiet, replay_extra=job.replay_extra)
    if job.scenario_path is None:
        result.replay = replay_command(job.source, seed, job.replay_extra)
    violations = []
    if result.report is not None:
        violations = [f"{v.kind} {v.site}: {v.detail}" for v in result.report.violations if v.hard][:5]
    failed = [f"{o.what}: {o.detail}" for o in result.failed if not o.what.startswith("final")]
    simulated = 0.0
    try:
        run = json.loads((run_dir / "run.json").read_text())
        simulated = float(run.get("simulated", 0.0))
    except (OSError, ValueError):
        pass
    outcome = SeedOutcome(seed, result.exit_code, result.verdict,
                          result.error or ("; ".join(failed) if failed else None), violations, result.replay,
                          str(run_dir), round(time.monotonic() - started, 3), simulated)
    if outcome.passed and not job.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
        outcome.run_dir = None
    return outcome


@dataclass
class SweepResult:
    outcomes: list[SeedOutcome]
    asked: int
    wall: float
    stopped_early: bool

    @property
    def failed(self) -> list[SeedOutcome]:
        return [o for o in self.outcomes if not o.passed]

    def summary(self) -> str:
        ran = len(self.outcomes)
        simulated = sum(o.simulated for o in self.outcomes)
        text = (f"{ran} of {self.asked} seed(s) run: {ran - len(self.failed)} passed, {len(self.failed)} failed"
                + (f" ({', '.join(str(o.seed) for o in self.failed[:20])})" if self.failed else "")
                + f"; {self.wall:.1f}s wall, {simulated:.0f}s simulated")
        return text + (" (stopped at the first failure: --fail-fast)" if self.stopped_early else "")


def sweep(job: SweepJob, seeds: list[int], *, jobs: int = 1, fail_fast: bool = False,
          on_outcome: Callable[[SeedOutcome], None] | None = None) -> SweepResult:
    """Run every seed, ``jobs`` at a time in processes of their own; report each as it ends."""
    import multiprocessing
    import time
    from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait

    started = time.monotonic()
    outcomes: list[SeedOutcome] = []
    stopped = False
    if jobs <= 1:
        for seed in seeds:
            outcome = run_seed(job, seed)
            outcomes.append(outcome)
            if on_outcome:
                on_outcome(outcome)
            if fail_fast and not outcome.passed:
                stopped = seed != seeds[-1]
                break
        return SweepResult(outcomes, len(seeds), time.monotonic() - started, stopped)
    context = multiprocessing.get_context("fork")
    pending = list(seeds)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        running: dict[Future[SeedOutcome], int] = {}
        while pending or running:
            while pending and len(running) < jobs and not stopped:
                seed = pending.pop(0)
                running[pool.submit(run_seed, job, seed)] = seed
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                running.pop(future)
                outcome = future.result()
                outcomes.append(outcome)
                if on_outcome:
                    on_outcome(outcome)
                if fail_fast and not outcome.passed:
                    stopped = True
            if stopped:
                pending.clear()
                for future in running:
                    future.cancel()
    outcomes.sort(key=lambda o: o.seed)
    return SweepResult(outcomes, len(seeds), time.monotonic() - started,
                       stopped and len(outcomes) < len(seeds))
