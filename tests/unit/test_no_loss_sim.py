"""Issue 6, item 1, in the simulator (the fast suite): a recovery loses none of the recovering
site's own data, nor what its subtree had queued at it. The same steps as the integration
test on real processes (tests/integration/test_no_loss.py), on the demo lab, asserting on the
site stores."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from emulator import sim
from emulator.lab import LabDir
from emulator.topology import load_topology

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "lab.yaml"
KEYS = 3000  # above the link window (2,000): most wait in the outbox when the parent is down


def records(lab: sim.SimLab, site: str, where: str = "1=1", *args: object) -> dict[tuple[str, str], int]:
    db = sqlite3.connect(f"file:{lab.dir.site_db(site)}?mode=ro", uri=True)
    try:
        return {(c, k): v for c, k, v in db.execute(
            f"SELECT data_class, key, version FROM site_data WHERE {where}", args)}
    finally:
        db.close()


def short_at_ancestors(lab: sim.SimLab, site: str) -> dict[str, int]:
    """For each ancestor of ``site``: how many of the records ``site`` holds it lacks (or holds
    at a lower version)."""
    held = records(lab, site)
    out = {}
    for ancestor in lab.topology.ancestors(site):
        theirs = records(lab, ancestor)
        out[ancestor] = sum(1 for k, v in held.items() if theirs.get(k, 0) < v)
    return out


def settle(lab: sim.SimLab) -> None:
    for code in sorted(lab.running_codes()):
        assert lab.control(code, {"cmd": "pause-workload"})["ok"]
    last: list[str] = []

    def valid() -> bool:
        report = lab.check()
        last[:] = [f"{v.kind} {v.site}: {v.detail}" for v in report.violations]
        return report.verdict == "valid"

    assert lab.wait_for(valid, timeout=180, poll=1.0), last[:10]


@pytest.fixture
def demo(tmp_path: Path) -> sim.SimLab:
    lab = sim.SimLab(LabDir(tmp_path / "lab"), load_topology(DEMO), seed=6)
    lab.start_all()
    lab.run(5)
    return lab


def queued_for(lab: sim.SimLab, site: str, peer: str) -> int:
    return int(lab.sites[site].store.db.execute("SELECT COUNT(*) FROM outbox WHERE peer=?", (peer,)).fetchone()[0])


@pytest.mark.parametrize("how", ["current", "backup", "wipe"])
def test_a_recovery_loses_none_of_the_site_s_own_data(demo: sim.SimLab, how: str) -> None:
    lab = demo
    lab.stop("CEN")
    own_status = len(records(lab, "P01", "data_class='status' AND origin='P01'"))
    assert lab.control("P01", {"cmd": "burst", "count": KEYS, "keys": KEYS, "chunk": 500})["ok"]
    assert lab.wait_for(lambda: len(records(lab, "P01", "key LIKE 'P01-B%'")) == KEYS, timeout=60)
    lab.run(12)  # P01's own status messages queue behind the burst
    assert len(records(lab, "P01", "data_class='status' AND origin='P01'")) >= own_status + 2
    assert queued_for(lab, "P01", "CEN") > KEYS - 1000, "the burst waits in P01's outbox"
    backup_id = lab.backup("P01").id if how == "backup" else None
    held = records(lab, "P01", "origin='P01'")
    lab.kill("P01")
    lab.start("CEN")
    lab.recover("P01", backup_id=backup_id, wipe=how == "wipe")
    settle(lab)
    for site in ("P01", "S01", "P02", "S02"):
        assert short_at_ancestors(lab, site) == dict.fromkeys(lab.topology.ancestors(site), 0), site
    cen = records(lab, "CEN", "origin='P01'")
    if how != "wipe":  # a wiped site no longer has its burst: no client made it
        assert len([k for k in cen if k[1].startswith("P01-B")]) == KEYS
        assert {k: v for k, v in held.items() if cen.get(k, 0) < v} == {}, \
            "every record P01 held before its recovery is at CEN"


def test_a_secondary_s_data_queued_at_its_primary_survives_the_primary_s_recovery(demo: sim.SimLab) -> None:
    lab = demo
    lab.stop("CEN")
    assert lab.control("S01", {"cmd": "burst", "count": KEYS, "keys": KEYS, "chunk": 500})["ok"]
    assert lab.wait_for(lambda: len(records(lab, "P01", "key LIKE 'S01-B%'")) == KEYS, timeout=60)
    assert queued_for(lab, "P01", "CEN") > KEYS - 1000
    lab.kill("P01")
    lab.start("CEN")
    lab.recover("P01")
    settle(lab)
    assert len(records(lab, "CEN", "key LIKE 'S01-B%'")) == KEYS
    assert short_at_ancestors(lab, "S01") == {"P01": 0, "CEN": 0}
    assert short_at_ancestors(lab, "P01") == {"CEN": 0}
