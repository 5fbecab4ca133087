"""``smslab report``: the page is self-contained (plotly.js inline once, nothing fetched), names
the lab, every fault and every violation, derives the outbox depth from the history, reads lab
and run directories, says what is wrong with a bad one, and handles a 200,000-event history.

``synthetic_history`` is a small simulation of a 5-site lab (links sending, receivers applying,
acks), with a partition, a drop fault, a kill and a start, a backup, a restore without recovery
(the hole: conflicts at the parent, a rollback, a degraded link), a recovery and its peers' side;
the browser test draws the same history."""

from __future__ import annotations

import argparse
import html
import json
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from emulator import checker, history, report
from emulator.cli import report as report_command
from emulator.errors import ConfigError, LabError
from emulator.lab import LabDir, LabInfo
from emulator.topology import parse_topology

TOPOLOGY = parse_topology("""
lab: rep
sites:
  - {code: CEN, type: central, clients: 0}
  - {code: P01, type: primary, parent: CEN}
  - {code: S01, type: secondary, parent: P01}
  - {code: P02, type: primary, parent: CEN}
  - {code: S02, type: secondary, parent: P02}
""")
LAB_ID = "rep-5a1b2c"
T0 = 1_760_000_000.0
FAULT_IDS = ("f1", "f2")


@dataclass
class _Link:
    sender: str
    receiver: str
    next_seq: int = 1
    expected: int = 1
    in_flight: list[tuple[float, int]] = field(default_factory=list)  # (arrives, seq)
    resend_after: float = 0.0  # the receiver asks again for a gap at most this often


