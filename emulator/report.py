"""``smslab report``: what happened in a lab run, as one self-contained HTML page.

The page is built from the lab's history (``emulator.history``) and, where there is one, a
checker report (``emulator.checker.Report.to_dict()``):

- a timeline, one lane per site, with the fault periods shaded (and drawn as bars on a lane of
  their own), the harness's kills, starts, restores and backups, and the sites' key decisions
  (starts, rollbacks, quarantines, health changes, queues restored, link resets) as markers; the
  recovering site's phases and its neighbours' side of the handshake as bars on their lanes;
- per directed link: envelopes applied per second at the receiver, envelopes dropped per second,
  and the sender's outbox depth over time, with the fault periods shaded;
- drops by kind and link; the verdict with each violation, the notes apart;
- the lab id, the scenario and seed of a run, the time span, event counts per kind, the replay
  command.

Everything is aggregated here, in Python, to bins of a second (coarser for long runs, so no
chart has more than ``MAX_BINS`` points per series): the page never carries the events
themselves and renders quickly for histories of hundreds of thousands of events. The charts are
plotly figures drawn by the one copy of plotly.js inlined in the page; the page is a jinja2
template with its CSS and JS inline, so the file opens offline.

Outbox depth is derived from the history: at the sender each ``sent`` adds one pending envelope,
each ``ack`` takes away those through its ``seq``; a ``void`` (deljob, delsite) or a recovery's
``link_reset`` drops the pending ones (through ``void_through`` when the peer accepted a resync,
all of them when the recovering site cleared its outbox); a store replaced by the harness takes
its outbox with it, and the next start of the site brings back the unacknowledged envelopes of
the restored counters.
"""

from __future__ import annotations

import heapq
import html
import itertools
import json
import math
import os
import shlex
import sqlite3
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import plotly.graph_objects as go  # type: ignore[import-untyped]
import plotly.io.json as plotly_json  # type: ignore[import-untyped]
import plotly.offline  # type: ignore[import-untyped]
from markupsafe import Markup
from plotly.subplots import make_subplots  # type: ignore[import-untyped]

from emulator import checker, history
from emulator.errors import ConfigError, LabError, SmslabError
from emulator.lab import LabDir, LabInfo

DROP_KINDS: tuple[str, ...] = ("duplicate", "conflict", "gap", "stale", "fenced", "quarantined", "paused",
                               "unappliable")
MAX_BINS = 1200  # points per series at most: longer runs get coarser bins
BIN_SIZES: tuple[float, ...] = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600)
MAX_MARKERS = 2000  # per marker category on the timeline; the legend says how many were left out
MAX_SHAPES = 200  # fault periods and restarts drawn on one link chart
MAX_VIOLATIONS = 1000  # rows per table of the verdict; the rest is counted
REPEATING = frozenset({"rollback", "quarantine", "resend_unavailable", "queue_restored", "void"})
REPEAT_GAP = 5.0  # seconds between two repeats drawn as one marker
FAULTS_LANE = "faults"

FAULT_COLORS: dict[str, str] = {
    "partition": "#e45756", "drop": "#f58518", "duplicate": "#b279a2", "reorder": "#54a24b",
    "delay": "#eeca3b", "disconnect": "#9d755d", "alarm": "#ff9da6", "pause": "#79706e",
    "broker-restart": "#4c78a8",
}
PHASE_COLORS: dict[str, str] = {
    "announce": "#f2cf5b", "counters": "#f28e2b", "resync": "#59a14f",
    "paused": "#bab0ac", "resyncing": "#76b7b2", "resynced": "#b07aa1",
}
DROP_COLORS: dict[str, str] = {
    "duplicate": "#9ecae9", "conflict": "#d62728", "gap": "#ff9d98", "stale": "#bab0ac", "fenced": "#8c564b",
    "quarantined": "#7f3c8d", "paused": "#f2cf5b", "unappliable": "#000000",
}
HEALTH_COLORS: dict[str, str] = {
    "active": "#2ca02c", "degraded": "#ff7f0e", "failed": "#d62728", "paused": "#bab0ac",
    "quarantined": "#7f3c8d",
}
APPLIED_COLOR, DROPPED_COLOR, DEPTH_COLOR, RECOVERY_COLOR = "#4c78a8", "#e45756", "#9467bd", "#59a14f"

# The timeline's markers: category -> (legend name, plotly symbol, colour, size).
MARKERS: dict[str, tuple[str, str, str, int]] = {
    "start": ("site process started", "triangle-up", "#2ca02c", 10),
    "launch": ("started by the harness", "triangle-right", "#1b7837", 11),
    "kill": ("killed (SIGKILL)", "x", "#d62728", 12),
    "stop": ("stopped", "x-thin-open", "#ff7f0e", 12),
    "process": ("paused / resumed", "circle-open", "#555555", 10),
    "restore": ("store restored / wiped", "hexagram", "#9467bd", 13),
    "backup": ("backup taken", "square", "#17becf", 9),
    "rollback": ("rollback detected", "diamond", "#8c564b", 11),
    "quarantine": ("quarantine", "square-x", "#7f3c8d", 11),
    "queue_restored": ("queue declared again", "star", "#17becf", 11),
    "link_reset": ("link reset (recovery)", "triangle-down-open", "#333333", 10),
    "void": ("jobs voided (deljob, delsite)", "x-open", "#555555", 10),
    "resend_unavailable": ("resend unavailable", "circle-x-open", "#d62728", 10),
    "recovery": ("recovery began", "star-triangle-up-open", "#2ca02c", 14),
    "peer": ("a neighbour's side of it moved", "diamond-wide-open", "#4e9f9a", 11),
    "complete": ("recovery complete", "star-diamond", "#2ca02c", 14),
}

_TEMPLATE = go.layout.Template(layout=go.Layout(
    font={"family": "system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif", "size": 12, "color": "#222"},
    paper_bgcolor="#ffffff", plot_bgcolor="#ffffff",
    xaxis={"gridcolor": "#eceff3", "zeroline": False, "linecolor": "#c8ccd2", "ticks": "outside",
           "tickcolor": "#c8ccd2"},
    yaxis={"gridcolor": "#eceff3", "zeroline": False, "linecolor": "#c8ccd2"},
    hoverlabel={"font": {"size": 12}},
))


# -- what the history says -------------------------------------------------------------------------


@dataclass
class FaultPeriod:
    id: str
    kind: str
    target: str
    start: float
    end: float | None = None  # None: still on at the end of the history
    on: dict[str, Any] = field(default_factory=dict)
    off: dict[str, Any] = field(default_factory=dict)
    relay: Counter[str] = field(default_factory=Counter)  # relay action -> envelopes

    @property
    def verified(self) -> bool:
        return self.off.get("verified") is not False

    def struck(self, link: str) -> bool:
        """Whether the fault struck the directed link ``A->B``."""
        if self.kind in ("alarm", "broker-restart"):
            return True
        ends = link.split("->")
        site = self.on.get("site")
        if self.kind in ("disconnect", "pause") or site:
            return str(site or self.target) in ends
        links = self.on.get("links")
        if isinstance(links, list):
            return link in links
        if "<->" in self.target:
            a, _, b = self.target.partition("<->")
            return link in (f"{a}->{b}", f"{b}->{a}")
        return link == self.target or self.target in ends


@dataclass
class PhaseBar:
    site: str
    recovery: str
    phase: str
    start: float
    end: float | None  # None: the history ends in this phase
    peer: str | None = None  # the recovering neighbour, for a peer's side of the handshake


@dataclass
class Recovery:
    site: str
    id: str
    phases: list[tuple[str, float]] = field(default_factory=list)

    @property
    def completed(self) -> float | None:
        return next((t for p, t in self.phases if p == "complete"), None)


@dataclass
class Marker:
    category: str
    time: float
    lane: str
    text: str
    link: str = ""  # repeats of one category on one link within REPEAT_GAP are drawn as one marker
    until: float | None = None  # the last repeat
    count: int = 1


def _merge_repeats(markers: list[Marker]) -> list[Marker]:
    """A rollback seen on every ack, a resend asked again every sync: one marker and a line
    from the first to the last, the hover saying how many."""
    out: list[Marker] = []
    open_: dict[tuple[str, str, str], Marker] = {}
    for m in markers:
        if m.category not in REPEATING:
            out.append(m)
            continue
        key = (m.category, m.lane, m.link)
        first = open_.get(key)
        if first is not None and m.time - (first.until or first.time) <= REPEAT_GAP:
            first.until, first.count = m.time, first.count + 1
            continue
        open_[key] = m
        out.append(m)
    for m in out:
        if m.count > 1 and m.until is not None:
            m.text += f" (seen {m.count} times, the last at {clock(m.until)})"
    return out


