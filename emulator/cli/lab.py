"""Commands of a lab's lifetime and processes: up, down, status, kill, stop, start, restart,
pause, resume, workload, object commands, check and wait-converged."""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path
from typing import Any

from emulator import backup, brokers, checker, faults, orchestrator, status
from emulator.cli.common import (
    add_json,
    control,
    count,
    emit_json,
    known_site,
    object_id,
    output_gone,
    positive,
    progress_for,
    result,
    say,
)
from emulator.errors import OutputClosed, SmslabError
from emulator.lab import LabDir
from emulator.topology import load_topology


def cmd_up(args: argparse.Namespace, lab_dir: LabDir) -> int:
    tell = progress_for(args)
    load_topology(args.topology)  # refused here, before a broker is started for it
    if lab_dir.exists():
        orchestrator.refuse_existing(lab_dir)
    given = getattr(args, "amqp", None) or os.environ.get("SMSLAB_AMQP_URL")
    if args.cluster:
        url, ref = brokers.local_cluster(Path(args.cluster), given)
    else:
        url, ref = brokers.broker_for_lab(lab_dir, given, progress=tell)
    try:
        info = orchestrator.up(Path(args.topology), lab_dir, url, timeout=args.timeout, progress=tell, broker=ref,
                               netns=[c for v in args.netns or [] for c in v.split(",") if c.strip()])
    except BaseException:
        if ref.kind != "external" and not lab_dir.exists():
            brokers.release(ref)
        raise
    if args.json:
        emit_json({"lab": info.lab_id, "dir": str(lab_dir.path), "sites": info.topology.depth_order(),
                   "broker": info.broker.describe(info.amqp_url)})
    else:
        say(f"lab {info.lab_id} is up: {len(info.topology.sites)} sites active (smslab status)")
    if args.foreground:
        stop = {"now": False}

        def on_signal(_s: int, _f: object) -> None:
            stop["now"] = True

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        try:
            say("staying attached; Ctrl-C brings the lab down")
            while not stop["now"]:
                time.sleep(0.5)
                if output_gone():  # the reader went away (| head): as Ctrl-C
                    break
                for code in info.topology.depth_order():
                    if lab_dir.pid(code) is None and not stop["now"]:
                        say(f"site {code} is not running")
        except OutputClosed:
            pass  # as Ctrl-C: the lab is brought down

        def tell(msg: str) -> None:
            try:
                say(msg)
            except OutputClosed:
                pass  # nobody reads it: the lab goes down all the same

        orchestrator.down(lab_dir, progress=tell)
    return 0


def cmd_down(args: argparse.Namespace, lab_dir: LabDir) -> int:
    kept = len(backup.list_all(lab_dir))
    tell = progress_for(args)
    info = orchestrator.down(lab_dir, keep=args.keep, progress=tell)
    if not args.keep:
        tell(f"removed the lab directory {lab_dir.path}" + (f" with its {kept} backup(s)" if kept else "")
             + " (--keep keeps it)")
    result(args, {"lab": info.lab_id, "dir": str(lab_dir.path), "kept": bool(args.keep), "backups": kept},
           f"lab {info.lab_id} is down")
    return 0


def cmd_status(args: argparse.Namespace, lab_dir: LabDir) -> int:
    info = lab_dir.load()
    snapshot = status.collect(lab_dir, info)
    if args.json:
        emit_json(snapshot)
    else:
        say(status.render(snapshot))
    return 0


def cmd_kill(args: argparse.Namespace, lab_dir: LabDir) -> int:
    code = known_site(lab_dir, args.site)
    pid = orchestrator.kill(lab_dir, code)
    result(args, {"site": code, "pid": pid, "action": "kill"}, f"site {code} killed (SIGKILL to pid {pid})")
    return 0


def cmd_stop(args: argparse.Namespace, lab_dir: LabDir) -> int:
    code = known_site(lab_dir, args.site)
    pid = orchestrator.stop(lab_dir, code)
    result(args, {"site": code, "pid": pid, "action": "stop"}, f"site {code} stopped (pid {pid})")
    return 0


def cmd_start(args: argparse.Namespace, lab_dir: LabDir) -> int:
    code = known_site(lab_dir, args.site)
    pid = orchestrator.start(lab_dir, code, timeout=args.timeout, progress=progress_for(args),
                             restore=args.restore, wipe=args.wipe)
    result(args, {"site": code, "pid": pid, "action": "start", "restore": args.restore, "wipe": args.wipe},
           f"site {code} started (pid {pid})")
    return 0


def cmd_restart(args: argparse.Namespace, lab_dir: LabDir) -> int:
    code = known_site(lab_dir, args.site)
    pid = orchestrator.restart(lab_dir, code, timeout=args.timeout, progress=progress_for(args))
    result(args, {"site": code, "pid": pid, "action": "restart"}, f"site {code} restarted (pid {pid})")
    return 0


