"""Site recovery on the real broker with real site processes (issue 3).

Each scenario: bring a lab up, do what an administrator did (back up, restore without
recovery, rebuild, recover), and judge the lab from the site stores.
"""

from __future__ import annotations

import json
import os
import signal

import pytest

from emulator import backup as backups
from emulator.testing import DEMO_SITES, Lab, topology_yaml, wait_for
from sites.clients import read_client_versions

pytestmark = pytest.mark.integration

# Faster thresholds so a broken link degrades and fails within seconds (sync every 0.3 s).
SETTINGS = {"degraded_after": 4, "failed_after": 8}


def up(lab: Lab, mode: str = "sms20", **kw: object) -> None:
    lab.up(topology_yaml(DEMO_SITES, mode=mode, settings={**SETTINGS, **kw.get("settings", {})}))  # type: ignore[dict-item]


def applied_from(lab: Lab, site: str, peer: str) -> int:
    return int(lab.link(site, peer)["next_expected"]) - 1


def traffic(lab: Lab, site: str, peer: str, more: int) -> None:
    """Wait until ``site`` has applied ``more`` envelopes from ``peer`` (the workload runs)."""
    start = applied_from(lab, site, peer)
    wait_for(f"{site} to apply {more} envelopes from {peer}",
             lambda: applied_from(lab, site, peer) >= start + more, timeout=60)


def kill(lab: Lab, site: str) -> None:
    pid = lab.dir.pid(site)
    assert pid
    os.kill(pid, signal.SIGKILL)
    wait_for(f"{site} to die", lambda: lab.dir.pid(site) is None, timeout=10)


def status_ids(lab: Lab, site: str) -> list[int]:
    return [m for (m,) in lab.query(site, "SELECT message_id FROM status_messages")]


def test_restore_without_recovery_reproduces_the_kb_then_recover_converges(lab: Lab) -> None:
    up(lab)
    traffic(lab, "CEN", "P01", 10)
    backup_id = lab.cli("backup", "P01").stdout.strip()
    # Made after the backup and acknowledged downstream: must survive the recovery.
    office = json.loads(lab.cli("create", "P01", "package", "--name", "Office", "--json").stdout)
    traffic(lab, "CEN", "P01", 30)
    wait_for("S01 to hold Office", lambda: lab.query("S01", "SELECT name FROM objects WHERE id=?", office["id"]))
    kill(lab, "P01")
    lab.cli("start", "P01", "--restore", backup_id)

    # The hole: CEN silently drops P01's new envelopes whose numbers it has already seen.
    wait_for("CEN to drop P01's reused numbers", lambda: lab.link("CEN", "P01")["conflicts"] > 0)
    assert lab.query("CEN", "SELECT COUNT(*) FROM drops WHERE source='P01' AND reason='conflict'")[0][0] > 0
    # ... and never tells P01: the restored site logs no error (Q288970).
    assert not [m for m in status_ids(lab, "P01") if m >= 5100]
    # P01 rejects its parent's envelopes as out of sequence; CEN cannot resend them.
    wait_for("P01 to see a gap from CEN", lambda: lab.link("P01", "CEN")["gaps"] > 0)
    wait_for("CEN to be unable to resend", lambda: lab.link("CEN", "P01")["resend_unavailable"] > 0)
    # The link degrades, then fails.
    wait_for("CEN<->P01 degraded", lambda: lab.link_health("CEN", "P01") in ("degraded", "failed"), timeout=30)
    wait_for("CEN<->P01 failed", lambda: lab.link_health("CEN", "P01") == "failed", timeout=30)
    assert 5101 in status_ids(lab, "CEN") or 5101 in status_ids(lab, "P01")  # link failed status
    done = lab.cli("check", check=False)
    assert done.returncode == 1, done.stdout
    assert "verdict: invalid" in done.stdout
    assert "link" in done.stdout and "dropped as already seen" in done.stdout
    report = json.loads(lab.cli("check", "--json", check=False).stdout)
    kinds = {v["kind"] for v in report["violations"]}
    assert {"link", "lost"} <= kinds, kinds
    assert json.loads(lab.cli("diag", "CEN", "--json").stdout)["drops"]["P01"]["conflict"] > 0
    assert json.loads(lab.cli("diag", "P01", "--json").stdout)["links"]["CEN"]["health"] == "failed"

    # The recovery agent, with the workload still running everywhere else.
    before = applied_from(lab, "CEN", "P02")
    # the highest transaction ID of P01's that each peer has accepted, read from their stores
    seen = {peer: int(lab.query(peer, "SELECT MAX(txn) FROM watermark WHERE source='P01'")[0][0] or 0)
            for peer in ("CEN", "S01")}
    out = lab.cli("recover", "P01", "--backup", backup_id).stdout
    for phase in ("announce", "counters", "resync", "complete"):
        assert f"phase {phase}" in out
    assert applied_from(lab, "CEN", "P02") > before, "traffic went on during the recovery"
    record = backups.load(lab.dir, backup_id)
    assert int(lab.meta("P01", "incarnation") or 0) == record.incarnation + 1
    # Q288970's workaround: the transaction ID moved to the peers' highest watermark + txn_margin
    agent = json.loads(lab.query("P01", "SELECT v FROM control WHERE k='recovery_agent'")[0][0])
    peers_max = max(r["txn_watermark"] for r in agent["reports"].values())
    assert set(agent["reports"]) == {"CEN", "S01"} and peers_max > record.txn_id
    assert all(agent["reports"][peer]["txn_watermark"] >= top for peer, top in seen.items()), (agent["reports"], seen)
    plan = json.loads(lab.meta("P01", "recovery_plan") or "{}")
    assert lab.info is not None
    margin = lab.info.topology.settings.txn_margin
    assert margin > 0 and plan["txn_id"] == peers_max + margin, (plan, peers_max, margin)
    assert int(lab.meta("P01", "txn_id") or 0) >= plan["txn_id"], "P01 numbers on from the plan"
    done = lab.cli("wait-converged", "--timeout", "90", check=False)
    assert done.returncode == 0, done.stdout
    assert lab.cli("check").returncode == 0
    # Nothing any site had acknowledged is lost: Office, made after the backup, is back at P01.
    assert lab.query("P01", "SELECT name, def_uid FROM objects WHERE id=?", office["id"]) == [("Office", office["def_uid"])]
    new = json.loads(lab.cli("create", "P01", "package", "--json").stdout)
    assert new["id"] > office["id"], "the allocator moved past every ID a peer had seen"