class _Depth:
    """One series of per-bin maxima of a value that changes at events."""

    def __init__(self, bins: int) -> None:
        self.out = [0] * bins
        self.cur = 0
        self.bin = -1
        self.peak = 0
        self.max = 0

    def _advance(self, b: int) -> None:
        if b <= self.bin:
            return
        if 0 <= self.bin < len(self.out):
            self.out[self.bin] = self.peak
        for i in range(self.bin + 1, min(b, len(self.out))):
            self.out[i] = self.cur
        self.bin, self.peak = b, self.cur

    def set(self, b: int, value: int) -> None:
        self._advance(b)
        self.cur = value
        self.peak = max(self.peak, value)
        self.max = max(self.max, value)

    def finish(self) -> None:
        self._advance(len(self.out))


@dataclass
class LinkStats:
    name: str
    bins: int
    applied: list[int] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    drops: Counter[str] = field(default_factory=Counter)
    sent: int = 0
    applied_total: int = 0
    acked_through: int = 0
    depth: _Depth = field(init=False)
    pending: list[int] = field(default_factory=list)  # heap of seqs sent, not acknowledged

    def __post_init__(self) -> None:
        self.applied = [0] * self.bins
        self.dropped = [0] * self.bins
        self.depth = _Depth(self.bins)

    @property
    def sender(self) -> str:
        return self.name.split("->")[0]

    @property
    def receiver(self) -> str:
        return self.name.split("->")[-1]


@dataclass
class Analysis:
    t0: float
    t1: float
    bin_s: float
    bins: int
    lanes: list[str]
    fault_lanes: list[str]
    counts: Counter[str]
    counts_by_site: Counter[tuple[str, str]]
    links: dict[str, LinkStats]
    faults: list[FaultPeriod]
    recoveries: list[Recovery]
    bars: list[PhaseBar]
    markers: list[Marker]
    total: int

    @property
    def span(self) -> float:
        return self.t1 - self.t0

    def rel(self, t: float) -> float:
        return round(t - self.t0, 3)


def _bin_size(span: float) -> float:
    for size in BIN_SIZES:
        if span / size <= MAX_BINS:
            return size
    return math.ceil(span / MAX_BINS / 3600) * 3600.0


def _link_order(names: Iterable[str], sites: Sequence[str], declared: Sequence[str]) -> list[str]:
    """Directed links by the tree (``declared``, child->parent beside parent->child), then the rest."""
    names = set(names)
    out: list[str] = []
    for name in declared:
        a, _, b = name.partition("->")
        for n in (name, f"{b}->{a}"):
            if n in names and n not in out:
                out.append(n)
    rank = {s: i for i, s in enumerate(sites)}
    rest = sorted((n for n in names if n not in out),
                  key=lambda n: (min(rank.get(p, 1 << 20) for p in n.split("->")), n))
    for name in rest:
        if name in out:
            continue
        out.append(name)
        a, _, b = name.partition("->")
        if f"{b}->{a}" in names and f"{b}->{a}" not in out:
            out.append(f"{b}->{a}")
    return out


def _lane_of(e: history.Event) -> str:
    if e.site != history.HARNESS:
        return e.site
    site = (e.detail or {}).get("site")
    if isinstance(site, str) and site:
        return site
    if e.link and "-" not in e.link and e.link != "broker":
        return e.link
    return FAULTS_LANE


def _arrow(link: str | None) -> str:
    return (link or "").replace("<->", " ⇄ ").replace("->", " → ")


