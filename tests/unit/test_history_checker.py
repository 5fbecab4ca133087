"""The checker's invariants on the history, each on hand-made histories: a planted loss, a
planted duplicate, a planted reorder are found; the ways the protocol legitimately re-sends
(a resync, a newer report, a restore) are not flagged; an idle run or a fault that struck
nothing is ``unknown``."""

from __future__ import annotations

from typing import Any

from emulator import checker, history
from emulator.protocol.sequencing import LinkState
from emulator.topology import parse_topology
from sites.store import StoreSnapshot

TOPOLOGY = parse_topology("""
lab: hc
mode: hardened
sites:
  - {code: CEN, type: central, clients: 0}
  - {code: P01, type: primary, parent: CEN}
""")


class H:
    """A history written event by event, a second apart."""

    def __init__(self) -> None:
        self.events: list[history.Event] = []
        self.index: dict[str, int] = {}

    def add(self, site: str, kind: str, **fields: Any) -> H:
        self.index[site] = self.index.get(site, 0) + 1
        self.events.append(history.Event(time=float(len(self.events)), site=site, index=self.index[site],
                                         run=fields.pop("run", "r1"), kind=kind, **fields))
        return self

    def send(self, seq: int, key: str = "k", hash_: str | None = None, sender: str = "P01", to: str = "CEN") -> H:
        return self.add(sender, "sent", link=f"{sender}->{to}", seq=seq, txn=seq, data_class="inventory", key=key,
                        hash=hash_ or f"h{seq}{key}", incarnation=1)

    def consume(self, seq: int, key: str = "k", hash_: str | None = None, sender: str = "P01", to: str = "CEN",
                kind: str = "applied", inc: int = 1) -> H:
        return self.add(to, kind, link=f"{sender}->{to}", seq=seq, txn=seq, data_class="inventory", key=key,
                        hash=hash_ or f"h{seq}{key}", incarnation=inc)

    def ack(self, through: int, sender: str = "P01", to: str = "CEN", **detail: Any) -> H:
        return self.add(sender, "ack", link=f"{sender}->{to}", seq=through, detail=detail or None)

    def state(self) -> checker.LabState:
        return checker.LabState(TOPOLOGY, {}, set(TOPOLOGY.codes), history=checker.HistoryView(self.events))


def found(h: H) -> dict[str, list[checker.Violation]]:
    state = h.state()
    out: dict[str, list[checker.Violation]] = {}
    for rule in (checker.lost_acknowledged, checker.applied_twice, checker.applied_out_of_order,
                 checker.forgot_committed_work, checker.old_incarnation_not_fenced, checker.vacuous_faults,
                 checker.idle):
        for v in rule(state):
            out.setdefault(v.kind, []).append(v)
    return out


def test_a_clean_link_has_nothing_to_say() -> None:
    h = H()
    for seq in (1, 2, 3):
        h.send(seq).consume(seq)
    h.ack(3)
    assert found(h) == {}


def test_a_planted_loss_is_found() -> None:
    h = H().send(1).send(2, key="x").consume(1).ack(2)  # CEN never consumed seq 2, yet P01 counts it acked
    (lost,) = found(h)["lost"]
    assert lost.site == "CEN" and lost.data == {"link": "P01->CEN", "first": 2, "count": 1}
    assert "never consumed" in lost.detail


def test_the_hole_reused_numbers_with_other_content_is_a_loss() -> None:
    h = H().send(1).consume(1).ack(1)
    h.send(1, hash_="other").add("CEN", "conflict", link="P01->CEN", seq=1, hash="other").ack(1, self_rollback=True)
    (lost,) = found(h)["lost"]
    assert "the hole" in lost.detail and "after its rollback" in lost.detail


def test_data_sent_again_or_superseded_is_not_lost() -> None:
    h = H().send(1, key="a").send(2, key="b").ack(2)  # neither consumed as such...
    h.send(3, key="a", hash_="h1a").consume(3, key="a", hash_="h1a")  # ...a resync re-sent a's data
    h.send(4, key="b", hash_="newer").consume(4, key="b", hash_="newer").ack(4)  # b's newer report arrived
    assert found(h) == {}


def test_a_loss_before_a_completed_recovery_is_history() -> None:
    h = H().send(1).send(2, key="x").consume(1).ack(2)
    h.add("P01", "recovery", detail={"phase": "complete", "recovery_id": "r"})
    assert [v.kind for v in found(h).get("lost_before_recovery", [])] == ["lost_before_recovery"]
    assert "lost" not in found(h)


def test_voided_envelopes_are_not_waiting_for_an_ack() -> None:
    h = H().send(1).send(2).consume(1)
    h.add("P01", "void", link="P01->CEN", detail={"why": "deljob"})
    h.send(3).consume(3).ack(3)
    assert "lost" not in found(h)


def test_a_planted_duplicate_is_found() -> None:
    h = H().send(1).consume(1).consume(1)
    (twice,) = found(h)["twice"]
    assert twice.site == "CEN" and twice.data["seq"] == 1