def test_reused_object_id_overwrites_downstream_package_14(lab: Lab) -> None:
    up(lab, settings={"degraded_after": 1000, "failed_after": 2000})
    lab.cli("workload", "pause")
    backup_id = lab.cli("backup", "P01").stdout.strip()
    office = json.loads(lab.cli("create", "P01", "package", "--name", "Office", "--json").stdout)
    wait_for("S01 to hold Office", lambda: lab.query("S01", "SELECT name FROM objects WHERE id=?", office["id"]))
    kill(lab, "P01")
    lab.cli("start", "P01", "--restore", backup_id)
    lab.cli("workload", "pause", "P01")
    # Global data from CEN flows through P01 to S01 until P01's numbers pass what S01 has seen.
    s01_seen = applied_from(lab, "S01", "P01")
    for _ in range(40):
        lab.cli("create", "CEN", "collection")
        if int(lab.link("P01", "S01")["next_send_seq"]) > s01_seen + 2:
            break
    wait_for("P01's link numbers to pass the hole", lambda: int(lab.link("P01", "S01")["next_send_seq"]) > s01_seen + 1)
    sql = json.loads(lab.cli("create", "P01", "package", "--name", "SQL Server", "--json").stdout)
    assert sql["id"] == office["id"], "the restored allocator hands out the same ID again"
    wait_for("S01's package to be overwritten",
             lambda: lab.query("S01", "SELECT name FROM objects WHERE id=?", office["id"]) == [("SQL Server",)])
    history = lab.query("S01", "SELECT name FROM object_history WHERE id=? ORDER BY first_seen", office["id"])
    assert [n for (n,) in history] == ["Office", "SQL Server"]
    done = lab.cli("check", check=False)
    assert done.returncode == 1
    assert f"object ID {office['id']} has named 2 different definitions" in done.stdout
    # The recovery cannot bring Office back (its definition was overwritten everywhere), but
    # it makes the lab consistent again; the overwrite stays in S01's object history.
    lab.cli("recover", "P01", "--backup", backup_id)
    assert lab.cli("wait-converged", "--timeout", "60", check=False).returncode == 0
    assert lab.query("P01", "SELECT name FROM objects WHERE id=?", office["id"]) == [("SQL Server",)]
    fresh = json.loads(lab.cli("create", "P01", "package", "--json").stdout)
    assert fresh["id"] > office["id"]


