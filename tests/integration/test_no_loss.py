"""Nothing lost in a recovery, a deleted queue or a bad control command (issue 6).

Real broker, real site processes; every assertion is on the site stores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from broker import admin, names
from emulator.testing import DEMO_SITES, Lab, topology_yaml, wait_for

pytestmark = pytest.mark.integration

SETTINGS = {"degraded_after": 4, "failed_after": 8}


def kill(lab: Lab, site: str) -> None:
    pid = lab.dir.pid(site)
    assert pid
    os.kill(pid, signal.SIGKILL)
    wait_for(f"{site} to die", lambda: lab.dir.pid(site) is None, timeout=10)


def records(lab: Lab, site: str, where: str = "1=1", *args: object) -> dict[tuple[str, str], int]:
    return {(c, k): v for c, k, v in lab.query(
        site, f"SELECT data_class, key, version FROM site_data WHERE {where}", *args)}


def burst_records(lab: Lab, site: str, origin: str) -> dict[tuple[str, str], int]:
    return records(lab, site, "key LIKE ?", f"{origin}-B%")


def status_records(lab: Lab, site: str, origin: str) -> dict[tuple[str, str], int]:
    return records(lab, site, "data_class='status' AND origin=?", origin)


def assert_ancestors_hold_everything(lab: Lab, site: str) -> None:
    """Every record ``site`` holds is at each of its ancestors, at least at that version."""
    assert lab.info is not None
    held = records(lab, site)
    for ancestor in lab.info.topology.ancestors(site):
        theirs = records(lab, ancestor)
        short = {k: v for k, v in held.items() if theirs.get(k, 0) < v}
        assert not short, f"{ancestor} lacks {len(short)} of {site}'s {len(held)} records, e.g. {sorted(short)[:3]}"


@pytest.mark.parametrize("how", ["current", "backup", "wipe"])
def test_a_recovery_loses_none_of_the_site_s_own_data(lab: Lab, how: str) -> None:
    """The central site is down while P01 makes 6,000 records; most stay in P01's outbox (the
    window is 2,000), its own status messages queue behind them; P01 dies and is recovered.
    Every record P01 and S01 hold must then be at the central site."""
    lab.up(topology_yaml(DEMO_SITES, settings=SETTINGS, workload={
        "inventory_interval": 0.5, "discovery_interval": 2.0, "status_interval": 0.5,
        "object_interval": 1.0, "scf_interval": 3.0}))
    lab.cli("stop", "CEN")
    statuses = len(status_records(lab, "P01", "P01"))
    lab.cli("burst", "P01", "--count", "6000", "--keys", "6000", "--chunk", "1000")
    wait_for("P01 to make the 6,000 records", lambda: len(burst_records(lab, "P01", "P01")) == 6000, timeout=60)
    wait_for("P01's own status messages to queue behind them",
             lambda: len(status_records(lab, "P01", "P01")) >= statuses + 4, timeout=30)
    queued = lab.query("P01", "SELECT COUNT(*) FROM outbox WHERE peer='CEN'")[0][0]
    assert queued > 4000, f"only {queued} envelopes wait for CEN: the test would not test the outbox"
    backup_id = lab.cli("backup", "P01").stdout.strip() if how == "backup" else None
    kill(lab, "P01")
    lab.cli("start", "CEN")
    if how == "backup":
        lab.cli("recover", "P01", "--backup", str(backup_id))
    elif how == "wipe":
        lab.cli("recover", "P01", "--wipe")
    else:
        lab.cli("recover", "P01")
    done = lab.cli("wait-converged", "--timeout", "120", check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    for site in ("P01", "S01", "P02", "S02"):
        assert_ancestors_hold_everything(lab, site)
    # a wiped site no longer has them: its (synthetic) clients report them again
    assert len(burst_records(lab, "CEN", "P01")) == 6000
    if how != "wipe":
        assert set(status_records(lab, "P01", "P01")) <= set(status_records(lab, "CEN", "P01"))
    assert lab.cli("check").returncode == 0


def test_a_secondary_s_data_queued_at_its_primary_survives_the_primary_s_recovery(lab: Lab) -> None:
    lab.up(topology_yaml(DEMO_SITES, settings=SETTINGS))
    lab.cli("stop", "CEN")
    assert lab.control("S01", {"cmd": "burst", "count": 4000, "keys": 4000, "chunk": 500})["ok"]
    wait_for("S01's records to reach P01", lambda: len(burst_records(lab, "P01", "S01")) == 4000, timeout=60)
    assert lab.query("P01", "SELECT COUNT(*) FROM outbox WHERE peer='CEN'")[0][0] > 2000
    kill(lab, "P01")
    lab.cli("start", "CEN")
    lab.cli("recover", "P01")
    done = lab.cli("wait-converged", "--timeout", "120", check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(burst_records(lab, "CEN", "S01")) == 4000
    assert_ancestors_hold_everything(lab, "S01")
    assert_ancestors_hold_everything(lab, "P01")


def _delete_queue(name: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", "delete_queue", name], check=True, capture_output=True, timeout=60)


@pytest.mark.parametrize("queue", ["site", "control"])
def test_a_queue_deleted_under_a_site_is_declared_again_and_nothing_is_lost(lab: Lab, queue: str) -> None:
    lab.up(topology_yaml(DEMO_SITES, settings=SETTINGS))
    wait_for("traffic up from P01", lambda: lab.link("CEN", "P01")["next_expected"] > 10)
    restored = "SELECT COUNT(*) FROM status_messages WHERE message_id=5400"
    assert lab.query("P01", restored)[0][0] == 0
    name = (names.site_queue if queue == "site" else names.control_queue)(lab.lab_id, "P01")
    _delete_queue(name)
    wait_for("P01 to say it declared its queue again", lambda: lab.query("P01", restored)[0][0] == 1, timeout=15)
    assert admin.queue_depths(lab.url, lab.lab_id, ["P01"])["P01"] >= 0, "the inbox is back"
    # the control queue answers again, and the links are active with nothing lost
    assert lab.control("P01", {"cmd": "ping"})["site"] == "P01"
    before = lab.link("P01", "CEN")["next_expected"]
    wait_for("P01 to apply its parent's envelopes again", lambda: lab.link("P01", "CEN")["next_expected"] > before,
             timeout=30)
    report = lab.wait_converged(timeout=90)
    assert report.verdict == "valid", report.render()
    snap = lab.status()
    assert all(link["health"] == "active" for link in snap["links"])


@pytest.mark.parametrize("command, error", [
    ({"cmd": "burst", "count": 10, "keys": 0}, "keys"),
    ({"cmd": "burst", "count": 10, "chunk": 0}, "chunk"),
    ({"cmd": "burst", "count": "ten"}, "count"),
    ({"cmd": "create", "kind": "printer"}, "kind"),
    ({"cmd": "create", "kind": "package", "colour": "red"}, "colour"),
    ({"cmd": "launch-missiles"}, "cmd"),
    ({"cmd": "delsite", "site": True, "parent": "CEN"}, "site"),
])
def test_a_bad_control_command_is_refused_with_a_reason_and_the_site_goes_on(
        lab: Lab, command: dict[str, object], error: str) -> None:
    lab.up(topology_yaml(DEMO_SITES[:2], settings=SETTINGS))
    pid = lab.dir.pid("P01")
    answer = lab.control("P01", command)
    assert answer["ok"] is False and error in answer["error"], answer
    assert lab.dir.pid("P01") == pid
    before = lab.link("CEN", "P01")["next_expected"]
    wait_for("P01 to go on sending", lambda: lab.link("CEN", "P01")["next_expected"] > before + 3, timeout=20)
    assert lab.control("P01", {"cmd": "ping"})["state"] == "active"


def test_deep_nesting_and_garbage_on_the_control_queue_are_dead_lettered_without_a_traceback(lab: Lab) -> None:
    """Published as the lab's controller (the one broker user a site takes commands from), so
    each body reaches the command parser and is refused for what it is, not for who sent it."""
    import pika

    lab.up(topology_yaml(DEMO_SITES[:2], settings=SETTINGS))
    assert lab.info is not None
    controller = lab.info.amqp_url
    deep = b'{"cmd": "ping", "x": ' + b"[" * 20000 + b"]" * 20000 + b"}"  # under the size limit
    huge = b'{"cmd": "ping", "x": ' + b"[" * 50000 + b"]" * 50000 + b"}"
    bodies = {"recursion limit": deep, "more than 65536": huge, "malformed control command": b"\xff not json",
              "should be an object": json.dumps([1, 2]).encode()}
    assert len(deep) < 65536 < len(huge)
    with admin.blocking(controller) as conn:
        ch = conn.channel()
        ch.confirm_delivery()
        for body in bodies.values():
            ch.basic_publish(names.exchange(lab.lab_id), names.control_key("P01"), body,
                             pika.BasicProperties(delivery_mode=2, user_id=admin.login_user(controller)),
                             mandatory=True)
    # and a deeply nested packet in P01's inbox
    admin.publish_raw(lab.url, lab.lab_id, "P01", b'{"v": 1, "x": ' + b"[" * 20000 + b"]" * 20000 + b"}")
    letters = wait_for("five dead letters",
                       lambda: (d := admin.dead_letters(lab.url, lab.lab_id)) and len(d) >= 5 and d)
    reasons = [json.loads(letter["body"])["reason"] for letter in letters]
    assert not [r for r in reasons if "identity" in r], reasons
    for expected in bodies:
        assert any(expected in r for r in reasons), (expected, reasons)
    assert any(r.startswith("malformed packet") and "recursion limit" in r for r in reasons), reasons
    assert lab.dir.pid("P01") and lab.control("P01", {"cmd": "ping"})["state"] == "active"
    out = lab.dir.out_file("P01")  # what escapes the site's logging (site.log) goes there
    assert "Traceback" not in lab.dir.log_file("P01").read_text() + (out.read_text() if out.exists() else "")
