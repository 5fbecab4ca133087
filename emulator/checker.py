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

Verdict: ``invalid`` if any violation but ``in_flight`` and ``down`` (and, while envelopes are
still in flight, but the data violations that may only be lag); ``unknown`` if only those (the
lab is not settled, or part of it cannot be read); ``valid`` otherwise. Sites run while the
checker reads them one after the other, so a violation makes the lab invalid only if it
stands, the same, in a second look ``confirm`` seconds later.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from emulator.lab import LabDir, LabInfo
from emulator.protocol.objects import parse_object_id
from emulator.protocol.sequencing import health
from emulator.topology import Topology
from sites.clients import read_client_versions
from sites.store import StoreSnapshot, read_meta, read_snapshot

Verdict = Literal["valid", "invalid", "unknown"]
SOFT = {"in_flight", "down"}
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
_VOLATILE = frozenset({"want", "sent", "acked", "produced"})


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
        for v in self.violations:
            kinds[v.kind] = kinds.get(v.kind, 0) + 1
        if kinds:
            lines.append("violations: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())))
        for v in self.violations[:limit]:
            lines.append(f"  {v.kind:<9} {v.site}: {v.detail}")
        if len(self.violations) > limit:
            lines.append(f"  ... and {len(self.violations) - limit} more ({more_hint})")
        s = self.stats
        lines.append("checked " + ", ".join(_count(s.get(k, 0), k[:-1])
                                            for k in ("sites", "clients", "records", "objects", "links")))
        return "\n".join(lines)


def _count(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


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


def read_state(lab_dir: LabDir, info: LabInfo) -> LabState:
    topo = info.topology
    codes = topo.depth_order()
    running = {code for code in codes if lab_dir.pid(code) is not None}
    stores: dict[str, StoreSnapshot] = {}
    for code in reversed(codes):  # children before parents: site data goes up
        snap = read_snapshot(lab_dir.site_db(code))
        if snap is not None:
            stores[code] = snap
    counters = {code: meta for code in codes if (meta := read_meta(lab_dir.site_db(code))) is not None}
    clients = {code: read_client_versions(lab_dir.clients_db(code)) for code in codes}
    return LabState(topo, stores, running, clients, counters)


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
    out: list[Violation] = []
    for code, store in state.stores.items():
        parent = topo.parent(code)
        above = state.stores.get(parent) if parent else None
        if above is None or parent is None:
            continue
        for (cls, key), (version, origin) in sorted(store.site_data.items()):
            have = above.site_data.get((cls, key), (0, ""))[0]
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
    out: list[Violation] = []
    for code, site in state.stores.items():
        for anc in topo.ancestors(code):
            owner = state.stores.get(anc)
            if owner is None:
                continue
            theirs = {k: o for k, o in owner.objects.items() if o["origin"] == anc}
            ours = {k: o for k, o in site.objects.items() if o["origin"] == anc}
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


INVARIANTS: list[Callable[[LabState], list[Violation]]] = [
    sites_down, recoveries_in_flight, links, quarantined_sites, client_data_lost, site_data_lost,
    invented, global_objects, reused_ids,
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
    soft = SOFT if settled else SOFT | LAG
    for v in violations:
        v.hard = v.kind not in soft
    verdict: Verdict = "invalid" if any(v.hard for v in violations) else ("unknown" if violations else "valid")
    return Report(verdict, violations, {
        "sites": len(state.stores), "clients": sum(len(c) for c in state.clients.values()),
        "records": sum(len(s.site_data) for s in state.stores.values()),
        "objects": sum(len(s.objects) for s in state.stores.values()),
        "links": len(state.topology.links()),
    })


def check(lab_dir: LabDir, info: LabInfo | None = None, *, confirm: float = 0.5) -> Report:
    """Judge the lab. Stores are read one after the other while sites run, so one snapshot
    can catch two ends of a link at different moments; a violation makes the lab invalid
    only if it stands, the same, in a second snapshot ``confirm`` seconds later."""
    info = info or lab_dir.load()
    first = judge(read_state(lab_dir, info))
    if first.verdict != "invalid" or confirm <= 0:
        return first
    time.sleep(confirm)
    second = judge(read_state(lab_dir, info))
    if second.verdict != "invalid":
        return second
    seen = {v.key for v in first.violations if v.hard}
    for v in second.violations:
        if v.hard and v.key not in seen:
            v.hard = False
            v.detail += " (seen once, gone half a second later: not counted)"
    second.verdict = "invalid" if any(v.hard for v in second.violations) else "unknown"
    return second