def test_hardened_mode_detects_the_rollback_and_quarantines(lab: Lab) -> None:
    up(lab, mode="hardened")
    traffic(lab, "CEN", "P01", 10)
    backup_id = lab.cli("backup", "P01").stdout.strip()
    traffic(lab, "CEN", "P01", 20)
    kill(lab, "P01")
    lab.cli("start", "P01", "--restore", backup_id)
    # Detected within seconds, by the parent and by the site itself, and quarantined.
    wait_for("CEN to quarantine P01", lambda: lab.link("CEN", "P01")["quarantined"], timeout=15)
    assert 5200 in status_ids(lab, "CEN")  # rollback detected (event 2095 analog), at the parent
    wait_for("P01 to quarantine itself", lambda: lab.meta("P01", "state") == "quarantined", timeout=15)
    wait_for("P01's data refused with a reason", lambda: lab.link("CEN", "P01")["refused"] > 0, timeout=15)
    extra = lab.link("P01", "CEN")["extra"]
    assert extra.get("rejected_quarantined", 0) + extra.get("rejected_gap", 0) > 0, extra
    # Not silently lost: S01's data waits in S01's outbox instead of being acknowledged.
    wait_for("S01 to hold its data back from the rolled-back P01", lambda: lab.link("S01", "P01")["quarantined"],
             timeout=15)

    def held() -> int:
        return int(lab.query("S01", "SELECT COUNT(*) FROM outbox WHERE peer='P01'")[0][0])

    acked, waiting = lab.link("S01", "P01")["acked_through"], held()
    wait_for("S01's new data to wait in its outbox too", lambda: held() > waiting + 2, timeout=15)
    assert lab.link("S01", "P01")["acked_through"] == acked, "nothing of it was acknowledged"
    assert lab.cli("check", check=False).returncode == 1
    lab.cli("recover", "P01", "--backup", backup_id)
    assert lab.cli("wait-converged", "--timeout", "90", check=False).returncode == 0
    assert not lab.link("CEN", "P01")["quarantined"]
    # The old incarnation is fenced: the same backup started again without recovery.
    kill(lab, "P01")
    lab.cli("workload", "resume")
    lab.cli("start", "P01", "--restore", backup_id)
    wait_for("CEN to fence P01's old incarnation", lambda: lab.link("CEN", "P01")["fenced"] > 0, timeout=15)
    wait_for("P01 to be told it is fenced",
             lambda: lab.link("P01", "CEN")["extra"].get("rejected_fenced", 0) > 0, timeout=15)


def test_wiped_primary_recovers(lab: Lab) -> None:
    up(lab)
    traffic(lab, "CEN", "P01", 10)
    kill(lab, "P01")
    down = lab.cli("check", check=False)
    assert down.returncode == 2 and "verdict: unknown" in down.stdout and "site is not running" in down.stdout, down.stdout
    lab.cli("recover", "P01", "--wipe")
    assert lab.cli("wait-converged", "--timeout", "90", check=False).returncode == 0
    cen_objects = {r[0] for r in lab.query("CEN", "SELECT id FROM objects WHERE origin='CEN'")}
    assert cen_objects <= {r[0] for r in lab.query("P01", "SELECT id FROM objects")}
    assert cen_objects <= {r[0] for r in lab.query("S01", "SELECT id FROM objects")}


def test_wiped_secondary_is_reinstalled(lab: Lab) -> None:
    up(lab)
    traffic(lab, "P01", "S01", 10)
    before = read_client_versions(lab.dir.clients_db("S01"))
    kill(lab, "S01")
    with pytest.raises(AssertionError, match="not backed up"):
        lab.cli("backup", "S01")
    out = lab.cli("recover", "S01", "--wipe").stdout
    assert "complete" in out
    assert any("reinitialized the site data of S01" in t for (t,) in lab.query("P01", "SELECT text FROM status_messages"))
    assert lab.cli("wait-converged", "--timeout", "90", check=False).returncode == 0
    after = read_client_versions(lab.dir.clients_db("S01"))
    assert all(after[c][0] >= before[c][0] for c in before), "clients are not rolled back with their site"
    central = dict(lab.query("CEN", "SELECT key, version FROM site_data WHERE data_class='inventory' AND origin='S01'"))
    assert central == {c: v[0] for c, v in after.items()}


