"""Commands about one site's data: backups, the recovery agent, the Preinst verbs, diag."""

from __future__ import annotations

import argparse
import time
from typing import Any

from emulator import backup, recover, status
from emulator.cli.common import add_json, control, emit_json, known_site, positive, progress_for, result, say
from emulator.cli.lab import cmd_stop
from emulator.errors import LabError
from emulator.lab import LabDir


def cmd_backup(args: argparse.Namespace, lab_dir: LabDir) -> int:
    code = known_site(lab_dir, args.site)
    record = backup.create(lab_dir, lab_dir.load(), code)
    if args.json:
        emit_json(record.model_dump())
    else:
        say(record.id)
    return 0


def cmd_backups(args: argparse.Namespace, lab_dir: LabDir) -> int:
    lab_dir.load()  # "no lab in ..." like every other command
    code = known_site(lab_dir, args.site) if args.site else None
    records = backup.list_all(lab_dir, code)
    if args.json:
        emit_json([r.model_dump() for r in records])
        return 0
    damaged = backup.unreadable(lab_dir)
    if not records and not damaged:
        say("no backups" + (f" of {code}" if code else ""))
    for name in damaged:
        say(f"{name}  unreadable: its backup.json is missing or damaged (not usable)")
    for r in records:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.created))
        say(f"{r.id}  {r.site}  {when}  txn {r.txn_id}  incarnation {r.incarnation}  next object {r.object_next}")
    return 0


def cmd_recover(args: argparse.Namespace, lab_dir: LabDir) -> int:
    code = known_site(lab_dir, args.site)
    reference = args.reference.upper() if args.reference else None
    record = recover.recover(lab_dir, code, backup_id=args.backup, wipe=args.wipe, reference=reference,
                             timeout=args.timeout, progress=progress_for(args), then_stop=args.then_stop)
    if args.json:
        emit_json(record)
    return 0


def cmd_restore(args: argparse.Namespace, lab_dir: LabDir) -> int:
    """The KB failure's first half, where the site runs elsewhere (a container): its store is
    replaced, and it starts where it runs (docker compose start p01)."""
    code = known_site(lab_dir, args.site)
    done = backup.replace_store(lab_dir, lab_dir.load(), code, backup_id=args.backup, wipe=args.wipe)
    result(args, {"site": code, "backup": args.backup, "wipe": args.wipe, "done": str(done)},
           f"{done}, no recovery; start {code} to run it")
    return 0


def cmd_syncchild(args: argparse.Namespace, lab_dir: LabDir) -> int:
    parent, child = known_site(lab_dir, args.parent), known_site(lab_dir, args.child)
    children = lab_dir.load().topology.children(parent)
    if child not in children:
        raise LabError(f"{child} is not a child of {parent}",
                       hint=f"children of {parent}: {', '.join(children) or 'none'}")
    answer = control(lab_dir, parent, {"cmd": "syncchild", "child": child})
    result(args, {"parent": parent, "child": child, "sent": answer["sent"]},
           f"{parent} queued {answer['sent']} global object(s) for {child}")
    return 0


def cmd_syncparent(args: argparse.Namespace, lab_dir: LabDir) -> int:
    code = known_site(lab_dir, args.site)
    answer = control(lab_dir, code, {"cmd": "syncparent"})
    kids = answer.get("children") or []
    result(args, {"site": code, "sent": answer["sent"], "children": kids},
           f"{code} queued {answer['sent']} record(s) for its parent"
           + (f"; asked {', '.join(kids)} to do the same" if kids else ""))
    return 0


def cmd_deljob(args: argparse.Namespace, lab_dir: LabDir) -> int:
    code, dest = known_site(lab_dir, args.site), known_site(lab_dir, args.dest)
    answer = control(lab_dir, code, {"cmd": "deljob", "dest": dest})
    result(args, {"site": code, "dest": dest, "deleted": answer["deleted"]},
           f"deleted {answer['deleted']} job(s) of {code} destined for {dest}")
    return 0


def cmd_delsite(args: argparse.Namespace, lab_dir: LabDir) -> int:
    target, parent = known_site(lab_dir, args.site), known_site(lab_dir, args.parent)
    at = known_site(lab_dir, args.at) if args.at else parent
    if at == target:
        raise LabError("delsite deletes a site's data at another site", hint="pass --at SITE (default: the parent)")
    answer = control(lab_dir, at, {"cmd": "delsite", "site": target, "parent": parent})
    result(args, {"site": target, "parent": parent, "at": at, "deleted": answer.get("deleted", 0),
                  "jobs": answer.get("jobs", 0), "note": answer.get("note")},
           answer.get("note")
           or f"{at}: deleted {answer['deleted']} record(s) of {target} and {answer.get('jobs', 0)} job(s)")
    return 0


