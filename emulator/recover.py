"""``smslab recover``: run the recovery agent of a site and follow it phase by phase.

A recovery is recorded in ``<lab>/recovery/<SITE>.json`` before anything changes, so running
the command again after a crash (of the agent or of the command) resumes the same recovery:
the store is not restored twice and the counters are not bumped twice.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from emulator import backup, orchestrator
from emulator.errors import LabError
from emulator.lab import LabDir, LabInfo
from sites.store import read_only

PHASES = ["announce", "counters", "resync", "complete"]
PHASE_TEXT = {
    "announce": "announce: peers pause the link and report what they know of the site",
    "counters": "counters: every counter moved past what any peer has seen",
    "resync": "resync: global data sent down, site data and SCFs resent up",
    "complete": "complete: links active under the new incarnation",
}


def record_path(lab_dir: LabDir, site: str) -> Path:
    return lab_dir.path / "recovery" / f"{site}.json"


def load_record(lab_dir: LabDir, site: str) -> dict[str, Any] | None:
    path = record_path(lab_dir, site)
    if not path.exists():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def save_record(lab_dir: LabDir, site: str, record: dict[str, Any]) -> None:
    path = record_path(lab_dir, site)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)


def read_progress(lab_dir: LabDir, site: str) -> dict[str, str]:
    with read_only(lab_dir.site_db(site)) as store:
        if store is None:
            return {}
        try:
            return store.meta()
        except sqlite3.DatabaseError:  # the schema is still being written
            return {}


def in_progress(lab_dir: LabDir, info: LabInfo, site: str, *, backup_id: str | None, wipe: bool,
                reference: str | None) -> dict[str, Any] | None:
    """Refuse a recovery that cannot be; the record of the one in progress, if any."""
    topo = info.topology
    spec = topo.site(site)
    if backup_id and wipe:
        raise LabError("--backup and --wipe exclude each other")
    if spec.type == "secondary" and backup_id:
        raise LabError(f"{site} is a secondary site: secondary sites are not backed up; their"
                       " recovery is a reinstall", hint=f"smslab recover {site} --wipe")
    if reference and reference not in topo.children(site):
        raise LabError(f"reference site {reference} is not a child of {site}",
                       hint=f"children of {site}: {', '.join(topo.children(site)) or 'none'}")
    record = load_record(lab_dir, site)
    if record and record["phase"] != "complete":
        asked = (backup_id, wipe, reference)
        if any(asked) and asked != (record["backup"], record["wipe"], record["reference"]):
            raise LabError(
                f"a recovery of {site} ({record['recovery_id']}) is already in progress"
                f" (backup {record['backup'] or '-'}, wipe {record['wipe']})",
                hint=f"run smslab recover {site} with no options (or the same ones) to resume it")
        return record
    return None


def recover(
    lab_dir: LabDir,
    site: str,
    *,
    backup_id: str | None = None,
    wipe: bool = False,
    reference: str | None = None,
    timeout: float = 120.0,
    progress: Callable[[str], None] = print,
    then_stop: bool = False,
) -> dict[str, Any]:
    """Run the recovery agent of ``site`` and follow it to the end. ``then_stop`` stops the
    recovered site afterwards (a compose lab's recovery container: the site's own container
    goes on from the recovered store)."""
    info = lab_dir.load()
    record = in_progress(lab_dir, info, site, backup_id=backup_id, wipe=wipe, reference=reference)
    if record:
        progress(f"resuming recovery {record['recovery_id']} of {site}")
    else:
        if backup_id:
            made = backup.verify(lab_dir, info, backup_id, site)  # refuse a bad backup before stopping anything
            lifetime = info.topology.settings.tombstone_lifetime
            if 0 < lifetime < time.time() - made.created:
                progress(f"warning: backup {backup_id} is {time.time() - made.created:.0f}s old, older than the"
                         f" tombstone lifetime ({lifetime:.0f}s): objects deleted since it was taken can come"
                         " back (AD's lingering objects; smslab check names them as orphans)")
        if not backup_id and not wipe:
            progress(f"no recovery of {site} in progress: a new one, from {site}'s current store")
        record = {"recovery_id": uuid.uuid4().hex[:12], "site": site, "backup": backup_id,
                  "wipe": wipe, "reference": reference, "started": time.time(), "phase": "prepare"}
        if lab_dir.pid(site):
            orchestrator.stop(lab_dir, site)
            progress(f"stopped the running {site}")
        done = backup.replace_store(lab_dir, info, site, backup_id=backup_id, wipe=wipe)
        if done:
            progress(done)
        save_record(lab_dir, site, record)
        progress(f"recovery {record['recovery_id']} of {site}: the agent joins under the reused site code")
    rid = record["recovery_id"]
    if not lab_dir.pid(site):
        orchestrator.ensure_broker_objects(lab_dir, info)
        orchestrator.ensure_daemon(lab_dir, info)
        extra = ["--recover", rid] + (["--reference", record["reference"]] if record["reference"] else [])
        orchestrator.spawn(lab_dir, site, extra)
    deadline = time.monotonic() + timeout
    shown = ""
    reached = -1  # phases are sequential: one passed between two looks is still shown
    while True:
        meta = read_progress(lab_dir, site)
        phase = meta.get("recovery_phase", "") if meta.get("recovery_id") == rid else ""
        waiting = meta.get("recovery_waiting", "")
        index = PHASES.index(phase) if phase in PHASES else -1
        if index >= 0:
            for passed in PHASES[reached + 1:index]:
                progress(f"  phase {PHASE_TEXT[passed]}")
            reached = max(reached, index)
        waits = waiting.replace(",", ", ")
        line = f"  phase {PHASE_TEXT.get(phase, 'starting the agent')}" + (f" (waiting for {waits})" if waiting else "")
        if line != shown:
            progress(line)
            shown = line
        if phase == "complete":
            record["phase"] = "complete"
            record["finished"] = time.time()
            save_record(lab_dir, site, record)
            progress(f"recovery {rid} of {site} complete: transaction ID {meta.get('txn_id')},"
                     f" incarnation {meta.get('incarnation')}")
            if then_stop and lab_dir.pid(site):
                orchestrator.stop(lab_dir, site)
                progress(f"stopped the recovered {site}: start it where it runs (docker compose start"
                         f" {site.lower()})")
            return record
        record["phase"] = phase or record["phase"]
        if lab_dir.pid(site) is None:
            save_record(lab_dir, site, record)
            raise LabError(f"the recovery agent of {site} exited in phase {phase or 'start'}",
                           hint=f"see {lab_dir.log_file(site)}; smslab recover {site} resumes it")
        if time.monotonic() > deadline:
            save_record(lab_dir, site, record)
            down = [p for p in waiting.split(",") if p and lab_dir.pid(p) is None]
            why = f"; not running: {', '.join(down)}" if down else ""
            raise LabError(
                f"recovery {rid} of {site} did not finish in {timeout:.0f}s: phase {phase or 'start'},"
                f" waiting for {waiting.replace(',', ', ') or 'nothing'}{why}",
                hint=(f"start them (smslab start {down[0]}); " if down else "")
                + f"the agent keeps trying; smslab recover {site} follows it again")
        time.sleep(0.2)
