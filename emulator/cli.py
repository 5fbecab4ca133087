"""``smslab``: the command line. Errors print what was wrong and what to do, no traceback
(unless ``--debug``)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from broker import admin
from emulator import backup, checker, orchestrator, recover, status
from emulator.errors import LabError, SmslabError
from emulator.lab import DEFAULT_LAB_DIR, LabDir

Handler = Callable[[argparse.Namespace, LabDir], int]
COMMANDS: dict[str, Handler] = {}


def command(name: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        COMMANDS[name] = fn
        return fn

    return register


def say(msg: str) -> None:
    print(msg, flush=True)


def amqp_url(args: argparse.Namespace) -> str:
    return args.amqp or os.environ.get("SMSLAB_AMQP_URL") or admin.DEFAULT_URL


def known_site(lab_dir: LabDir, code: str) -> str:
    code = code.upper()
    lab_dir.load().topology.site(code)  # raises "unknown site" with the list
    return code


# -- lab lifetime ---------------------------------------------------------------------------


@command("up")
def cmd_up(args: argparse.Namespace, lab_dir: LabDir) -> int:
    info = orchestrator.up(Path(args.topology), lab_dir, amqp_url(args), timeout=args.timeout,
                           progress=say)
    say(f"lab {info.lab_id} is up: {len(info.topology.sites)} sites active (smslab status)")
    if args.foreground:
        say("staying attached; Ctrl-C brings the lab down")
        stop = {"now": False}

        def on_signal(_s: int, _f: object) -> None:
            stop["now"] = True

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        while not stop["now"]:
            time.sleep(0.5)
            for code in info.topology.depth_order():
                if lab_dir.pid(code) is None and not stop["now"]:
                    say(f"site {code} is not running")
        orchestrator.down(lab_dir, progress=say)
    return 0


@command("down")
def cmd_down(args: argparse.Namespace, lab_dir: LabDir) -> int:
    kept = len(backup.list_all(lab_dir))
    info = orchestrator.down(lab_dir, keep=args.keep, progress=say)
    if not args.keep:
        say(f"removed the lab directory {lab_dir.path}" + (f" with its {kept} backup(s)" if kept else "")
            + " (--keep keeps it)")
    say(f"lab {info.lab_id} is down")
    return 0


@command("status")
def cmd_status(args: argparse.Namespace, lab_dir: LabDir) -> int:
    info = lab_dir.load()
    snapshot = status.collect(lab_dir, info)
    if args.json:
        print(json.dumps(snapshot, indent=2))
    else:
        say(status.render(snapshot))
    return 0


@command("kill")
def cmd_kill(args: argparse.Namespace, lab_dir: LabDir) -> int:
    code = known_site(lab_dir, args.site)
    pid = orchestrator.kill(lab_dir, code)
    say(f"site {code} killed (SIGKILL to pid {pid})")
    return 0


@command("stop")
def cmd_stop(args: argparse.Namespace, lab_dir: LabDir) -> int:
    code = known_site(lab_dir, args.site)
    pid = orchestrator.stop(lab_dir, code)
    say(f"site {code} stopped (pid {pid})")
    return 0


@command("start")
def cmd_start(args: argparse.Namespace, lab_dir: LabDir) -> int:
    code = known_site(lab_dir, args.site)
    pid = orchestrator.start(lab_dir, code, timeout=args.timeout, progress=say,
                             restore=args.restore, wipe=args.wipe)
    say(f"site {code} started (pid {pid})")
    return 0


# -- talking to a running site --------------------------------------------------------------


def control(lab_dir: LabDir, code: str, cmd: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    info = lab_dir.load()
    if lab_dir.pid(code) is None:
        raise LabError(f"site {code} is not running", hint=f"smslab start {code}")
    answer = admin.control_request(info.amqp_url, info.lab_id, code, cmd, timeout=timeout)
    if not answer.get("ok", False):
        raise LabError(f"{code}: {answer.get('error')}", hint=answer.get("hint"))
    return answer


@command("workload")
def cmd_workload(args: argparse.Namespace, lab_dir: LabDir) -> int:
    info = lab_dir.load()
    codes = [known_site(lab_dir, s) for s in args.sites]
    if not codes:
        codes = [c for c in info.topology.depth_order() if lab_dir.pid(c)]
        down = [c for c in info.topology.depth_order() if c not in codes]
        if down:
            say(f"not running (skipped): {', '.join(down)}")
    for code in codes:
        control(lab_dir, code, {"cmd": f"{args.action}-workload"})
    say(f"workload {args.action}d at {', '.join(codes)}")
    return 0


@command("create")
def cmd_create(args: argparse.Namespace, lab_dir: LabDir) -> int:
    code = known_site(lab_dir, args.site)
    obj = control(lab_dir, code, {"cmd": "create", "kind": args.kind, "name": args.name})["object"]
    say(obj["id"] if not args.json else json.dumps(obj))
    return 0


@command("update")
def cmd_update(args: argparse.Namespace, lab_dir: LabDir) -> int:
    code = known_site(lab_dir, args.site)
    obj = control(lab_dir, code, {"cmd": "update", "id": args.id, "name": args.name})["object"]
    say(json.dumps(obj) if args.json else f"{obj['id']} revision {obj['revision']}")
    return 0


@command("delete")
def cmd_delete(args: argparse.Namespace, lab_dir: LabDir) -> int:
    code = known_site(lab_dir, args.site)
    obj = control(lab_dir, code, {"cmd": "delete", "id": args.id})["object"]
    say(f"{obj['id']} deleted (revision {obj['revision']})")
    return 0


@command("check")
def cmd_check(args: argparse.Namespace, lab_dir: LabDir) -> int:
    report = checker.check(lab_dir)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.render())
    return {"valid": 0, "invalid": 1, "unknown": 2}[report.verdict]


@command("wait-converged")
def cmd_wait_converged(args: argparse.Namespace, lab_dir: LabDir) -> int:
    """Pause the workload, then poll the checker until valid or the timeout."""
    info = lab_dir.load()
    running = [c for c in info.topology.depth_order() if lab_dir.pid(c)]
    for code in running:
        try:
            control(lab_dir, code, {"cmd": "pause-workload"}, timeout=5)
        except SmslabError:
            pass
    say(f"workload paused at {len(running)} site(s) (smslab workload resume to go on)")
    deadline = time.monotonic() + args.timeout
    started = time.monotonic()
    last, last_said = "", 0.0
    while True:
        report = checker.check(lab_dir, info)
        if report.verdict == "valid":
            if args.json:
                print(json.dumps(report.to_dict(), indent=2))
            else:
                say(f"converged in {time.monotonic() - started:.1f}s: {report.render().splitlines()[-1]}")
            return 0
        summary = report.render(limit=5, more_hint="smslab check for all")
        now = time.monotonic()
        if not args.json and (summary != last or now - last_said > 5):
            say(f"[{now - started:4.0f}s] {summary}")
            last, last_said = summary, now
        if now > deadline:
            if args.json:
                print(json.dumps(report.to_dict(), indent=2))
            say(f"not converged after {args.timeout:.0f}s")
            if any(v.kind in ("link", "reused_id") and v.hard for v in report.violations):
                say("hint: links are broken or IDs reused: recover the site (smslab recover SITE)")
            return {"invalid": 1, "unknown": 2}[report.verdict]
        time.sleep(0.5)


def positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="smslab",
        description="A lab emulator of an SMS 2.0 site hierarchy over RabbitMQ.",
    )
    p.add_argument("--lab", default=os.environ.get("SMSLAB_LAB", DEFAULT_LAB_DIR),
                   help=f"lab directory (default {DEFAULT_LAB_DIR}, or SMSLAB_LAB)")
    p.add_argument("--amqp", default=None,
                   help="broker URL (default SMSLAB_AMQP_URL or amqp://guest:guest@localhost:5672/%%2F)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    s = sub.add_parser("up", help="bring a lab up from a topology file")
    s.add_argument("topology")
    s.add_argument("--foreground", action="store_true", help="stay attached; Ctrl-C brings it down")
    s.add_argument("--timeout", type=positive, default=60.0, help="seconds to wait for every site")
    s = sub.add_parser("down", help="stop every site and delete the lab's broker objects")
    s.add_argument("--keep", action="store_true", help="keep the lab directory (stores, logs)")
    s = sub.add_parser("status", help="the tree, sites and links")
    s.add_argument("--json", action="store_true")
    for name, text in (("kill", "SIGKILL a site"), ("stop", "stop a site gracefully")):
        s = sub.add_parser(name, help=text)
        s.add_argument("site")
    s = sub.add_parser("start", help="start a stopped or killed site")
    s.add_argument("site")
    s.add_argument("--timeout", type=positive, default=30.0)
    add_start_options(s)
    s = sub.add_parser("workload", help="pause or resume the workload generators")
    s.add_argument("action", choices=["pause", "resume"])
    s.add_argument("sites", nargs="*", metavar="SITE", help="sites (default: every running site)")
    s = sub.add_parser("create", help="create a package, advertisement or collection at a site")
    s.add_argument("site")
    s.add_argument("kind", choices=["package", "advertisement", "collection"])
    s.add_argument("--name")
    s.add_argument("--json", action="store_true")
    s = sub.add_parser("update", help="update an object at the site that owns it")
    s.add_argument("site")
    s.add_argument("id")
    s.add_argument("--name")
    s.add_argument("--json", action="store_true")
    s = sub.add_parser("delete", help="delete an object at the site that owns it")
    s.add_argument("site")
    s.add_argument("id")
    s = sub.add_parser("check", help="judge the lab: valid (0), invalid (1) or unknown (2)")
    s.add_argument("--json", action="store_true")
    s = sub.add_parser("wait-converged", help="pause the workload and wait until check is valid")
    s.add_argument("--timeout", type=positive, default=60.0)
    s.add_argument("--json", action="store_true", help="print the last report as JSON")
    add_more_commands(sub)
    return p


def add_start_options(s: argparse.ArgumentParser) -> None:
    group = s.add_mutually_exclusive_group()
    group.add_argument("--restore", metavar="BACKUP",
                       help="first replace the site's store with a backup, WITHOUT recovery (the KB failure)")
    group.add_argument("--wipe", action="store_true",
                       help="first rebuild the site from nothing under its old code, WITHOUT recovery")


def add_more_commands(sub: Any) -> None:
    s = sub.add_parser("backup", help="back up a running site (atomic snapshot); prints the backup id")
    s.add_argument("site")
    s = sub.add_parser("backups", help="list backups")
    s.add_argument("site", nargs="?")
    s.add_argument("--json", action="store_true")
    s = sub.add_parser("recover", help="run the recovery agent: reused site code + resynchronization handshake")
    s.add_argument("site")
    group = s.add_mutually_exclusive_group()
    group.add_argument("--backup", metavar="BACKUP", help="restore this backup first")
    group.add_argument("--wipe", action="store_true", help="rebuild from nothing first (a secondary's reinstall)")
    s.add_argument("--reference", metavar="SITE", help="the child whose copy of our global objects is taken back")
    s.add_argument("--timeout", type=positive, default=120.0)
    s = sub.add_parser("syncchild", help="Preinst /syncchild: PARENT sends all global data to CHILD")
    s.add_argument("parent")
    s.add_argument("child")
    s = sub.add_parser("syncparent", help="Preinst /syncparent: SITE and its children resend site data and SCFs up")
    s.add_argument("site")
    s = sub.add_parser("deljob", help="Preinst /deljob: delete every job of SITE destined for DEST")
    s.add_argument("site")
    s.add_argument("dest")
    s = sub.add_parser("delsite", help="Preinst /delsite: delete SITE's data where it is run (at --at)")
    s.add_argument("site")
    s.add_argument("--parent", required=True, help="SITE's parent: nothing is deleted if it moved")
    s.add_argument("--at", help="where to run it (default: the parent)")
    s = sub.add_parser("dump", help="Preinst /dump: the SCFs a site holds, for itself and its children")
    s.add_argument("site")
    s = sub.add_parser("stopsite", help="Preinst /stopsite: stop a site gracefully")
    s.add_argument("site")
    s = sub.add_parser("diag", help="a site's watermarks, link counters, outbox, health and drops")
    s.add_argument("site")
    s.add_argument("--json", action="store_true")


@command("backup")
def cmd_backup(args: argparse.Namespace, lab_dir: LabDir) -> int:
    code = known_site(lab_dir, args.site)
    record = backup.create(lab_dir, lab_dir.load(), code)
    say(record.id)
    return 0


@command("backups")
def cmd_backups(args: argparse.Namespace, lab_dir: LabDir) -> int:
    lab_dir.load()  # "no lab in ..." like every other command
    code = known_site(lab_dir, args.site) if args.site else None
    records = backup.list_all(lab_dir, code)
    if args.json:
        print(json.dumps([r.model_dump() for r in records], indent=2))
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


@command("recover")
def cmd_recover(args: argparse.Namespace, lab_dir: LabDir) -> int:
    code = known_site(lab_dir, args.site)
    reference = args.reference.upper() if args.reference else None
    recover.recover(lab_dir, code, backup_id=args.backup, wipe=args.wipe, reference=reference,
                    timeout=args.timeout, progress=say)
    return 0


@command("syncchild")
def cmd_syncchild(args: argparse.Namespace, lab_dir: LabDir) -> int:
    parent, child = known_site(lab_dir, args.parent), known_site(lab_dir, args.child)
    children = lab_dir.load().topology.children(parent)
    if child not in children:
        raise LabError(f"{child} is not a child of {parent}",
                       hint=f"children of {parent}: {', '.join(children) or 'none'}")
    answer = control(lab_dir, parent, {"cmd": "syncchild", "child": child})
    say(f"{parent} queued {answer['sent']} global object(s) for {child}")
    return 0


@command("syncparent")
def cmd_syncparent(args: argparse.Namespace, lab_dir: LabDir) -> int:
    code = known_site(lab_dir, args.site)
    answer = control(lab_dir, code, {"cmd": "syncparent"})
    kids = answer.get("children") or []
    say(f"{code} queued {answer['sent']} record(s) for its parent" + (f"; asked {', '.join(kids)} to do the same" if kids else ""))
    return 0


@command("deljob")
def cmd_deljob(args: argparse.Namespace, lab_dir: LabDir) -> int:
    code, dest = known_site(lab_dir, args.site), known_site(lab_dir, args.dest)
    answer = control(lab_dir, code, {"cmd": "deljob", "dest": dest})
    say(f"deleted {answer['deleted']} job(s) of {code} destined for {dest}")
    return 0


@command("delsite")
def cmd_delsite(args: argparse.Namespace, lab_dir: LabDir) -> int:
    target, parent = known_site(lab_dir, args.site), known_site(lab_dir, args.parent)
    at = known_site(lab_dir, args.at) if args.at else parent
    if at == target:
        raise LabError("delsite deletes a site's data at another site", hint="pass --at SITE (default: the parent)")
    answer = control(lab_dir, at, {"cmd": "delsite", "site": target, "parent": parent})
    say(answer.get("note") or f"{at}: deleted {answer['deleted']} record(s) of {target} and {answer.get('jobs', 0)} job(s)")
    return 0


@command("dump")
def cmd_dump(args: argparse.Namespace, lab_dir: LabDir) -> int:
    code = known_site(lab_dir, args.site)
    print(json.dumps(status.dump(lab_dir, code), indent=2))
    return 0


@command("stopsite")
def cmd_stopsite(args: argparse.Namespace, lab_dir: LabDir) -> int:
    return cmd_stop(args, lab_dir)


@command("diag")
def cmd_diag(args: argparse.Namespace, lab_dir: LabDir) -> int:
    code = known_site(lab_dir, args.site)
    info = status.diag(lab_dir, lab_dir.load(), code)
    print(json.dumps(info, indent=2) if args.json else status.render_diag(info))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    lab_dir = LabDir(args.lab)
    try:
        if args.amqp and args.command != "up" and lab_dir.exists():
            used = lab_dir.load().amqp_url
            if used != args.amqp:
                print(f"smslab: note: this lab's sites use the broker given at `up` ({admin._safe(used)});"
                      " --amqp is ignored", file=sys.stderr)
        return COMMANDS[args.command](args, lab_dir)
    except SmslabError as exc:
        if args.debug:
            raise
        print(f"smslab: error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"smslab: hint: {exc.hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
