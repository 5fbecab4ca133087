"""The convergence checker: judges a lab from every site's store (read-only).

Each invariant is one function over a ``LabState`` (the stores read once, then the counters
and the clients' own records read after them) returning the violations it finds:

- ``down``: a site is not running or its store cannot be read;
- ``in_flight``: envelopes not yet acknowledged, or a recovery not complete;
- ``link``: a link is not active (degraded, failed, paused, quarantined) or the two ends'
  counters contradict each other (a rollback the peers never resolved);
- ``lost``: a site holds a record (inventory, discovery, status message, SCF, whatever its
  subtree sent it) that its parent does not hold at that version or later; or a client's
  latest report is not at its site or at the central site (with the drops that explain it);
- ``invented``: a record at a version, or a transaction ID, above anything its origin ever
  produced (the origin went back without recovery, or the data was forged);
- ``missing`` / ``diverged`` / ``orphan``: a site does not hold exactly the global objects of
  each of its ancestors (missing, another revision, or one its owner no longer has);
- ``reused_id``: an object ID names two definitions (the "package 14" hazard of Q258924).

And from the lab's history (``emulator.history``), what the stores alone cannot tell:

- ``lost``: an envelope its sender counts as acknowledged that its receiver never consumed
  (the hole: a restored site's reused numbers, acknowledged as already seen);
- ``twice`` (``applied_twice``): an envelope consumed twice by one receiver (a store restored in
  between aside);
- ``reordered`` (``applied_out_of_order``): a receiver consumed a link's envelopes out of sequence;
- ``forgot`` (``forgot_committed_work``): a receiver expects again envelopes it had applied, with
  no restore in between (committed work lost across a restart);
- ``not_fenced`` (``old_incarnation_not_fenced``, hardened): an envelope of an incarnation older
  than the one a peer resynced with was applied (these four share one walk of the history);
- ``vacuous``: a fault during which nothing was sent where it struck; ``idle``: nothing was
  ever applied on any link; ``history``: events were pruned before they were merged. These
  make a run ``unknown``, never a vacuous ``valid``.

Verdict: ``invalid`` if any violation but the soft ones (``in_flight``, ``down``, ``vacuous``,
``idle``, ``history``; and, while envelopes are still in flight, the data violations that may
only be lag); ``unknown`` if only soft ones; ``valid`` otherwise. Sites run while the checker
reads them one after the other, so a violation makes the lab invalid only if it stands, the
same, in a second look ``confirm`` seconds later.
"""

from __future__ import annotations

import heapq
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from emulator import history
from emulator.lab import LabDir, LabInfo
from emulator.protocol import retention
from emulator.protocol.objects import parse_object_id
from emulator.protocol.sequencing import health
from emulator.topology import Topology
from sites.clients import read_client_versions
from sites.store import StoreSnapshot, read_meta, read_snapshot

Verdict = Literal["valid", "invalid", "unknown"]
SOFT = {"in_flight", "down", "vacuous", "idle", "history"}
NOTES = {"lost_before_recovery"}  # named in the report; never against the verdict
LAG = {"lost", "missing", "diverged", "orphan"}


@dataclass
class Violation:
    kind: str
    site: str
    detail: str
    data: dict[str, Any] = field(default_factory=dict)
    hard: bool = True  # counts against validity (set by the verdict)

    @property
    def key(self) -> tuple[Any, ...]:
        """Identity across two snapshots: what stays put when the violation is real."""
        if self.data:
            return (self.kind, self.site, tuple(sorted(
                (k, str(v)) for k, v in self.data.items() if k not in _VOLATILE)))
        return (self.kind, self.site, self.detail)


# numbers that move on in a healthy lab (a client's version, a sender's counters)
_VOLATILE = frozenset({"want", "sent", "acked", "produced", "count"})