def analyze(events: Sequence[history.Event], *, sites: Sequence[str] = (),
            links: Sequence[str] = ()) -> Analysis:
    """One pass over the history: bins, fault periods, recoveries, markers, outbox depths.
    ``sites`` orders the lanes (the tree's order), ``links`` the directed links ("A->B")."""
    if any(b.time < a.time for a, b in itertools.pairwise(events)):
        events = sorted(events, key=lambda e: e.time)
    t0 = events[0].time if events else 0.0
    t1 = max(events[-1].time, t0) if events else 0.0
    bin_s = _bin_size(t1 - t0)
    bins = int((t1 - t0) // bin_s) + 1

    counts: Counter[str] = Counter()
    by_site: Counter[tuple[str, str]] = Counter()
    stats: dict[str, LinkStats] = {}
    faults: dict[str, FaultPeriod] = {}
    anonymous = 0
    recoveries: dict[tuple[str, str], Recovery] = {}
    peer_phases: dict[tuple[str, str, str], list[tuple[str, float]]] = defaultdict(list)
    markers: list[Marker] = []
    replaced: set[str] = set()  # sites whose store was replaced since their last start
    seen_sites: set[str] = set()

    def link(name: str) -> LinkStats:
        s = stats.get(name)
        if s is None:
            s = stats[name] = LinkStats(name, bins)
        return s

    def depth(s: LinkStats, b: int) -> None:
        s.depth.set(b, len(s.pending))

    for name in links:
        link(name)
    for e in events:
        kind = e.kind
        counts[kind] += 1
        by_site[(kind, e.site)] += 1
        if e.site != history.HARNESS:
            seen_sites.add(e.site)
        b = min(int((e.time - t0) // bin_s), bins - 1)
        if kind == "applied" and e.link:
            s = link(e.link)
            s.applied[b] += 1
            s.applied_total += 1
        elif kind in DROP_KINDS and e.link:
            s = link(e.link)
            s.dropped[b] += 1
            s.drops[kind] += 1
        elif kind == "sent" and e.link:
            s = link(e.link)
            s.sent += 1
            if e.seq is not None:
                heapq.heappush(s.pending, e.seq)
                depth(s, b)
        elif kind == "ack" and e.link and e.seq is not None:
            s = link(e.link)
            s.acked_through = e.seq
            while s.pending and s.pending[0] <= e.seq:
                heapq.heappop(s.pending)
            depth(s, b)
        elif kind == "void" and e.link:
            s = link(e.link)
            s.pending = [q for q in s.pending if e.seq is not None and q > e.seq]
            heapq.heapify(s.pending)
            depth(s, b)
            markers.append(Marker("void", e.time, e.site, f"{_arrow(e.link)}: queued envelopes deleted"
                                  + _detail_text(e.detail, ("why", "deleted")), link=e.link))
        elif kind == "link_reset" and e.link:
            a, _, peer = e.link.partition("<->")
            sender = e.site if e.site in (a, peer) else a
            s = link(f"{sender}->{peer if sender == a else a}")
            detail = e.detail or {}
            if detail.get("void_through") is not None:  # a peer took a recovering site's resync
                through = int(detail["void_through"])
                s.pending = [q for q in s.pending if q > through]
                heapq.heapify(s.pending)
            else:  # the recovering site cleared its outbox: the resync sends again
                s.pending = []
            depth(s, b)
            markers.append(Marker("link_reset", e.time, e.site, f"{_arrow(e.link)} reset"
                                  + _detail_text(detail, ("next_send_seq", "next_expected", "void_through",
                                                          "their_incarnation"))))
        elif kind == "start":
            if e.site in replaced and e.detail:  # the restored outbox: what the old counters had not acked
                for peer, counters in (e.detail.get("links") or {}).items():
                    s = link(f"{e.site}->{peer}")
                    acked = int(counters.get("acked_through", 0))
                    s.pending = list(range(acked + 1, int(counters.get("next_send_seq", 1))))
                    depth(s, b)
            replaced.discard(e.site)
            markers.append(Marker("start", e.time, e.site, "process started"
                                  + _detail_text(e.detail, ("pid", "state", "txn_id"))
                                  + (f", incarnation {e.incarnation}" if e.incarnation is not None else "")))
        elif kind in ("fault_on", "fault_off"):
            detail = e.detail or {}
            fkind = str(detail.get("kind") or "fault")
            fid = e.fault
            if kind == "fault_on":
                if fid is None:
                    anonymous += 1
                    fid = f"{fkind}-{anonymous}" if fkind != "fault" else f"fault-{anonymous}"
                faults[fid] = FaultPeriod(fid, fkind, e.link or "", e.time, on=detail)
            else:
                period = faults.get(fid) if fid else next(
                    (f for f in reversed(faults.values()) if f.end is None and f.kind == fkind), None)
                if period is None:  # healed, never seen on (the history starts after it)
                    fid = fid or f"{fkind}-?"
                    period = faults[fid] = FaultPeriod(fid, fkind, e.link or "", t0, on=detail)
                period.end = e.time
                period.off = detail
        elif kind == "relay" and e.fault in faults:
            detail = e.detail or {}
            faults[e.fault].relay[str(detail.get("action", "?"))] += int(detail.get("envelopes", 1))
        elif kind == "process":
            detail = e.detail or {}
            action = str(detail.get("action", "?"))
            category = {"kill": "kill", "stop": "stop", "start": "launch"}.get(action, "process")
            what = {"kill": "killed (SIGKILL)", "stop": "stopped", "start": "started"}.get(action, action)
            if action == "start" and detail.get("restore"):
                what += f" from backup {detail['restore']} (no recovery)"
            elif action == "start" and detail.get("wipe"):
                what += " from nothing (wiped, no recovery)"
            markers.append(Marker(category, e.time, _lane_of(e), what + _detail_text(detail, ("pid",))))
        elif kind == "store":
            detail = e.detail or {}
            action = str(detail.get("action", "?"))
            lane = _lane_of(e)
            if action in ("restore", "wipe"):
                replaced.add(lane)
                for s in stats.values():
                    if s.sender == lane:  # the store's outbox went with it
                        s.pending = []
                        depth(s, b)
                text = (f"store restored from backup {detail.get('backup')}" if action == "restore"
                        else "store wiped (rebuilt from nothing)")
                markers.append(Marker("restore", e.time, lane, text))
            else:
                markers.append(Marker("backup" if action == "backup" else "restore", e.time, lane,
                                      f"{action} {detail.get('backup', '')}".strip()
                                      + _detail_text(detail, ("txn_id",))))
        elif kind in ("rollback", "self_rollback"):
            what = "rollback of the peer" if kind == "rollback" else "own rollback"
            markers.append(Marker("rollback", e.time, e.site, f"{what} on {_arrow(e.link)}"
                                  + (f" (ack through {e.seq})" if e.seq is not None else "")
                                  + _detail_text(e.detail, ("sent_through",)), link=e.link or ""))
        elif kind == "quarantine":
            detail = e.detail or {}
            text = ("quarantined itself" if detail.get("self") else
                    f"quarantined {(e.link or '?').split('->')[0]}") + f" ({_arrow(e.link)})"
            markers.append(Marker("quarantine", e.time, e.site, text + _detail_text(detail, ("why",)),
                                  link=e.link or ""))
        elif kind == "health":
            detail = e.detail or {}
            to = str(detail.get("to", "?"))
            markers.append(Marker(f"health:{to}", e.time, e.site,
                                  f"{_arrow(e.link)}: {detail.get('from', '?')} → {to}"))
        elif kind == "queue_restored":
            markers.append(Marker("queue_restored", e.time, e.site,
                                  "queue deleted by the broker, declared again"
                                  + _detail_text(e.detail, ("queue",))))
        elif kind == "resend_unavailable":
            markers.append(Marker("resend_unavailable", e.time, e.site,
                                  f"{_arrow(e.link)}: asked again from seq {e.seq}, no longer held",
                                  link=e.link or ""))
        elif kind == "recovery":
            detail = e.detail or {}
            rid = str(detail.get("recovery_id", "?"))
            rec = recoveries.setdefault((e.site, rid), Recovery(e.site, rid))
            phase = str(detail.get("phase", "?"))
            if not rec.phases:
                markers.append(Marker("recovery", e.time, e.site, f"recovery {rid} began ({phase})"))
            if not rec.phases or rec.phases[-1][0] != phase:
                rec.phases.append((phase, e.time))
            if phase == "complete":
                markers.append(Marker("complete", e.time, e.site, f"recovery {rid} complete"))
        elif kind == "peer_recovery" and e.link:
            detail = e.detail or {}
            rid = str(detail.get("recovery_id", "?"))
            peer = e.link.partition("<->")[2] or e.link
            phases = peer_phases[(e.site, peer, rid)]
            phase = str(detail.get("phase", "?"))
            if not phases or phases[-1][0] != phase:
                phases.append((phase, e.time))
                markers.append(Marker("peer", e.time, e.site,
                                      f"its side of {peer}'s recovery {rid}: {phase}"))

    for s in stats.values():
        s.depth.finish()

    bars: list[PhaseBar] = []
    for rec in recoveries.values():
        for i, (phase, start) in enumerate(rec.phases):
            if phase == "complete":
                continue
            end = rec.phases[i + 1][1] if i + 1 < len(rec.phases) else None
            bars.append(PhaseBar(rec.site, rec.id, phase, start, end))
    for (site, peer, rid), phases in peer_phases.items():
        for i, (phase, start) in enumerate(phases):
            if phase == "complete":
                continue
            end = phases[i + 1][1] if i + 1 < len(phases) else None
            bars.append(PhaseBar(site, rid, phase, start, end, peer=peer))

    lanes = list(dict.fromkeys(sites)) + sorted(seen_sites - set(sites))  # a silent site keeps its lane
    for m in markers:
        if m.lane not in lanes and m.lane != FAULTS_LANE:
            lanes.append(m.lane)
    periods = sorted(faults.values(), key=lambda f: f.start)
    return Analysis(t0=t0, t1=t1, bin_s=bin_s, bins=bins, lanes=lanes, fault_lanes=_fault_lanes(periods, t1),
                    counts=counts, counts_by_site=by_site,
                    links={n: stats[n] for n in _link_order(stats, lanes, links)}, faults=periods,
                    recoveries=sorted(recoveries.values(), key=lambda r: r.phases[0][1] if r.phases else 0.0),
                    bars=bars, markers=_merge_repeats(markers), total=len(events))


def _fault_lanes(periods: list[FaultPeriod], t1: float) -> list[str]:
    """Sub-lanes of the faults lane so overlapping faults do not hide each other."""
    ends: list[float] = []
    out: list[str] = []
    for f in periods:
        end = f.end if f.end is not None else t1
        row = next((i for i, e in enumerate(ends) if e < f.start), None)
        if row is None:
            row = len(ends)
            ends.append(end)
        ends[row] = end
        out.append(FAULTS_LANE if row == 0 else f"{FAULTS_LANE} ({row + 1})")
    return out


def _detail_text(detail: dict[str, Any] | None, keys: Sequence[str]) -> str:
    if not detail:
        return ""
    bits = [f"{k.replace('_', ' ')} {detail[k]}" for k in keys if detail.get(k) is not None]
    return f" ({', '.join(bits)})" if bits else ""


# -- figures ---------------------------------------------------------------------------------------


def clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t * 1000) % 1000:03d}"


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) + f".{int(t * 1000) % 1000:03d}"


def _fault_text(f: FaultPeriod, an: Analysis) -> str:
    end = f"{clock(f.end)} ({f.end - f.start:.1f} s)" if f.end is not None else "still on at the end"
    lines = [f"<b>fault {html.escape(f.id)}</b>: {html.escape(f.kind)} {html.escape(_arrow(f.target))}",
             f"on {clock(f.start)} (t={an.rel(f.start):g} s) → {end}"]
    if f.on.get("seed") is not None:
        lines.append(f"seed {f.on['seed']}")
    if f.on.get("params"):
        lines.append("params " + html.escape(json.dumps(f.on["params"], separators=(",", ":"))))
    if not f.verified:
        lines.append("did not take effect (healed at once)")
    if f.relay:
        lines.append("relay: " + ", ".join(f"{a} {n}" for a, n in sorted(f.relay.items())))
    return "<br>".join(lines)


def _x_axis(an: Analysis) -> dict[str, Any]:
    pad = max(an.span * 0.005, 0.5)
    return {"range": [-pad, an.span + pad], "title": {"text": f"seconds since {clock(an.t0)}", "standoff": 6}}