def _hand_key(args: argparse.Namespace, lab_dir: LabDir, *, up: bool) -> int:
    """The Preinst key verbs: SITE's key read from it and pinned at every site above it
    (``keyforparent``) or below it (``keyforchild``)."""
    code = known_site(lab_dir, args.site)
    topology = lab_dir.load().topology
    to = topology.ancestors(code) if up else [s for s in topology.subtree(code) if s != code]
    if not to:
        if up:
            raise LabError(f"{code} is the central site: it has no parent", hint=f"smslab keyforchild {code}")
        raise LabError(f"{code} has no child sites", hint=f"smslab keyforparent {code}")
    key = control(lab_dir, code, {"cmd": "key"})
    for site in to:
        control(lab_dir, site, {"cmd": "trustkey", "site": code, "inc": key["inc"], "pub": key["pub"]})
    done = {"site": code, "inc": key["inc"], "fingerprint": key["fingerprint"], "pinned_at": to}
    if args.json:
        emit_json(done)
    else:
        say(f"{code}'s key {done['fingerprint']} (incarnation {done['inc']}) pinned at {', '.join(to)}")
    return 0


def cmd_keyforparent(args: argparse.Namespace, lab_dir: LabDir) -> int:
    return _hand_key(args, lab_dir, up=True)


def cmd_keyforchild(args: argparse.Namespace, lab_dir: LabDir) -> int:
    return _hand_key(args, lab_dir, up=False)


def cmd_dump(args: argparse.Namespace, lab_dir: LabDir) -> int:
    code = known_site(lab_dir, args.site)
    emit_json(status.dump(lab_dir, code))
    return 0


def cmd_diag(args: argparse.Namespace, lab_dir: LabDir) -> int:
    code = known_site(lab_dir, args.site)
    info = status.diag(lab_dir, lab_dir.load(), code)
    if args.json:
        emit_json(info)
    else:
        say(status.render_diag(info))
    return 0


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    def add(name: str, handler: Any, text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = sub.add_parser(name, parents=[common], help=text, description=text)
        parser.set_defaults(handler=handler)
        return parser

    s = add("backup", cmd_backup, "back up a running site (atomic snapshot); prints the backup id")
    s.add_argument("site")
    add_json(s)
    s = add("backups", cmd_backups, "list backups")
    s.add_argument("site", nargs="?")
    add_json(s)
    s = add("recover", cmd_recover, "run the recovery agent: reused site code + resynchronization handshake")
    s.add_argument("site")
    group = s.add_mutually_exclusive_group()
    group.add_argument("--backup", metavar="BACKUP", help="restore this backup first")
    group.add_argument("--wipe", action="store_true", help="rebuild from nothing first (a secondary's reinstall)")
    s.add_argument("--reference", metavar="SITE", help="the child whose copy of our global objects is taken back")
    s.add_argument("--timeout", type=positive, default=120.0)
    s.add_argument("--then-stop", action="store_true",
                   help="stop the recovered site afterwards (compose: its own container goes on from its store)")
    add_json(s)
    s = add("restore", cmd_restore, "replace a stopped site's store with a backup (or --wipe), WITHOUT recovery")
    s.add_argument("site")
    group = s.add_mutually_exclusive_group(required=True)
    group.add_argument("backup", nargs="?", metavar="BACKUP")
    group.add_argument("--wipe", action="store_true", help="rebuild it from nothing under its old code")
    add_json(s)
    s = add("syncchild", cmd_syncchild, "Preinst /syncchild: PARENT sends all global data to CHILD")
    s.add_argument("parent")
    s.add_argument("child")
    add_json(s)
    s = add("syncparent", cmd_syncparent, "Preinst /syncparent: SITE and its children resend site data and SCFs up")
    s.add_argument("site")
    add_json(s)
    s = add("deljob", cmd_deljob, "Preinst /deljob: delete every job of SITE destined for DEST")
    s.add_argument("site")
    s.add_argument("dest")
    add_json(s)
    s = add("delsite", cmd_delsite, "Preinst /delsite: delete SITE's data where it is run (at --at)")
    s.add_argument("site")
    s.add_argument("--parent", required=True, help="SITE's parent: nothing is deleted if it moved")
    s.add_argument("--at", help="where to run it (default: the parent)")
    add_json(s)
    s = add("keyforparent", cmd_keyforparent,
            "Preinst /keyforparent (hardened): SITE's signing key pinned by hand at its parent and every site above")
    s.add_argument("site")
    add_json(s)
    s = add("keyforchild", cmd_keyforchild,
            "Preinst /keyforchild (hardened): SITE's signing key pinned by hand at every site below it")
    s.add_argument("site")
    add_json(s)
    s = add("dump", cmd_dump, "Preinst /dump: the SCFs a site holds, for itself and its children (JSON)")
    s.add_argument("site")
    s.add_argument("--json", action="store_true", help="print JSON (what it prints anyway)")
    s = add("stopsite", cmd_stop, "Preinst /stopsite: stop a site gracefully")
    s.add_argument("site")
    add_json(s)
    s = add("diag", cmd_diag, "a site's watermarks, link counters, outbox, health and drops")
    s.add_argument("site")
    add_json(s)
