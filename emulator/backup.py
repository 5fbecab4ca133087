"""Site backups (the Backup SMS Site Server task): an atomic snapshot of a running site's
whole store, plus a control record, in ``<lab>/sites/<CODE>/backups/<ID>/``.

    site.db       SQLite online backup of the site's store (counters, watermarks, outbox, data)
    backup.json   BackupRecord: site, lab, time, counters at backup time, sha256 of site.db
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from emulator import history
from emulator.errors import CorruptBackup, LabError
from emulator.lab import LabDir, LabInfo
from sites.store import backup_file, check_backup_file


class BackupRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    site: str
    lab: str
    created: float
    sha256: str
    txn_id: int
    incarnation: int
    scf_serial: int
    object_next: int
    links: dict[str, dict[str, int]]  # peer -> next_send_seq, acked_through, next_expected


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def create(lab_dir: LabDir, info: LabInfo, site: str, *, backup_id: str | None = None,
           now: float | None = None) -> BackupRecord:
    """An online backup of a site's store (``backup_id`` and ``now``: the simulator's own)."""
    spec = info.topology.site(site)
    if spec.type == "secondary":
        raise LabError(
            f"{site} is a secondary site: secondary sites are not backed up (as in SMS 2.0;"
            " they have no site database of their own)",
            hint=f"to rebuild it, reinstall it: smslab recover {site} --wipe",
        )
    source = lab_dir.site_db(site)
    if not source.exists():
        raise LabError(f"site {site} has no store yet", hint="is the lab up? (smslab status)")
    now = time.time() if now is None else now
    backup_id = backup_id or f"{site}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime(now))}-{os.urandom(2).hex()}"
    target_dir = lab_dir.backup_dir(backup_id)
    target_dir.mkdir(parents=True)
    target = target_dir / "site.db"
    held = backup_file(source, target)
    meta, alloc, links = held["meta"], held["alloc"], held["links"]
    record = BackupRecord(
        id=backup_id, site=site, lab=info.lab_id, created=now, sha256=_sha256(target),
        txn_id=int(meta.get("txn_id", 0)), incarnation=int(meta.get("incarnation", 0)),
        scf_serial=int(meta.get("scf_serial", 0)), object_next=int(alloc.get("object", 1)),
        links=links,
    )
    (target_dir / "backup.json").write_text(record.model_dump_json(indent=2))
    history.record(lab_dir, "store", link=site, site=site, at=now,
                   detail={"action": "backup", "backup": backup_id, "txn_id": record.txn_id, "links": links})
    return record


def load(lab_dir: LabDir, backup_id: str) -> BackupRecord:
    path = lab_dir.backup_dir(backup_id) / "backup.json" if len(backup_id) >= 3 else lab_dir.path / "none"
    if not path.exists():
        known = ", ".join(r.id for r in list_all(lab_dir)) or "none"
        raise LabError(f"no backup {backup_id!r} in this lab (backups: {known})",
                       hint="smslab backups lists them; smslab backup SITE makes one")
    try:
        return BackupRecord.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "top level"
        raise CorruptBackup(f"backup {backup_id}: its control record backup.json is unreadable:"
                            f" {first.get('msg')} at {where}",
                            hint="use another backup (smslab backups)") from exc


def list_all(lab_dir: LabDir, site: str | None = None) -> list[BackupRecord]:
    out: list[BackupRecord] = []
    for path in (d / "backup.json" for d in lab_dir.all_backup_dirs()):
        if not path.exists():
            continue
        try:
            record = BackupRecord.model_validate_json(path.read_bytes())
        except ValidationError:
            continue
        if site is None or record.site == site:
            out.append(record)
    return sorted(out, key=lambda r: r.created)


def unreadable(lab_dir: LabDir) -> list[str]:
    """Backup folders whose control record is missing or unreadable."""
    bad = []
    for folder in lab_dir.all_backup_dirs():
        try:
            BackupRecord.model_validate_json((folder / "backup.json").read_bytes())
        except (OSError, ValidationError):
            bad.append(folder.name)
    return bad


def verify(lab_dir: LabDir, info: LabInfo, backup_id: str, site: str) -> BackupRecord:
    """Refuse a backup of another site or lab, or one whose files are damaged."""
    record = load(lab_dir, backup_id)
    other = ("secondary sites have no backups; smslab recover " + site + " --wipe reinstalls it"
             if info.topology.site(site).type == "secondary" else f"smslab backups {site} lists {site}'s backups")
    if record.site != site:
        raise CorruptBackup(f"backup {backup_id} is of site {record.site}, not {site}", hint=other)
    if record.lab != info.lab_id:
        raise CorruptBackup(f"backup {backup_id} was taken in lab {record.lab}, not {info.lab_id}",
                            hint=f"smslab backups {site} lists this lab's backups")
    db = lab_dir.backup_dir(backup_id) / "site.db"
    damaged = f"use another backup (smslab backups {site}) or recover {site} --wipe"
    if not db.exists():
        raise CorruptBackup(f"backup {backup_id}: site.db is missing", hint=damaged)
    if _sha256(db) != record.sha256:
        raise CorruptBackup(f"backup {backup_id}: site.db does not match its checksum (damaged or changed)",
                            hint=damaged)
    check_backup_file(db, site_code=site, lab=info.lab_id)
    return record


def restore_into(lab_dir: LabDir, info: LabInfo, backup_id: str, site: str) -> BackupRecord:
    """Replace a stopped site's store with a backup (nothing else of the lab changes)."""
    record = verify(lab_dir, info, backup_id, site)
    if lab_dir.pid(site):
        raise LabError(f"site {site} is running", hint=f"smslab stop {site} (or kill) first")
    wipe_store(lab_dir, site)
    shutil.copyfile(lab_dir.backup_dir(backup_id) / "site.db", lab_dir.site_db(site))
    return record


def replace_store(lab_dir: LabDir, info: LabInfo, site: str, *, backup_id: str | None,
                  wipe: bool, at: float | None = None) -> str | None:
    """Put a stopped site's store back to a backup, or to nothing; say what was done.

    The site's history is merged first: what the store recorded since the backup is gone
    from it after this, but not from the lab's history."""
    if not backup_id and not wipe:
        return None
    if backup_id:
        verify(lab_dir, info, backup_id, site)
    if not lab_dir.pid(site):
        history.merge(lab_dir, info)
    if backup_id:
        record = restore_into(lab_dir, info, backup_id, site)
        history.record(lab_dir, "store", link=site, site=site, at=at,
                       detail={"action": "restore", "backup": record.id, "links": record.links})
        return f"{site} restored from backup {record.id} (transaction ID {record.txn_id})"
    wipe_store(lab_dir, site)
    history.record(lab_dir, "store", link=site, site=site, at=at, detail={"action": "wipe"})
    return f"{site} rebuilt from nothing under its old site code"


def wipe_store(lab_dir: LabDir, site: str) -> None:
    if lab_dir.pid(site):
        raise LabError(f"site {site} is running", hint=f"smslab stop {site} (or kill) first")
    for suffix in ("", "-wal", "-shm"):
        path = Path(str(lab_dir.site_db(site)) + suffix)
        if path.exists():
            path.unlink()
