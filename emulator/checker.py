"""The convergence checker: judges a lab from every site's store (read-only).

Invariants (PRODUCT §5), each violation named:

- ``lost``: the central site does not hold a client's latest inventory or discovery, or a
  site's latest SCF (with the drops that explain it, when the stores recorded any);
- ``missing`` / ``diverged`` / ``orphan``: a site does not hold exactly the global objects of
  each of its ancestors (missing, a different definition or revision, or one its owner
  does not have);
- ``reused_id``: an object ID has named two different definitions somewhere (the
  "package 14" hazard of Q258924);
- ``link``: a link is not active (degraded, failed, paused, quarantined) or the two ends'
  counters contradict each other (a rollback the peers never resolved);
- ``in_flight``: envelopes not yet acknowledged; ``down``: a site is not running.

Verdict: ``invalid`` if any violation but ``in_flight`` and ``down`` (and, while envelopes are
still in flight, but the data violations that may only be lag); ``unknown`` if only those (the
lab is not settled, or part of it cannot be read); ``valid`` otherwise.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from emulator.lab import LabDir, LabInfo
from emulator.protocol.sequencing import LinkState, health
from sites.clients import read_client_versions
from sites.store import SiteStore, read_only

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
_VOLATILE = frozenset({"want", "sent", "acked"})


@dataclass
class Report:
    verdict: Verdict
    violations: list[Violation]
    stats: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "violations": [asdict(v) for v in self.violations],
                "stats": self.stats}

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
        lines.append("checked " + ", ".join(_count(s.get(k, 0), k[:-1]) for k in ("sites", "clients", "objects", "links")))
        return "\n".join(lines)


def _count(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


@dataclass
class _Site:
    code: str
    meta: dict[str, str]
    links: dict[str, LinkState]
    outbox: dict[str, int]
    site_data: dict[tuple[str, str], int]
    objects: dict[str, dict[str, Any]]
    history: dict[str, dict[str, float]]  # object ID -> definition -> first seen
    drops: dict[tuple[str, str], int]


def _read(lab_dir: LabDir, code: str) -> _Site | None:
    with read_only(lab_dir.site_db(code)) as store:
        if store is None:
            return None
        try:
            return _snapshot(code, store)
        except sqlite3.DatabaseError:
            return None


def _snapshot(code: str, store: SiteStore) -> _Site:
    db = store.db
    db.execute("BEGIN")  # one consistent snapshot of the store
    try:
        history: dict[str, dict[str, float]] = {}
        for oid, uid, seen in db.execute("SELECT id, def_uid, first_seen FROM object_history"):
            history.setdefault(oid, {})[uid] = seen
        site = _Site(
            code=code,
            meta=store.meta(),
            links=store.load_links(),
            outbox=store.outbox_counts(),
            site_data={(c, k): v for c, k, v in db.execute("SELECT data_class, key, version FROM site_data")},
            objects={o["id"]: o for o in store.objects()},
            history=history,
            drops={(c, k): n for c, k, n in db.execute(
                "SELECT data_class, key, COUNT(*) FROM drops WHERE reason IN ('conflict','stale')"
                " GROUP BY data_class, key")},
        )
        return site
    finally:
        db.execute("COMMIT")


def check(lab_dir: LabDir, info: LabInfo | None = None, *, confirm: float = 0.5) -> Report:
    """Judge the lab. Stores are read one after the other while sites run, so one snapshot
    can catch two ends of a link at different moments; a violation makes the lab invalid
    only if it stands, the same, in a second snapshot ``confirm`` seconds later."""
    info = info or lab_dir.load()
    first = _check_once(lab_dir, info)
    if first.verdict != "invalid" or confirm <= 0:
        return first
    time.sleep(confirm)
    second = _check_once(lab_dir, info)
    if second.verdict != "invalid":
        return second
    seen = {v.key for v in first.violations if v.hard}
    for v in second.violations:
        if v.hard and v.key not in seen:
            v.hard = False
            v.detail += " (seen once, gone half a second later: not counted)"
    second.verdict = "invalid" if any(v.hard for v in second.violations) else "unknown"
    return second


def _check_once(lab_dir: LabDir, info: LabInfo) -> Report:
    topo = info.topology
    settings = topo.settings
    violations: list[Violation] = []
    sites: dict[str, _Site] = {}
    for code in topo.depth_order():
        if lab_dir.pid(code) is None:
            violations.append(Violation("down", code, "site is not running"))
        snap = _read(lab_dir, code)
        if snap is None:
            violations.append(Violation("down", code, "site store cannot be read"))
            continue
        sites[code] = snap
        phase = snap.meta.get("recovery_phase")
        if phase and phase != "complete":
            violations.append(Violation("in_flight", code, f"recovery in progress (phase {phase})"))

    # links: health and the two ends' counters
    for parent, child in topo.links():
        p, c = sites.get(parent), sites.get(child)
        if p is None or c is None:
            continue
        pl, cl = p.links.get(child), c.links.get(parent)
        if pl is None or cl is None:
            violations.append(Violation("link", child, f"link {parent}<->{child} is missing at one end"))
            continue
        for end, link in ((parent, pl), (child, cl)):
            h = health(link, degraded_after=settings.degraded_after, failed_after=settings.failed_after)
            if h != "active":
                violations.append(Violation("link", end, f"link {parent}<->{child} is {h} at {end}",
                                            {"health": h}))
        for sender, s_link, receiver, r_link in ((parent, pl, child, cl), (child, cl, parent, pl)):
            name = f"{sender}->{receiver}"
            if s_link.sent_through < r_link.applied_through:
                fate = (f"{receiver} refuses them: {sender} is quarantined until it is recovered"
                        if topo.mode == "hardened" else "they are dropped as already seen")
                violations.append(Violation(
                    "link", sender,
                    f"{name}: {receiver} has applied through seq {r_link.applied_through} but {sender}"
                    f" has sent only {s_link.sent_through}: {sender}'s counters went back and its new"
                    f" envelopes reuse numbers {receiver} already applied; {fate}",
                    {"sent": s_link.sent_through, "applied": r_link.applied_through}))
            elif s_link.acked_through > r_link.applied_through:
                violations.append(Violation(
                    "link", receiver,
                    f"{name}: {sender} counts seq through {s_link.acked_through} as acknowledged but"
                    f" {receiver} expects {r_link.next_expected}: out of sequence, {sender} cannot resend",
                    {"acked": s_link.acked_through, "expected": r_link.next_expected}))
            elif s_link.sent_through > r_link.applied_through:
                violations.append(Violation(
                    "in_flight", sender,
                    f"{name}: {s_link.sent_through - r_link.applied_through} envelope(s) not yet applied",
                    {"sent": s_link.sent_through, "applied": r_link.applied_through}))

    central = sites.get(topo.central)
    clients_total = 0
    if central is not None:
        for code in topo.depth_order():
            versions = read_client_versions(lab_dir.clients_db(code))
            clients_total += len(versions)
            for client, (inv, disc) in sorted(versions.items()):
                for cls, want in (("inventory", inv), ("discovery", disc)):
                    if want == 0:
                        continue
                    have = central.site_data.get((cls, client), 0)
                    if have < want:
                        dropped = sum(s.drops.get((cls, client), 0) for s in sites.values())
                        why = f"; {dropped} envelope(s) for it dropped as already seen" if dropped else ""
                        violations.append(Violation(
                            "lost", topo.central,
                            f"{cls} of client {client}: central holds version {have}, the client is at {want}{why}",
                            {"class": cls, "key": client, "have": have, "want": want}))
            site = sites.get(code)
            if site is not None:
                serial = int(site.meta.get("scf_serial", 0))
                have = central.site_data.get(("scf", code), 0)
                if have < serial:
                    violations.append(Violation(
                        "lost", topo.central,
                        f"SCF of {code}: central holds serial {have}, {code} is at {serial}",
                        {"class": "scf", "key": code, "have": have, "want": serial}))

    # global objects: every site holds exactly its ancestors' objects
    object_count = 0
    for code, site in sites.items():
        for anc in topo.ancestors(code):
            owner = sites.get(anc)
            if owner is None:
                continue
            theirs = {k: o for k, o in owner.objects.items() if o["origin"] == anc}
            ours = {k: o for k, o in site.objects.items() if o["origin"] == anc}
            for oid, obj in theirs.items():
                mine = ours.get(oid)
                if mine is None:
                    violations.append(Violation("missing", code, f"{obj['kind']} {oid} of {anc} is missing",
                                                {"id": oid, "owner": anc}))
                elif mine["def_uid"] != obj["def_uid"]:
                    violations.append(Violation(
                        "reused_id", code,
                        f"{obj['kind']} {oid}: {code} holds {mine['name']!r}, {anc} holds {obj['name']!r}"
                        " (two definitions under one ID)", {"id": oid, "owner": anc}))
                elif (mine["revision"], mine["deleted"]) != (obj["revision"], obj["deleted"]):
                    violations.append(Violation(
                        "diverged", code,
                        f"{obj['kind']} {oid}: revision {mine['revision']} here, {obj['revision']} at {anc}",
                        {"id": oid, "owner": anc}))
            for oid in sorted(set(ours) - set(theirs)):
                violations.append(Violation("orphan", code,
                                            f"{ours[oid]['kind']} {oid} is not (any more) at its owner {anc}",
                                            {"id": oid, "owner": anc}))
        object_count += len(site.objects)
        for oid, seen in site.history.items():
            # An overwrite before its owner's last recovery is history (diag shows it); the
            # recovery made the lab consistent again. One after it is a live violation.
            owner = sites.get(oid[:3])
            since = float(owner.meta.get("recovered_at", 0)) if owner else 0.0
            after = [uid for uid, first in seen.items() if first >= since]
            if len(after) > 1 or (after and len(seen) > len(after)):
                uids = list(seen)
                violations.append(Violation(
                    "reused_id", code,
                    f"object ID {oid} has named {len(uids)} different definitions here (package 14 hazard)",
                    {"id": oid, "definitions": sorted(uids)}))

    for code, site in sites.items():
        if site.meta.get("state") == "quarantined":
            violations.append(Violation("link", code, f"site {code} is quarantined (restored without recovery)"))

    # Data still on its way is not lost: propagation is judged only once the lab is settled.
    settled = not any(v.kind == "in_flight" for v in violations) and not any(
        n for site in sites.values() for n in site.outbox.values())
    soft = SOFT if settled else SOFT | LAG
    for v in violations:
        v.hard = v.kind not in soft
    verdict: Verdict = "invalid" if any(v.hard for v in violations) else ("unknown" if violations else "valid")
    return Report(verdict, violations, {
        "sites": len(sites), "clients": clients_total, "objects": object_count,
        "links": len(topo.links()),
    })
