"""The recovery handshake in a running site: the recovering site's agent and the peers' side.

The decisions are in ``emulator.protocol.recovery``: the agent's phases and counter plan
(``RecoveryAgent``, ``plan_counters``), and the peers' state machine (``PeerRecovery`` and its
``peer_on_*`` handlers). This module applies them to the store and sends the messages, through
``RecoveryHost``: the small part of the site runtime that recovery may use.

All handlers run inside the runtime's batch transaction (messages) or a transaction of
their own (ticks, steps); every phase is a history event.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Literal, Protocol

from emulator.protocol import envelope as wire
from emulator.protocol import sequencing as seq
from emulator.protocol.envelope import (
    DataClass,
    RecoveryAnnounce,
    RecoveryComplete,
    RecoveryReport,
    RecoveryResync,
    RecoveryResyncDone,
)
from emulator.protocol.recovery import (
    CounterPlan,
    OwnCounters,
    PeerRecovery,
    PeerStep,
    Phase,
    RecoveryAgent,
    accept_resync,
    left_to_children,
    peer_on_announce,
    peer_on_complete,
    peer_on_resync,
    peer_pause_expired,
    peer_report,
    peer_resynced,
    peer_upload_step,
    plan_counters,
    reset_link_to_plan,
)
from emulator.topology import Settings, Topology
from sites import status_ids as sid
from sites.store import SiteStore

log = logging.getLogger("sites.recovery")

ANNOUNCE_RETRY = 1.0
RESYNC_STEP = 2000  # site data records sent up per step of a resync


class RecoveryHost(Protocol):
    """What recovery may use of the site runtime."""

    site: str
    parent: str | None
    children: list[str]
    topology: Topology
    settings: Settings
    store: SiteStore
    links: dict[str, seq.LinkState]
    published: dict[str, int]
    txn_id: int
    incarnation: int
    scf_serial: int
    status_serial: int
    alloc: dict[str, int]
    state: str
    signing: bool
    clock: Callable[[], float]

    def transaction(self) -> AbstractContextManager[sqlite3.Connection]: ...

    def event(self, kind: str, now: float, *, link: str | None = ..., seq_: int | None = ...,
              txn: int | None = ..., data_class: str | None = ..., key: str | None = ...,
              hash_: str | None = ..., inc: int | None = ..., detail: dict[str, Any] | None = ...) -> None: ...

    def emit(self, peer: str, cls: DataClass, key: str, origin: str, payload: dict[str, Any],
             op: Literal["upsert", "delete"] = ..., hash_: str | None = ...) -> None: ...

    def status(self, message_id: int, severity: str, text: str, now: float) -> None: ...

    def rekey(self) -> Any: ...

    def send_scf(self, now: float) -> None: ...

    def client_catch_up(self, now: float, *, full: bool) -> None: ...

    def send_site_control(self, child: str, now: float, settings: dict[str, Any] | None = ...) -> None: ...

    def publish_direct(self, peer: str, msgs: list[wire._Msg]) -> None: ...

    def new_id(self, length: int = ...) -> str: ...

    def later(self, delay: float, fn: Callable[[], None]) -> None: ...

    def pump(self) -> None: ...


class Recovery:
    def __init__(self, rt: RecoveryHost) -> None:
        self.rt = rt
        self._kicked = False
        self._uploading = False
        self.agent: RecoveryAgent | None = None
        self.reload()
        if self.agent and self.agent.phase is not Phase.COMPLETE:
            rt.state = "recovering"
            for peer in self.agent.peers:
                if self.agent.phase is Phase.ANNOUNCE:
                    rt.links[peer].paused = True

    # -- starting a recovery (the site process was started with --recover) ----------------

    def begin(self, recovery_id: str, reference: str | None) -> None:
        """Enter the recovering state under a recovery ID, once (a rerun resumes)."""
        rt = self.rt
        store = rt.store
        if self.agent is not None and self.agent.recovery_id == recovery_id:
            return
        peers = ([rt.parent] if rt.parent else []) + list(rt.children)
        agent = RecoveryAgent(recovery_id=recovery_id, site=rt.site, peers=peers)
        now = rt.clock()
        with rt.transaction():
            store.set_meta("recovery_id", recovery_id)
            store.set_meta("recovery_reference", reference or "")
            store.set_meta("recovery_started", now)
            store.set_meta("recovery_waiting", ",".join(peers))
            store.delete_meta("recovery_plan")  # a plan of an earlier recovery is not this one's
            self.agent = agent
            self._persist()
            rt.state = "recovering"
            for peer in peers:
                rt.links[peer].paused = True
            self._phase_event(now)
            rt.status(sid.RECOVERY_STARTED, "info",
                      f"site recovery {recovery_id} started under the reused site code {rt.site}", now)

    def reload(self) -> None:
        """Read the agent back from the store (at start, and after a failed transaction)."""
        state = self.rt.store.get_control("recovery_agent")
        self.restore_agent(state if isinstance(state, dict) else None)

    def restore_agent(self, state: dict[str, Any] | None) -> None:
        self.agent = RecoveryAgent.from_state(state) if state else None

    def reset_kick(self) -> None:
        self._kicked = False  # a kick scheduled on a dead connection's loop never ran

    def kick(self) -> None:
        """Run the agent's next step now rather than at the next tick."""
        if self.agent is None or self.agent.phase is Phase.COMPLETE or self._kicked:
            return
        self._kicked = True

        def run() -> None:
            self._kicked = False
            self.tick()

        self.rt.later(0, run)

    def _persist(self) -> None:
        assert self.agent is not None
        self.rt.store.set_control("recovery_agent", self.agent.to_state())
        self.rt.store.set_meta("recovery_phase", self.agent.phase.value)

    def _phase_event(self, now: float) -> None:
        assert self.agent is not None
        self.rt.event("recovery", now, inc=self.rt.incarnation,
                      detail={"recovery_id": self.agent.recovery_id, "phase": self.agent.phase.value})

    # -- the agent, driven by the tick ----------------------------------------------------

    def tick(self) -> None:
        agent = self.agent
        if agent is None or agent.phase is Phase.COMPLETE:
            return
        if os.environ.get("SMSLAB_HOLD_PHASE") == agent.phase.value:
            return  # test fault: the agent stalls in this phase (to be killed there)
        rt = self.rt
        now = rt.clock()
        if agent.phase is Phase.ANNOUNCE:
            if not agent.peers:  # a site alone: nothing to ask, only its own counters to move
                with rt.transaction():
                    self._plan(now)
                self.kick()
                return
            for peer in agent.should_announce(now, agent.announce_retry(ANNOUNCE_RETRY)):
                link = rt.links[peer]
                rt.publish_direct(peer, [RecoveryAnnounce(
                    source=rt.site, dest=peer, incarnation=rt.incarnation,
                    recovery_id=agent.recovery_id, txn_id=rt.txn_id,
                    next_send_seq=link.next_send_seq, next_expected=link.next_expected)])
            waiting = ",".join(agent.missing_reports())
            if waiting != rt.store.get_meta("recovery_waiting"):
                with rt.transaction():
                    rt.store.set_meta("recovery_waiting", waiting)
        elif agent.phase is Phase.COUNTERS:
            self._start_resync(now)
        elif agent.phase is Phase.RESYNC:
            self._send_resync_messages()
            self._upload_step()
            self._maybe_complete(now)

    def _on_report(self, report: RecoveryReport, now: float) -> None:
        agent = self.agent
        if agent is None or not agent.on_report(report):
            if agent is not None:
                self._persist()
            return
        self._plan(now)

    def _plan(self, now: float) -> None:
        rt = self.rt
        agent = self.agent
        assert agent is not None
        own = OwnCounters(
            txn_id=rt.txn_id, incarnation=rt.incarnation, object_next=rt.alloc["object"],
            scf_serial=rt.scf_serial,
            control_sent={c: rt.store.get_int(f"control_serial_sent:{c}") for c in rt.children},
            status_serial=rt.status_serial,
        )
        reference = rt.store.get_meta("recovery_reference") or None
        plan = plan_counters(own, agent.parsed_reports(), margin=rt.settings.txn_margin,
                             reference=reference if reference in agent.peers else None)
        self._apply_plan(plan, now)
        rt.store.set_meta("recovery_plan", json.dumps({"txn_id": plan.txn_id, "incarnation": plan.incarnation,
                                                       "object_next": plan.object_next}))
        agent.advance(Phase.COUNTERS)
        rt.store.set_meta("recovery_waiting", "")
        self._persist()
        self._phase_event(now)
        self.kick()  # runs after this batch commits
        rt.status(sid.RECOVERY_PHASE, "info",
                  f"recovery {agent.recovery_id}: counters moved past every peer: transaction ID"
                  f" {plan.txn_id}, incarnation {plan.incarnation}, next object number"
                  f" {plan.object_next}, SCF serial {plan.scf_serial}", now)

    def _apply_plan(self, plan: CounterPlan, now: float) -> None:
        rt = self.rt
        rt.txn_id = plan.txn_id
        rt.incarnation = plan.incarnation
        if rt.signing:
            rt.rekey()  # a new key for the new incarnation: the restored one's is retired with it
        rt.alloc["object"] = plan.object_next
        rt.scf_serial = plan.scf_serial
        rt.status_serial = plan.status_serial
        for child, serial in plan.control_sent.items():
            if child in rt.children:
                rt.store.set_meta(f"control_serial_sent:{child}", serial)
        for peer, lp in plan.links.items():
            link = rt.links[peer]
            reset_link_to_plan(link, lp, now)
            rt.store.outbox_clear(peer)  # what the backup had queued is resent by the resync
            rt.published[peer] = link.acked_through
            rt.event("link_reset", now, link=f"{rt.site}<->{peer}", inc=rt.incarnation,
                     detail={"next_send_seq": link.next_send_seq, "next_expected": link.next_expected,
                             "their_incarnation": link.their_incarnation})
        for obj in plan.adopt:
            held = rt.store.get_object(obj["id"])
            if held is None or (held["def_uid"] == obj["def_uid"] and held["revision"] < obj["revision"]):
                rt.store.upsert_object(obj, via="recovery", now=now)

    def _start_resync(self, now: float) -> None:
        rt = self.rt
        agent = self.agent
        assert agent is not None
        with rt.transaction():
            for peer in agent.peers:
                rt.links[peer].paused = False
            for child in rt.children:
                sync_objects_to(rt, child)  # our own and our ancestors' objects, down
                agent.our_marks[child] = rt.links[child].sent_through
            for target in rt.topology.subtree(rt.site)[1:]:
                last = rt.store.get_control(f"control_last:{target}")
                if last is not None:  # a site control change cleared with the old jobs
                    rt.send_site_control(target, now, settings=last)
            rt.send_scf(now)
            rt.client_catch_up(now, full=True)  # the clients report their full inventory again
            agent.upload_done = rt.parent is None
            agent.advance(Phase.RESYNC)
            self._persist()
            self._phase_event(now)
        self._send_resync_messages(force=True)
        rt.pump()

    def _upload_step(self) -> None:
        """Resync, up: every site data record the recovering site originated goes to its
        parent again (its clients' data, its status messages), in steps of ``RESYNC_STEP``
        records, each its own transaction; the parent reinitialized its copy. What its subtree
        had sent it is left out (``left_to_children``). Resumable: the cursor is part of the
        agent's state."""
        rt = self.rt
        agent = self.agent
        if agent is None or agent.phase is not Phase.RESYNC or agent.upload_done or rt.parent is None:
            return
        if self._uploading:
            return
        self._uploading = True
        try:
            with rt.transaction():
                cursor = (agent.upload_cursor[0], agent.upload_cursor[1]) if agent.upload_cursor else None
                below = left_to_children(rt.site, rt.topology.subtree(rt.site))
                last = _send_site_data(rt, rt.parent, cursor, skip_origins=below)
                if last is not None:
                    agent.upload_cursor = list(last)
                agent.upload_done = last is None or rt.store.site_data_page(after=last, limit=1) == []
                self._persist()
        finally:
            self._uploading = False
        rt.pump()
        if agent.upload_done:
            self.kick()
        else:
            rt.later(0, self._upload_step)

    def _send_resync_messages(self, force: bool = False) -> None:
        rt = self.rt
        agent = self.agent
        assert agent is not None
        now = rt.clock()
        if not force and now - agent.last_announce < ANNOUNCE_RETRY * 3:
            return
        agent.last_announce = now
        for peer in agent.peers:
            if peer in agent.done_marks:
                continue
            report = agent.reports[peer]
            rt.publish_direct(peer, [RecoveryResync(
                source=rt.site, dest=peer, incarnation=rt.incarnation, recovery_id=agent.recovery_id,
                next_send_seq=report["next_expected"], next_expected=report["last_sent"] + 1,
                challenge=report.get("challenge", ""))])

    def _on_resync_done(self, msg: RecoveryResyncDone, now: float) -> None:
        if self.agent is None:
            return
        self.agent.on_resync_done(msg.source, msg.recovery_id, msg.through)
        self._persist()
        self.kick()

    def _maybe_complete(self, now: float) -> None:
        rt = self.rt
        agent = self.agent
        assert agent is not None
        applied = {p: l.applied_through for p, l in rt.links.items()}
        acked = {p: l.acked_through for p, l in rt.links.items()}
        if rt.parent and rt.parent not in agent.our_marks:
            children_in = all(
                c in agent.done_marks and applied[c] >= agent.done_marks[c] for c in rt.children)
            if not children_in or not agent.upload_done:
                return
            agent.our_marks[rt.parent] = rt.links[rt.parent].sent_through
        waiting = agent.waiting_for(applied, acked)
        with rt.transaction():
            if waiting:
                rt.store.set_meta("recovery_waiting", ",".join(waiting))
                self._persist()
                return
            agent.advance(Phase.COMPLETE)
            self._persist()
            self._phase_event(now)
            rt.state = "active"
            rt.store.set_meta("recovery_waiting", "")
            rt.store.set_meta("recovered_at", now)
            rt.status(sid.RECOVERY_COMPLETE, "info",
                      f"site recovery {agent.recovery_id} complete: links active, incarnation"
                      f" {rt.incarnation}", now)
        for peer in agent.peers:
            rt.publish_direct(peer, [RecoveryComplete(
                source=rt.site, dest=peer, incarnation=rt.incarnation, recovery_id=agent.recovery_id,
                challenge=agent.reports.get(peer, {}).get("challenge", ""))])
        rt.pump()

    # -- handshake messages ---------------------------------------------------------------

    def on_peer_message(self, link: seq.LinkState, msg: Any, now: float) -> list[wire._Msg]:
        """A handshake message from ``link.peer``; returns what to send back to it."""
        if isinstance(msg, RecoveryReport):
            self._on_report(msg, now)
        elif isinstance(msg, RecoveryResyncDone):
            self._on_resync_done(msg, now)
        elif isinstance(msg, RecoveryAnnounce):
            step = peer_on_announce(self._entry(link.peer), msg.recovery_id, challenge=self.rt.new_id(16), now=now)
            return self._peer(link, step, msg.recovery_id, now)
        elif isinstance(msg, RecoveryResync):
            step = peer_on_resync(self._entry(link.peer), msg.recovery_id, site_is_child=link.peer in self.rt.children,
                                  challenge=msg.challenge, incarnation=msg.incarnation,
                                  known_incarnation=link.their_incarnation)
            return self._peer(link, step, msg.recovery_id, now, resync=msg)
        elif isinstance(msg, RecoveryComplete):
            step = peer_on_complete(self._entry(link.peer), msg.recovery_id, challenge=msg.challenge)
            return self._peer(link, step, msg.recovery_id, now)
        return []

    def peer_tick(self) -> None:
        """A link paused by a neighbour's announce that has not resynced within the pause
        timeout runs again, with a status message (a forged announce pauses nothing for good)."""
        rt = self.rt
        own = set(self.agent.peers) if self.agent and self.agent.phase is not Phase.COMPLETE else set()
        now = rt.clock()
        for peer, link in rt.links.items():
            if not link.paused or peer in own:
                continue
            step = peer_pause_expired(self._entry(peer), now=now, timeout=rt.settings.recovery_pause_timeout)
            if step is None or step.entry is None:
                continue
            with rt.transaction():
                link.paused = False
                self._save_entry(peer, step.entry)
                link.extra["recovery_expired"] = link.extra.get("recovery_expired", 0) + 1
                rt.event("peer_recovery", now, link=f"{rt.site}<->{peer}",
                         detail={"recovery_id": step.entry.recovery_id, "phase": "expired"})
                rt.status(sid.PEER_RECOVERY_TIMEOUT, "warning",
                          f"site {peer} announced recovery {step.entry.recovery_id} but has not resynchronized"
                          f" within {rt.settings.recovery_pause_timeout:.0f} s; the link is active again"
                          " (a late resync of that recovery is still taken)", now)
            rt.pump()

    # -- the peers' side ------------------------------------------------------------------

    def _entry(self, peer: str) -> PeerRecovery | None:
        value = self.rt.store.get_control(f"peer_recovery:{peer}")
        if not isinstance(value, dict):
            return None
        if "phase" not in value:  # written by an earlier version: {recovery_id, resynced, mark}
            value = {**value, "phase": "resynced" if value.get("resynced") else "paused"}
        return PeerRecovery.from_state(value)

    def _save_entry(self, peer: str, entry: PeerRecovery | None) -> None:
        self.rt.store.set_control(f"peer_recovery:{peer}", entry.to_state() if entry else None)

    def _peer(self, link: seq.LinkState, step: PeerStep, recovery_id: str, now: float,
              resync: RecoveryResync | None = None) -> list[wire._Msg]:
        """Carry out one step of the peers' state machine, in its order."""
        rt = self.rt
        peer = link.peer
        reply: list[wire._Msg] = []
        if step.ignored:
            log.info("%s: recovery message from %s ignored: %s", rt.site, peer, step.ignored)
            return reply
        if step.refused:
            log.warning("%s: recovery message from %s refused: %s", rt.site, peer, step.refused)
            link.extra["recovery_refused"] = link.extra.get("recovery_refused", 0) + 1
            rt.event("refused", now, link=f"{peer}->{rt.site}", detail={"reason": step.refused})
            return reply
        entry = step.entry
        if step.started:
            rt.status(sid.PEER_RECOVERY, "info", f"site {peer} is recovering ({recovery_id}); link paused", now)
        if step.pause:
            link.paused = True
        if step.report:
            reply.append(self._report(link, recovery_id, entry.challenge if entry else ""))
        if step.accept and resync is not None:
            void_through = accept_resync(link, resync, now)
            rt.store.outbox_purge(peer, void_through)
            rt.published[peer] = link.acked_through
            rt.event("link_reset", now, link=f"{rt.site}<->{peer}", inc=resync.incarnation,
                     detail={"next_send_seq": link.next_send_seq, "next_expected": link.next_expected,
                             "their_incarnation": link.their_incarnation, "void_through": void_through})
        if step.reinit_child and entry is not None:
            self._reinit_child(peer, now)
            step = peer_resynced(entry, rt.links[peer].sent_through)
            entry = step.entry
        if step.start_upload:
            rt.later(0, lambda: self._resync_up_step(peer))
        if step.done_through is not None:
            reply.append(RecoveryResyncDone(source=rt.site, dest=peer, incarnation=rt.incarnation,
                                            recovery_id=recovery_id, through=step.done_through))
        if step.unpause:
            link.paused = False
        if step.completed:
            rt.status(sid.PEER_RECOVERY, "info", f"site {peer} completed its recovery ({recovery_id}); link active", now)
        self._save_entry(peer, entry)
        rt.event("peer_recovery", now, link=f"{rt.site}<->{peer}",
                 detail={"recovery_id": recovery_id, "phase": entry.phase.value if entry else "complete"})
        return reply

    def _report(self, link: seq.LinkState, recovery_id: str, challenge: str) -> RecoveryReport:
        rt = self.rt
        peer = link.peer
        held = rt.store.objects(origin=peer) if peer in rt.topology.ancestors(rt.site) else []
        return peer_report(
            site=rt.site, peer=peer, incarnation=rt.incarnation, recovery_id=recovery_id, link=link,
            txn_watermark=rt.store.max_watermark(peer), held_objects=held,
            scf_serial=rt.store.site_data_version(DataClass.SCF.value, peer) or 0,
            control_serial=rt.store.get_int("control_serial_processed") if peer == rt.parent else 0,
            status_serial=rt.store.max_site_data_version(DataClass.STATUS.value, peer),
            challenge=challenge,
        )

    def _reinit_child(self, child: str, now: float) -> None:
        """The recovering site is our child: reinitialize the site data we hold from its
        subtree (its fresh copies follow) and send it all global data again."""
        rt = self.rt
        subtree = rt.topology.subtree(child)
        # status messages are history, not state: they stay (nothing acknowledged is lost)
        removed = rt.store.delete_site_data_of(subtree, keep=(DataClass.STATUS.value,))
        rt.status(sid.SITE_DELETED, "info",
                  f"reinitialized the site data of {child}'s subtree ({removed} records)"
                  " for its recovery; fresh copies follow", now)
        sync_objects_to(rt, child)
        last = rt.store.get_control(f"control_last:{child}")
        if last is not None:  # a site control change purged with the old jobs
            rt.send_site_control(child, now, settings=last)

    def _resync_up_step(self, peer: str) -> None:
        """The recovering site is our parent: our site data goes up again, in steps of
        ``RESYNC_STEP`` records, each its own transaction (a resumable cursor in the entry)."""
        rt = self.rt
        entry = self._entry(peer)
        if entry is None:
            return
        now = rt.clock()
        with rt.transaction():
            last = _send_site_data(rt, peer, entry.cursor)
            done = last is None or rt.store.site_data_page(after=last, limit=1) == []
            if done:
                rt.send_scf(now)
            step = peer_upload_step(entry, last, last=done, mark=rt.links[peer].sent_through)
            if step.ignored:
                return
            self._save_entry(peer, step.entry)
        if step.done_through is not None:
            rt.publish_direct(peer, [RecoveryResyncDone(
                source=rt.site, dest=peer, incarnation=rt.incarnation,
                recovery_id=entry.recovery_id, through=step.done_through)])
        else:
            rt.later(0, lambda: self._resync_up_step(peer))
        rt.pump()

    def resume_peer_resyncs(self) -> None:
        """After a restart or a reconnect: go on with a resync up that was under way."""
        parent = self.rt.parent
        if parent:
            entry = self._entry(parent)
            if entry and entry.phase.value == "resyncing":
                self.rt.later(0, lambda: self._resync_up_step(parent))


