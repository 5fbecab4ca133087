"""The recovery handshake in a running site: both the recovering site's agent and the
peers' side. The decisions (phases, counter plan) are in ``emulator.protocol.recovery``;
this module applies them to the store and sends the messages.

All handlers run inside the runtime's batch transaction (messages) or a tick transaction.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from typing import TYPE_CHECKING, Any

from emulator.protocol import sequencing as seq
from emulator.protocol.envelope import (
    DataClass,
    RecoveryAnnounce,
    RecoveryComplete,
    RecoveryReport,
    RecoveryResync,
    RecoveryResyncDone,
)
from emulator.protocol.objects import parse_object_id
from emulator.protocol.recovery import (
    CounterPlan,
    OwnCounters,
    Phase,
    RecoveryAgent,
    accept_resync,
    plan_counters,
    reset_link_to_plan,
)
from sites import status_ids as sid

if TYPE_CHECKING:
    from sites.runtime import Outgoing, SiteRuntime

log = logging.getLogger("sites.recovery")

ANNOUNCE_RETRY = 1.0
RESYNC_STEP = 2000  # site data records sent up per step of a /syncparent during a recovery


class Recovery:
    def __init__(self, rt: SiteRuntime) -> None:
        self.rt = rt
        self._kicked = False
        self._uploading = False
        state = rt.store.get_control("recovery_agent")
        self.agent: RecoveryAgent | None = RecoveryAgent.from_state(state) if state else None
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
        with store.transaction():
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
            rt._status(sid.RECOVERY_STARTED, "info",
                       f"site recovery {recovery_id} started under the reused site code {rt.site}", now)
            rt._save_links()
            rt._save_counters()

    def reload(self) -> None:
        """Read the agent back from the store (after a failed transaction)."""
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
                with rt.store.transaction():
                    self._plan(now)
                    rt._save_links()
                    rt._save_counters()
                self.kick()
                return
            for peer in agent.should_announce(now, agent.announce_retry(ANNOUNCE_RETRY)):
                link = rt.links[peer]
                rt._publish_direct(peer, [RecoveryAnnounce(
                    source=rt.site, dest=peer, incarnation=rt.incarnation,
                    recovery_id=agent.recovery_id, txn_id=rt.txn_id,
                    next_send_seq=link.next_send_seq, next_expected=link.next_expected)])
            waiting = ",".join(agent.missing_reports())
            if waiting != rt.store.get_meta("recovery_waiting"):
                with rt.store.transaction():
                    rt.store.set_meta("recovery_waiting", waiting)
        elif agent.phase is Phase.COUNTERS:
            self._start_resync(now)
        elif agent.phase is Phase.RESYNC:
            self._send_resync_messages()
            self._upload_step()
            self._maybe_complete(now)

    def on_report(self, report: RecoveryReport, now: float) -> None:
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
        self.kick()  # runs after this batch commits
        rt._status(sid.RECOVERY_PHASE, "info",
                   f"recovery {agent.recovery_id}: counters moved past every peer: transaction ID"
                   f" {plan.txn_id}, incarnation {plan.incarnation}, next object number"
                   f" {plan.object_next}, SCF serial {plan.scf_serial}", now)

    def _apply_plan(self, plan: CounterPlan, now: float) -> None:
        rt = self.rt
        rt.txn_id = plan.txn_id
        rt.incarnation = plan.incarnation
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
        for obj in plan.adopt:
            held = rt.store.get_object(obj["id"])
            if held is None or (held["def_uid"] == obj["def_uid"] and held["revision"] < obj["revision"]):
                rt.store.upsert_object(obj, via="recovery", now=now)

    def _start_resync(self, now: float) -> None:
        rt = self.rt
        agent = self.agent
        assert agent is not None
        with rt.store.transaction():
            for peer in agent.peers:
                rt.links[peer].paused = False
            for child in rt.children:
                sync_objects_to(rt, child)  # our own and our ancestors' objects, down
                agent.our_marks[child] = rt.links[child].sent_through
            for target in rt.topology.subtree(rt.site)[1:]:
                last = rt.store.get_control(f"control_last:{target}")
                if last is not None:  # a site control change cleared with the old jobs
                    rt.send_site_control(target, now, settings=last)
            rt._send_scf(now)
            rt._client_catch_up(now, full=True)  # the clients report their full inventory again
            agent.upload_done = rt.parent is None
            agent.advance(Phase.RESYNC)
            self._persist()
            rt._save_links()
            rt._save_counters()
        self._send_resync_messages(force=True)
        rt.pump()

    def _upload_step(self) -> None:
        """Resync, up: every site data record the recovering site holds goes to its parent
        again (its own data, its status messages, what its subtree had sent it), in steps of
        ``RESYNC_STEP`` records, each its own transaction; the parent reinitialized its copy.
        Resumable: the cursor is part of the agent's state."""
        rt = self.rt
        agent = self.agent
        if agent is None or agent.phase is not Phase.RESYNC or agent.upload_done or rt.parent is None:
            return
        if self._uploading:
            return
        self._uploading = True
        try:
            with rt.store.transaction():
                cursor = (agent.upload_cursor[0], agent.upload_cursor[1]) if agent.upload_cursor else None
                rows = rt.store.site_data_page(after=cursor, limit=RESYNC_STEP)
                for row in rows:
                    if row["data_class"] == DataClass.SCF.value and row["key"] == rt.site:
                        continue  # a fresh SCF of ours went up at the start of the resync
                    rt._emit(rt.parent, DataClass(row["data_class"]), row["key"], row["origin"], row["payload"])
                if rows:
                    agent.upload_cursor = [rows[-1]["data_class"], rows[-1]["key"]]
                agent.upload_done = len(rows) < RESYNC_STEP
                self._persist()
                rt._save_links()
                rt._save_counters()
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
            rt._publish_direct(peer, [RecoveryResync(
                source=rt.site, dest=peer, incarnation=rt.incarnation, recovery_id=agent.recovery_id,
                next_send_seq=report["next_expected"], next_expected=report["last_sent"] + 1)])

    def on_resync_done(self, msg: RecoveryResyncDone, now: float) -> None:
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
        with rt.store.transaction():
            if waiting:
                rt.store.set_meta("recovery_waiting", ",".join(waiting))
                self._persist()
                return
            agent.advance(Phase.COMPLETE)
            self._persist()
            rt.state = "active"
            rt.store.set_meta("recovery_waiting", "")
            rt.store.set_meta("recovered_at", now)
            rt._status(sid.RECOVERY_COMPLETE, "info",
                       f"site recovery {agent.recovery_id} complete: links active, incarnation"
                       f" {rt.incarnation}", now)
            rt._save_links()
            rt._save_counters()
        for peer in agent.peers:
            rt._publish_direct(peer, [RecoveryComplete(
                source=rt.site, dest=peer, incarnation=rt.incarnation, recovery_id=agent.recovery_id)])
        rt.pump()

    # -- the peers' side ------------------------------------------------------------------

    def on_peer_message(self, link: seq.LinkState, msg: Any, out: Outgoing, now: float) -> None:
        if isinstance(msg, RecoveryReport):
            self.on_report(msg, now)
        elif isinstance(msg, RecoveryResyncDone):
            self.on_resync_done(msg, now)
        elif isinstance(msg, RecoveryAnnounce):
            self._on_announce(link, msg, out, now)
        elif isinstance(msg, RecoveryResync):
            self._on_resync(link, msg, out, now)
        elif isinstance(msg, RecoveryComplete):
            self._on_complete(link, msg, now)

    def _entry(self, peer: str) -> dict[str, Any] | None:
        value = self.rt.store.get_control(f"peer_recovery:{peer}")
        return value if isinstance(value, dict) else None

    def _on_announce(self, link: seq.LinkState, msg: RecoveryAnnounce, out: Outgoing, now: float) -> None:
        rt = self.rt
        entry = self._entry(link.peer)
        if entry is None or entry["recovery_id"] != msg.recovery_id:
            entry = {"recovery_id": msg.recovery_id, "resynced": False, "mark": 0}
            rt._status(sid.PEER_RECOVERY, "info",
                       f"site {link.peer} is recovering ({msg.recovery_id}); link paused", now)
        link.paused = True
        rt.store.set_control(f"peer_recovery:{link.peer}", entry)
        if entry["resynced"]:
            out.messages[link.peer].append(RecoveryResyncDone(
                source=rt.site, dest=link.peer, incarnation=rt.incarnation,
                recovery_id=msg.recovery_id, through=entry["mark"]))
            link.paused = False
            return
        out.messages[link.peer].append(self._report(link, msg.recovery_id))

    def _report(self, link: seq.LinkState, recovery_id: str) -> RecoveryReport:
        rt = self.rt
        peer = link.peer
        own_objects = rt.store.objects(origin=peer) if peer in rt.topology.ancestors(rt.site) else []
        numbers = [n for o in own_objects if (p := parse_object_id(o["id"])) and (n := p[1])]
        scf = rt.store.site_data_version(DataClass.SCF.value, peer) or 0
        control = rt.store.get_int("control_serial_processed") if peer == rt.parent else 0
        return RecoveryReport(
            source=rt.site, dest=peer, incarnation=rt.incarnation, recovery_id=recovery_id,
            next_expected=link.next_expected, last_sent=link.sent_through,
            txn_watermark=rt.store.max_watermark(peer),
            max_object_ids={"object": max(numbers, default=0)},
            scf_serial=scf, control_serial=control, their_incarnation=link.their_incarnation,
            status_serial=rt.store.max_site_data_version(DataClass.STATUS.value, peer),
            objects=[o for o in own_objects if o["origin"] == peer],
        )

    def _on_resync(self, link: seq.LinkState, msg: RecoveryResync, out: Outgoing, now: float) -> None:
        rt = self.rt
        peer = link.peer
        entry = self._entry(peer)
        if entry is None or entry["recovery_id"] != msg.recovery_id:
            log.warning("%s: resync from %s for an unknown recovery %s", rt.site, peer, msg.recovery_id)
            return
        if entry.get("resyncing"):
            return  # sending our data up in steps; Done follows the last one
        if not entry["resynced"]:
            void_through = accept_resync(link, msg, now)
            rt.store.outbox_purge(peer, void_through)
            rt.published[peer] = link.acked_through
            if peer in rt.children:
                subtree = rt.topology.subtree(peer)
                # status messages are history, not state: they stay (nothing acknowledged is lost)
                removed = rt.store.delete_site_data_of(subtree, keep=(DataClass.STATUS.value,))
                rt._status(sid.SITE_DELETED, "info",
                           f"reinitialized the site data of {peer}'s subtree ({removed} records)"
                           " for its recovery; fresh copies follow", now)
                sync_objects_to(rt, peer)
                last = rt.store.get_control(f"control_last:{peer}")
                if last is not None:  # a site control change purged with the old jobs
                    rt.send_site_control(peer, now, settings=last)
            else:
                # /syncparent in steps of RESYNC_STEP records, each its own transaction, so the
                # first records travel while the rest are read (a resumable cursor in the entry).
                entry.update(resyncing=True, cursor=None)
                rt.store.set_control(f"peer_recovery:{peer}", entry)
                rt.later(0, lambda: self._resync_up_step(peer))
                return
            entry.update(resynced=True, mark=link.sent_through)
            rt.store.set_control(f"peer_recovery:{peer}", entry)
        out.messages[peer].append(RecoveryResyncDone(
            source=rt.site, dest=peer, incarnation=rt.incarnation, recovery_id=msg.recovery_id,
            through=entry["mark"]))

    def _resync_up_step(self, peer: str) -> None:
        rt = self.rt
        entry = self._entry(peer)
        if entry is None or not entry.get("resyncing"):
            return
        now = rt.clock()
        with rt.store.transaction():
            cursor = tuple(entry["cursor"]) if entry.get("cursor") else None
            rows = rt.store.site_data_page(after=cursor, limit=RESYNC_STEP)
            for row in rows:
                if row["data_class"] == DataClass.SCF.value and row["key"] == rt.site:
                    continue
                rt._emit(peer, DataClass(row["data_class"]), row["key"], row["origin"], row["payload"])
            done = len(rows) < RESYNC_STEP
            if rows:
                entry["cursor"] = [rows[-1]["data_class"], rows[-1]["key"]]
            if done:
                rt._send_scf(now)
                entry.update(resyncing=False, resynced=True, mark=rt.links[peer].sent_through)
            rt.store.set_control(f"peer_recovery:{peer}", entry)
            rt._save_links()
            rt._save_counters()
        if done:
            rt._publish_direct(peer, [RecoveryResyncDone(
                source=rt.site, dest=peer, incarnation=rt.incarnation,
                recovery_id=entry["recovery_id"], through=entry["mark"])])
        else:
            rt.later(0, lambda: self._resync_up_step(peer))
        rt.pump()

    def resume_peer_resyncs(self) -> None:
        """After a restart or a reconnect: go on with a /syncparent that was under way."""
        if self.rt.parent:
            entry = self._entry(self.rt.parent)
            if entry and entry.get("resyncing"):
                self.rt.later(0, lambda: self._resync_up_step(self.rt.parent))  # type: ignore[arg-type]

    def _on_complete(self, link: seq.LinkState, msg: RecoveryComplete, now: float) -> None:
        entry = self._entry(link.peer)
        if entry is None or entry["recovery_id"] != msg.recovery_id:
            return
        self.rt.store.set_control(f"peer_recovery:{link.peer}", None)
        self.rt._status(sid.PEER_RECOVERY, "info",
                        f"site {link.peer} completed its recovery ({msg.recovery_id}); link active", now)


def sync_objects_to(rt: SiteRuntime, child: str) -> int:
    """``/syncchild``: send every global object this site holds down to one child."""
    count = 0
    for obj in rt.store.objects():
        rt._emit(child, DataClass(obj["kind"]), obj["id"], obj["origin"], obj,
                 "delete" if obj["deleted"] else "upsert")
        count += 1
    return count


def sync_site_data_up(rt: SiteRuntime, now: float) -> int:
    """``/syncparent``: send every site data record this site holds up, and a fresh SCF."""
    if not rt.parent:
        return 0
    count = 0
    for row in rt.store.site_data():
        if row["data_class"] == DataClass.SCF.value and row["key"] == rt.site:
            continue
        rt._emit(rt.parent, DataClass(row["data_class"]), row["key"], row["origin"], row["payload"])
        count += 1
    rt._send_scf(now)
    return count + 1


def new_recovery_id() -> str:
    return uuid.uuid4().hex[:12]