class Sim:
    """Events of a lab, written as its sites and harness would, in time order."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.events: list[history.Event] = []
        self.index: dict[str, int] = {}
        self.runs: dict[str, int] = {}

    def add(self, site: str, kind: str, t: float, **fields: Any) -> None:
        self.index[site] = self.index.get(site, 0) + 1
        run = "harness" if site == history.HARNESS else f"{site}-run{self.runs.get(site, 1)}"
        self.events.append(history.Event(time=round(T0 + t, 6), site=site, index=self.index[site], run=run,
                                         kind=kind, **fields))

    def harness(self, kind: str, t: float, **fields: Any) -> None:
        self.add(history.HARNESS, kind, t, **fields)


def synthetic_history(seconds: float = 60.0, rate: float = 4.0, seed: int = 7) -> list[history.Event]:
    """About ``8 * rate * 3.2 * seconds`` events: 8 directed links sending ``rate`` envelopes a
    second; faults and recoveries at fixed fractions of the run."""
    sim = Sim(seed)
    links = {(s, r): _Link(s, r) for p, c in TOPOLOGY.links() for s, r in ((c, p), (p, c))}
    at = {name: seconds * f for name, f in (
        ("backup", 0.15), ("f1_on", 0.25), ("f1_off", 0.40), ("kill", 0.50), ("start", 0.53), ("f2_on", 0.58),
        ("f2_off", 0.75), ("restore", 0.80), ("recover", 0.87), ("complete", 0.95))}
    done: set[str] = set()
    backup: dict[tuple[str, str], int] = {}
    down: set[str] = set()
    restored = recovering = False
    for code in TOPOLOGY.depth_order():
        sim.add(code, "start", 0.0, incarnation=1,
                detail={"pid": 100, "state": "active", "txn_id": 0, "links": {}})
    dt = 0.05
    steps = int(seconds / dt)

    def due(name: str, now: float) -> bool:
        if name not in done and now >= at[name]:
            done.add(name)
            return True
        return False

    for step in range(1, steps + 1):
        t = step * dt
        if due("backup", t):
            backup = {k: link.next_seq for k, link in links.items() if k[0] == "P01"}
            sim.harness("store", t, link="P01", detail={"action": "backup", "backup": "P01-b1", "site": "P01",
                                                         "txn_id": 120})
        if due("f1_on", t):
            sim.harness("fault_on", t, link="P01<->CEN", fault="f1", detail={
                "kind": "partition", "seed": 11, "params": {}, "links": ["P01->CEN", "CEN->P01"]})
        if due("f1_off", t):
            sim.harness("fault_off", t, link="P01<->CEN", fault="f1", detail={
                "kind": "partition", "stats": {"P01->CEN": {"seen": 40, "forwarded": 40}}})
            for key in (("P01", "CEN"), ("CEN", "P01")):  # the senders resend what was held: duplicates
                link = links[key]
                sim.add(key[0], "resend", t, link=f"{key[0]}->{key[1]}", seq=link.expected)
                link.in_flight += [(t + 0.3, seq) for seq in range(link.expected, link.next_seq)]
        if due("kill", t):
            down.add("P01")
            sim.harness("process", t, link="P01", detail={"action": "kill", "pid": 100, "site": "P01"})
        if due("start", t):
            down.discard("P01")
            sim.runs["P01"] = sim.runs.get("P01", 1) + 1
            sim.harness("process", t, link="P01", detail={"action": "start", "pid": 101, "restore": None,
                                                           "wipe": False, "site": "P01"})
            counters = {r: {"next_send_seq": link.next_seq, "acked_through": link.next_seq - 1,
                            "next_expected": 1} for (s, r), link in links.items() if s == "P01"}
            sim.add("P01", "start", t + 0.2, incarnation=1,
                    detail={"pid": 101, "state": "active", "txn_id": 300, "links": counters})
            sim.add("CEN", "queue_restored", t + 0.5, detail={"queue": "smslab.rep.CEN.in"})
        if due("f2_on", t):
            sim.harness("fault_on", t, link="S01->P01", fault="f2", detail={
                "kind": "drop", "seed": 5, "params": {"rate": 0.3}, "links": ["S01->P01"]})
        if due("f2_off", t):
            sim.harness("fault_off", t, link="S01->P01", fault="f2", detail={
                "kind": "drop", "stats": {"S01->P01": {"seen": 50, "forwarded": 35, "dropped": 15}}})
        if due("restore", t):
            sim.harness("process", t, link="P01", detail={"action": "kill", "pid": 101, "site": "P01"})
            sim.harness("store", t + 0.1, link="P01",
                        detail={"action": "restore", "backup": "P01-b1", "site": "P01"})
            sim.runs["P01"] = sim.runs.get("P01", 1) + 1
            sim.harness("process", t + 0.2, link="P01",
                        detail={"action": "start", "pid": 102, "restore": "P01-b1", "wipe": False,
                                "site": "P01"})
            for key, seq in backup.items():
                links[key].next_seq = seq
                links[key].in_flight.clear()
            counters = {r: {"next_send_seq": seq, "acked_through": seq - 1, "next_expected": 1}
                        for (_, r), seq in backup.items()}
            sim.add("P01", "start", t + 0.3, incarnation=1,
                    detail={"pid": 102, "state": "active", "txn_id": 120, "links": counters})
            restored = True
        if restored and t >= at["restore"] + 1.5 and "rollback" not in done:
            done.add("rollback")
            sim.add("CEN", "rollback", t, link="P01->CEN", seq=backup[("P01", "CEN")] - 1, incarnation=1,
                    detail={"sent_through": backup[("P01", "CEN")] - 1})
            sim.add("CEN", "health", t, link="CEN<->P01", detail={"from": "active", "to": "degraded"})
            sim.add("P01", "health", t + 0.3, link="P01<->CEN", detail={"from": "active", "to": "degraded"})
        if due("recover", t):
            recovering = True
            restored = False
            sim.add("P01", "recovery", t, incarnation=2, detail={"recovery_id": "rec-1", "phase": "announce"})
            for peer in ("CEN", "S01"):
                sim.add(peer, "peer_recovery", t + 0.2, link=f"{peer}<->P01",
                        detail={"recovery_id": "rec-1", "phase": "paused"})
        if recovering and t >= at["recover"] + 1.0 and "counters" not in done:
            done.add("counters")
            sim.add("P01", "recovery", t, incarnation=2, detail={"recovery_id": "rec-1", "phase": "counters"})
            for (s, r), link in links.items():
                if s == "P01":
                    link.next_seq = links[(s, r)].expected
                    sim.add("P01", "link_reset", t, link=f"P01<->{r}", incarnation=2,
                            detail={"next_send_seq": link.next_seq, "next_expected": links[(r, s)].expected,
                                    "their_incarnation": 1})
        if recovering and t >= at["recover"] + 2.0 and "resync" not in done:
            done.add("resync")
            sim.add("P01", "recovery", t, incarnation=2, detail={"recovery_id": "rec-1", "phase": "resync"})
            for peer in ("CEN", "S01"):
                down_link, up_link = links[(peer, "P01")], links[("P01", peer)]
                sim.add(peer, "link_reset", t + 0.1, link=f"{peer}<->P01", incarnation=2, detail={
                    "next_send_seq": down_link.next_seq, "next_expected": up_link.expected,
                    "their_incarnation": 2, "void_through": down_link.next_seq - 1})
                sim.add(peer, "peer_recovery", t + 0.2, link=f"{peer}<->P01",
                        detail={"recovery_id": "rec-1", "phase": "resyncing"})
        if due("complete", t):
            recovering = False
            sim.add("P01", "recovery", t, incarnation=2, detail={"recovery_id": "rec-1", "phase": "complete"})
            for peer in ("CEN", "S01"):
                sim.add(peer, "peer_recovery", t + 0.1, link=f"{peer}<->P01",
                        detail={"recovery_id": "rec-1", "phase": "complete"})
            sim.add("CEN", "health", t + 0.2, link="CEN<->P01", detail={"from": "degraded", "to": "active"})
            sim.add("P01", "health", t + 0.2, link="P01<->CEN", detail={"from": "degraded", "to": "active"})
        partitioned = "f1_on" in done and "f1_off" not in done
        dropping = "f2_on" in done and "f2_off" not in done
        for (s, r), link in links.items():
            if s in down or (recovering and "P01" in (s, r)):
                continue
            if sim.rng.random() < rate * dt:
                seq = link.next_seq
                link.next_seq += 1
                sim.add(s, "sent", t, link=f"{s}->{r}", seq=seq, txn=seq, data_class="inventory",
                        key=f"c{seq % 7}", hash=f"h{seq}", incarnation=1)
                if dropping and (s, r) == ("S01", "P01") and sim.rng.random() < 0.3:
                    continue
                link.in_flight.append((t + 0.05, seq))
            if r in down or (partitioned and "P01" in (s, r) and "CEN" in (s, r)):
                continue
            arrived = sorted(item for item in link.in_flight if item[0] <= t)
            link.in_flight = [item for item in link.in_flight if item[0] > t]
            for _, seq in arrived:
                fields: dict[str, Any] = {"link": f"{s}->{r}", "seq": seq, "txn": seq, "hash": f"h{seq}",
                                          "data_class": "inventory", "key": f"c{seq % 7}", "incarnation": 1}
                if seq == link.expected:
                    sim.add(r, "applied", t, **fields)
                    link.expected += 1
                elif seq < link.expected:
                    sim.add(r, "conflict" if restored and s == "P01" else "duplicate", t, **fields)
                else:
                    sim.add(r, "gap", t, **fields)
                    if t >= link.resend_after:  # held back; the sender sends again from the one expected
                        link.resend_after = t + 0.5
                        sim.add(s, "resend", t + 0.01, link=f"{s}->{r}", seq=link.expected)
                        link.in_flight += [(t + 0.2, q) for q in range(link.expected, link.next_seq)
                                           if not (dropping and sim.rng.random() < 0.3)]
            if step % 20 == 0 and s not in down:
                sim.add(s, "ack", t, link=f"{s}->{r}", seq=link.expected - 1, incarnation=1)
    sim.events.sort(key=lambda e: e.time)
    return sim.events


def synthetic_verdict() -> dict[str, Any]:
    return checker.Report("invalid", [
        checker.Violation("lost", "CEN", "P01->CEN: 12 envelope(s) acknowledged at P01 never reached CEN,"
                          " e.g. inventory c3 seq 41 <txn 41>; 12 of them reuse numbers CEN had applied with"
                          " other content: the hole, dropped as already seen",
                          {"link": "P01->CEN", "first": 41}),
        checker.Violation("link", "P01", "link CEN<->P01 is degraded at P01", {"health": "degraded"}),
        checker.Violation("in_flight", "S01", "S01->P01: 3 envelope(s) not yet applied", hard=False),
        checker.Violation("lost_before_recovery", "P01", "S01->P01: 2 envelope(s) acknowledged at S01 never"
                          " reached P01; a later recovery could not bring them back", hard=False),
    ], {"sites": 5, "clients": 12, "records": 300, "objects": 20, "links": 4, "events": 4000}).to_dict()


def synthetic_meta() -> dict[str, Any]:
    return {"lab_id": LAB_ID, "mode": "sms20", "sites": TOPOLOGY.subtree(TOPOLOGY.central),
            "links": [f"{c}->{p}" for p, c in TOPOLOGY.links()], "scenario": "restore-without-recovery",
            "seed": 42, "replay": ["smslab", "scenario", "run", "restore-without-recovery", "--seed", "42"]}


@pytest.fixture(scope="module")
def events() -> list[history.Event]:
    return synthetic_history()


@pytest.fixture(scope="module")
def page(events: list[history.Event]) -> str:
    return report.build_report(events, title=f"smslab report: {LAB_ID}", verdict=synthetic_verdict(),
                               meta=synthetic_meta())


def test_the_synthetic_history_has_what_the_report_shows(events: list[history.Event]) -> None:
    kinds = {e.kind for e in events}
    assert 2000 < len(events) < 10000
    assert {"sent", "applied", "ack", "fault_on", "fault_off", "process", "store", "recovery",
            "peer_recovery", "conflict", "gap", "duplicate", "health", "rollback", "link_reset"} <= kinds
    assert 55 < events[-1].time - events[0].time <= 61


def test_the_page_is_self_contained(page: str) -> None:
    assert page.startswith("<!DOCTYPE html>")
    for tag in re.findall(r"<(?:script|link|img|iframe)\b[^>]*>", page, flags=re.IGNORECASE):
        assert not re.search(r"\b(?:src|href)\s*=\s*[\"']?\s*(?:https?:)?//", tag, flags=re.IGNORECASE), tag
    assert page.count("* plotly.js v") == 1  # one copy of plotly.js, inline
    assert page.count("<script") == 3  # plotly.js, the figures (JSON), the code that draws them
    figures = re.search(r'<script type="application/json" id="figures">(.*?)</script>', page, flags=re.DOTALL)
    assert figures is not None
    drawn = json.loads(figures.group(1))
    assert [f["div"] for f in drawn][:1] == ["fig-timeline"]
    assert len(drawn) == 1 + 8 + 1  # the timeline, 8 directed links, the drops
    for f in drawn:
        assert f'id="{f["div"]}"' in page


def test_the_page_names_the_lab_the_faults_and_every_violation(page: str) -> None:
    assert LAB_ID in page
    assert "restore-without-recovery" in page and ">42<" in page
    assert html.escape("smslab scenario run restore-without-recovery --seed 42") in page
    for fault in FAULT_IDS:
        assert f"<b>{fault}</b>" in page
    for v in synthetic_verdict()["violations"]:
        assert html.escape(v["detail"]) in page
    notes = page.index("<h3>Notes")
    assert page.index(html.escape(synthetic_verdict()["violations"][3]["detail"])) > notes
    assert page.index(html.escape(synthetic_verdict()["violations"][0]["detail"])) < notes
    assert 'class="badge invalid"' in page


def test_counts_drops_and_outbox_depth_come_from_the_history(events: list[history.Event]) -> None:
    an = report.analyze(events, sites=TOPOLOGY.subtree(TOPOLOGY.central))
    assert an.bin_s == 1 and an.bins == 61
    assert an.total == len(events) and sum(an.counts.values()) == len(events)
    assert an.lanes == ["CEN", "P01", "S01", "P02", "S02"]
    assert [f.id for f in an.faults] == list(FAULT_IDS)
    f1 = an.faults[0]
    assert f1.kind == "partition" and f1.struck("P01->CEN") and not f1.struck("S01->P01")
    applied = sum(1 for e in events if e.kind == "applied" and e.link == "P01->CEN")
    assert sum(an.links["P01->CEN"].applied) == applied == an.links["P01->CEN"].applied_total
    drops = {k: sum(1 for e in events if e.kind == k and e.link == "P01->CEN") for k in report.DROP_KINDS}
    assert dict(an.links["P01->CEN"].drops) == {k: n for k, n in drops.items() if n}
    assert an.links["P01->CEN"].drops["conflict"] > 0  # the hole after the restore
    assert an.links["S01->P01"].drops["gap"] > 0  # the drop fault
    # during the partition P01's outbox to CEN grows; acks bring it back down afterwards
    assert f1.end is not None
    during = an.links["P01->CEN"].depth.out[int(f1.end - an.t0) - 1]
    assert during >= 10
    assert an.links["P01->CEN"].depth.out[int(f1.end - an.t0) + 5] < during
    assert [r.id for r in an.recoveries] == ["rec-1"] and an.recoveries[0].completed is not None
    assert [b.phase for b in an.bars if b.peer is None] == ["announce", "counters", "resync"]
    assert {b.site for b in an.bars if b.peer == "P01"} == {"CEN", "S01"}
    categories = {m.category for m in an.markers}
    assert {"start", "kill", "launch", "restore", "backup", "rollback", "health:degraded", "health:active",
            "queue_restored", "link_reset", "complete"} <= categories


def test_outbox_depth_follows_sent_ack_void_and_reset() -> None:
    sim = Sim(1)
    for seq in range(1, 11):
        sim.add("P01", "sent", seq * 0.1, link="P01->CEN", seq=seq)
    sim.add("P01", "ack", 1.5, link="P01->CEN", seq=4)  # 6 pending
    sim.add("P01", "void", 2.5, link="P01->CEN", seq=7)  # 3 pending
    for seq in range(11, 14):
        sim.add("P01", "sent", 3.5, link="P01->CEN", seq=seq)  # 6 pending
    sim.add("CEN", "link_reset", 4.5, link="P01<->CEN", detail={"void_through": 99})  # CEN's side: no effect
    sim.add("P01", "link_reset", 5.5, link="P01<->CEN",
            detail={"next_send_seq": 20, "next_expected": 3})  # the recovering site cleared its outbox
    sim.add("P01", "sent", 6.5, link="P01->CEN", seq=20)
    sim.harness("store", 7.5, link="P01", detail={"action": "restore", "site": "P01"})  # the outbox went too
    sim.add("P01", "start", 8.5, detail={"links": {"CEN": {"next_send_seq": 9, "acked_through": 5}}})  # 6..8
    sim.add("P01", "ack", 9.5, link="P01->CEN", seq=7)  # 8 pending
    an = report.analyze(sim.events)
    depth = an.links["P01->CEN"].depth
    # the highest depth in each second since the first event (0.1 s): what it was when the second began,
    # or more; a fall shows in the next second
    assert depth.out == [10, 10, 6, 6, 6, 6, 1, 1, 3, 3] and depth.max == 10 and depth.cur == 1
    assert an.links["CEN->P01"].depth.max == 0


def test_an_empty_history_still_renders() -> None:
    page = report.build_report([], title="nothing", meta={"lab_id": "empty-000000"})
    assert "empty-000000" in page and "no envelope was sent" in page and "not checked" in page


def test_a_long_run_is_binned_coarser() -> None:
    sim = Sim(2)
    for i in range(0, 7200, 3):
        sim.add("CEN", "applied", float(i), link="P01->CEN", seq=i + 1)
    an = report.analyze(sim.events)
    assert an.bin_s == 10 and an.bins <= report.MAX_BINS
    assert sum(an.links["P01->CEN"].applied) == len(sim.events)


def test_a_200k_event_history_renders(capsys: pytest.CaptureFixture[str]) -> None:
    events = synthetic_history(seconds=720.0, rate=12.0, seed=3)
    assert len(events) >= 200_000
    began = time.perf_counter()
    page = report.build_report(events, title="big", verdict=synthetic_verdict(), meta=synthetic_meta())
    took = time.perf_counter() - began
    figures = re.search(r'<script type="application/json" id="figures">(.*?)</script>', page, flags=re.DOTALL)
    assert figures is not None and len(figures.group(1)) < 3_000_000  # bins, not events
    with capsys.disabled():
        print(f"\n{len(events)} events: report built in {took:.2f} s, {len(page) / 1e6:.1f} MB")


# -- lab and run directories ---------------------------------------------------------------------


def _write_history(path: Path, events: list[history.Event]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as out:
        out.writelines(e.to_json() + "\n" for e in events)


def _run_dir(tmp_path: Path, events: list[history.Event]) -> Path:
    run = tmp_path / "run"
    _write_history(run / "history.jsonl", events)
    (run / "verdict.json").write_text(json.dumps(synthetic_verdict()))
    (run / "run.json").write_text(json.dumps({
        "scenario": "restore-without-recovery", "seed": 42, "started": T0, "finished": T0 + 61,
        "replay": "smslab run restore-without-recovery.yaml --seed 42", "lab": LAB_ID, "verdict": "invalid",
        "error": None, "exit": 1, "steps": ["wait 5", "backup P01", "restore P01 without recovery"],
        "expectations": [{"step": 2, "what": "backup P01", "ok": True, "detail": ""},
                         {"step": 4, "what": "check invalid: lost", "ok": False,
                          "detail": "the check found only link"}],
        "shards": {"a": 1}}))
    LabDir(run / "lab").save(LabInfo(lab_id=LAB_ID, amqp_url="memory://", created=T0, topology=TOPOLOGY))
    return run


def test_a_run_directory_is_reported_without_its_lab(tmp_path: Path, events: list[history.Event]) -> None:
    run = _run_dir(tmp_path, events)
    written = report.generate(run)
    assert written.path == run / "report.html" and written.events == len(events)
    assert written.verdict == "invalid"
    page = written.path.read_text()
    assert LAB_ID in page and "restore-without-recovery" in page and "<h3>Expectations</h3>" in page
    assert "the check found only link" in page and "FAILED" in page and "restore P01 without recovery" in page
    assert "shards" in page  # what the report does not know is listed as it is
    assert report.write_report(run, tmp_path / "out" / "r.html") == tmp_path / "out" / "r.html"


def test_a_run_directory_without_a_verdict_says_so(tmp_path: Path, events: list[history.Event]) -> None:
    run = _run_dir(tmp_path, events[:500])
    (run / "verdict.json").unlink()
    written = report.generate(run)
    assert written.verdict is None and written.note and "verdict.json" in written.note
    assert "not checked" in written.path.read_text()


def test_a_lab_directory_is_merged_and_checked(tmp_path: Path, events: list[history.Event]) -> None:
    lab_dir = LabDir(tmp_path / "lab")
    lab_dir.save(LabInfo(lab_id=LAB_ID, amqp_url="memory://", created=T0, topology=TOPOLOGY))
    _write_history(history.history_path(lab_dir), events[:800])
    history.record(lab_dir, "fault_on", link="broker", fault="f9", detail={"kind": "alarm"}, at=T0 + 30)
    written = report.generate(lab_dir.path)
    assert written.events == 801  # the harness's event was merged first
    assert written.verdict is None and written.note and "no site" in written.note  # nothing to check
    assert "f9" in written.path.read_text()


def test_a_lab_whose_stores_are_readable_is_judged(tmp_path: Path, events: list[history.Event],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    lab_dir = LabDir(tmp_path / "lab")
    info = LabInfo(lab_id=LAB_ID, amqp_url="memory://", created=T0, topology=TOPOLOGY)
    lab_dir.save(info)
    _write_history(history.history_path(lab_dir), events[:300])
    lab_dir.site_dir("CEN").mkdir(parents=True)
    lab_dir.site_db("CEN").touch()
    judged: list[str] = []

    def check(at: LabDir, about: LabInfo | None = None) -> checker.Report:
        judged.append(about.lab_id if about else "?")
        down = checker.Violation("down", "P01", "site is not running", hard=False)
        return checker.Report("unknown", [down], {"sites": 5})

    monkeypatch.setattr(checker, "check", check)
    written = report.generate(lab_dir.path, tmp_path / "r.html")
    assert judged == [LAB_ID] and written.verdict == "unknown" and written.note is None
    page = written.path.read_text()
    assert 'class="badge unknown"' in page and "site is not running" in page


@pytest.mark.parametrize("bad, message", [
    ("missing", "does not exist"),
    ("empty-dir", "neither a lab directory"),
    ("no-events", "has no events"),
    ("bad-line", "line 2"),
    ("bad-verdict", "not valid JSON"),
    ("bad-run", "is not a JSON object"),
])
def test_bad_sources_say_what_and_where(tmp_path: Path, events: list[history.Event], bad: str,
                                        message: str) -> None:
    source = tmp_path / bad
    if bad != "missing":
        source.mkdir()
    if bad == "no-events":
        (source / "history.jsonl").write_text("\n")
    elif bad == "bad-line":
        (source / "history.jsonl").write_text(events[0].to_json() + "\n{\"time\": 1}\n")
    elif bad in ("bad-verdict", "bad-run"):
        _write_history(source / "history.jsonl", events[:10])
        if bad == "bad-verdict":
            (source / "verdict.json").write_text("{not json")
        else:
            (source / "run.json").write_text("[1, 2]")
    with pytest.raises((ConfigError, LabError)) as caught:
        report.write_report(source)
    assert message in caught.value.message
    assert str(source) in caught.value.message or str(source / "history.jsonl") in caught.value.message
    assert caught.value.hint


def test_the_command(tmp_path: Path, events: list[history.Event], capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="smslab")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--lab", default=str(tmp_path / "no-lab"))
    report_command.register(parser.add_subparsers(dest="command"), common)
    run = _run_dir(tmp_path, events[:1000])
    args = parser.parse_args(["report", str(run), "-o", str(tmp_path / "x.html"), "--json"])
    assert args.handler(args, LabDir(args.lab)) == 0
    assert json.loads(capsys.readouterr().out) == {"report": str(tmp_path / "x.html"), "events": 1000}
    args = parser.parse_args(["report", str(run)])
    assert args.handler(args, LabDir(args.lab)) == 0
    assert capsys.readouterr().out.strip() == str(run / "report.html")
    args = parser.parse_args(["report"])  # the lab directory (--lab), here none
    with pytest.raises(LabError, match="does not exist"):
        args.handler(args, LabDir(args.lab))