def timeline_figure(an: Analysis) -> go.Figure:
    fig = go.Figure()
    fault_rows = list(dict.fromkeys(an.fault_lanes))
    lanes = fault_rows + an.lanes
    min_w = max(an.span / 400, 0.2)
    by_kind: dict[str, list[tuple[FaultPeriod, str]]] = defaultdict(list)
    for f, row in zip(an.faults, an.fault_lanes, strict=True):
        by_kind[f.kind].append((f, row))
    for kind, items in by_kind.items():
        color = FAULT_COLORS.get(kind, "#999999")
        fig.add_trace(go.Bar(
            orientation="h", y=[row for _, row in items], base=[an.rel(f.start) for f, _ in items],
            x=[max((f.end if f.end is not None else an.t1) - f.start, min_w) for f, _ in items],
            width=0.6, marker={"color": color, "line": {"width": 0}}, name=f"fault: {kind}",
            text=[f.id for f, _ in items], textposition="auto", insidetextanchor="start", cliponaxis=False,
            insidetextfont={"size": 11, "color": "#fff"}, outsidetextfont={"size": 11, "color": color},
            hovertext=[_fault_text(f, an) for f, _ in items], hoverinfo="text"))
    by_phase: dict[tuple[str, bool], list[PhaseBar]] = defaultdict(list)
    for bar in an.bars:
        by_phase[(bar.phase, bar.peer is not None)].append(bar)
    for (phase, peer), bars in sorted(by_phase.items(), key=lambda kv: (kv[0][1], kv[1][0].start)):
        color = PHASE_COLORS.get(phase, "#cccccc")
        texts = []
        for bar in bars:
            end = bar.end if bar.end is not None else an.t1
            whose = (f"{bar.site}: its side of {bar.peer}'s recovery" if bar.peer else f"{bar.site} recovery")
            until = clock(end) if bar.end is not None else "end of history"
            texts.append(f"<b>{html.escape(whose)}</b> {html.escape(bar.recovery)}<br>"
                         f"phase <b>{html.escape(phase)}</b> {clock(bar.start)} → {until}"
                         f" ({_secs(end - bar.start)})")
        fig.add_trace(go.Bar(
            orientation="h", y=[b.site for b in bars], base=[an.rel(b.start) for b in bars],
            x=[max((b.end if b.end is not None else an.t1) - b.start, min_w) for b in bars],
            width=0.34 if peer else 0.56, offset=-0.17 if peer else -0.28,
            marker={"color": color, "line": {"width": 0}, "pattern": {"shape": "/" if peer else ""}},
            name=f"neighbour {phase}" if peer else f"recovery: {phase}",
            hovertext=texts, hoverinfo="text"))
    by_cat: dict[str, list[Marker]] = defaultdict(list)
    for m in an.markers:
        by_cat[m.category].append(m)
    order = list(MARKERS) + sorted(c for c in by_cat if c not in MARKERS)
    for cat in order:
        marks = by_cat.get(cat)
        if not marks:
            continue
        if cat.startswith("health:"):
            state = cat.split(":", 1)[1]
            name, symbol, color, size = f"link → {state}", "circle", HEALTH_COLORS.get(state, "#7f7f7f"), 10
        else:
            name, symbol, color, size = MARKERS.get(cat, (cat, "circle-open", "#555555", 9))
        shown = marks[:MAX_MARKERS]
        if len(marks) > len(shown):
            name += f" (first {len(shown)} of {len(marks)})"
        repeated = [m for m in shown if m.until is not None]
        if repeated:  # from the first to the last repeat
            xs: list[float | None] = []
            ys: list[str | None] = []
            for m in repeated:
                assert m.until is not None
                xs += [an.rel(m.time), an.rel(m.until), None]
                ys += [m.lane, m.lane, None]
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line={"color": color, "width": 3},
                                     opacity=0.45, showlegend=False, hoverinfo="skip", legendgroup=cat))
        fig.add_trace(go.Scatter(
            x=[an.rel(m.time) for m in shown], y=[m.lane for m in shown], mode="markers", name=name,
            legendgroup=cat,
            marker={"symbol": symbol, "color": color, "size": size, "line": {"width": 1.5, "color": color}},
            hovertext=[f"{clock(m.time)} (t={an.rel(m.time):g} s) · <b>{html.escape(m.lane)}</b><br>"
                       f"{html.escape(m.text)}" for m in shown], hoverinfo="text"))
    plot, below, total = _timeline_geometry(an, sum(1 for t in fig.data if t.showlegend is not False))
    fig.update_layout(
        template=_TEMPLATE, height=total, barmode="overlay", margin={"l": 70, "r": 20, "t": 14, "b": below},
        xaxis=_x_axis(an), hovermode="closest",
        yaxis={"type": "category", "categoryorder": "array", "categoryarray": lanes,
               "range": [len(lanes) - 0.5, -0.5], "fixedrange": True, "showgrid": True},
        legend={"orientation": "h", "x": 0, "xanchor": "left", "y": -52 / plot, "yanchor": "top",
                "font": {"size": 11}, "groupclick": "toggleitem", "tracegroupgap": 4},
        shapes=[_fault_shape(f, an, strong=True) for f in an.faults[:MAX_SHAPES]],
        uniformtext={"minsize": 9, "mode": "show"},
    )
    return fig


def _timeline_geometry(an: Analysis, traces: int) -> tuple[int, int, int]:
    """(plot area, room below it for the axis and the legend: about 6 entries a row, total) in px."""
    plot = 36 * (len(set(an.fault_lanes)) + len(an.lanes))
    below = 52 + 22 * math.ceil(traces / 6) + 8
    return plot, below, 14 + plot + below


def _fault_shape(f: FaultPeriod, an: Analysis, *, strong: bool) -> dict[str, Any]:
    end = f.end if f.end is not None else an.t1
    return {"type": "rect", "xref": "x", "yref": "paper", "x0": an.rel(f.start),
            "x1": an.rel(max(end, f.start + an.span / 500)), "y0": 0, "y1": 1,
            "fillcolor": FAULT_COLORS.get(f.kind, "#999999"), "opacity": 0.16 if strong else 0.06,
            "layer": "below", "line": {"width": 0}}


def link_figure(an: Analysis, s: LinkStats) -> go.Figure:
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.1, row_heights=[0.55, 0.45])
    per = 1 / an.bin_s
    xs = [round(i * an.bin_s, 3) for i in range(an.bins)]
    rate = "per s" if an.bin_s == 1 else f"per s (bins of {an.bin_s:g} s)"
    fig.add_trace(go.Scatter(
        x=xs, y=[round(v * per, 3) for v in s.applied], name="applied", mode="lines", line_shape="hv",
        line={"color": APPLIED_COLOR, "width": 1.4}, fill="tozeroy", fillcolor="rgba(76,120,168,0.18)",
        hovertemplate="%{y:g} applied/s<extra></extra>"), row=1, col=1)
    if any(s.dropped):
        fig.add_trace(go.Scatter(
            x=xs, y=[round(v * per, 3) for v in s.dropped], name="dropped", mode="lines", line_shape="hv",
            line={"color": DROPPED_COLOR, "width": 1.4}, hovertemplate="%{y:g} dropped/s<extra></extra>"),
            row=1, col=1)
    fig.add_trace(go.Scatter(
        x=[round((i + 1) * an.bin_s, 3) for i in range(an.bins)], y=s.depth.out, name="outbox depth",
        mode="lines", line_shape="vh", line={"color": DEPTH_COLOR, "width": 1.4}, fill="tozeroy",
        fillcolor="rgba(148,103,189,0.15)", hovertemplate="outbox %{y}<extra></extra>"), row=2, col=1)
    shapes: list[dict[str, Any]] = []
    struck = [f for f in an.faults if f.struck(s.name)]
    other = [f for f in an.faults if not f.struck(s.name)]
    for f in struck[:MAX_SHAPES]:
        shape = _fault_shape(f, an, strong=True)
        shape["label"] = {"text": html.escape(f.id), "textposition": "top left",
                          "font": {"size": 10, "color": FAULT_COLORS.get(f.kind, "#777")}}
        shapes.append(shape)
    shapes += [_fault_shape(f, an, strong=False) for f in other[:max(0, MAX_SHAPES - len(struck))]]
    ends = (s.sender, s.receiver)
    for rec in an.recoveries:
        if rec.site in ends and rec.phases and len(shapes) < MAX_SHAPES:
            done = rec.completed
            began = rec.phases[0][1]
            end = max(done if done is not None else an.t1, began + an.span / 250)
            shapes.append({"type": "rect", "xref": "x", "yref": "paper", "x0": an.rel(began),
                           "x1": an.rel(end), "y0": 0, "y1": 1, "fillcolor": RECOVERY_COLOR, "opacity": 0.12,
                           "layer": "below", "line": {"width": 0},
                           "label": {"text": f"recovery {html.escape(rec.site)}", "textposition": "top right",
                                     "font": {"size": 10, "color": "#2e7d32"}}})
    for m in an.markers:
        if m.category in ("kill", "restore") and m.lane in ends and len(shapes) < MAX_SHAPES:
            color = MARKERS[m.category][2]
            shapes.append({"type": "line", "xref": "x", "yref": "paper", "x0": an.rel(m.time),
                           "x1": an.rel(m.time), "y0": 0, "y1": 1, "layer": "above",
                           "line": {"color": color, "width": 1, "dash": "dot"}})
    axis = _x_axis(an)
    fig.update_layout(template=_TEMPLATE, height=290, margin={"l": 56, "r": 12, "t": 14, "b": 40},
                      showlegend=False, hovermode="x unified", shapes=shapes)
    fig.update_xaxes(range=axis["range"])
    fig.update_xaxes(title={**axis["title"], "font": {"size": 11}}, row=2, col=1)
    fig.update_yaxes(title={"text": rate, "font": {"size": 11}}, rangemode="tozero", row=1, col=1)
    fig.update_yaxes(title={"text": "outbox", "font": {"size": 11}}, rangemode="tozero", row=2, col=1)
    return fig


