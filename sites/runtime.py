"""The site runtime: glue between the broker transport, the pure protocol core and the store.

One thread, driven by the transport's I/O loop:

    deliveries -> batch -> one SQLite transaction (the core decides, the runtime applies,
               advances watermarks, queues forwards, writes the history events)
               -> COMMIT -> broker ack (multiple) -> acks/requests to peers -> pump outbox
    outbox pump -> packets of envelopes, publisher confirms pipelined up to the link window
    tick (every sync interval) -> resends, gap accounting, heartbeats, health, workload

The broker message is acknowledged only after the transaction that applied it committed,
so a kill -9 at any point loses nothing and applies nothing twice: a redelivered envelope
is a duplicate by its link sequence. Every decision of the core is an event in the store's
history, written in the same transaction as the decision.

The runtime never interprets a verdict itself: ``sequencing.receive`` / ``take_ack`` /
``serve_resend`` / ``tick`` return decisions, and the runtime executes them.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sqlite3
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from broker import names
from broker.base import Delivery, Transport
from emulator.errors import BrokerUnavailable, MalformedEnvelope, SmslabError
from emulator.protocol import admission, codec, retention, signing
from emulator.protocol import control as ctl
from emulator.protocol import envelope as wire
from emulator.protocol import sequencing as seq
from emulator.protocol.data import apply_control_change, keep_site_data
from emulator.protocol.envelope import (
    DataClass,
    Envelope,
    LinkAck,
    Reject,
    ResendRequest,
    content_hash,
)
from emulator.protocol.objects import OBJECT_KINDS, object_id, parse_object_id
from emulator.topology import Topology
from sites import commands
from sites import status_ids as sid
from sites.clients import ClientStore, WorkloadClock, inventory_payload
from sites.recovery import Recovery
from sites.store import SiteStore

log = logging.getLogger("sites.runtime")

PACKET_SIZE = 200  # envelopes per AMQP message at most (Replication Manager bundles too)
WORKLOAD_TICK = 0.1  # seconds: the shortest wait between two looks at the workload
WORKLOAD_TICK_MAX = 0.5  # the longest: a stop (SIGTERM), a pause or new rates are seen within it
# Protocol bugs planted on purpose, to show that a seed sweep of the simulator finds them
# (``SMSLAB_PLANTED_BUG=purge-past-ack``: an ack purges one envelope more than it acknowledges).
# Never set outside those tests.
def planted_bugs() -> frozenset[str]:
    return frozenset(b for b in os.environ.get("SMSLAB_PLANTED_BUG", "").split(",") if b)


PLANTED_BUGS = planted_bugs()

_COUNTERS = ("txn_id", "incarnation", "scf_serial", "status_serial", "state")


class RefusedInput(MalformedEnvelope):
    """A well-formed packet from a neighbour that its sender could not have sent (admission):
    refused whole, with the reason, and dead-lettered."""

    def __init__(self, message: str, peer: str | None) -> None:
        super().__init__(message)
        self.peer = peer


class RefusedIdentity(RefusedInput):
    """A message whose broker user is not the one its named sender publishes as (per-site
    identities): refused whole, with the reason, and dead-lettered; ``peer`` is the site it
    claimed to come from (None: a control command)."""


class ControlFailed(Exception):
    def __init__(self, delivery: Delivery, answer: dict[str, Any]) -> None:
        super().__init__(answer.get("error"))
        self.delivery = delivery
        self.answer = answer


@dataclass
class Outgoing:
    """What one batch decided to send besides outbox envelopes."""

    messages: dict[str, list[wire._Msg]] = field(default_factory=lambda: defaultdict(list))
    ack_peers: set[str] = field(default_factory=set)
    replies: list[tuple[str, str | None, dict[str, Any]]] = field(default_factory=list)
    republish: dict[str, int] = field(default_factory=dict)  # peer -> resend from seq
    dead: list[tuple[bytes, str]] = field(default_factory=list)  # envelopes consumed unapplied


@dataclass(frozen=True)
class Saved:
    """The runtime's memory as it was before one delivery: put back when the delivery's
    savepoint is rolled back, so memory and store never disagree."""

    links: dict[str, seq.LinkState]
    published: dict[str, int]
    txn_id: int
    incarnation: int
    scf_serial: int
    status_serial: int
    object_next: int
    state: str
    agent: dict[str, Any] | None
    workload_paused: bool


@dataclass(frozen=True)
class SendMark:
    """What applying one envelope can change in memory (the store has a savepoint): the
    counters and the send side of each link."""

    txn_id: int
    scf_serial: int
    status_serial: int
    object_next: int
    sends: dict[str, tuple[int, int]]  # peer -> (next_send_seq, sent)
    published: dict[str, int]


class SiteRuntime:
    def __init__(
        self,
        *,
        lab: str,
        topology: Topology,
        site: str,
        store: SiteStore,
        clients: ClientStore | None,
        transport: Transport,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        process_id: int | None = None,
        identities: admission.Identities | None = None,
    ) -> None:
        self.lab = lab
        # Per-site broker identities: who may publish as whom (None: the lab is unauthenticated)
        self.identities = identities
        self.topology = topology
        self.site = site
        self.spec = topology.site(site)
        self.settings = topology.settings
        self.mode: seq.Mode = topology.mode
        self.store = store
        self.clients = clients
        self.transport = transport
        self.clock = clock
        # Identifiers (runs, object definitions, requests) come from here, so a simulator can
        # make them repeat for a seed.
        self.rng = rng if rng is not None else random.Random(os.urandom(16))
        self.process_id = os.getpid() if process_id is None else process_id
        self.run_id = self.new_id()
        self.parent = topology.parent(site)
        self.children = topology.children(site)
        # what admission checks envelopes against: who may send what, made where
        self._ancestors = frozenset(topology.ancestors(site))
        self._descendants = frozenset(topology.subtree(site))
        self._subtrees = {child: frozenset(topology.subtree(child)) for child in self.children}
        self.links: dict[str, seq.LinkState] = store.load_links()
        self.published: dict[str, int] = {}
        self.batch: list[Delivery] = []
        self.flush_scheduled = False
        self.workload_paused = store.get_control("workload_paused") is True
        self.stopping = False
        self._generation = 0
        self._started = False
        self._burst_step: Callable[[], None] | None = None
        self.heard_from: set[str] = set()  # peers that acknowledged us since this process started
        self.beats: dict[str, seq.Beat] = {}  # what each peer was told and said last (memory only)
        self._beats_incarnation: int | None = None
        self.connects = 0  # broker connections made ready since this process started
        self._failures_logged: set[str] = set()
        self._unconfirmed: dict[str, int] = {}
        self._unconfirmed_logged: dict[str, float] = {}
        self._saved_rows: dict[str, Any] = {}  # what the store holds of links and counters
        self._last_prune = 0.0
        self.on_tick_hooks: list[Callable[[], None]] = []
        self._rng = random.Random(f"{site}-objects")
        # hardened mode signs what this site originates and verifies what it receives
        # (emulator.protocol.signing): its key of this incarnation, the keys pinned per origin
        self.signing = self.mode == "hardened"
        self._signer: signing.Signer | None = None
        self._pins: dict[str, signing.Pin] | None = None
        self._sig_checks: dict[int, signing.Check] = {}  # this packet's envelopes, by id()
        self._load_counters()
        with store.transaction():
            store.begin_run(self.run_id, self.clock())
            if self.signing:
                self.rekey()
        self.recovery = Recovery(self)
        self.on_tick_hooks.append(self.recovery.tick)
        self.on_tick_hooks.append(self.recovery.peer_tick)
        self.workload = WorkloadClock(
            site,
            clients.ids if clients else [],
            topology.workload_of(site),
            has_objects=self.spec.type != "secondary",
            has_children=bool(self.children),
            now=self.clock(),
        )

    def new_id(self, length: int = 12) -> str:
        return f"{self.rng.getrandbits(4 * length):0{length}x}"

    # -- counters, links and the runtime transaction ---------------------------------------

    def _load_counters(self) -> None:
        s = self.store
        self.txn_id = s.get_int("txn_id")
        self.incarnation = s.get_int("incarnation", 1)
        self.scf_serial = s.get_int("scf_serial")
        self.status_serial = s.get_int("status_serial")
        # One allocator per site for every kind, so an ID names one object of the site.
        self.alloc = {"object": s.allocators().get("object", 1)}
        self.state = s.get_meta("state", "active") or "active"
        self._saved_rows.clear()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One store transaction that, before it commits, saves whatever of the links and
        counters changed in memory."""
        with self.store.transaction() as db:
            yield db
            written = self._save()
        self._saved_rows.update(written)

    def _save(self) -> dict[str, Any]:
        """Write the links and counters that differ from what the store holds; return the
        rows written (remembered once the transaction has committed)."""
        written: dict[str, Any] = {}
        for peer, link in self.links.items():
            mark = link.fingerprint()  # only a link that changed is serialized and written
            if self._saved_rows.get(f"link:{peer}") != mark:
                self.store.save_link_row(peer, codec.dumps(link.to_row()))
                written[f"link:{peer}"] = mark
        for name in _COUNTERS:
            value = str(getattr(self, name))
            if self._saved_rows.get(name) != value:
                self.store.set_meta(name, value)
                written[name] = value
        for kind, n in self.alloc.items():
            if self._saved_rows.get(f"alloc:{kind}") != str(n):
                self.store.set_allocator(kind, n)
                written[f"alloc:{kind}"] = str(n)
        return written

    def capture(self) -> Saved:
        agent = self.recovery.agent
        return Saved({p: link.clone() for p, link in self.links.items()}, dict(self.published), self.txn_id,
                     self.incarnation,
                     self.scf_serial, self.status_serial, self.alloc["object"], self.state,
                     agent.to_state() if agent else None, self.workload_paused)

    def restore(self, saved: Saved) -> None:
        self.links.clear()
        self.links.update(saved.links)
        self.published = dict(saved.published)
        self.txn_id, self.incarnation = saved.txn_id, saved.incarnation
        self.scf_serial, self.status_serial = saved.scf_serial, saved.status_serial
        self.alloc["object"] = saved.object_next
        self.state = saved.state
        self.workload_paused = saved.workload_paused
        self.recovery.restore_agent(saved.agent)
        self._signer = None  # read back from the store, like the rest
        self._pins = None

    def _send_mark(self) -> SendMark:
        return SendMark(self.txn_id, self.scf_serial, self.status_serial, self.alloc["object"],
                        {p: (l.next_send_seq, l.sent) for p, l in self.links.items()}, dict(self.published))

    def _back_to(self, mark: SendMark) -> None:
        self.txn_id, self.scf_serial, self.status_serial = mark.txn_id, mark.scf_serial, mark.status_serial
        self.alloc["object"] = mark.object_next
        self.published = dict(mark.published)
        for peer, (next_send_seq, sent) in mark.sends.items():
            self.links[peer].next_send_seq = next_send_seq
            self.links[peer].sent = sent

    def reload_state(self) -> None:
        """Make the in-memory state what the store says (after a transaction failed)."""
        self.links.clear()
        self.links.update(self.store.load_links())
        self._load_counters()
        self.published = {peer: link.acked_through for peer, link in self.links.items()}
        self.recovery.reload()

    # -- the history ------------------------------------------------------------------------

    def event(self, kind: str, now: float, *, link: str | None = None, seq_: int | None = None,
              txn: int | None = None, data_class: str | None = None, key: str | None = None,
              hash_: str | None = None, inc: int | None = None, detail: dict[str, Any] | None = None) -> None:
        """Record one event of the history, inside the current transaction."""
        self.store.add_event(self.run_id, now, kind, link, seq_, txn, data_class, key, hash_, inc,
                             codec.dumps(detail) if detail else None)

    def _envelope_event(self, kind: str, link: str, env: Envelope, now: float,
                        detail: dict[str, Any] | None = None) -> None:
        self.event(kind, now, link=link, seq_=env.link_seq, txn=env.txn_id, data_class=env.data_class.value,
                   key=env.key, hash_=env.hash, inc=env.incarnation, detail=detail)

    def _prune_history(self, now: float) -> None:
        """Every ``retention_interval``: prune what the retention settings let go (the rules:
        ``emulator.protocol.retention``), in the tick's transaction."""
        if now - self._last_prune < self.settings.retention_interval:
            return
        self._last_prune = now
        cut = retention.cutoffs(retention.Retention.of(self.settings), now)
        gone = self.store.prune(cut)
        if cut.events_before is not None:
            gone["events"] = self.store.prune_events(cut.events_before)
        if any(gone.values()):
            log.info("%s: retention pruned %s", self.site,
                     ", ".join(f"{n} {table}" for table, n in sorted(gone.items()) if n))

    # -- first start ----------------------------------------------------------------------

    @classmethod
    def initialize_store(cls, store: SiteStore, *, lab: str, topology: Topology, site: str,
                         store_id: str | None = None, created: float | None = None) -> None:
        """Give a brand-new store its identity and its links (a no-op if it has one)."""
        if store.get_meta("site_code"):
            return
        spec = topology.site(site)
        with store.transaction():
            store.set_meta("site_code", site)
            store.set_meta("site_type", spec.type)
            store.set_meta("parent", spec.parent or "")
            store.set_meta("lab", lab)
            store.set_meta("mode", topology.mode)
            store.set_meta("store_id", store_id or os.urandom(16).hex())
            store.set_meta("incarnation", 1)
            store.set_meta("txn_id", 0)
            store.set_meta("scf_serial", 0)
            store.set_meta("state", "active")
            store.set_meta("created", time.time() if created is None else created)
            store.set_allocator("object", 1)
            if spec.parent:
                store.save_link(seq.LinkState(peer=spec.parent, role="parent", their_incarnation=1))
            for child in topology.children(site):
                store.save_link(seq.LinkState(peer=child, role="child", their_incarnation=1))

    # -- transport handler ----------------------------------------------------------------

    def on_ready(self) -> None:
        # Unconfirmed publishes of the last connection are unknown: send them again from the
        # last acknowledgement; receivers drop what they already have.
        self.published = {peer: link.acked_through for peer, link in self.links.items()}
        # Deliveries of the last connection not yet flushed were requeued by the broker and
        # their tags mean nothing on this channel; their flush timer died with the old loop.
        self.batch.clear()
        self.flush_scheduled = False
        self.connects += 1
        log.info("%s connected to the broker; state %s", self.site, self.state)
        # Every connection has its own I/O loop: the timers of the last one died with it.
        self._generation += 1
        self.later(self.settings.sync_interval, self._tick)
        self.later(0.05, self._workload_tick)
        if self._burst_step is not None:
            self.later(0, self._burst_step)
        self.recovery.reset_kick()
        self.recovery.kick()  # a recovery agent announces at once
        self.recovery.resume_peer_resyncs()
        if not self._started:
            self._started = True
            self.guarded(self._startup_reports)
        self.guarded(self.pump)

    def later(self, delay: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` after ``delay`` on this connection's loop (never on a later one)."""
        generation = self._generation

        def run() -> None:
            if generation == self._generation:
                self.guarded(fn)

        self.transport.call_later(delay, run)

    def guarded(self, fn: Callable[[], None]) -> None:
        """Run a callback of the I/O loop; an unexpected exception never ends the site.

        It is logged once per place with its traceback (then one line each time), and the
        in-memory state is read back from the store, which the failed transaction left as
        it was before.
        """
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - logged once by _log_failure
            where = f"{getattr(fn, '__qualname__', fn)}:{type(exc).__name__}"
            self._log_failure(where, exc, "the site goes on")
            self.reload_state()

    def _log_failure(self, where: str, exc: BaseException, then: str) -> None:
        """An unexpected error: its traceback the first time at this place, one line after."""
        if where not in self._failures_logged:
            self._failures_logged.add(where)
            log.error("%s: unexpected error in %s; %s", self.site, where, then, exc_info=exc)
        else:
            log.error("%s: unexpected error in %s again: %r", self.site, where, exc)

    def on_delivery(self, delivery: Delivery) -> None:
        self.batch.append(delivery)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.later(0, self.flush)

    def on_queue_restored(self, queue: str) -> None:
        now = self.clock()
        with self.transaction():
            self.event("queue_restored", now, detail={"queue": queue})
            meanwhile = ("what peers sent meanwhile came back to them and is sent again" if queue == "site" else
                         "a command sent meanwhile is lost with it: its sender gets no answer and may send it again")
            self.status(sid.QUEUE_RESTORED, "warning",
                        f"the broker deleted this site's {queue} queue; it was declared and bound again ({meanwhile})",
                        now)
        self.pump()

    def on_confirm(self, token: Any, ok: bool) -> None:
        if ok:
            return
        kind = token[0]
        if kind == "out":
            _, peer, first = token
            self._unconfirmed[peer] = self._unconfirmed.get(peer, 0) + 1
            now = self.clock()
            if now - self._unconfirmed_logged.get(peer, 0.0) >= 10.0:  # a warning, not a flood
                log.warning("%s: %d publish(es) to %s not confirmed (unroutable or refused) since the"
                            " last warning, now from seq %s; will resend", self.site,
                            self._unconfirmed[peer], peer, first)
                self._unconfirmed_logged[peer] = now
                self._unconfirmed[peer] = 0
            self.published[peer] = min(self.published.get(peer, 0), first - 1)
        elif kind == "dead":
            log.error("%s: the broker refused a dead letter; it is in this site's log only", self.site)

    # -- the batch ------------------------------------------------------------------------

    def flush(self) -> None:
        self.flush_scheduled = False
        batch, self.batch = self.batch, []
        if not batch:
            return
        now = self.clock()
        out = Outgoing()
        malformed: list[tuple[Delivery, str]] = []
        try:
            self._apply_batch(batch, out, malformed, now)
        except Exception:
            # Nothing of the batch was committed or acknowledged: take it again in a moment
            # (``guarded`` logs this and reads the state back from the store).
            self.batch = batch + self.batch
            if not self.flush_scheduled:
                self.flush_scheduled = True
                self.later(1.0, self.flush)
            raise
        self._ack_batch(batch, malformed)
        self._send(out)
        self.pump()

    def _apply_batch(self, batch: list[Delivery], out: Outgoing, malformed: list[tuple[Delivery, str]],
                     now: float) -> None:
        with self.transaction():
            for delivery in batch:
                # Each delivery in a savepoint: one we cannot apply is undone and dead-lettered,
                # and neither the batch nor the site goes down with it.
                saved = self.capture()
                self.store.savepoint("delivery")
                try:
                    if delivery.queue == "control":
                        why = admission.command_refusal(self.identities, user_id=delivery.user_id,
                                                        parent=self.parent, cmd=None)
                        if why:
                            raise RefusedIdentity(f"refused: {why}", None)
                        self._handle_control(delivery, out, now)
                    else:
                        packet = wire.decode(delivery.body, lab=self.lab, dest=self.site)
                        why = admission.sender_refusal(self.identities, user_id=delivery.user_id,
                                                       sender=packet.source)
                        if why:
                            raise RefusedIdentity(f"refused: {why}", packet.source)
                        self._handle_packet(packet, delivery.redelivered, out, now)
                    self.store.flush_pending()  # its writes, together, while its savepoint can undo them
                except ControlFailed as failed:
                    self.store.rollback_to("delivery")
                    self.restore(saved)
                    if delivery.reply_to:
                        out.replies.append((delivery.reply_to, delivery.correlation_id, failed.answer))
                except MalformedEnvelope as exc:
                    self.store.rollback_to("delivery")
                    self.restore(saved)
                    malformed.append((delivery, str(exc)))
                    self._refused(delivery, exc, now)
                except Exception as exc:  # noqa: BLE001 - logged once by _log_failure
                    self._log_failure(f"a message from the {delivery.queue} queue:{type(exc).__name__}", exc,
                                      "it is dead-lettered and the site goes on")
                    self.store.rollback_to("delivery")
                    self.restore(saved)
                    malformed.append((delivery, f"cannot apply: {exc!r}"))
                self.store.release("delivery")

    def _refused(self, delivery: Delivery, exc: MalformedEnvelope, now: float) -> None:
        """Count and record a refused delivery (after its savepoint was undone): the reason is
        in the history and, with the message, in the dead-letter queue."""
        peer = exc.peer if isinstance(exc, RefusedInput) else None
        link = self.links.get(peer) if peer else None
        if link is not None:
            counter = "refused_identity" if isinstance(exc, RefusedIdentity) else "refused_input"
            link.extra[counter] = link.extra.get(counter, 0) + 1
        self.event("refused", now, link=f"{peer}->{self.site}" if link else None,
                   detail={"queue": delivery.queue, "reason": str(exc)[:300]})

    def _ack_batch(self, batch: list[Delivery], malformed: list[tuple[Delivery, str]]) -> None:
        if not malformed:
            self.transport.ack(batch[-1].tag, multiple=True)
            return
        bad = {d.tag for d, _ in malformed}
        for d in batch:
            if d.tag not in bad:
                self.transport.ack(d.tag)
        for d, reason in malformed:
            log.warning("%s: dead-lettering a malformed message: %s", self.site, reason)
            self._dead_letter(d, reason)

    def _dead_letter(self, delivery: Delivery, reason: str) -> None:
        # Kept, with its reason, in the lab's dead-letter queue. The dead-letter publish goes
        # out (confirmed) on the channel before the ack, so the broker has it first.
        if self._publish_dead(delivery.body, reason, delivery.queue):
            self.transport.ack(delivery.tag)

    def _publish_dead(self, raw: bytes, reason: str, queue: str) -> bool:
        body = json.dumps({
            "site": self.site, "reason": reason, "queue": queue, "at": self.clock(),
            "body": raw.decode("utf-8", errors="replace"),
        }).encode()
        try:
            self.transport.publish(names.DEAD_KEY, body, ("dead",))
        except BrokerUnavailable:
            return False
        return True

    # -- packets --------------------------------------------------------------------------

    def _handle_packet(self, packet: wire.Packet, redelivered: bool, out: Outgoing, now: float) -> None:
        peer = packet.source
        link = self.links.get(peer)
        if link is None:
            raise MalformedEnvelope(f"packet from {peer}, which is not a neighbour of {self.site}")
        subtree = self._subtrees.get(peer, frozenset())
        for m in packet.messages:
            if isinstance(m, Envelope):
                why = admission.refusal(m, peer_role=link.role, peer_subtree=subtree, ancestors=self._ancestors,
                                        descendants=self._descendants)
                if why:
                    raise RefusedInput(f"refused: {why}", peer)
        if self.signing:
            self._check_signatures(link, packet)
        data = [(m.data_class.value, m.key, m.data_class.upward) for m in packet.messages if isinstance(m, Envelope)]
        if len(data) > 1:  # what the envelopes will look up, read at once
            self.store.prefetch(peer, [(c, k) for c, k, _ in data], [(c, k) for c, k, up in data if up])
        for msg in packet.messages:
            if isinstance(msg, Envelope):
                self._receive_envelope(link, msg, out, now)
            elif isinstance(msg, LinkAck):
                self._receive_ack(link, msg, redelivered, now)
            elif isinstance(msg, ResendRequest):
                self._receive_resend_request(link, msg, out, now)
            elif isinstance(msg, Reject):
                key = f"rejected_{msg.reason.value}"
                link.extra[key] = link.extra.get(key, 0) + 1
                self.event("rejected", now, link=f"{self.site}->{peer}", seq_=msg.link_seq,
                           inc=msg.incarnation, detail={"reason": msg.reason.value})
            else:
                out.messages[peer].extend(self.recovery.on_peer_message(link, msg, now))

    def _receive_envelope(self, link: seq.LinkState, env: Envelope, out: Outgoing, now: float) -> None:
        peer = link.peer
        name = f"{peer}->{self.site}"
        applied_hash = self.store.applied_hash(peer, env.link_seq) if env.link_seq < link.next_expected else None
        receipt = seq.receive(link, env, mode=self.mode,
                              watermark=self.store.watermark(peer, env.data_class.value, env.key),
                              applied_hash=applied_hash, now=now, sync_interval=self.settings.sync_interval)
        check = self._sig_checks.get(id(env)) if self.signing else None
        if receipt.apply and check is not None and check.outcome is signing.Outcome.RETIRED:
            # signed with a key its origin's recovery retired: consumed, refused with the reason
            receipt = seq.unappliable(link, env, drop="retired_key")
            out.dead.append((wire.encode_message(env), f"refused: {check.reason}"))
            self._envelope_event("unappliable", name, env, now, {"reason": check.reason[:300]})
            self._told_retired(env, check.reason, now)
        elif receipt.apply:
            self.store.savepoint("envelope")
            mark = self._send_mark()
            try:
                self.store.set_watermark(peer, env.data_class.value, env.key, env.txn_id)
                version = self._apply(env, now)
                if check is not None and check.pin is not None:
                    self.pin(env.origin, check.pin, now,
                             why=f"{env.origin} was recovered" if check.rotated else f"first heard of {env.origin}")
            except Exception as exc:  # noqa: BLE001 - well-formed but unappliable: consume, record, keep
                self.store.rollback_to("envelope")
                self.store.release("envelope")
                self._back_to(mark)
                receipt = seq.unappliable(link, env)
                log.error("%s: envelope %s seq %s from %s cannot be applied: %r", self.site,
                          env.data_class.value, env.link_seq, env.source, exc)
                out.dead.append((wire.encode_message(env), f"cannot apply: {exc!r}"))
                self._envelope_event("unappliable", name, env, now, {"error": repr(exc)[:200]})
            else:
                self.store.release("envelope")
                self.store.record_applied(peer, env.link_seq, env.txn_id, env.hash, env.data_class.value,
                                          env.key, env.origin, version, now)
                self._envelope_event("applied", name, env, now, {"version": version} if version else None)
                if self.state == "recovering":
                    self.recovery.kick()  # completion waits on the peers' resync data
        else:
            self._envelope_event(receipt.verdict.value, name, env, now)
        if receipt.drop:
            self.store.record_drop(peer, env.link_seq, env.txn_id, env.incarnation, receipt.drop,
                                   env.data_class.value, env.key, env.origin, env.hash, now)
        if receipt.ack:
            out.ack_peers.add(peer)
        if receipt.quarantine:
            self._quarantined(link, receipt.quarantine, now)
        if receipt.resend_from is not None:
            out.messages[peer].append(ResendRequest(source=self.site, dest=peer, incarnation=self.incarnation,
                                                    from_seq=receipt.resend_from))
        if receipt.reject is not None:  # hardened: every refusal carries its reason back
            out.messages[peer].append(Reject(source=self.site, dest=peer, incarnation=self.incarnation,
                                             link_seq=env.link_seq, reason=receipt.reject,
                                             detail=f"expected {link.next_expected}"))

    def _receive_ack(self, link: seq.LinkState, ack: LinkAck, redelivered: bool, now: float) -> None:
        self.heard_from.add(link.peer)
        seq.heard(self.beats.setdefault(link.peer, seq.Beat()), ack)
        decision = seq.take_ack(link, ack, mode=self.mode, now=now, redelivered=redelivered,
                                suspect_for=3 * self.settings.sync_interval)
        effect = decision.effect
        name = f"{self.site}->{link.peer}"
        if decision.purge_through is not None:
            through = decision.purge_through
            if "purge-past-ack" in PLANTED_BUGS and self.published.get(link.peer, 0) > through:
                through += 1  # a bug planted on purpose (tests of the simulator's seed sweeps)
            self.store.outbox_purge(link.peer, through)
            self.published[link.peer] = max(self.published.get(link.peer, 0), decision.purge_through)
            self.event("ack", now, link=name, seq_=decision.purge_through, inc=ack.incarnation)
            if self.state == "recovering":
                self.recovery.kick()  # completion waits on these acks
        if effect is seq.AckEffect.ROLLBACK:
            self.event("rollback", now, link=f"{link.peer}->{self.site}", seq_=ack.through, inc=ack.incarnation,
                       detail={"sent_through": ack.sent_through})
        elif effect is seq.AckEffect.REFUSED:
            if link.ahead_since == now:  # the first of a run of them: one event, every one counted
                self.event("refused", now, link=f"{link.peer}->{self.site}", seq_=ack.through, inc=ack.incarnation,
                           detail={"reason": f"an ack through {ack.through}, but {self.site} has sent"
                                             f" only {link.sent_through}: nothing purged"})
        elif effect is seq.AckEffect.SELF_ROLLBACK:
            self.event("self_rollback", now, link=name, seq_=ack.through, inc=ack.incarnation,
                       detail={"sent_through": link.sent_through})
        elif effect is seq.AckEffect.FENCED:
            self.event("fenced", now, link=f"{link.peer}->{self.site}", inc=ack.incarnation, detail={"ack": True})
        if decision.quarantine_peer:
            self._quarantined(link, decision.quarantine_peer, now)
        if decision.quarantine_self and self.state != "quarantined":
            self.state = "quarantined"
            self.event("quarantine", now, link=name, detail={"self": True})
            self.status(sid.ROLLBACK_SELF, "error",
                        f"{decision.quarantine_self}; quarantined until recovered (smslab recover {self.site})", now)

    def _quarantined(self, link: seq.LinkState, why: str, now: float) -> None:
        self.event("quarantine", now, link=f"{link.peer}->{self.site}", detail={"why": why})
        self.status(sid.ROLLBACK_DETECTED, "error",
                    f"rollback detected for site {link.peer} (the AD event 2095 analog): {why};"
                    f" {link.peer} is quarantined until it is recovered", now)

    def _receive_resend_request(self, link: seq.LinkState, req: ResendRequest, out: Outgoing, now: float) -> None:
        decision = seq.serve_resend(link, req, self.store.outbox_min_seq(link.peer))
        name = f"{self.site}->{link.peer}"
        if decision.refused:
            self.event("refused", now, link=f"{link.peer}->{self.site}", seq_=req.from_seq, inc=req.incarnation,
                       detail={"reason": f"a resend request from seq {req.from_seq}, but {self.site} has sent"
                                         f" only {link.sent_through}"})
            return
        if decision.unavailable:
            self.event("resend_unavailable", now, link=name, seq_=req.from_seq)
        if decision.start is not None:
            out.republish[link.peer] = decision.start
            self.event("resend", now, link=name, seq_=decision.start, detail={"asked": True})

    # -- applying data --------------------------------------------------------------------

    def _apply(self, env: Envelope, now: float) -> int | None:
        cls = env.data_class
        if cls.upward:
            return self._apply_site_data(env, now)
        if cls is DataClass.SITE_CONTROL:
            self._apply_site_control(env, now)
            return None
        return self._apply_object(env, now)

    def _apply_site_data(self, env: Envelope, now: float) -> int:
        version = int(env.payload.get("version", 0))
        held = self.store.site_data_version(env.data_class.value, env.key)
        if not keep_site_data(env.data_class, version, held, recovering=self.state == "recovering"):
            return version
        self.store.upsert_site_data(env.data_class.value, env.key, env.origin, version, env.payload, now)
        if self.parent:
            self.emit(self.parent, env.data_class, env.key, env.origin, env.payload, env.op, env.hash)
        return version

    def _apply_object(self, env: Envelope, now: float) -> int:
        obj = dict(env.payload)
        self.store.upsert_object(obj, via=env.source, now=now)
        for child in self.children:
            self.emit(child, env.data_class, env.key, env.origin, env.payload, env.op, env.hash)
        return int(obj.get("revision", 0))

    def _apply_site_control(self, env: Envelope, now: float) -> None:
        target = env.payload["target"]
        if target != self.site:
            for child in self.children:
                if target in self.topology.subtree(child):
                    self.emit(child, env.data_class, env.key, env.origin, env.payload, env.op, env.hash)
            return
        serial = int(env.payload["delta_serial"])
        last = self.store.get_int("control_serial_processed")
        if not apply_control_change(serial, last):
            self.status(sid.SCM_OLDER_DELTA, "warning",
                        f"SMS_SITE_CONTROL_MANAGER will ignore delta serial {serial} because it"
                        f" was already processed as part of an older delta site control file"
                        f" (last processed {last})", now)
            return
        self.status(sid.SCM_BEGIN, "info", f"began processing delta site control file {serial}", now)
        self.store.set_meta("control_serial_processed", serial)
        self.store.set_control("site_settings", env.payload.get("settings", {}))
        self.status(sid.SCM_DONE, "info", f"processed delta site control file {serial}", now)
        self.send_scf(now)

    # -- signatures (hardened mode) ---------------------------------------------------------

    def rekey(self) -> signing.Signer:
        """This incarnation's signing key, made (and kept in the store) when the incarnation
        has none yet: at the first start, and when a recovery moved the incarnation on."""
        seed = self.store.signing_seed(self.incarnation)
        if seed is None:
            seed = self.rng.randbytes(32)
            self.store.set_signing_seed(self.incarnation, seed)
        self._signer = signing.Signer(seed, self.incarnation)
        return self._signer

    def signer(self) -> signing.Signer:
        if self._signer is None or self._signer.inc != self.incarnation:
            return self.rekey()
        return self._signer

    def sign(self, cls: DataClass, key: str, op: str, payload: dict[str, Any]) -> dict[str, Any]:
        return self.signer().sign(self.site, cls.value, key, op, payload)

    def pins(self) -> dict[str, signing.Pin]:
        if self._pins is None:
            self._pins = {site: signing.Pin(inc, pub) for site, (inc, pub) in self.store.site_keys().items()}
        return self._pins

    def pin(self, origin: str, pin: signing.Pin, now: float, *, why: str) -> None:
        """Pin ``origin``'s key (in this transaction)."""
        before = self.pins().get(origin)
        self.store.pin_key(origin, pin.inc, pin.pub, now)
        self.pins()[origin] = pin
        self.event("key", now, inc=pin.inc, detail={"site": origin, "key": pin.fingerprint, "why": why})
        if before is not None:
            self.status(sid.KEY_CHANGED, "info" if pin.inc > before.inc else "warning",
                        f"the key of {origin} is now {pin.fingerprint} (incarnation {pin.inc}; was"
                        f" {before.fingerprint}, incarnation {before.inc}): {why}", now)

    def _told_retired(self, env: Envelope, reason: str, now: float) -> None:
        sig = env.payload.get(signing.SIG) or {}
        told = self.store.get_meta(f"retired_told:{env.origin}")
        if told != str(sig.get("inc")):
            self.store.set_meta(f"retired_told:{env.origin}", sig.get("inc"))
            self.status(sid.KEY_RETIRED, "warning", f"refused {env.data_class.value} {env.key!r}"
                        f" from {env.source}: {reason}", now)

    def _check_signatures(self, link: seq.LinkState, packet: wire.Packet) -> None:
        """Every envelope of the packet against the pins (and what earlier envelopes of the
        packet would pin): a forgery refuses the packet; the rest is kept for the receive."""
        self._sig_checks.clear()
        pins = dict(self.pins())
        for m in packet.messages:
            if not isinstance(m, Envelope) or link.quarantined or m.incarnation != link.their_incarnation \
                    or m.link_seq < link.next_expected:
                continue  # fenced, quarantined or a repeat: sequencing applies none of them
            result = signing.check(m.origin, m.data_class.value, m.key, m.op, m.payload,
                                   pinned=pins.get(m.origin),
                                   neighbour_incarnation=link.their_incarnation if m.origin == m.source else None)
            if result.outcome is signing.Outcome.FORGED:
                raise RefusedInput(f"refused: {m.data_class.value} {m.key!r} from {m.source} (origin"
                                   f" {m.origin}): {result.reason}", link.peer)
            if result.pin is not None:
                pins[m.origin] = result.pin
            self._sig_checks[id(m)] = result

    # -- originating ----------------------------------------------------------------------

    def emit(self, peer: str, cls: DataClass, key: str, origin: str, payload: dict[str, Any],
             op: Literal["upsert", "delete"] = "upsert", hash_: str | None = None) -> None:
        """Queue one envelope for a peer; ``hash_`` is the payload's hash when already known."""
        link = self.links[peer]
        if self.signing and origin == self.site and not self.signer().signed_by_me(payload):
            payload = self.sign(cls, key, op, payload)  # a record of ours from before a recovery
            hash_ = None
        self.txn_id += 1
        seq_no = link.next_send_seq
        digest = hash_ or content_hash(payload)
        body = wire.encode_envelope(source=self.site, dest=peer, incarnation=self.incarnation, origin=origin,
                                    data_class=cls, key=key, txn_id=self.txn_id, link_seq=seq_no, op=op,
                                    hash_=digest, payload=payload)
        self.store.outbox_add(peer, seq_no, body)
        self.store.add_event(self.run_id, self.clock(), "sent", f"{self.site}->{peer}", seq_no, self.txn_id,
                             cls.value, key, digest, self.incarnation, None)
        link.next_send_seq += 1
        link.sent += 1

    def originate_site_data(self, cls: DataClass, key: str, version: int, payload: dict[str, Any],
                            now: float) -> None:
        """Data made at this site: store it here and send it up."""
        if self.signing:
            payload = self.sign(cls, key, "upsert", payload)
        self.store.upsert_site_data(cls.value, key, self.site, version, payload, now)
        if self.parent and self.state != "quarantined":
            self.emit(self.parent, cls, key, self.site, payload)

    def status(self, message_id: int, severity: str, text: str, now: float) -> None:
        """A status message: stored here and replicated up as site data."""
        log.log(logging.WARNING if severity != "info" else logging.INFO, "%s status %s: %s",
                self.site, message_id, text)
        self.store.add_status(sid.component_of(message_id), message_id, severity, text, now)
        self.status_serial += 1
        payload = {"site": self.site, "component": sid.component_of(message_id),
                   "message_id": message_id, "severity": severity, "text": text,
                   "version": self.status_serial, "at": now}
        self.originate_site_data(DataClass.STATUS, f"{self.site}:{self.status_serial}",
                                 self.status_serial, payload, now)

    def send_scf(self, now: float) -> None:
        self.scf_serial += 1
        payload = {"site": self.site, "version": self.scf_serial, "type": self.spec.type,
                   "parent": self.parent, "children": self.children,
                   "settings": self.store.get_control("site_settings") or {}}
        self.originate_site_data(DataClass.SCF, self.site, self.scf_serial, payload, now)

    def create_object(self, kind: str, name: str | None, now: float) -> dict[str, Any]:
        if name is not None and not name.strip():
            raise SmslabError("an object's name cannot be empty")
        number = self.alloc["object"]
        self.alloc["object"] = number + 1
        oid = object_id(self.site, number)
        obj = {"id": oid, "kind": kind, "origin": self.site, "def_uid": self.new_id(),
               "name": name or f"{kind} {oid}", "revision": 1, "deleted": False}
        self._publish_object(obj, now)
        return obj

    def update_object(self, oid: str, name: str | None, delete: bool, now: float) -> dict[str, Any]:
        obj = self.store.get_object(oid)
        owner = parse_object_id(oid)
        if obj is None:
            raise SmslabError(f"there is no object {oid} at {self.site}",
                              hint=f"objects are changed at the site that owns them ({owner[0]})" if owner else None)
        if obj["origin"] != self.site:
            raise SmslabError(f"{oid} belongs to {obj['origin']}: objects from above are locked at {self.site}",
                              hint=f"change it at {obj['origin']}")
        if obj["deleted"]:
            raise SmslabError(f"{obj['kind']} {oid} is deleted")
        if name is not None and not name.strip():
            raise SmslabError("an object's name cannot be empty")
        obj = dict(obj, revision=obj["revision"] + 1)
        if name:
            obj["name"] = name
        if delete:
            obj["deleted"] = True
            obj["deleted_at"] = now  # the tombstone lifetime runs from here, at every site
        self._publish_object(obj, now)
        return obj

    def _publish_object(self, obj: dict[str, Any], now: float) -> None:
        if self.signing:
            obj = self.sign(DataClass(obj["kind"]), obj["id"], "delete" if obj["deleted"] else "upsert", obj)
        self.store.upsert_object(obj, via=self.site, now=now)
        if self.state == "quarantined":
            return
        cls = DataClass(obj["kind"])
        for child in self.children:
            self.emit(child, cls, obj["id"], self.site, obj, "delete" if obj["deleted"] else "upsert")

    def send_site_control(self, child: str, now: float, settings: dict[str, Any] | None = None) -> None:
        serial = self.store.get_int(f"control_serial_sent:{child}") + 1
        self.store.set_meta(f"control_serial_sent:{child}", serial)
        if settings is None:
            settings = {"inventory_schedule": f"every {self._rng.randint(1, 7)} days"}
        self.store.set_control(f"control_last:{child}", settings)  # sent again after a recovery
        payload = {"target": child, "delta_serial": serial, "settings": settings}
        next_hop = next(c for c in self.children if child in self.topology.subtree(c))
        self.emit(next_hop, DataClass.SITE_CONTROL, f"{child}:{serial}", self.site, payload)

    # -- workload -------------------------------------------------------------------------

    def _startup_reports(self) -> None:
        """Record the start; clients re-send what the site does not hold yet; the SCF goes up."""
        now = self.clock()
        with self.transaction():
            self.event("start", now, inc=self.incarnation, detail={
                "pid": self.process_id, "state": self.state, "txn_id": self.txn_id,
                "links": {p: {"next_send_seq": l.next_send_seq, "acked_through": l.acked_through,
                              "next_expected": l.next_expected} for p, l in self.links.items()}})
            if self.scf_serial == 0:
                self.send_scf(now)
            self.client_catch_up(now, full=False)
        self.pump()

    def client_catch_up(self, now: float, *, full: bool) -> None:
        if not self.clients:
            return
        for client, (inv, disc) in self.clients.versions().items():
            for cls, version in ((DataClass.INVENTORY, inv), (DataClass.DISCOVERY, disc)):
                if version == 0:
                    continue
                held = self.store.site_data_version(cls.value, client)
                if full or held is None or held < version:
                    self.originate_site_data(cls, client, version, self._client_payload(cls, client, version), now)

    @staticmethod
    def _client_payload(data_class: DataClass, client: str, version: int) -> dict[str, Any]:
        if data_class is DataClass.INVENTORY:
            return inventory_payload(client, version)
        return {"client": client, "version": version}

    def _workload_tick(self) -> None:
        if self.stopping:  # set by a signal handler: stop from inside the loop
            self.shutdown()
            return
        if self.workload_paused or self.state != "active":
            self.later(WORKLOAD_TICK_MAX, self._workload_tick)
            return
        now = self.clock()
        due = self.workload.due(now)
        # The next look when something is due, between WORKLOAD_TICK and WORKLOAD_TICK_MAX (a
        # stop, a pause or new rates are seen within the longer): an idle site wakes rarely.
        wait = min(max(self.workload.next_at() - now, WORKLOAD_TICK), WORKLOAD_TICK_MAX)
        self.later(wait, self._workload_tick)
        if not due:
            return
        with self.transaction():
            if due.inventory or due.discovery:
                assert self.clients is not None
                for client in due.inventory:
                    v = self.clients.bump(client, "inventory")
                    self.originate_site_data(DataClass.INVENTORY, client, v, inventory_payload(client, v), now)
                for client in due.discovery:
                    v = self.clients.bump(client, "discovery")
                    self.originate_site_data(DataClass.DISCOVERY, client, v, {"client": client, "version": v}, now)
            if due.status:
                self.status(sid.SITE_HEARTBEAT, "info", "site component manager heartbeat", now)
            if due.objects:
                self._random_admin_action(now)
            if due.control:
                self.send_site_control(self._rng.choice(self.children), now)
        self.pump()

    def _random_admin_action(self, now: float) -> None:
        own = self.store.objects(origin=self.site, include_deleted=False)
        roll = self._rng.random()
        most = self.topology.workload_of(self.site).max_objects
        if own and roll < 0.25:
            self.update_object(self._rng.choice(own)["id"], None, False, now)
        elif own and (roll < 0.32 or 0 < most <= len(own)):
            self.update_object(self._rng.choice(own)["id"], None, True, now)
        else:
            self.create_object(self._rng.choice(OBJECT_KINDS), None, now)

    def burst(self, count: int, keys: int, chunk: int) -> None:
        """Originate ``count`` inventory envelopes of synthetic clients (benchmarks, load)."""
        if not self.parent:
            raise SmslabError(f"{self.site} has no parent to send a burst to")
        made = {"n": 0}
        names_ = [f"{self.site}-B{i:05d}" for i in range(min(keys, count))]
        base = self.clients.inventory_of(names_) if self.clients else {}  # a burst again: newer versions

        def step() -> None:
            now = self.clock()
            reports: list[tuple[str, int]] = []
            for _ in range(min(chunk, count - made["n"])):
                client = names_[made["n"] % keys]
                reports.append((client, base.get(client, 0) + made["n"] // keys + 1))
                made["n"] += 1
            if self.clients:  # the clients report first, as a client's report reaches its site
                self.clients.reported(reports)
            with self.transaction():
                for client, version in reports:
                    self.originate_site_data(DataClass.INVENTORY, client, version,
                                             inventory_payload(client, version), now)
            self.pump()
            if made["n"] < count:
                self.later(0, step)
            else:
                self._burst_step = None

        self._burst_step = step  # resumed on the next connection if the broker drops
        self.later(0, step)

    # -- sending --------------------------------------------------------------------------

    def _send(self, out: Outgoing) -> None:
        for peer in out.ack_peers:
            out.messages[peer].insert(0, self._ack_for(self.links[peer]))
        for peer, msgs in out.messages.items():
            if msgs:
                self.publish_direct(peer, msgs)
        for peer, from_seq in out.republish.items():
            self.published[peer] = min(self.published.get(peer, 0), from_seq - 1)
        for body, reason in out.dead:
            self._publish_dead(body, reason, "site")
        for reply_to, corr, answer in out.replies:
            self.transport.reply(reply_to, corr, json.dumps(answer).encode())

    def _ack_for(self, link: seq.LinkState) -> LinkAck:
        return LinkAck(source=self.site, dest=link.peer, incarnation=self.incarnation,
                       through=link.applied_through, sent_through=link.sent_through,
                       fresh=link.peer not in self.heard_from)

    def publish_direct(self, peer: str, msgs: list[wire._Msg]) -> None:
        body = wire.encode_parts(self.lab, self.site, peer, [wire.encode_message(m) for m in msgs])
        try:
            self.transport.publish(names.link_key(self.site, peer), body, None)
        except BrokerUnavailable:
            return  # acks and requests are repeated every sync interval
        for m in msgs:
            if isinstance(m, LinkAck):
                seq.told(self.beats.setdefault(peer, seq.Beat()), m, self.clock())

    def pump(self) -> None:
        """Publish outbox envelopes not yet published, up to the window, in packets."""
        if not self.transport.ready:
            return
        window = self.settings.window
        for peer, link in self.links.items():
            if link.paused or link.quarantined and self.mode == "hardened":
                continue
            published = max(self.published.get(peer, link.acked_through), link.acked_through)
            limit = link.acked_through + window - published
            if published >= link.sent_through or limit <= 0:
                self.published[peer] = published
                continue
            rows = self.store.outbox_range(peer, published + 1, min(limit, window))
            for start in range(0, len(rows), PACKET_SIZE):
                chunk = rows[start:start + PACKET_SIZE]
                body = wire.encode_parts(self.lab, self.site, peer, [b for _, b in chunk])
                try:
                    self.transport.publish(names.link_key(self.site, peer), body, ("out", peer, chunk[0][0]))
                except BrokerUnavailable:
                    return
                published = chunk[-1][0]
            self.published[peer] = published

    # -- the periodic tick ----------------------------------------------------------------

    def _tick(self) -> None:
        if self.stopping:
            return
        self.later(self.settings.sync_interval, self._tick)
        now = self.clock()
        counts = self.store.outbox_counts()
        s = self.settings
        if self._beats_incarnation != self.incarnation:  # a new incarnation: tell every peer
            self.beats.clear()
            self._beats_incarnation = self.incarnation
        decisions = {
            peer: seq.tick(link, now=now, unacked=counts.get(peer, 0), resend_after=s.resend_after,
                           sync_interval=s.sync_interval, degraded_after=s.degraded_after,
                           failed_after=s.failed_after, beat=self.beats.get(peer),
                           idle_heartbeat=s.idle_heartbeat)
            for peer, link in self.links.items()
        }
        for hook in self.on_tick_hooks:
            hook()
        with self.transaction():
            for peer, d in decisions.items():
                link = self.links[peer]
                if d.resend:
                    self.published[peer] = link.acked_through
                    self.event("resend", now, link=f"{self.site}->{peer}", seq_=link.acked_through + 1)
                if d.health_changed:
                    self._health_changed(link, d.health_before, d.health_after, now)
            self._prune_history(now)
        for peer, d in decisions.items():
            link = self.links[peer]
            msgs: list[wire._Msg] = []
            if d.heartbeat and not link.paused:
                msgs.append(self._ack_for(link))
            if d.request_resend_from is not None:
                msgs.append(ResendRequest(source=self.site, dest=peer, incarnation=self.incarnation,
                                          from_seq=d.request_resend_from))
            if msgs:
                self.publish_direct(peer, msgs)
        self.pump()

    def _health_changed(self, link: seq.LinkState, before: str, after: str, now: float) -> None:
        self.event("health", now, link=f"{self.site}<->{link.peer}", detail={"from": before, "to": after})
        if after in ("degraded", "failed"):
            mid = sid.LINK_DEGRADED if after == "degraded" else sid.LINK_FAILED
            self.status(mid, "warning" if after == "degraded" else "error",
                        f"replication link {self.site}<->{link.peer} is {after}"
                        f" ({max(link.out_failed_syncs, link.in_failed_syncs)} consecutive failed syncs)", now)
        elif after == "active" and before in ("degraded", "failed"):
            self.status(sid.LINK_ACTIVE, "info", f"replication link {self.site}<->{link.peer} is active again", now)

    # -- control commands -----------------------------------------------------------------

    def _handle_control(self, delivery: Delivery, out: Outgoing, now: float) -> None:
        try:
            command = ctl.parse(delivery.body)
        except ctl.MalformedCommand as exc:
            if not delivery.reply_to:
                raise  # dead-lettered with its reason
            raise ControlFailed(delivery, {"ok": False, "error": exc.message,
                                           "hint": "see emulator/protocol/control.py for the commands"}) from None
        why = admission.command_refusal(self.identities, user_id=delivery.user_id, parent=self.parent, cmd=command.cmd)
        if why:
            raise RefusedIdentity(f"refused: {why}", None)
        # A command redelivered after a crash or a reconnect (committed, not yet acked) is
        # answered from the record of its first run, never run twice.
        cid = delivery.correlation_id if command.cmd not in ctl.READ_ONLY else None
        done = self.store.command_answer(cid) if cid else None
        if done is not None:
            answer = done
        else:
            try:
                answer = commands.run(self, command, now)
                answer.setdefault("ok", True)
            except SmslabError as exc:
                answer = {"ok": False, "error": exc.message, "hint": exc.hint}
            except Exception as exc:  # noqa: BLE001 - logged once by _log_failure
                self._log_failure(f"control command {command.cmd!r}:{type(exc).__name__}", exc, "refused")
                answer = {"ok": False, "error": f"{command.cmd!r} failed at {self.site}: {exc!r}"}
            if not answer["ok"]:
                raise ControlFailed(delivery, answer)  # undone to the savepoint, then answered
            if cid:
                self.store.record_command(cid, answer, now)
        if delivery.reply_to:
            out.replies.append((delivery.reply_to, delivery.correlation_id, answer))

    def shutdown(self) -> None:
        self.stopping = True
        if self.batch and self.transport.ready:
            self.flush()
        self.transport.stop()