@dataclass
class Report:
    verdict: Verdict
    violations: list[Violation]
    stats: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "violations": [asdict(v) for v in self.violations],
                "stats": self.stats}

    @property
    def valid(self) -> bool:
        return self.verdict == "valid"

    def kinds(self) -> set[str]:
        """The kinds of the violations that count."""
        return {v.kind for v in self.violations if v.hard}

    def render(self, limit: int = 40, more_hint: str = "--json for all") -> str:
        lines = [f"verdict: {self.verdict}"]
        kinds: dict[str, int] = {}
        notes: dict[str, int] = {}
        for v in self.violations:
            bucket = notes if v.kind in NOTES else kinds
            bucket[v.kind] = bucket.get(v.kind, 0) + 1
        if kinds:
            lines.append("violations: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())))
        if notes:
            lines.append("notes: " + ", ".join(f"{k} {n}" for k, n in sorted(notes.items())))
        for v in self.violations[:limit]:
            tag = "note" if v.kind in NOTES else v.kind
            lines.append(f"  {tag:<9} {v.site}: {v.detail}")
        if len(self.violations) > limit:
            lines.append(f"  ... and {len(self.violations) - limit} more ({more_hint})")
        s = self.stats
        lines.append("checked " + ", ".join(_count(s.get(k, 0), k[:-1])
                                            for k in ("sites", "clients", "records", "objects", "links", "events")))
        return "\n".join(lines)


def _count(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


@dataclass
class HistoryView:
    """The lab's merged history, as the history invariants read it."""

    events: list[history.Event]
    gaps: list[history.Gap] = field(default_factory=list)


@dataclass
class LabState:
    """Everything the invariants look at. The stores are read first; the counters and the
    clients' records after them, so a counter or a client is never behind what a store
    shows of it (no false ``invented`` on a busy lab)."""

    topology: Topology
    stores: dict[str, StoreSnapshot]
    running: set[str]
    clients: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)  # site -> client -> versions
    counters: dict[str, dict[str, str]] = field(default_factory=dict)  # site -> meta, read after the stores
    history: HistoryView | None = None
    now: float = field(default_factory=time.time)  # when the stores were read (the retention rules' clock)
    cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # what invariants share

    @property
    def retention(self) -> retention.Retention:
        return retention.Retention.of(self.topology.settings)

    def counter(self, site: str, name: str) -> int | None:
        meta = self.counters.get(site)
        if meta is None:
            store = self.stores.get(site)
            meta = store.meta if store else None
        return int(meta.get(name) or 0) if meta is not None else None

    def recovering(self, site: str) -> bool:
        store = self.stores.get(site)
        phase = store.meta.get("recovery_phase") if store else None
        return bool(phase) and phase != "complete"


def read_state(lab_dir: LabDir, info: LabInfo, *, with_history: bool = True,
               running: set[str] | None = None, now: float | None = None) -> LabState:
    """What the invariants judge; ``running`` names the sites that run (default: those with a
    live process; the simulator gives its own)."""
    topo = info.topology
    codes = topo.depth_order()
    if running is None:
        running = {code for code in codes if lab_dir.pid(code) is not None}
    stores: dict[str, StoreSnapshot] = {}
    for code in reversed(codes):  # children before parents: site data goes up
        snap = read_snapshot(lab_dir.site_db(code))
        if snap is not None:
            stores[code] = snap
    counters = {code: meta for code in codes if (meta := read_meta(lab_dir.site_db(code))) is not None}
    clients = {code: read_client_versions(lab_dir.clients_db(code)) for code in codes}
    view = None
    if with_history:
        events = history.load(lab_dir, info)
        view = HistoryView(events, history.load_state(lab_dir).gaps)
    return LabState(topo, stores, running, clients, counters, view, time.time() if now is None else now)


# -- the invariants ----------------------------------------------------------------------------


def sites_down(state: LabState) -> list[Violation]:
    out = []
    for code in state.topology.depth_order():
        if code not in state.running:
            out.append(Violation("down", code, "site is not running"))
        if code not in state.stores:
            out.append(Violation("down", code, "site store cannot be read"))
    return out


def recoveries_in_flight(state: LabState) -> list[Violation]:
    return [Violation("in_flight", code, f"recovery in progress (phase {snap.meta.get('recovery_phase')})")
            for code, snap in state.stores.items() if state.recovering(code)]


def links(state: LabState) -> list[Violation]:
    topo = state.topology
    settings = topo.settings
    out: list[Violation] = []
    for parent, child in topo.links():
        p, c = state.stores.get(parent), state.stores.get(child)
        if p is None or c is None:
            continue
        pl, cl = p.links.get(child), c.links.get(parent)
        if pl is None or cl is None:
            out.append(Violation("link", child, f"link {parent}<->{child} is missing at one end"))
            continue
        for end, link in ((parent, pl), (child, cl)):
            h = health(link, degraded_after=settings.degraded_after, failed_after=settings.failed_after)
            if h != "active":
                out.append(Violation("link", end, f"link {parent}<->{child} is {h} at {end}", {"health": h}))
        for sender, s_link, receiver, r_link in ((parent, pl, child, cl), (child, cl, parent, pl)):
            name = f"{sender}->{receiver}"
            if s_link.sent_through < r_link.applied_through:
                fate = (f"{receiver} refuses them: {sender} is quarantined until it is recovered"
                        if topo.mode == "hardened" else "they are dropped as already seen")
                out.append(Violation(
                    "link", sender,
                    f"{name}: {receiver} has applied through seq {r_link.applied_through} but {sender}"
                    f" has sent only {s_link.sent_through}: {sender}'s counters went back and its new"
                    f" envelopes reuse numbers {receiver} already applied; {fate}",
                    {"sent": s_link.sent_through, "applied": r_link.applied_through}))
            elif s_link.acked_through > r_link.applied_through:
                out.append(Violation(
                    "link", receiver,
                    f"{name}: {sender} counts seq through {s_link.acked_through} as acknowledged but"
                    f" {receiver} expects {r_link.next_expected}: out of sequence, {sender} cannot resend",
                    {"acked": s_link.acked_through, "expected": r_link.next_expected}))
            elif s_link.sent_through > r_link.applied_through:
                out.append(Violation(
                    "in_flight", sender,
                    f"{name}: {s_link.sent_through - r_link.applied_through} envelope(s) not yet applied",
                    {"sent": s_link.sent_through, "applied": r_link.applied_through}))
    return out


def _dropped(state: LabState, cls: str, key: str) -> str:
    dropped = sum(s.drops.get((cls, key), 0) for s in state.stores.values())
    return f"; {dropped} envelope(s) for it dropped as already seen or stale" if dropped else ""


def client_data_lost(state: LabState) -> list[Violation]:
    """Each client's latest inventory and discovery is at its own site and at the central site."""
    topo = state.topology
    out: list[Violation] = []
    for code, versions in state.clients.items():
        holders = dict.fromkeys([code, topo.central])
        for client, (inv, disc) in sorted(versions.items()):
            for cls, want in (("inventory", inv), ("discovery", disc)):
                if want == 0:
                    continue
                for holder in holders:
                    store = state.stores.get(holder)
                    if store is None:
                        continue
                    have = store.site_data.get((cls, client), (0, ""))[0]
                    if have < want:
                        where = "central" if holder == topo.central else "its site"
                        out.append(Violation(
                            "lost", holder,
                            f"{cls} of client {client}: {where} {holder} holds version {have}, the client"
                            f" is at {want}{_dropped(state, cls, client)}",
                            {"class": cls, "key": client, "have": have, "want": want}))
    return out


def site_data_lost(state: LabState) -> list[Violation]:
    """Every record a site holds is at its parent with at least that version (and so, step by
    step, at every ancestor): its own data, its status messages and SCF, its subtree's."""
    topo = state.topology
    rules = state.retention
    out: list[Violation] = []
    for code, store in state.stores.items():
        parent = topo.parent(code)
        above = state.stores.get(parent) if parent else None
        if above is None or parent is None:
            continue
        for (cls, key), (version, origin) in sorted(store.site_data.items()):
            have = above.site_data.get((cls, key), (0, ""))[0]
            if have < version and cls == "status" and retention.status_expired(
                    store.status_at.get(key), state.now, rules):
                continue  # past status_retention: its parent may have let it go
            if have < version:
                what = f"{cls} {key}" + (f" (from {origin})" if origin != code else "")
                out.append(Violation(
                    "lost", parent,
                    f"{what}: {code} holds version {version}, its parent {parent} holds"
                    f" {have or 'none'}{_dropped(state, cls, key)}",
                    {"class": cls, "key": key, "holder": code, "want": version, "have": have}))
    return out


def invented(state: LabState) -> list[Violation]:
    """Nothing is above what its origin produced: a client's report version, a site's status
    message and SCF serials, a sender's transaction IDs."""
    known_clients = {c: v for versions in state.clients.values() for c, v in versions.items()}
    out: list[Violation] = []

    def flag(site: str, what: str, held: int, produced: int, origin: str, data: dict[str, Any]) -> None:
        if state.recovering(origin):
            return  # its counters are being moved past its peers right now
        out.append(Violation(
            "invented", site,
            f"{what}: {site} holds {held}, above anything {origin} has produced ({produced}): {origin}"
            " went back without a recovery, or the data was forged",
            {**data, "held": held, "produced": produced}))

    for code, store in state.stores.items():
        for (cls, key), (version, origin) in store.site_data.items():
            if cls in ("inventory", "discovery") and key in known_clients:
                produced = known_clients[key][0 if cls == "inventory" else 1]
                if version > produced:
                    flag(code, f"{cls} of client {key}", version, produced, origin, {"class": cls, "key": key})
            elif cls == "status" and origin in state.stores:
                serial = state.counter(origin, "status_serial") or 0
                if version > serial:
                    flag(code, f"status message {key}", version, serial, origin, {"class": cls, "key": key})
            elif cls == "scf" and key in state.stores:
                serial = state.counter(key, "scf_serial") or 0
                if version > serial:
                    flag(code, f"SCF of {key}", version, serial, key, {"class": cls, "key": key})
        for sender, top in store.max_txn.items():
            txn = state.counter(sender, "txn_id")
            if txn is not None and top > txn:
                flag(code, f"transaction ID from {sender}", top, txn, sender, {"sender": sender})
    return out


def global_objects(state: LabState) -> list[Violation]:
    """Every site holds exactly the global objects of each of its ancestors."""
    topo = state.topology
    rules = state.retention

    def kept(obj: dict[str, Any]) -> bool:  # a tombstone past its lifetime may be gone anywhere
        return not retention.tombstone_expired(obj, state.now, rules)

    out: list[Violation] = []
    for code, site in state.stores.items():
        for anc in topo.ancestors(code):
            owner = state.stores.get(anc)
            if owner is None:
                continue
            theirs = {k: o for k, o in owner.objects.items() if o["origin"] == anc}
            ours = {k: o for k, o in site.objects.items() if o["origin"] == anc}
            theirs = {k: o for k, o in theirs.items() if kept(o) or k in ours}
            ours = {k: o for k, o in ours.items() if kept(o) or k in theirs}
            for oid, obj in theirs.items():
                mine = ours.get(oid)
                if mine is None:
                    out.append(Violation("missing", code, f"{obj['kind']} {oid} of {anc} is missing",
                                         {"id": oid, "owner": anc}))
                elif mine["def_uid"] != obj["def_uid"]:
                    out.append(Violation(
                        "reused_id", code,
                        f"{obj['kind']} {oid}: {code} holds {mine['name']!r}, {anc} holds {obj['name']!r}"
                        " (two definitions under one ID)", {"id": oid, "owner": anc}))
                elif (mine["revision"], mine["deleted"]) != (obj["revision"], obj["deleted"]):
                    out.append(Violation(
                        "diverged", code,
                        f"{obj['kind']} {oid}: revision {mine['revision']} here, {obj['revision']} at {anc}",
                        {"id": oid, "owner": anc}))
            for oid in sorted(set(ours) - set(theirs)):
                out.append(Violation("orphan", code, f"{ours[oid]['kind']} {oid} is not (any more) at its owner {anc}",
                                     {"id": oid, "owner": anc}))
    return out


def reused_ids(state: LabState) -> list[Violation]:
    """An object ID that named two definitions since its owner's last recovery (an overwrite
    before it is history, which ``diag`` shows; the recovery made the lab consistent again)."""
    out: list[Violation] = []
    for code, site in state.stores.items():
        for oid, seen in site.object_history.items():
            parsed = parse_object_id(oid)
            owner = state.stores.get(parsed[0]) if parsed else None
            since = float(owner.meta.get("recovered_at", 0)) if owner else 0.0
            after = [uid for uid, first in seen.items() if first >= since]
            if len(after) > 1 or (after and len(seen) > len(after)):
                out.append(Violation(
                    "reused_id", code,
                    f"object ID {oid} has named {len(seen)} different definitions here (package 14 hazard)",
                    {"id": oid, "definitions": sorted(seen)}))
    return out


def quarantined_sites(state: LabState) -> list[Violation]:
    return [Violation("link", code, f"site {code} is quarantined (restored without recovery)")
            for code, site in state.stores.items() if site.meta.get("state") == "quarantined"]


# -- the invariants on the history -------------------------------------------------------------

CONSUMED = frozenset({"applied", "stale", "unappliable"})


def _fmt(e: history.Event) -> str:
    what = f" ({e.data_class} {e.key}, txn {e.txn})" if e.data_class else ""
    return f"{e.link} seq {e.seq}{what}"


def lost_acknowledged(state: LabState) -> list[Violation]:
    """Every envelope its sender counts as acknowledged reached its receiver: that envelope,
    or its data in another one (a resync sends it again), or newer data of the same record
    sent after it (a client's next report supersedes the one before)."""
    if state.history is None:
        return []
    order = 0
    pending: dict[str, list[tuple[int, int, history.Event]]] = defaultdict(list)  # link -> heap of sent
    acknowledged: list[tuple[int, history.Event, history.Event]] = []  # (order, sent, the ack covering it)
    sent_order: dict[tuple[str, int, str | None], int] = {}
    consumed: dict[tuple[str, int], str | None] = {}  # (link, seq) -> hash last consumed
    consumed_data: set[tuple[str, str | None, str | None, str | None]] = set()  # link, class, key, hash
    delivered: dict[tuple[str, str | None, str | None], int] = {}  # link, class, key -> latest sent order
    recovered: dict[str, list[float]] = defaultdict(list)  # site -> when its recoveries completed
    heappush, heappop = heapq.heappush, heapq.heappop
    for e in state.history.events:
        kind = e.kind  # the three kinds of nearly every event first
        if kind == "sent":
            if e.link and e.seq is not None:
                order += 1
                sent_order[(e.link, e.seq, e.hash)] = order
                heappush(pending[e.link], (e.seq, order, e))
        elif kind == "ack":
            if e.link and e.seq is not None:
                heap = pending[e.link]
                while heap and heap[0][0] <= e.seq:
                    _, o, sent = heappop(heap)
                    acknowledged.append((o, sent, e))
        elif kind in CONSUMED:
            if e.link and e.seq is not None:
                consumed[(e.link, e.seq)] = e.hash
                consumed_data.add((e.link, e.data_class, e.key, e.hash))
                o = sent_order.get((e.link, e.seq, e.hash), 0)
                record = (e.link, e.data_class, e.key)
                if o > delivered.get(record, 0):
                    delivered[record] = o
                else:
                    delivered.setdefault(record, 0)
        elif kind == "recovery":
            if e.detail and e.detail.get("phase") == "complete":
                recovered[e.site].append(e.time)
        elif kind == "store":
            if e.site == history.HARNESS and e.detail and e.detail.get("action") in ("restore", "wipe"):
                # the store's outbox went with it: what it held will never be sent from it again
                replaced = str(e.detail.get("site") or e.link)
                for link in [k for k in pending if k.startswith(f"{replaced}->")]:
                    pending[link] = []
        elif kind in ("link_reset", "void") and e.link:
            _void(pending, e)
    lost: dict[tuple[str, str], list[tuple[history.Event, history.Event]]] = defaultdict(list)
    for o, sent, ack in acknowledged:
        assert sent.link is not None and sent.seq is not None
        if (sent.link, sent.data_class, sent.key, sent.hash) in consumed_data:
            continue
        if delivered.get((sent.link, sent.data_class, sent.key), 0) > o:
            continue  # newer data of that record, sent after it, arrived
        ends = sent.link.split("->")
        # A recovery of either end after the loss was the fix for the failure that lost it: what
        # it could not bring back (the site no longer had it) is named, but it is history.
        healed = any(t > ack.time for site in ends for t in recovered.get(site, []))
        lost[(sent.link, "lost_before_recovery" if healed else "lost")].append((sent, ack))
    out = []
    for (link, kind), items in sorted(lost.items()):
        sender, receiver = link.split("->")
        first, ack = items[0]
        assert first.seq is not None
        reused = sum(1 for sent, _ in items if consumed.get((link, sent.seq or 0), "none") != "none")
        how = " (taken as acknowledged after its rollback)" if ack.detail and ack.detail.get("self_rollback") else ""
        why = (f"{reused} of them reuse numbers {receiver} had applied with other content: the hole, dropped as"
               " already seen" if reused else f"{receiver} never consumed them")
        after = "; a later recovery could not bring them back" if kind == "lost_before_recovery" else ""
        out.append(Violation(
            kind, receiver,
            f"{link}: {len(items)} envelope(s) acknowledged at {sender}{how} never reached {receiver}, e.g."
            f" {_fmt(first)}; {why}{after}",
            {"link": link, "first": first.seq, "count": len(items)}))
    return out


def _void(pending: dict[str, list[tuple[int, int, history.Event]]], e: history.Event) -> None:
    """Envelopes that will never be sent (a recovery cleared or voided them, a Preinst verb
    deleted the jobs) are not waiting for an acknowledgement any more."""
    assert e.link is not None
    if e.kind == "void":
        link, through = e.link, e.seq
    else:
        site, peer = e.link.split("<->")
        detail = e.detail or {}
        link = f"{site}->{peer}"
        if "void_through" in detail:  # a peer took a recovering site's resync
            through = int(detail["void_through"])
        else:  # the recovering site restarted the link from what the peer expects
            through = int(detail.get("next_send_seq", 1)) - 1
    if through is None:
        pending[link] = []
        return
    pending[link] = [item for item in pending[link] if item[0] > through]
    heapq.heapify(pending[link])


def applied_twice(state: LabState) -> list[Violation]:
    """No receiver consumed an envelope twice (a store replaced in between aside)."""
    return _receiver_walk(state)["twice"]


def applied_out_of_order(state: LabState) -> list[Violation]:
    """Each receiver consumed each link's envelopes in sequence, from what it expected at its
    last start or link reset."""
    return _receiver_walk(state)["reordered"]


def forgot_committed_work(state: LabState) -> list[Violation]:
    """No receiver, restarted, expects again what it had applied (unless its store was replaced)."""
    return _receiver_walk(state)["forgot"]


def old_incarnation_not_fenced(state: LabState) -> list[Violation]:
    """Hardened: nothing of an incarnation older than the one a peer resynced with was applied."""
    return _receiver_walk(state)["not_fenced"]


def _receiver_walk(state: LabState) -> dict[str, list[Violation]]:
    """One walk of the history, per link and receiver, for the four invariants above (what a
    receiver expects next depends on its restarts and resets, which all four need). Done once
    per state."""
    if state.history is None:
        return defaultdict(list)
    cached = state.cache.get("receiver_walk")
    if cached is None:
        found: dict[str, list[Violation]] = defaultdict(list)
        for v in _walk_receivers(state):
            found[v.kind].append(v)
        cached = state.cache["receiver_walk"] = found
    return cached


def _walk_receivers(state: LabState) -> list[Violation]:
    assert state.history is not None
    hardened = state.topology.mode == "hardened"
    consumed: dict[str, dict[int, str | None]] = defaultdict(dict)  # link -> seq -> hash
    expected: dict[str, int] = {}
    known_inc: dict[str, int] = {}
    replaced: set[str] = set()  # sites whose store the harness replaced since their last start
    out: list[Violation] = []
    for e in state.history.events:
        if e.site == history.HARNESS:
            if e.kind == "store" and e.detail and e.detail.get("action") in ("restore", "wipe"):
                replaced.add(str(e.detail.get("site", e.link)))
            continue
        if e.kind == "start" and e.detail:
            for peer, counters in (e.detail.get("links") or {}).items():
                link = f"{peer}->{e.site}"
                ne = int(counters.get("next_expected", 1))
                done = consumed[link]
                forgotten = [seq for seq in done if seq >= ne]
                if forgotten and e.site not in replaced:
                    out.append(Violation(
                        "forgot", e.site,
                        f"{link}: after a restart {e.site} expects seq {ne} again, but it had applied through"
                        f" {max(forgotten)} (committed work lost, no restore in between)",
                        {"link": link, "expected": ne}))
                for seq in forgotten:
                    del done[seq]
                expected[link] = ne
            replaced.discard(e.site)
        elif e.kind == "link_reset" and e.link and e.detail:
            peer = e.link.split("<->")[1]
            link = f"{peer}->{e.site}"
            expected[link] = int(e.detail.get("next_expected", 1))
            if e.detail.get("their_incarnation") is not None:
                known_inc[link] = int(e.detail["their_incarnation"])
        elif e.kind in CONSUMED and e.link and e.seq is not None:
            link = e.link
            if consumed[link].get(e.seq, "") == e.hash:
                out.append(Violation("twice", e.site, f"{_fmt(e)} consumed twice at {e.site}",
                                     {"link": link, "seq": e.seq}))
            elif link in expected and e.seq != expected[link]:
                out.append(Violation("reordered", e.site,
                                     f"{_fmt(e)} consumed at {e.site} while it expected seq {expected[link]}",
                                     {"link": link, "seq": e.seq}))
            if (hardened and e.kind == "applied" and link in known_inc and e.incarnation is not None
                    and e.incarnation < known_inc[link]):
                out.append(Violation(
                    "not_fenced", e.site,
                    f"{_fmt(e)} of incarnation {e.incarnation} applied at {e.site}, after it resynced with"
                    f" incarnation {known_inc[link]}", {"link": link, "seq": e.seq}))
            consumed[link][e.seq] = e.hash
            expected[link] = e.seq + 1
    return out


_SITE_FAULTS = frozenset({"disconnect", "pause", "isolate"})
_TRAFFIC = frozenset({"sent", "applied", "resend", "duplicate", "gap", "stale"})


def vacuous_faults(state: LabState) -> list[Violation]:
    """A fault during which nothing was sent where it struck tells nothing: ``unknown``."""
    if state.history is None or not state.history.events:
        return []
    events = state.history.events
    end = events[-1].time
    periods: dict[str, tuple[history.Event, float]] = {}
    unverified: set[str] = set()
    for e in events:
        if e.site != history.HARNESS or not e.fault:
            continue
        if e.kind == "fault_on":
            periods[e.fault] = (e, end)
        elif e.kind == "fault_off" and e.fault in periods:
            periods[e.fault] = (periods[e.fault][0], e.time)
            if e.detail and e.detail.get("verified") is False:
                unverified.add(e.fault)
    out = []
    grace = state.topology.settings.resend_after + 2 * state.topology.settings.sync_interval
    for fault_id, (on, off) in periods.items():
        if fault_id in unverified:
            continue  # it did not take effect, said so and was healed
        detail = on.detail or {}
        kind = detail.get("kind")
        if kind in _SITE_FAULTS:
            site = str(detail.get("site") or on.link)
            struck = {f"{a}->{b}" for a, b in state.topology.links() for a, b in ((a, b), (b, a)) if site in (a, b)}
        elif kind in ("alarm", "broker-node-kill", "broker-partition"):
            struck = None  # every link
        else:
            struck = set(detail.get("links") or [])
        # what the fault struck, and what its effects showed in until the lab caught up
        crossed = sum(1 for e in events if e.kind in _TRAFFIC and on.time <= e.time <= off + grace
                      and (struck is None or e.link in struck))
        if crossed == 0:
            out.append(Violation(
                "vacuous", history.HARNESS,
                f"fault {fault_id} ({kind} {on.link}) was on for {off - on.time:.1f}s and nothing was sent"
                " where it struck: it tells nothing", {"fault": fault_id}))
    return out


def idle(state: LabState) -> list[Violation]:
    if state.history is None or not state.topology.links():
        return []
    if any(e.kind == "applied" for e in state.history.events):
        return []
    return [Violation("idle", history.HARNESS, "nothing was ever applied on any link: there is nothing to judge")]


def history_gaps(state: LabState) -> list[Violation]:
    if state.history is None:
        return []
    return [Violation("history", g.site,
                      f"events {g.after + 1}..{g.first_kept - 1} of {g.site} (run {g.run}) were pruned before they"
                      " were merged (history_retention): the history checks are incomplete",
                      {"run": g.run, "after": g.after}) for g in state.history.gaps]


INVARIANTS: list[Callable[[LabState], list[Violation]]] = [
    sites_down, recoveries_in_flight, links, quarantined_sites, client_data_lost, site_data_lost,
    invented, global_objects, reused_ids,
    lost_acknowledged, applied_twice, applied_out_of_order, forgot_committed_work, old_incarnation_not_fenced,
    vacuous_faults, idle, history_gaps,
]


def judge(state: LabState) -> Report:
    """Every invariant over one state, and the verdict."""
    violations: list[Violation] = []
    seen: set[tuple[Any, ...]] = set()
    for invariant in INVARIANTS:
        for v in invariant(state):
            if v.key not in seen:
                seen.add(v.key)
                violations.append(v)
    # Data still on its way is not lost: propagation is judged only once the lab is settled.
    settled = not any(v.kind == "in_flight" for v in violations) and not any(
        n for site in state.stores.values() for n in site.outbox.values())
    soft = SOFT | NOTES if settled else SOFT | NOTES | LAG
    for v in violations:
        v.hard = v.kind not in soft
    open_ = [v for v in violations if v.kind not in NOTES]
    verdict: Verdict = "invalid" if any(v.hard for v in violations) else ("unknown" if open_ else "valid")
    return Report(verdict, violations, {
        "sites": len(state.stores), "clients": sum(len(c) for c in state.clients.values()),
        "records": sum(len(s.site_data) for s in state.stores.values()),
        "objects": sum(len(s.objects) for s in state.stores.values()),
        "links": len(state.topology.links()),
        "events": len(state.history.events) if state.history else 0,
    })


def check(lab_dir: LabDir, info: LabInfo | None = None, *, confirm: float = 0.5,
          with_history: bool = True, running: set[str] | None = None, now: float | None = None) -> Report:
    """Judge the lab. Stores are read one after the other while sites run, so one snapshot
    can catch two ends of a link at different moments; a violation makes the lab invalid
    only if it stands, the same, in a second snapshot ``confirm`` seconds later."""
    info = info or lab_dir.load()
    with history.no_collection():
        first = judge(read_state(lab_dir, info, with_history=with_history, running=running, now=now))
    if first.verdict != "invalid" or confirm <= 0:
        return first
    time.sleep(confirm)
    with history.no_collection():
        second = judge(read_state(lab_dir, info, with_history=with_history, running=running, now=now))
    if second.verdict != "invalid":
        return second
    seen = {v.key for v in first.violations if v.hard}
    for v in second.violations:
        if v.hard and v.key not in seen:
            v.hard = False
            v.detail += " (seen once, gone half a second later: not counted)"
    second.verdict = ("invalid" if any(v.hard for v in second.violations)
                      else "unknown" if any(v.kind not in NOTES for v in second.violations) else "valid")
    return second