def _send_site_data(rt: RecoveryHost, peer: str, after: tuple[str, str] | None,
                    skip_origins: set[str] | frozenset[str] = frozenset()) -> tuple[str, str] | None:
    """Queue one step of site data records for ``peer`` (our parent), after a cursor; our own
    SCF is left out (a fresh one goes up), and records whose origin is in ``skip_origins``.
    Returns the cursor of the last record read, or None."""
    rows = rt.store.site_data_page(after=after, limit=RESYNC_STEP)
    for row in rows:
        if row["data_class"] == DataClass.SCF.value and row["key"] == rt.site:
            continue
        if row["origin"] in skip_origins:
            continue
        rt.emit(peer, DataClass(row["data_class"]), row["key"], row["origin"], row["payload"])
    return (rows[-1]["data_class"], rows[-1]["key"]) if rows else None


def sync_objects_to(rt: RecoveryHost, child: str) -> int:
    """``/syncchild``: send every global object this site holds down to one child."""
    count = 0
    for obj in rt.store.objects():
        rt.emit(child, DataClass(obj["kind"]), obj["id"], obj["origin"], obj,
                "delete" if obj["deleted"] else "upsert")
        count += 1
    return count


def sync_site_data_up(rt: RecoveryHost, now: float) -> int:
    """``/syncparent``: send every site data record this site holds up, and a fresh SCF."""
    if not rt.parent:
        return 0
    count = 0
    for row in rt.store.site_data():
        if row["data_class"] == DataClass.SCF.value and row["key"] == rt.site:
            continue
        rt.emit(rt.parent, DataClass(row["data_class"]), row["key"], row["origin"], row["payload"])
        count += 1
    rt.send_scf(now)
    return count + 1