def test_central_site_recovers_with_a_reference_primary(lab: Lab) -> None:
    up(lab)
    backup_id = lab.cli("backup", "CEN").stdout.strip()
    made = json.loads(lab.cli("create", "CEN", "advertisement", "--name", "Made after the backup", "--json").stdout)
    wait_for("P01 to hold it", lambda: lab.query("P01", "SELECT 1 FROM objects WHERE id=?", made["id"]))
    traffic(lab, "CEN", "P02", 10)
    kill(lab, "CEN")
    lab.cli("recover", "CEN", "--backup", backup_id, "--reference", "P01")
    assert lab.cli("wait-converged", "--timeout", "90", check=False).returncode == 0
    assert lab.query("CEN", "SELECT name FROM objects WHERE id=?", made["id"]) == [("Made after the backup",)]
    fresh = json.loads(lab.cli("create", "CEN", "package", "--json").stdout)
    assert fresh["id"] > made["id"]


@pytest.mark.parametrize("phase", ["announce", "counters", "resync"])
def test_agent_killed_in_each_phase_and_rerun_converges(lab: Lab, phase: str) -> None:
    up(lab)
    backup_id = lab.cli("backup", "P01").stdout.strip()
    traffic(lab, "CEN", "P01", 10)
    kill(lab, "P01")
    stalled = lab.cli("recover", "P01", "--backup", backup_id, "--timeout", "5", check=False,
                      env={"SMSLAB_HOLD_PHASE": phase})
    assert stalled.returncode == 2 and f"phase {phase}" in stalled.stderr, stalled.stderr
    plan = lab.meta("P01", "recovery_plan")
    # the counter plan is made once, when every peer has reported: not yet in the announce phase
    assert (plan is None) == (phase == "announce"), plan
    kill(lab, "P01")  # the agent dies in that phase
    resumed = lab.cli("recover", "P01")
    assert "resuming recovery" in resumed.stdout
    record = backups.load(lab.dir, backup_id)
    assert int(lab.meta("P01", "incarnation") or 0) == record.incarnation + 1, "counters bumped once"
    if phase == "announce":
        assert lab.meta("P01", "recovery_plan") is not None, "the resumed agent made its plan"
    else:
        assert lab.meta("P01", "recovery_plan") == plan, "the plan was not made again"
    assert lab.cli("wait-converged", "--timeout", "90", check=False).returncode == 0


def test_recovery_with_a_peer_down_names_it_and_resumes(lab: Lab) -> None:
    up(lab)
    backup_id = lab.cli("backup", "P01").stdout.strip()
    kill(lab, "S01")
    kill(lab, "P01")
    done = lab.cli("recover", "P01", "--backup", backup_id, "--timeout", "5", check=False)
    assert done.returncode == 2
    assert "waiting for S01" in done.stderr and "not running: S01" in done.stderr
    assert "smslab start S01" in done.stderr
    assert lab.dir.pid("P01"), "the agent keeps waiting for the peer"
    refused = lab.cli("create", "P01", "package", check=False)
    assert refused.returncode == 2 and "P01 is recovering: administrative actions are refused" in refused.stderr
    lab.cli("start", "S01")
    lab.cli("recover", "P01")
    assert lab.cli("wait-converged", "--timeout", "90", check=False).returncode == 0


def test_bad_backups_are_refused_with_the_reason(lab: Lab) -> None:
    up(lab)
    p01 = lab.cli("backup", "P01").stdout.strip()
    p02 = lab.cli("backup", "P02").stdout.strip()
    listing = lab.cli("backups").stdout
    assert p01 in listing and p02 in listing
    kill(lab, "P01")
    foreign = lab.cli("start", "P01", "--restore", p02, check=False)
    assert foreign.returncode == 2 and f"backup {p02} is of site P02, not P01" in foreign.stderr
    db = lab.dir.backup_dir(p01) / "site.db"
    data = bytearray(db.read_bytes())
    data[5000:5010] = b"XXXXXXXXXX"
    db.write_bytes(bytes(data))
    corrupt = lab.cli("recover", "P01", "--backup", p01, check=False)
    assert corrupt.returncode == 2 and "does not match its checksum" in corrupt.stderr
    missing = lab.cli("start", "P01", "--restore", "P01-nope", check=False)
    assert missing.returncode == 2 and "no backup 'P01-nope'" in missing.stderr
    lab.cli("start", "P01")  # nothing else was touched: the site starts as it was