def cmd_pause(args: argparse.Namespace, lab_dir: LabDir) -> int:
    code = known_site(lab_dir, args.site)
    spec = faults.apply_pause(lab_dir, lab_dir.load(), code, for_s=args.for_s, progress=progress_for(args))
    result(args, spec.model_dump(), f"{code} is paused (fault {spec.id}); smslab resume {code} goes on")
    return 0


def cmd_resume(args: argparse.Namespace, lab_dir: LabDir) -> int:
    code = known_site(lab_dir, args.site)
    info = lab_dir.load()
    paused = [f for f in faults.active(lab_dir) if f.kind == "pause" and f.site == code]
    for spec in paused:
        faults.heal(lab_dir, info, spec.id, progress=progress_for(args))
    if not paused or args.json:
        result(args, {"site": code, "resumed": [f.id for f in paused]}, f"{code} is not paused")
    return 0


def cmd_workload(args: argparse.Namespace, lab_dir: LabDir) -> int:
    info = lab_dir.load()
    codes = [known_site(lab_dir, s) for s in args.sites]
    if not codes:
        codes = [c for c in info.topology.depth_order() if lab_dir.pid(c)]
        down = [c for c in info.topology.depth_order() if c not in codes]
        if down:
            progress_for(args)(f"not running (skipped): {', '.join(down)}")
    for code in codes:
        control(lab_dir, code, {"cmd": f"{args.action}-workload"})
    result(args, {"action": args.action, "sites": codes}, f"workload {args.action}d at {', '.join(codes)}")
    return 0


def cmd_burst(args: argparse.Namespace, lab_dir: LabDir) -> int:
    code = known_site(lab_dir, args.site)
    command: dict[str, Any] = {"cmd": "burst", "count": args.count, "keys": args.keys}
    if args.chunk is not None:
        command["chunk"] = args.chunk
    control(lab_dir, code, command)  # the site checks the bounds and says which one is wrong
    if args.json:
        emit_json({"site": code, **{k: v for k, v in command.items() if k != "cmd"}})
    else:
        say(f"{code}: a burst of {args.count} inventory report(s) of {min(args.keys, args.count)} synthetic"
            " client(s) is under way (smslab diag shows the outbox)")
    return 0


def cmd_create(args: argparse.Namespace, lab_dir: LabDir) -> int:
    code = known_site(lab_dir, args.site)
    command: dict[str, Any] = {"cmd": "create", "kind": args.kind}
    if args.name is not None:
        command["name"] = args.name
    obj = control(lab_dir, code, command)["object"]
    if args.json:
        emit_json(obj)
    else:
        say(obj["id"])
    return 0


def cmd_update(args: argparse.Namespace, lab_dir: LabDir) -> int:
    code = known_site(lab_dir, args.site)
    command: dict[str, Any] = {"cmd": "update", "id": args.id}
    if args.name is not None:
        command["name"] = args.name
    obj = control(lab_dir, code, command)["object"]
    if args.json:
        emit_json(obj)
    else:
        say(f"{obj['id']} revision {obj['revision']}")
    return 0


def cmd_delete(args: argparse.Namespace, lab_dir: LabDir) -> int:
    code = known_site(lab_dir, args.site)
    obj = control(lab_dir, code, {"cmd": "delete", "id": args.id})["object"]
    if args.json:
        emit_json(obj)
    else:
        say(f"{obj['id']} deleted (revision {obj['revision']})")
    return 0


def cmd_check(args: argparse.Namespace, lab_dir: LabDir) -> int:
    report = checker.check(lab_dir)
    if args.json:
        emit_json(report.to_dict())
    else:
        say(report.render())
    return {"valid": 0, "invalid": 1, "unknown": 2}[report.verdict]


def cmd_wait_converged(args: argparse.Namespace, lab_dir: LabDir) -> int:
    """Pause the workload, then poll the checker until valid or the timeout."""
    info = lab_dir.load()
    tell = progress_for(args)
    running = [c for c in info.topology.depth_order() if lab_dir.pid(c)]
    for code in running:
        try:
            control(lab_dir, code, {"cmd": "pause-workload"}, timeout=5)
        except SmslabError:
            pass
    tell(f"workload paused at {len(running)} site(s) (smslab workload resume to go on)")
    deadline = time.monotonic() + args.timeout
    started = time.monotonic()
    last, last_said = "", 0.0
    while True:
        # the stores first (cheap); the history once they agree (it only grows)
        report = checker.check(lab_dir, info, with_history=False)
        if report.verdict == "valid":
            report = checker.check(lab_dir, info)
        if report.verdict == "valid":
            if args.json:
                emit_json(report.to_dict())
            else:
                say(f"converged in {time.monotonic() - started:.1f}s: {report.render().splitlines()[-1]}")
            return 0
        summary = report.render(limit=5, more_hint="smslab check for all")
        now = time.monotonic()
        if summary != last or now - last_said > 5:
            tell(f"[{now - started:4.0f}s] {summary}")
            last, last_said = summary, now
        if now > deadline:
            if args.json:
                emit_json(report.to_dict())
            tell(f"not converged after {args.timeout:.0f}s")
            if any(v.kind in ("link", "reused_id") and v.hard for v in report.violations):
                tell("hint: links are broken or IDs reused: recover the site (smslab recover SITE)")
            return {"invalid": 1, "unknown": 2}[report.verdict]
        time.sleep(0.5)