def drops_figure(an: Analysis) -> go.Figure | None:
    names = [n for n, s in an.links.items() if sum(s.drops.values())]
    if not names:
        return None
    fig = go.Figure()
    for kind in DROP_KINDS:
        ys = [an.links[n].drops.get(kind, 0) for n in names]
        if any(ys):
            fig.add_trace(go.Bar(x=[_arrow(n) for n in names], y=ys, name=kind,
                                 marker={"color": DROP_COLORS.get(kind)},
                                 hovertemplate=f"%{{x}}: %{{y}} {kind}<extra></extra>"))
    fig.update_layout(template=_TEMPLATE, barmode="stack", height=320,
                      margin={"l": 60, "r": 20, "t": 20, "b": 60},
                      yaxis={"title": {"text": "envelopes dropped"}},
                      legend={"orientation": "h", "y": 1.12, "traceorder": "normal"})
    return fig


# -- the page --------------------------------------------------------------------------------------


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="smslab report">
<title>{{ title }}</title>
<style>
:root { --fg:#1f2328; --muted:#656d76; --line:#d8dee4; --bg:#f6f8fa; --card:#fff;
        --valid:#1a7f37; --invalid:#cf222e; --unknown:#9a6700; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif; color:var(--fg);
       background:var(--bg); }
