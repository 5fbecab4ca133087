"""The checker's invariants, each on hand-made stores (real SQLite site stores and client
stores written through their own APIs, read back the way ``smslab check`` reads them)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from emulator import checker
from emulator.lab import LabDir, LabInfo
from emulator.protocol.sequencing import LinkState
from emulator.topology import parse_topology
from sites.clients import ClientStore
from sites.runtime import SiteRuntime
from sites.store import SiteStore

TOPOLOGY = parse_topology("""
lab: chk
sites:
  - {code: CEN, type: central, clients: 0}
  - {code: P01, type: primary, parent: CEN, clients: 1}
  - {code: S01, type: secondary, parent: P01, clients: 1}
""")


class Stores:
    def __init__(self, root: Path) -> None:
        self.dir = LabDir(root)
        self.info = LabInfo(lab_id="chk-000001", amqp_url="memory://", created=0.0, topology=TOPOLOGY)
        self.stores: dict[str, SiteStore] = {}
        self.clients: dict[str, ClientStore] = {}
        for code in TOPOLOGY.depth_order():
            store = SiteStore(self.dir.site_db(code))
            SiteRuntime.initialize_store(store, lab=self.info.lab_id, topology=TOPOLOGY, site=code)
            self.stores[code] = store
            if TOPOLOGY.clients_of(code):
                self.clients[code] = ClientStore(self.dir.clients_db(code), code, TOPOLOGY.clients_of(code))

    def close(self) -> None:
        for s in self.stores.values():
            s.close()
        for c in self.clients.values():
            c.close()

    def record(self, site: str, cls: str, key: str, version: int, origin: str | None = None) -> None:
        self.stores[site].upsert_site_data(cls, key, origin or site, version, {"version": version}, 0.0)

    def everywhere(self, cls: str, key: str, version: int, origin: str) -> None:
        """A record as it is once it has gone all the way up from its origin."""
        for site in [origin, *TOPOLOGY.ancestors(origin)]:
            self.record(site, cls, key, version, origin)

    def meta(self, site: str, **values: object) -> None:
        for k, v in values.items():
            self.stores[site].set_meta(k, v)

    def report(self) -> checker.Report:
        state = checker.read_state(self.dir, self.info, with_history=False)
        state.running = set(TOPOLOGY.codes)  # no processes here: every site counts as running
        return checker.judge(state)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Stores]:
    stores = Stores(tmp_path / "lab")
    try:
        yield stores
    finally:
        stores.close()


def kinds(report: checker.Report) -> set[str]:
    return {v.kind for v in report.violations}


def test_a_consistent_lab_is_valid(lab: Stores) -> None:
    version = lab.clients["S01"].bump("S01-C001", "inventory")
    lab.everywhere("inventory", "S01-C001", version, "S01")
    lab.everywhere("status", "P01:1", 1, "P01")
    lab.meta("P01", status_serial=1)
    report = lab.report()
    assert report.verdict == "valid", report.render()


def test_a_record_a_site_holds_but_its_parent_lacks_is_lost(lab: Stores) -> None:
    lab.record("P01", "inventory", "P01-B00001", 1)  # a burst record: no client of any clients.db
    report = lab.report()
    assert report.verdict == "invalid"
    (lost,) = [v for v in report.violations if v.kind == "lost"]
    assert lost.site == "CEN" and lost.data["key"] == "P01-B00001" and lost.data["holder"] == "P01"


def test_a_record_held_above_at_a_lower_version_is_lost(lab: Stores) -> None:
    lab.record("S01", "inventory", "S01-B00001", 3)
    lab.record("P01", "inventory", "S01-B00001", 3, "S01")
    lab.record("CEN", "inventory", "S01-B00001", 2, "S01")
    report = lab.report()
    assert [(v.kind, v.site, v.data["have"]) for v in report.violations] == [("lost", "CEN", 2)]


def test_a_site_s_own_status_message_missing_above_is_lost(lab: Stores) -> None:
    lab.meta("P01", status_serial=3)
    for n in (1, 2, 3):
        lab.record("P01", "status", f"P01:{n}", n)
    lab.record("CEN", "status", "P01:1", 1, "P01")
    lost = sorted(v.data["key"] for v in lab.report().violations if v.kind == "lost")
    assert lost == ["P01:2", "P01:3"]


def test_a_client_s_latest_report_missing_at_its_site_and_at_central_is_lost(lab: Stores) -> None:
    lab.clients["P01"].bump("P01-C001", "inventory")
    version = lab.clients["P01"].bump("P01-C001", "inventory")
    lab.everywhere("inventory", "P01-C001", version - 1, "P01")
    report = lab.report()
    assert {(v.kind, v.site) for v in report.violations} == {("lost", "P01"), ("lost", "CEN")}


def test_lag_is_not_loss_while_envelopes_are_in_flight(lab: Stores) -> None:
    lab.record("P01", "inventory", "P01-B00001", 1)
    lab.stores["P01"].outbox_add("CEN", 1, b"{}")
    report = lab.report()
    assert report.verdict == "unknown" and "lost" in kinds(report)
    assert not any(v.hard for v in report.violations)


def test_a_version_above_what_the_client_produced_is_invented(lab: Stores) -> None:
    version = lab.clients["S01"].bump("S01-C001", "inventory")
    lab.everywhere("inventory", "S01-C001", version, "S01")
    lab.record("CEN", "inventory", "S01-C001", 2**62, "S01")  # a forged version
    report = lab.report()
    (bad,) = [v for v in report.violations if v.kind == "invented"]
    assert bad.site == "CEN" and bad.data["held"] == 2**62 and bad.data["produced"] == 1
    assert report.verdict == "invalid"


def test_a_status_serial_or_scf_above_the_origin_s_counter_is_invented(lab: Stores) -> None:
    lab.meta("P01", status_serial=2, scf_serial=4)
    lab.everywhere("status", "P01:5", 5, "P01")  # the origin went back to 2 without a recovery
    lab.everywhere("scf", "P01", 4, "P01")
    report = lab.report()
    found = {(v.site, v.data["key"]) for v in report.violations if v.kind == "invented"}
    assert found == {("P01", "P01:5"), ("CEN", "P01:5")}


def test_a_watermark_above_the_sender_s_transaction_id_is_invented(lab: Stores) -> None:
    lab.meta("P01", txn_id=100)
    lab.stores["CEN"].set_watermark("P01", "inventory", "P01-C001", 150)
    (bad,) = [v for v in lab.report().violations if v.kind == "invented"]
    assert bad.site == "CEN" and bad.data == {"sender": "P01", "held": 150, "produced": 100}


def test_a_recovering_origin_is_not_judged_on_its_counters(lab: Stores) -> None:
    lab.meta("P01", txn_id=100, recovery_phase="announce")
    lab.stores["CEN"].set_watermark("P01", "inventory", "P01-C001", 150)
    report = lab.report()
    assert "invented" not in kinds(report) and report.verdict == "unknown"


def test_links_whose_ends_disagree_are_named(lab: Stores) -> None:
    # CEN applied through 10 from P01, but P01 says it has sent only 4: P01 went back.
    lab.stores["CEN"].save_link(LinkState(peer="P01", role="child", next_expected=11, their_incarnation=1))
    lab.stores["P01"].save_link(LinkState(peer="CEN", role="parent", next_send_seq=5, acked_through=4,
                                          their_incarnation=1))
    report = lab.report()
    assert any(v.kind == "link" and "reuse numbers" in v.detail for v in report.violations)
    assert report.verdict == "invalid"


def test_objects_missing_diverged_orphan_and_reused(lab: Stores) -> None:
    def obj(oid: str, uid: str, revision: int = 1) -> dict[str, object]:
        return {"id": oid, "kind": "package", "origin": "CEN", "def_uid": uid, "name": f"p {uid}",
                "revision": revision, "deleted": False}

    cen, p01, s01 = lab.stores["CEN"], lab.stores["P01"], lab.stores["S01"]
    cen.upsert_object(obj("CEN00001", "a", 2), "CEN", 0.0)
    p01.upsert_object(obj("CEN00001", "a", 1), "CEN", 0.0)  # diverged at P01; missing at S01
    cen.upsert_object(obj("CEN00002", "b"), "CEN", 0.0)
    p01.upsert_object(obj("CEN00002", "b"), "CEN", 0.0)
    s01.upsert_object(obj("CEN00002", "b"), "P01", 0.0)
    s01.upsert_object(obj("CEN00002", "c"), "P01", 1.0)  # overwritten under one ID at S01
    s01.upsert_object(obj("CEN00003", "d"), "P01", 0.0)  # CEN no longer has it
    found = {(v.kind, v.site) for v in lab.report().violations}
    assert found >= {("diverged", "P01"), ("missing", "S01"), ("reused_id", "S01"), ("orphan", "S01")}


def test_an_idle_consistent_lab_has_no_violation_to_confirm(lab: Stores) -> None:
    report = lab.report()
    assert report.verdict == "valid" and not report.violations