def add_start_options(s: argparse.ArgumentParser) -> None:
    group = s.add_mutually_exclusive_group()
    group.add_argument("--restore", metavar="BACKUP",
                       help="first replace the site's store with a backup, WITHOUT recovery (the KB failure)")
    group.add_argument("--wipe", action="store_true",
                       help="first rebuild the site from nothing under its old code, WITHOUT recovery")


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    def add(name: str, handler: Any, text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = sub.add_parser(name, parents=[common], help=text, description=text)
        parser.set_defaults(handler=handler)
        return parser

    s = add("up", cmd_up, "bring a lab up from a topology file")
    s.add_argument("topology")
    s.add_argument("--foreground", action="store_true", help="stay attached; Ctrl-C brings it down")
    s.add_argument("--cluster", metavar="DIR",
                   help="use the local RabbitMQ cluster in DIR (smslab broker cluster up --dir DIR): its "
                        "nodes' URLs, and node faults (fault broker-node-kill) on it")
    s.add_argument("--netns", action="append", metavar="SITES",
                   help="run these sites (comma-separated, or all) each on a host of its own: a network "
                        "namespace with its own interface to this host (root; the brokers must listen "
                        "beyond loopback); fault isolate cuts one off; down deletes them")
    s.add_argument("--timeout", type=positive, default=60.0, help="seconds to wait for every site")
    add_json(s)
    s = add("down", cmd_down, "heal every fault, stop every site, delete the lab's broker objects")
    s.add_argument("--keep", action="store_true", help="keep the lab directory (stores, logs, history)")
    add_json(s)
    add_json(add("status", cmd_status, "the tree, sites and links"))
    for name, handler, text in (("kill", cmd_kill, "SIGKILL a site"), ("stop", cmd_stop, "stop a site gracefully")):
        s = add(name, handler, text)
        s.add_argument("site")
        add_json(s)
    s = add("start", cmd_start, "start a stopped or killed site (waits until it is attached)")
    s.add_argument("site")
    s.add_argument("--timeout", type=positive, default=30.0)
    add_start_options(s)
    add_json(s)
    s = add("restart", cmd_restart, "stop a site gracefully and start it again")
    s.add_argument("site")
    s.add_argument("--timeout", type=positive, default=30.0)
    add_json(s)
    s = add("pause", cmd_pause, "freeze a site's process (SIGSTOP) until smslab resume")
    s.add_argument("site")
    s.add_argument("--for", dest="for_s", type=positive, metavar="S", help="resume it after S seconds")
    add_json(s)
    s = add("resume", cmd_resume, "let a paused site go on (SIGCONT)")
    s.add_argument("site")
    add_json(s)
    s = add("workload", cmd_workload, "pause or resume the workload generators")
    s.add_argument("action", choices=["pause", "resume"])
    s.add_argument("sites", nargs="*", metavar="SITE", help="sites (default: every running site)")
    add_json(s)
    s = add("burst", cmd_burst, "make a site's synthetic clients send COUNT inventory reports at once (load)")
    s.add_argument("site")
    s.add_argument("--count", type=count, required=True, help="inventory reports in all")
    s.add_argument("--keys", type=count, default=1000, help="synthetic clients they come from (default 1000)")
    s.add_argument("--chunk", type=count, help="reports per store transaction (default 1000)")
    add_json(s)
    s = add("create", cmd_create, "create a package, advertisement or collection at a site")
    s.add_argument("site")
    s.add_argument("kind", choices=["package", "advertisement", "collection"])
    s.add_argument("--name")
    add_json(s)
    s = add("update", cmd_update, "update an object at the site that owns it")
    s.add_argument("site")
    s.add_argument("id", type=object_id)
    s.add_argument("--name")
    add_json(s)
    s = add("delete", cmd_delete, "delete an object at the site that owns it")
    s.add_argument("site")
    s.add_argument("id", type=object_id)
    add_json(s)
    add_json(add("check", cmd_check, "judge the lab: valid (0), invalid (1) or unknown (2)"))
    s = add("wait-converged", cmd_wait_converged, "pause the workload and wait until check is valid")
    s.add_argument("--timeout", type=positive, default=60.0)
    add_json(s)