def test_preinst_verbs(lab: Lab) -> None:
    up(lab)
    traffic(lab, "CEN", "P01", 10)
    lab.cli("workload", "pause")
    note = lab.cli("delsite", "S01", "--parent", "P02", "--at", "P01").stdout
    assert "nothing deleted" in note
    assert lab.query("P01", "SELECT COUNT(*) FROM site_data WHERE origin='S01'")[0][0] > 0
    out = lab.cli("delsite", "S01", "--parent", "P01").stdout
    assert "deleted" in out
    assert lab.query("P01", "SELECT COUNT(*) FROM site_data WHERE origin='S01'")[0][0] == 0
    lab.cli("syncparent", "P01")  # P01 and S01 resend their site data up
    wait_for("S01's data back at P01", lambda: lab.query("P01", "SELECT COUNT(*) FROM site_data WHERE origin='S01'")[0][0] > 0)
    before = applied_from(lab, "S01", "P01")
    sent = lab.cli("syncchild", "P01", "S01").stdout
    assert "global object(s) for S01" in sent
    wait_for("S01 to receive the full dump", lambda: applied_from(lab, "S01", "P01") > before)
    dump = json.loads(lab.cli("dump", "P01").stdout)
    assert set(dump["scf"]) == {"P01", "S01"}
    diag = json.loads(lab.cli("diag", "P01", "--json").stdout)
    assert set(diag["links"]) == {"CEN", "S01"} and "S01" in diag["watermarks"]
    assert "watermarks (.trs)" in lab.cli("diag", "P01").stdout
    lab.cli("stop", "S01")
    lab.cli("create", "P01", "package")
    wait_for("a job for the stopped S01", lambda: lab.query("P01", "SELECT COUNT(*) FROM outbox WHERE peer='S01'")[0][0] > 0)
    jobs = lab.cli("deljob", "P01", "S01").stdout
    assert "deleted" in jobs and not jobs.startswith("deleted 0")
    assert lab.query("P01", "SELECT COUNT(*) FROM outbox WHERE peer='S01'")[0][0] == 0


def test_a_deeper_subtree_converges_after_its_primary_recovers(lab: Lab) -> None:
    """Site data two levels below the recovering site (same SCF serial as in the backup) comes back."""
    sites = [
        {"code": "CEN", "type": "central", "clients": 0},
        {"code": "P01", "type": "primary", "parent": "CEN"},
        {"code": "P11", "type": "primary", "parent": "P01"},
        {"code": "S11", "type": "secondary", "parent": "P11"},
    ]
    lab.up(topology_yaml(sites, settings=SETTINGS, workload={
        "inventory_interval": 0.5, "discovery_interval": 2.0, "status_interval": 2.0,
        "object_interval": 1.0, "scf_interval": 0}))
    traffic(lab, "CEN", "P01", 10)
    backup_id = lab.cli("backup", "P01").stdout.strip()
    traffic(lab, "CEN", "P01", 10)
    kill(lab, "P01")
    lab.cli("recover", "P01", "--backup", backup_id)
    assert lab.cli("wait-converged", "--timeout", "90", check=False).returncode == 0
    assert {k for (k,) in lab.query("CEN", "SELECT key FROM site_data WHERE data_class='scf'")} == {"CEN", "P01", "P11", "S11"}


def test_a_lone_central_site_recovers(lab: Lab) -> None:
    lab.up(topology_yaml([{"code": "CEN", "type": "central", "clients": 2}]))
    backup_id = lab.cli("backup", "CEN").stdout.strip()
    kill(lab, "CEN")
    assert "complete" in lab.cli("recover", "CEN", "--backup", backup_id).stdout
    assert lab.cli("wait-converged", "--timeout", "30", check=False).returncode == 0
