"""Retention on real site processes and the real broker (issue 10, bounded growth): a lab with
retention periods of seconds prunes under its workload, the checker judges the pruned lab valid,
and a recovery from a backup of a pruned store (older than what the peers still remember of
it) converges valid. The site's log rotates; the dead-letter queue is capped."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from broker import admin, names
from emulator.testing import DEMO_SITES, Lab, topology_yaml, wait_for

pytestmark = pytest.mark.integration

RETENTION = {"applied_retention": 5, "status_retention": 5, "tombstone_lifetime": 20, "retention_interval": 1,
             "history_retention": 120, "log_max_bytes": 4_000, "log_backups": 2, "dead_letter_max": 3}
WORKLOAD = {"inventory_interval": 0.5, "discovery_interval": 2.0, "status_interval": 0.5,
            "object_interval": 0.5, "scf_interval": 2.0, "max_objects": 4}


def one(lab: Lab, site: str, sql: str, *args: object) -> int:
    return int(lab.query(site, sql, *args)[0][0] or 0)


def purged_tombstones(lab: Lab, site: str) -> int:
    return one(lab, site, "SELECT COUNT(*) FROM watermark_floor WHERE data_class IN"
                          " ('package', 'advertisement', 'collection')")


@pytest.mark.slow  # half a minute of pruning under load, then a recovery: in the slow suite (.ci/run runs it)
def test_a_pruned_lab_is_valid_and_a_recovery_after_pruning_converges_valid(lab: Lab) -> None:
    lab.up(topology_yaml(DEMO_SITES, workload=WORKLOAD, settings=RETENTION))
    # pruned under the workload: old status messages (their .trs rows folded into a floor),
    # expired tombstones at every site below their owner
    wait_for("CEN to fold P01's old status watermarks",
             lambda: lab.query("CEN", "SELECT 1 FROM watermark_floor WHERE source='P01' AND data_class='status'"),
             timeout=60)
    wait_for("S01 and S02 to purge expired tombstones",
             lambda: purged_tombstones(lab, "S01") and purged_tombstones(lab, "S02"), timeout=90)
    # what CEN holds of status messages is what the last few seconds made (the newest of each site aside)
    old = time.time() - 5 - 1 - 3
    assert one(lab, "CEN", "SELECT COUNT(*) FROM site_data WHERE data_class='status'"
                           " AND json_extract(payload, '$.at') < ?", old) <= len(DEMO_SITES)
    assert lab.wait_converged(timeout=90).valid  # the checker on a pruned lab

    for code in ("CEN", "P01", "P02", "S01", "S02"):
        lab.control(code, {"cmd": "resume-workload"})
    backup_id = lab.cli("backup", "P01").stdout.strip()
    made = time.time()
    # CEN forgets what it applied from P01 before the backup: the recovery must not need it
    wait_for("CEN to prune what it applied before the backup",
             lambda: one(lab, "CEN", "SELECT MIN(at) FROM applied WHERE source='P01'") > made, timeout=30)
    pid = lab.dir.pid("P01")
    assert pid
    os.kill(pid, signal.SIGKILL)
    wait_for("P01 to die", lambda: lab.dir.pid("P01") is None, timeout=10)
    lab.cli("recover", "P01", "--backup", backup_id)
    assert lab.wait_converged(timeout=120).valid
    assert lab.meta("P01", "recovery_phase") == "complete"

    # the site's own log rotates past log_max_bytes; site.log is always the current one
    logs = sorted(p.name for p in lab.dir.site_dir("CEN").glob("site.log*"))
    assert logs[:2] == ["site.log", "site.log.1"] and len(logs) <= 3, logs
    assert lab.dir.log_file("CEN").stat().st_size <= 4_000 + 1_000


def test_the_dead_letter_queue_keeps_at_most_dead_letter_max_messages(lab: Lab) -> None:
    info = lab.up(topology_yaml(DEMO_SITES, settings={"dead_letter_max": 3}))
    for i in range(6):  # malformed: each dead-lettered with its reason, one after the other
        admin.publish_raw(lab.url, info.lab_id, "P01", f"not an envelope {i}".encode())
        wait_for(f"P01 to refuse message {i}",
                 lambda i=i: one(lab, "P01", "SELECT COUNT(*) FROM events WHERE kind='refused'") > i, timeout=30)
    wait_for("the dead-letter queue at its cap",
             lambda: admin.queue_depth(lab.url, names.dead_queue(info.lab_id)) == 3, timeout=30)
    kept = [json.loads(d["body"])["body"] for d in admin.dead_letters(lab.url, info.lab_id)]
    assert kept == [f"not an envelope {i}" for i in (3, 4, 5)], kept  # the oldest went