header.top { background:#24292f; color:#fff; padding:14px 28px 12px; }
header.top h1 { margin:0; font-size:20px; font-weight:600; }
header.top .sub { color:#c9d1d9; font-size:13px; margin-top:2px; }
nav { position:sticky; top:0; z-index:10; background:#fff; border-bottom:1px solid var(--line);
      padding:6px 28px; display:flex; gap:18px; font-size:13px; align-items:center; }
nav a { color:#0969da; text-decoration:none; }
nav label { margin-left:auto; color:var(--muted); }
main { max-width:1500px; margin:0 auto; padding:18px 28px 40px; }
section { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:16px 18px;
          margin-bottom:18px; }
h2 { margin:0 0 10px; font-size:17px; }
h3 { margin:14px 0 6px; font-size:14px; }
p.hint { color:var(--muted); margin:0 0 10px; font-size:13px; }
.summary { display:grid; grid-template-columns:repeat(auto-fill,minmax(250px,1fr)); gap:8px 22px; margin:0; }
.summary div { border-left:3px solid var(--line); padding:1px 0 1px 9px; }
.summary dt { color:var(--muted); font-size:12px; }
.summary dd { margin:0; font-weight:500; overflow-wrap:anywhere; }
pre, code { font:12.5px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; }
pre.cmd { background:#0d1117; color:#e6edf3; padding:8px 12px; border-radius:6px; overflow-x:auto; margin:6px 0 0; }
.badge { display:inline-block; padding:2px 10px; border-radius:12px; font-weight:700; color:#fff;
         text-transform:uppercase; letter-spacing:.03em; font-size:12px; vertical-align:middle; }
.badge.valid { background:var(--valid); } .badge.invalid { background:var(--invalid); }
.badge.unknown { background:var(--unknown); } .badge.none { background:#6e7781; }
.verdict-line { font-size:15px; margin-bottom:8px; }
.chips { display:flex; flex-wrap:wrap; gap:6px; margin:6px 0 10px; }
.chip { background:var(--bg); border:1px solid var(--line); border-radius:12px; padding:1px 9px; font-size:12px; }
.chip b { font-weight:600; }
table { border-collapse:collapse; width:100%; font-size:13px; }
th, td { text-align:left; padding:4px 8px; border-bottom:1px solid #eaeef2; vertical-align:top; }
th { background:var(--bg); font-weight:600; }
.scroll th { position:sticky; top:0; z-index:1; box-shadow:0 1px 0 #eaeef2; }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; }
td.zero { color:#c4c9cf; }
td.meaning { color:var(--muted); font-size:12px; }
table.fixed { table-layout:fixed; }
table.fixed col.kind { width:190px; } table.fixed col.site { width:70px; }
tr.hard td.kind { color:var(--invalid); font-weight:600; }
tr.soft td.kind { color:var(--unknown); font-weight:600; }
tr.note td.kind { color:var(--muted); font-weight:600; }
tr.ok td.outcome { color:var(--valid); font-weight:600; } tr.failed td.outcome { color:var(--invalid); font-weight:700; }
.scroll { max-height:460px; overflow:auto; border:1px solid #eaeef2; border-radius:6px; }
.links { display:grid; grid-template-columns:repeat(auto-fill,minmax(560px,1fr)); gap:14px; }
.card { border:1px solid var(--line); border-radius:8px; padding:8px 10px 2px; }
.card h3 { margin:0; font-size:14px; }
.card .stats { color:var(--muted); font-size:12px; }
.chart { width:100%; }
.legend-swatch { display:inline-block; width:12px; height:10px; border-radius:2px; margin:0 4px 0 10px;
                 vertical-align:baseline; }
.empty { color:var(--muted); font-style:italic; }
details summary { cursor:pointer; color:#0969da; font-size:13px; }
footer { color:var(--muted); font-size:12px; text-align:center; padding:8px 0 24px; }
</style>
<script>{{ plotlyjs }}</script>
</head>
<body>
<header class="top">
  <h1>{{ title }}</h1>
  <div class="sub">{{ subtitle }}</div>
</header>
<nav>
  <a href="#summary">Summary</a><a href="#verdict">Verdict</a><a href="#timeline">Timeline</a>
  <a href="#links">Links</a><a href="#drops">Drops</a><a href="#events">Events</a>
  <label><input type="checkbox" id="sync-x" checked> zoom all charts together</label>
</nav>
<main>
<section id="summary">
  <h2>Summary</h2>
  <dl class="summary">
  {% for name, value in summary %}<div><dt>{{ name }}</dt><dd>{{ value }}</dd></div>
  {% endfor %}
  </dl>
  {% if kind_chips %}<h3>Events per kind</h3><div class="chips">{% for k, n in kind_chips %}
    <span class="chip" title="{{ meanings[k] }}"><b>{{ k }}</b> {{ n }}</span>{% endfor %}</div>{% endif %}
  {% if replay %}<h3>Replay</h3><pre class="cmd">{{ replay }}</pre>{% endif %}
  {% if expectations %}<h3>Expectations</h3>
  <div class="scroll"><table class="fixed">
    <colgroup><col style="width:60px"><col style="width:38%"><col style="width:90px"><col></colgroup>
    <tr><th class="num">step</th><th>expected</th><th></th><th>what happened</th></tr>
    {% for x in expectations %}<tr class="{{ x.css }}"><td class="num">{{ x.step }}</td><td>{{ x.what }}</td>
      <td class="outcome">{{ x.ok }}</td><td>{{ x.detail }}</td></tr>
    {% endfor %}
  </table></div>{% endif %}
  {% if steps %}<details><summary>the scenario's {{ steps | length }} steps</summary><ol>
    {% for step in steps %}<li><code>{{ step }}</code></li>{% endfor %}</ol></details>{% endif %}
  {% if extra %}<details><summary>more about this run</summary><pre>{{ extra }}</pre></details>{% endif %}
</section>

<section id="verdict">
  <h2>Verdict</h2>
  {% if verdict %}
  <div class="verdict-line"><span class="badge {{ verdict.verdict }}">{{ verdict.verdict }}</span>
    {{ verdict.summary }}</div>
  {% if verdict.kinds %}<div class="chips">{% for k, n, cls in verdict.kinds %}
    <span class="chip"><b>{{ k }}</b> {{ n }}{% if cls %} · {{ cls }}{% endif %}</span>{% endfor %}</div>{% endif %}
  {% for group in verdict.groups %}
  <h3>{{ group.title }} ({{ group.rows | length }}{% if group.more %} shown of {{ group.rows | length + group.more }}{% endif %})</h3>
  {% if group.hint %}<p class="hint">{{ group.hint }}</p>{% endif %}
  <div class="scroll"><table class="fixed">
    <colgroup><col class="kind"><col class="site"><col></colgroup>
    <tr><th>kind</th><th>site</th><th>what</th></tr>
    {% for v in group.rows %}<tr class="{{ group.css }}"><td class="kind">{{ v.kind }}</td><td>{{ v.site }}</td>
      <td>{{ v.detail }}</td></tr>
    {% endfor %}
  </table></div>
  {% endfor %}
  {% if not verdict.groups %}<p class="empty">no violation, no note</p>{% endif %}
  {% if verdict.stats %}<div class="chips" style="margin-top:10px">{% for k, v in verdict.stats %}
    <span class="chip">{{ k }} <b>{{ v }}</b></span>{% endfor %}</div>{% endif %}
  {% else %}
  <div class="verdict-line"><span class="badge none">not checked</span> {{ verdict_note }}</div>
  {% endif %}
</section>

<section id="timeline">
  <h2>Timeline</h2>
  <p class="hint">One lane per site; faults shaded across all lanes and drawn as bars on the faults lane;
    recovery phases as bars on the recovering site's lane (hatched: a neighbour's side of the handshake).
    Hover for details; drag to zoom, double-click to reset; click legend entries to hide them.</p>
  <div class="chart" id="fig-timeline" style="height:{{ timeline_height }}px"></div>
  {% if faults %}
  <h3>Faults</h3>
  <div class="scroll"><table>
    <tr><th>fault</th><th>kind</th><th>target</th><th>on</th><th>off</th><th class="num">seconds</th>
        <th>seed</th><th>what it did</th></tr>
    {% for f in faults %}<tr><td><b>{{ f.id }}</b></td><td><span class="legend-swatch" style="background:{{ f.color }};margin-left:0"></span>{{ f.kind }}</td>
      <td>{{ f.target }}</td><td>{{ f.on }}</td><td>{{ f.off }}</td><td class="num">{{ f.seconds }}</td>
      <td>{{ f.seed }}</td><td>{{ f.did }}</td></tr>
    {% endfor %}
  </table></div>
  {% else %}<p class="empty">no fault in this run</p>{% endif %}
  {% if recoveries %}
  <h3>Recoveries</h3>
  <table>
    <tr><th>site</th><th>recovery</th><th>phases</th><th>complete</th></tr>
    {% for r in recoveries %}<tr><td><b>{{ r.site }}</b></td><td><code>{{ r.id }}</code></td><td>{{ r.phases }}</td>
      <td>{{ r.complete }}</td></tr>
    {% endfor %}
  </table>
  {% endif %}
</section>

<section id="links">
  <h2>Links</h2>
  <p class="hint">Per directed link: envelopes
    <span class="legend-swatch" style="background:{{ colors.applied }}"></span>applied per second at the receiver,
    <span class="legend-swatch" style="background:{{ colors.dropped }}"></span>dropped per second at the receiver,
    <span class="legend-swatch" style="background:{{ colors.depth }}"></span>the sender's outbox depth
    (sent, not yet acknowledged; the highest in each bin). Faults that struck the link are shaded and named,
    other faults faintly; green: a recovery of either end; dotted lines: a kill or a restore of either end.</p>
  {% if link_cards %}
  <div class="links">
  {% for c in link_cards %}<div class="card"><h3>{{ c.title }}</h3><div class="stats">{{ c.stats }}</div>
    <div class="chart" id="{{ c.div }}" style="height:290px"></div></div>
  {% endfor %}
  </div>
  {% else %}<p class="empty">no envelope was sent or applied on any link</p>{% endif %}
</section>

<section id="drops">
  <h2>Drops by kind</h2>
  {% if drops_chart %}<div class="chart" id="fig-drops" style="height:320px"></div>{% else %}
  <p class="empty">no envelope was dropped</p>{% endif %}
  {% if link_rows %}
  <div class="scroll" style="margin-top:10px"><table>
    <tr><th>link</th><th class="num">sent</th><th class="num">applied</th>
      {% for k in drop_kinds %}<th class="num">{{ k }}</th>{% endfor %}
      <th class="num">max outbox</th><th class="num">outbox at end</th></tr>
    {% for r in link_rows %}<tr><td><b>{{ r.name }}</b></td>{% for v in r.cells %}
      <td class="num{% if v == "0" %} zero{% endif %}">{{ v }}</td>{% endfor %}</tr>
    {% endfor %}
  </table></div>
  {% endif %}
</section>

<section id="events">
  <h2>Events per kind</h2>
  <p class="hint">{{ total }} events, by kind and by the site that recorded them ({{ harness }}: the harness).</p>
  <table>
    <tr><th>kind</th><th>what it means</th><th class="num">total</th>{% for s in event_sites %}<th class="num">{{ s }}</th>{% endfor %}</tr>
    {% for r in event_rows %}<tr><td><b>{{ r.kind }}</b></td><td class="meaning">{{ r.meaning }}</td>
      <td class="num"><b>{{ r.total }}</b></td>
      {% for v in r.cells %}<td class="num{% if not v %} zero{% endif %}">{{ v }}</td>{% endfor %}</tr>
    {% endfor %}
  </table>
</section>
</main>
<footer>smslab report · generated {{ generated }} · times are local ({{ tz }}) · plotly.js {{ plotly_version }}
  inline, works offline</footer>
<script type="application/json" id="figures">{{ figures }}</script>
<script>
(function () {
  "use strict";
  var FIGS = JSON.parse(document.getElementById("figures").textContent);
  var CONFIG = {displaylogo: false, responsive: true, scrollZoom: false,
                modeBarButtonsToRemove: ["select2d", "lasso2d", "autoScale2d"]};
  var SPAN = {{ span_range }};
  var synced = [];
  var syncing = false;
  var status = window.smslabReport = {total: FIGS.length, rendered: 0, errors: []};
  function rangeOf(ev) {
    var keys = ["xaxis", "xaxis2"];
    for (var i = 0; i < keys.length; i++) {
      var k = keys[i];
      if ((k + ".range[0]") in ev) { return [ev[k + ".range[0]"], ev[k + ".range[1]"]]; }
      if ((k + ".range") in ev) { return ev[k + ".range"]; }
      if (ev[k + ".autorange"]) { return SPAN; }
    }
    return null;
  }
  function follow(src, ev) {
    if (syncing || !document.getElementById("sync-x").checked) { return; }
    var range = rangeOf(ev);
    if (!range) { return; }
    syncing = true;
    var jobs = synced.filter(function (d) { return d !== src; }).map(function (d) {
      return Plotly.relayout(d, {"xaxis.range": range.slice()});
    });
    Promise.all(jobs).then(function () { syncing = false; }, function () { syncing = false; });
  }
  function draw(i) {
    if (i >= FIGS.length) { document.body.setAttribute("data-rendered", "done"); return; }
    var f = FIGS[i];
    var div = document.getElementById(f.div);
    Plotly.newPlot(div, f.fig.data, f.fig.layout, CONFIG).then(function () {
      if (f.sync) { synced.push(div); div.on("plotly_relayout", function (ev) { follow(div, ev); }); }
      status.rendered += 1;
      setTimeout(function () { draw(i + 1); }, 0);
    }, function (err) {
      status.errors.push(String(err));
      setTimeout(function () { draw(i + 1); }, 0);
    });
  }
  draw(0);
})();
</script>
</body>
</html>
"""

_ENV = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                          lstrip_blocks=True)


def _script_json(value: Any) -> str:
    """JSON to put inside <script>: no ``<`` at all, so neither ``</script>`` nor ``<!--``."""
    text: str = plotly_json.to_json_plotly(value)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _fig_json(fig: go.Figure) -> dict[str, Any]:
    out: dict[str, Any] = fig.to_plotly_json()
    return out


def _secs(d: float) -> str:
    return f"{d * 1000:.0f} ms" if d < 1 else f"{d:.1f} s"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min {secs:02d} s" if hours else f"{minutes} min {secs:02d} s"


def _moment(value: Any) -> str:
    """A time from run.json: epoch seconds, or a string as written."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 1e8:
        return _when(float(value))
    return str(value)


def _replay_text(value: Any) -> str:
    if isinstance(value, list | tuple):
        return shlex.join(str(v) for v in value)
    return str(value)


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _expectations(meta: dict[str, Any]) -> list[dict[str, str]]:
    """A run's expectations (``run.json``: step, what, ok, detail each), taken out of ``meta``."""
    value = meta.get("expectations")
    if not (isinstance(value, list) and value and all(isinstance(v, dict) and "ok" in v for v in value)):
        return []
    del meta["expectations"]
    return [{"step": str(v.get("step", "")), "what": str(v.get("what", "")),
             "detail": str(v.get("detail") or ""), "ok": "held" if v.get("ok") else "FAILED",
             "css": "ok" if v.get("ok") else "failed"} for v in value]


def _verdict_context(verdict: dict[str, Any]) -> dict[str, Any]:
    violations = [v for v in verdict.get("violations") or [] if isinstance(v, dict)]
    notes = [v for v in violations if v.get("kind") in checker.NOTES]
    hard = [v for v in violations if v.get("kind") not in checker.NOTES and v.get("hard", True)]
    soft = [v for v in violations if v.get("kind") not in checker.NOTES and not v.get("hard", True)]
    kinds: Counter[tuple[str, str]] = Counter()
    for group, name in ((hard, "counts"), (soft, "soft"), (notes, "note")):
        for v in group:
            kinds[(str(v.get("kind", "?")), name)] += 1

    def rows(group: list[dict[str, Any]]) -> list[dict[str, str]]:
        return [{"kind": str(v.get("kind", "?")), "site": str(v.get("site", "")),
                 "detail": str(v.get("detail", ""))} for v in group[:MAX_VIOLATIONS]]

    groups = []
    soft_hint = ("these do not make the run invalid, only unknown (a site down, data in flight, a fault that"
                 " struck nothing, pruned history)")
    notes_hint = ("named for the record, never against the verdict: losses before a recovery that the"
                  " recovery could not bring back")
    for group, title, css, hint in ((hard, "Violations", "hard", "these count against the verdict"),
                                    (soft, "Soft violations", "soft", soft_hint),
                                    (notes, "Notes", "note", notes_hint)):
        if group:
            shown = rows(group)
            groups.append({"title": title, "css": css, "rows": shown, "more": len(group) - len(shown),
                           "hint": hint})
    word = str(verdict.get("verdict", "unknown"))
    parts = [text for n, text in ((len(hard), f"{len(hard)} violation(s) that count"),
                                  (len(soft), f"{len(soft)} soft violation(s)"),
                                  (len(notes), f"{len(notes)} note(s)")) if n] or ["no violation, no note"]
    stats = verdict.get("stats")
    return {
        "verdict": word if word in ("valid", "invalid", "unknown") else "unknown",
        "summary": ", ".join(parts),
        "kinds": [(k, n, "" if cls == "counts" else cls) for (k, cls), n in sorted(kinds.items())],
        "groups": groups,
        "stats": [(str(k), str(v)) for k, v in stats.items()] if isinstance(stats, dict) else [],
    }


def _fault_rows(an: Analysis) -> list[dict[str, str]]:
    out = []
    for f in an.faults:
        did: list[str] = []
        stats = f.off.get("stats")
        if isinstance(stats, dict):
            for name, value in sorted(stats.items()):
                if isinstance(value, dict):
                    did.append(f"{name}: " + ", ".join(f"{k.replace('_', ' ')} {v}"
                                                       for k, v in value.items()))
                else:
                    did.append(f"{name} {value}")
        if f.relay:
            did.append("relay: " + ", ".join(f"{a} {n} envelope(s)" for a, n in sorted(f.relay.items())))
        if f.on.get("closed") is not None and not isinstance(stats, dict):
            did.append(f"{f.on['closed']} connection(s) closed")
        if not f.verified:
            did.append("did not take effect: healed at once")
        params = f.on.get("params")
        settings = (", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in params.items())
                    if isinstance(params, dict) else "")
        kind = f"{f.kind} {settings}" if settings else f.kind
        out.append({
            "id": f.id, "kind": kind, "color": FAULT_COLORS.get(f.kind, "#999999"),
            "target": _arrow(f.target),
            "on": f"{clock(f.start)} (t={an.rel(f.start):g} s)",
            "off": f"{clock(f.end)} (t={an.rel(f.end):g} s)" if f.end is not None else "still on",
            "seconds": f"{(f.end if f.end is not None else an.t1) - f.start:.1f}",
            "seed": str(f.on.get("seed", "")), "did": "; ".join(did),
        })
    return out


def _recovery_rows(an: Analysis) -> list[dict[str, str]]:
    out = []
    for r in an.recoveries:
        steps = []
        for i, (phase, t) in enumerate(r.phases):
            if phase == "complete":
                continue
            end = r.phases[i + 1][1] if i + 1 < len(r.phases) else an.t1
            steps.append(f"{phase} {clock(t)} ({_secs(end - t)})")
        done = r.completed
        start = r.phases[0][1] if r.phases else an.t0
        out.append({"site": r.site, "id": r.id, "phases": " → ".join(steps) or "—",
                    "complete": (f"{clock(done)}, {_secs(done - start)} after it began" if done is not None
                                 else "not complete at the end of the history")})
    return out


def build_report(events: list[history.Event], *, title: str, verdict: dict[str, Any] | None = None,
                 meta: dict[str, Any] | None = None) -> str:
    """The report page for a history (time-ordered, as ``history.jsonl`` keeps it).

    ``verdict`` is a checker report dict (``Report.to_dict()``), or None. ``meta`` says what is
    known of the run; recognised keys: ``lab_id``, ``mode``, ``sites`` (site codes in tree order,
    for the lanes), ``links`` (directed links "A->B", in the order to show them), ``scenario``,
    ``seed``, ``replay`` (a command, as a string or a list of words), ``started``, ``finished``
    (epoch seconds or text), ``exit``, ``error``, ``steps`` (strings), ``expectations`` (dicts with
    step, what, ok, detail), ``source``, ``verdict_note`` (why there is no verdict); any other key
    is listed as it is.
    """
    meta = dict(meta or {})
    sites = [str(s) for s in meta.pop("sites", None) or []]
    links = [str(n) for n in meta.pop("links", None) or []]
    an = analyze(events, sites=sites, links=links)
    lab_id = meta.pop("lab_id", None)
    summary: list[tuple[str, str]] = []
    if lab_id:
        summary.append(("lab", str(lab_id)))
    for key, name in (("mode", "mode"), ("scenario", "scenario"), ("seed", "seed")):
        if meta.get(key) is not None:
            summary.append((name, str(meta.pop(key))))
    if an.lanes:
        summary.append(("sites", f"{len(an.lanes)}: " + " ".join(an.lanes)))
    for key, name in (("started", "run started"), ("finished", "run finished")):
        if meta.get(key) is not None:
            summary.append((name, _moment(meta.pop(key))))
    if events:
        summary.append(("history", f"{_when(an.t0)} → {clock(an.t1)}"))
        summary.append(("time span", _duration(an.span)))
    summary.append(("events", f"{an.total:,}"))
    summary.append(("faults", str(len(an.faults))))
    summary.append(("recoveries", str(len(an.recoveries))))
    summary.append(("directed links", str(len(an.links))))
    if an.bin_s != 1:
        summary.append(("chart bins", f"{an.bin_s:g} s"))
    if meta.get("exit") is not None:
        summary.append(("exit code", str(meta.pop("exit"))))
    error = meta.pop("error", None)
    if error:
        summary.append(("error", str(error)))
    expectations = _expectations(meta)
    steps = meta.pop("steps") if _strings(meta.get("steps")) else []
    replay = meta.pop("replay", None)
    source = meta.pop("source", None)
    if source:
        summary.append(("source", str(source)))
    verdict_note = str(meta.pop("verdict_note", None) or "no checker report was given")
    extra = json.dumps(meta, indent=2, sort_keys=True, default=str) if meta else ""

    figures: list[dict[str, Any]] = []
    timeline_height = 0
    if events:
        timeline = timeline_figure(an)
        timeline_height = int(timeline.layout.height)
        figures.append({"div": "fig-timeline", "sync": True, "fig": _fig_json(timeline)})
    cards = []
    for i, (name, s) in enumerate(an.links.items()):
        if not (s.sent or s.applied_total or sum(s.drops.values())):
            continue
        div = f"fig-link-{i}"
        figures.append({"div": div, "sync": True, "fig": _fig_json(link_figure(an, s))})
        dropped = sum(s.drops.values())
        cards.append({"div": div, "title": _arrow(name), "stats": " · ".join(
            [f"sent {s.sent:,}", f"applied {s.applied_total:,}", f"dropped {dropped:,}",
             f"max outbox {s.depth.max:,}", f"outbox at end {s.depth.cur:,}"])})
    drops = drops_figure(an)
    if drops is not None:
        figures.append({"div": "fig-drops", "sync": False, "fig": _fig_json(drops)})
    link_rows = [{"name": _arrow(n), "cells": [f"{s.sent:,}", f"{s.applied_total:,}"]
                  + [f"{s.drops.get(k, 0):,}" for k in DROP_KINDS]
                  + [f"{s.depth.max:,}", f"{s.depth.cur:,}"]} for n, s in an.links.items()]
    harness = any(site == history.HARNESS for _, site in an.counts_by_site)
    event_sites = an.lanes + ([history.HARNESS] if harness else [])
    kinds = [k for k in history.KINDS if an.counts.get(k)]
    kinds += sorted(k for k in an.counts if k not in history.KINDS)
    event_rows = [{"kind": k, "meaning": history.KINDS.get(k, ""), "total": f"{an.counts[k]:,}",
                   "cells": [f"{an.counts_by_site.get((k, s), 0):,}" if an.counts_by_site.get((k, s)) else ""
                              for s in event_sites]} for k in kinds]
    sub = [f"lab {lab_id}" if lab_id else "", f"{an.total:,} events",
           _duration(an.span) if events else "no events"]
    pad = max(an.span * 0.005, 0.5)
    offset = time.strftime("%z")
    return _ENV.from_string(PAGE).render(
        title=title, subtitle=" · ".join(p for p in sub if p), summary=summary,
        replay=_replay_text(replay) if replay else "", extra=extra, expectations=expectations, steps=steps,
        verdict=_verdict_context(verdict) if verdict else None, verdict_note=verdict_note,
        timeline_height=timeline_height,
        faults=_fault_rows(an), recoveries=_recovery_rows(an), link_cards=cards,
        drops_chart=drops is not None, link_rows=link_rows, drop_kinds=DROP_KINDS,
        colors={"applied": APPLIED_COLOR, "dropped": DROPPED_COLOR, "depth": DEPTH_COLOR},
        total=f"{an.total:,}", event_sites=event_sites, event_rows=event_rows, harness=history.HARNESS,
        kind_chips=[(k, f"{an.counts[k]:,}") for k in sorted(an.counts, key=lambda k: (-an.counts[k], k))],
        meanings=defaultdict(str, history.KINDS),
        generated=_when(time.time()), tz=f"UTC{offset[:3]}:{offset[3:]}" if offset else time.tzname[0],
        plotly_version=plotly.offline.get_plotlyjs_version(),
        plotlyjs=Markup(plotly.offline.get_plotlyjs()),
        figures=Markup(_script_json(figures)),
        span_range=Markup(json.dumps([-pad, round(an.span + pad, 3)])),
    )


# -- from a lab or a run directory -----------------------------------------------------------------


@dataclass(frozen=True)
class Written:
    path: Path
    events: int
    verdict: str | None  # the verdict shown, None if none
    note: str | None = None  # why there is no verdict


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}",
                          hint="check the file's permissions, or remove it to report without it") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{what} {path} is not valid JSON: {exc.msg} at line {exc.lineno}",
                          hint="it is written by the run that produced this directory: run it again,"
                               " or remove the file") from exc
    if not isinstance(value, dict):
        raise ConfigError(f"{what} {path} is not a JSON object", hint="remove it to report without it")
    return value


def _read_events(lab_dir: LabDir) -> list[history.Event]:
    path = history.history_path(lab_dir)
    try:
        return list(history.read(lab_dir))
    except OSError as exc:
        raise ConfigError(f"cannot read the history {path}: {exc.strerror or exc}",
                          hint="check the file's permissions") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"the history {path} is not text: {exc.reason}",
                          hint="is it a history.jsonl written by smslab?") from exc
    except ConfigError as exc:
        if exc.hint:
            raise
        fix = (f"in a lab, delete it and {path.parent / 'history.state.json'} to merge the history again"
               if lab_dir.exists() else "the run's history is damaged: run it again to write it anew")
        raise ConfigError(exc.message, hint=fix) from exc


def _topology_meta(info: LabInfo) -> dict[str, Any]:
    topo = info.topology
    tree = topo.subtree(topo.central)
    return {"lab_id": info.lab_id, "mode": topo.mode, "sites": tree,
            "links": [f"{c}->{p}" for p, c in sorted(topo.links(), key=lambda pc: tree.index(pc[1]))]}


def _lab_verdict(lab_dir: LabDir, info: LabInfo) -> tuple[dict[str, Any] | None, str | None]:
    codes = info.topology.depth_order()
    readable = [c for c in codes if lab_dir.pid(c) is not None or lab_dir.site_db(c).exists()]
    if not readable:
        return None, (f"no site of lab {info.lab_id} is running and no site store is left in"
                      f" {lab_dir.path / 'sites'}: the checker has nothing to read")
    try:
        return checker.check(lab_dir, info).to_dict(), None
    except (SmslabError, sqlite3.Error, OSError) as exc:
        return None, f"the checker could not read the lab: {exc}"


_WHICH = "pass a lab directory (it has lab.json) or a run directory (it has history.jsonl)"


def _source_kind(source: Path) -> str:
    if (source / "lab.json").is_file():
        return "lab"
    if (source / "history.jsonl").is_file() or (source / "run.json").is_file():
        return "run"
    if not source.exists():
        raise LabError(f"{source} does not exist", hint=_WHICH)
    if not source.is_dir():
        raise ConfigError(f"{source} is not a directory", hint=_WHICH)
    raise LabError(f"{source} is neither a lab directory (no lab.json) nor a run directory"
                   " (no history.jsonl)", hint=_WHICH)


def generate(source: Path, out: Path | None = None) -> Written:
    """Write the report of a lab directory or a run directory (see ``write_report``)."""
    source = Path(source).resolve()
    kind = _source_kind(source)
    meta: dict[str, Any] = {"source": str(source)}
    verdict: dict[str, Any] | None = None
    note: str | None = None
    if kind == "lab":
        lab_dir = LabDir(source)
        info = lab_dir.load()
        meta.update(_topology_meta(info))
        try:
            history.merge(lab_dir, info)
        except OSError as exc:
            raise LabError(f"cannot merge the history of lab {info.lab_id} in {lab_dir.path}:"
                           f" {exc.strerror or exc}",
                           hint="the report merges the sites' events into history.jsonl first: it needs to"
                                " write to the lab directory") from exc
        events = _read_events(lab_dir)
        if not events:
            raise LabError(f"the history of lab {info.lab_id} has no events"
                           f" ({history.history_path(lab_dir)})",
                           hint="bring the lab up (smslab up TOPOLOGY) and let it run a while")
        verdict, note = _lab_verdict(lab_dir, info)
        title = f"smslab report: {info.lab_id}"
    else:
        run_dir = LabDir(source)
        path = history.history_path(run_dir)
        if not path.is_file():
            raise ConfigError(f"run directory {source} has no history.jsonl",
                              hint="the run did not finish writing it; report on its lab instead:"
                                   f" smslab report {source / 'lab'}")
        run: dict[str, Any] = {}
        if (source / "run.json").is_file():
            run = _read_json(source / "run.json", "run file")
        lab_json = source / "lab" / "lab.json"
        if lab_json.is_file():
            meta.update(_topology_meta(LabDir(source / "lab").load()))
        if run.get("lab_id") or run.get("lab"):
            meta.setdefault("lab_id", str(run.get("lab_id") or run.get("lab")))
        for key, value in run.items():
            if key in ("lab_id", "lab", "verdict"):
                continue
            if key in ("sites", "links") and not _strings(value):
                key = f"run {key}"  # not lanes or links to draw: listed as they are
            meta.setdefault(key, value)
        if (source / "verdict.json").is_file():
            verdict = _read_json(source / "verdict.json", "verdict file")
            if "verdict" not in verdict:
                raise ConfigError(f"verdict file {source / 'verdict.json'} has no \"verdict\" key",
                                  hint="it should hold a checker report: smslab check --json > verdict.json")
        elif isinstance(run.get("verdict"), dict) and "verdict" in run["verdict"]:
            verdict = run["verdict"]
        else:
            note = f"the run directory has no verdict.json ({source})"
        events = _read_events(run_dir)
        if not events:
            raise ConfigError(f"the history {path} has no events",
                              hint="the run recorded nothing: was the lab up while it ran?")
        scenario = meta.get("scenario")
        title = f"smslab report: {meta.get('lab_id') or source.name}" + (f" · {scenario}" if scenario else "")
    if note:
        meta["verdict_note"] = note
    page = build_report(events, title=title, verdict=verdict, meta=meta)
    target = Path(out) if out is not None else source / "report.html"
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"cannot write the report to {target}: {exc.strerror or exc}",
                          hint="choose another file with -o FILE") from exc
    return Written(target.resolve(), len(events), verdict.get("verdict") if verdict else None, note)


def write_report(source: Path, out: Path | None = None) -> Path:
    """Write the report of ``source``, a lab directory (it has ``lab.json``: its history is
    merged first and the checker judges it if its sites are running or their stores readable) or
    a run directory (``history.jsonl``, and ``verdict.json``, ``run.json``, ``lab/`` where they
    exist). ``out`` defaults to ``report.html`` inside ``source``. Returns the path written."""
    return generate(source, out).path


__all__ = ["DROP_KINDS", "Analysis", "Written", "analyze", "build_report", "generate", "write_report"]