def test_a_planted_reorder_is_found() -> None:
    h = H().send(1).send(2).send(3).consume(1).consume(3).consume(2)
    kinds = found(h)
    assert [v.data["seq"] for v in kinds["reordered"]] == [3, 2]


def test_a_restart_sets_what_is_expected_and_a_restore_may_forget() -> None:
    links = {"P01": {"next_expected": 3, "next_send_seq": 1, "acked_through": 0}}
    h = H().consume(1).consume(2).add("CEN", "start", run="r2", detail={"links": links}).consume(3)
    assert found(h) == {}
    forgetful = H().consume(1).consume(2).consume(3)
    forgetful.add("CEN", "start", run="r2", detail={"links": links})  # expects 3 again: lost committed work
    assert [v.kind for v in found(forgetful)["forgot"]] == ["forgot"]
    restored = H().consume(1).consume(2).consume(3)
    restored.add(history.HARNESS, "store", link="CEN", detail={"action": "restore", "site": "CEN"})
    restored.add("CEN", "start", run="r2", detail={"links": links}).consume(3)
    assert found(restored) == {}


def test_hardened_an_old_incarnation_applied_after_the_resync_is_not_fenced() -> None:
    h = H().consume(1)
    h.add("CEN", "link_reset", link="CEN<->P01", detail={"next_expected": 2, "their_incarnation": 2})
    h.consume(2, inc=2).consume(3, inc=1)
    (bad,) = found(h)["not_fenced"]
    assert bad.data["seq"] == 3


def test_an_idle_run_is_unknown() -> None:
    h = H().add("CEN", "start", detail={"links": {}})
    (v,) = found(h)["idle"]
    report = checker.judge(checker.LabState(TOPOLOGY, {}, set(), history=checker.HistoryView(h.events)))
    assert v.kind in {x.kind for x in report.violations} and report.verdict != "valid"


def test_a_fault_that_struck_nothing_is_vacuous_one_that_did_is_not() -> None:
    on = {"kind": "partition", "links": ["P01->CEN"]}
    h = H().send(1).consume(1)
    h.add(history.HARNESS, "fault_on", fault="f1", link="P01<->CEN", detail=on)
    h.add(history.HARNESS, "fault_off", fault="f1", link="P01<->CEN", detail={"kind": "partition"})
    (v,) = found(h)["vacuous"]
    assert v.data == {"fault": "f1"}
    busy = H().add(history.HARNESS, "fault_on", fault="f2", link="P01<->CEN", detail=on).send(1)
    busy.add(history.HARNESS, "fault_off", fault="f2", link="P01<->CEN", detail={"kind": "partition"}).consume(1)
    assert "vacuous" not in found(busy)


def test_a_store_replaced_takes_its_pending_envelopes_with_it() -> None:
    h = H().send(1).send(2, key="x").consume(1)  # seq 2 still in P01's outbox...
    h.add(history.HARNESS, "store", link="P01", detail={"action": "wipe", "site": "P01"})  # ...wiped with it
    h.send(2, key="y", hash_="new").consume(2, key="y", hash_="new").ack(2)  # the rebuilt site's own seq 2
    assert found(h) == {}


def test_a_loss_before_a_recovery_is_a_note_not_against_the_verdict() -> None:
    h = H().send(1).send(2, key="x").consume(1).ack(2)
    h.add("P01", "recovery", detail={"phase": "complete", "recovery_id": "r"})
    state = h.state()
    report = checker.judge(checker.LabState(TOPOLOGY, {}, set(), history=state.history))
    notes = [v for v in report.violations if v.kind == "lost_before_recovery"]
    assert notes and not notes[0].hard
    assert "note" in report.render()


def test_events_pruned_before_they_were_merged_make_the_run_unknown_and_say_so() -> None:
    h = H()
    for seq in (1, 2, 3):
        h.send(seq).consume(seq)
    h.ack(3)
    stores = {"CEN": quiet_store("P01", "child"), "P01": quiet_store("CEN", "parent")}
    clean = checker.judge(checker.LabState(TOPOLOGY, stores, set(TOPOLOGY.codes), history=checker.HistoryView(h.events)))
    assert clean.verdict == "valid", clean.render()
    gap = history.Gap(site="CEN", run="r1", after=0, first_kept=4)
    report = checker.judge(checker.LabState(TOPOLOGY, stores, set(TOPOLOGY.codes),
                                            history=checker.HistoryView(h.events, [gap])))
    (v,) = [v for v in report.violations if v.kind == "history"]
    assert report.verdict == "unknown" and not v.hard
    assert v.site == "CEN" and "events 1..3" in v.detail and "pruned" in v.detail


def quiet_store(peer: str, role: str) -> StoreSnapshot:
    """A store whose one link is active and settled, holding nothing."""
    link = LinkState(peer=peer, role=role, next_send_seq=4 if role == "parent" else 1,  # type: ignore[arg-type]
                     acked_through=3 if role == "parent" else 0, next_expected=4 if role == "child" else 1)
    return StoreSnapshot(meta={}, links={peer: link}, outbox={}, site_data={}, objects={}, object_history={},
                         drops={}, max_txn={})
