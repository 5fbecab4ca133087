"""Commands of the fault harness and the history: fault, faults, heal, history."""

from __future__ import annotations

import argparse
import time
from typing import Any

from emulator import faults, history
from emulator.cli.common import (
    add_json,
    count,
    emit_json,
    fraction,
    known_site,
    non_negative,
    output_gone,
    positive,
    progress_for,
    say,
)
from emulator.errors import ConfigError, OutputClosed
from emulator.lab import LabDir
from emulator.protocol.shaping import LINK_FAULTS


def cmd_fault(args: argparse.Namespace, lab_dir: LabDir) -> int:
    info = lab_dir.load()
    tell = progress_for(args)
    kind = args.kind
    spec: faults.FaultSpec | None
    if kind in LINK_FAULTS:
        params: dict[str, float] = {}
        for name in ("rate", "window", "ms", "jitter", "max_hold"):
            value = getattr(args, name, None)
            if value is not None:
                params[name] = float(value)
        spec = faults.apply_link_fault(lab_dir, info, kind, args.a, args.b, oneway=args.oneway, params=params,
                                       seed=args.seed, for_s=args.for_s, verify=args.verify, progress=tell)
    elif kind == "disconnect":
        spec = faults.apply_disconnect(lab_dir, info, known_site(lab_dir, args.site), for_s=args.for_s, progress=tell)
    elif kind == "alarm":
        spec = faults.apply_alarm(lab_dir, info, for_s=args.for_s, progress=tell)
    elif kind == "broker-restart":
        faults.broker_restart(lab_dir, info, progress=tell)
        spec = None
    elif kind == "broker-node-kill":
        spec = faults.apply_broker_node_kill(lab_dir, info, args.node, for_s=args.for_s, progress=tell)
    elif kind == "isolate":
        spec = faults.apply_isolate(lab_dir, info, known_site(lab_dir, args.site), for_s=args.for_s, progress=tell)
    elif kind == "broker-partition":
        spec = faults.apply_broker_partition(lab_dir, info, args.node, for_s=args.for_s, progress=tell)
    else:  # pragma: no cover - argparse allows only the kinds above
        raise ConfigError(f"unknown fault {kind!r}")
    if args.json:
        emit_json(spec.model_dump() if spec else {"kind": kind, "done": True})
    elif spec is not None:
        say(f"fault {spec.id} is on: {spec.describe()} (seed {spec.seed})"
            + (f", healed in {args.for_s:g}s" if args.for_s else f"; smslab heal {spec.id} undoes it"))
    return 0


def cmd_faults(args: argparse.Namespace, lab_dir: LabDir) -> int:
    lab_dir.load()
    rows = faults.listing(lab_dir)
    if args.json:
        emit_json(rows)
        return 0
    if not rows:
        say("no fault is on")
    for row in rows:
        since = time.strftime("%H:%M:%S", time.localtime(row["since"]))
        until = f" until {time.strftime('%H:%M:%S', time.localtime(row['until']))}" if row.get("until") else ""
        state = "" if row["state"] == "on" else f" [{row['state']}]"
        say(f"{row['id']}  {row['description']}  since {since}{until}  seed {row['seed']}{state}")
        if row["done_text"]:
            say(f"      {row['done_text']}")
    return 0


def cmd_heal(args: argparse.Namespace, lab_dir: LabDir) -> int:
    info = lab_dir.load()
    if not args.all and not args.ids:
        raise ConfigError("name the fault(s) to heal, or --all", hint="smslab faults lists them")
    tell = progress_for(args)
    if args.all:
        healed = faults.heal_all(lab_dir, info, progress=tell)
        if not healed:
            tell("no fault was on")
    else:
        healed = []
        for fault_id in args.ids:
            faults.find(lab_dir, fault_id)  # an unknown id is an error, with the ones that are on
            done = faults.heal(lab_dir, info, fault_id, progress=tell)
            if done:
                healed.append(done)
    if args.json:
        emit_json([f.model_dump() for f in healed])
    return 0


def cmd_history(args: argparse.Namespace, lab_dir: LabDir) -> int:
    info = lab_dir.load()
    sites = {known_site(lab_dir, s) for s in args.site} if args.site else None
    kinds = {k.strip() for given in args.kind for k in given.split(',') if k.strip()} if args.kind else None
    unknown = sorted((kinds or set()) - set(history.KINDS))
    if unknown:
        raise ConfigError(f"unknown event kind(s): {', '.join(unknown)}",
                          hint="kinds: " + ", ".join(sorted(history.KINDS)))
    history.merge(lab_dir, info)

    def wanted(e: history.Event) -> bool:
        if kinds and e.kind not in kinds:
            return False
        about = {e.site} | set((e.link or "").replace("<->", "->").split("->"))
        return not sites or bool(sites & about)

    shown = 0
    path = history.history_path(lab_dir)
    merged, offset = history.read_new(lab_dir, 0)  # whole lines: the daemon may be appending
    events = [e for e in merged if wanted(e)]
    if args.limit:
        events = events[-args.limit:]
    for e in events:
        say(e.to_json() if args.json else history.render(e))
        shown += 1
    if not args.follow:
        if not args.json:
            state = history.load_state(lab_dir)
            gaps = f"; {len(state.gaps)} gap(s) pruned before they were merged" if state.gaps else ""
            progress_for(args)(f"{shown} event(s) shown of {state.events} in {path}{gaps}")
        return 0
    try:
        while True:
            time.sleep(0.5)
            if output_gone():  # the reader went away while nothing new came: stop as at a write
                raise OutputClosed("the output was closed")
            history.merge(lab_dir, info)
            # whole lines only, each once: the fault daemon merges too, at any moment
            new, offset = history.read_new(lab_dir, offset)
            for e in new:
                if wanted(e):
                    say(e.to_json() if args.json else history.render(e))
    except OutputClosed:
        raise  # exit 141, quietly, as at any write to a closed pipe
    except KeyboardInterrupt:
        return 0


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    def add(name: str, handler: Any, text: str, parent: Any = sub) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = parent.add_parser(name, parents=[common], help=text, description=text)
        parser.set_defaults(handler=handler)
        return parser

    fault = add("fault", cmd_fault, "put a fault on the lab (from outside the sites), checked on traffic")
    kinds = fault.add_subparsers(dest="kind", metavar="KIND")
    kinds.required = True

    def link_fault(kind: str, text: str) -> argparse.ArgumentParser:
        s = add(kind, cmd_fault, text, kinds)
        s.add_argument("a", metavar="A", help="a site")
        s.add_argument("b", metavar="B", help="its parent or one of its children")
        s.add_argument("--oneway", action="store_true", help="only A->B (default: both ways)")
        s.add_argument("--seed", type=int, help="seed of the fault's randomness (default: drawn, and shown)")
        s.add_argument("--for", dest="for_s", type=positive, metavar="S", help="heal it after S seconds")
        s.add_argument("--verify", type=positive, metavar="S",
                       help="seconds to wait for traffic to prove the fault (default 5, or 6 sync intervals)")
        add_json(s)
        return s

    link_fault("partition", "cut the link between A and B: its messages are held, and arrive when healed")
    link_fault("drop", "drop messages on the link at random").add_argument(
        "--rate", type=fraction, required=True, help="probability of a drop, 0..1")
    link_fault("duplicate", "deliver messages on the link twice at random").add_argument(
        "--rate", type=fraction, required=True, help="probability of a second copy, 0..1")
    s = link_fault("reorder", "deliver messages on the link out of order")
    s.add_argument("--window", type=count, default=20, help="messages held at most (default 20)")
    s.add_argument("--max-hold", dest="max_hold", type=positive, default=2.0, help="seconds one waits at most")
    s = link_fault("delay", "delay messages on the link")
    s.add_argument("--ms", type=non_negative, required=True, help="delay in milliseconds")
    s.add_argument("--jitter", type=non_negative, default=0.0, help="plus or minus this many milliseconds")
    s = add("disconnect", cmd_fault, "close a site's broker connections and keep them closed", kinds)
    s.add_argument("site")
    s.add_argument("--for", dest="for_s", type=positive, metavar="S", help="let it reconnect after S seconds")
    add_json(s)
    s = add("alarm", cmd_fault, "raise a memory alarm on the broker: every publisher is blocked", kinds)
    s.add_argument("--for", dest="for_s", type=positive, metavar="S", help="clear it after S seconds")
    add_json(s)
    add_json(add("broker-restart", cmd_fault, "restart the broker application (stop_app, start_app)", kinds))
    s = add("broker-node-kill", cmd_fault, "kill -9 one node of the lab's local cluster (smslab up --cluster DIR); "
            "healing starts it again", kinds)
    s.add_argument("node", metavar="NODE", help="its number (1, 2, 3), node name or HOST:PORT")
    s.add_argument("--for", dest="for_s", type=positive, metavar="S", help="start it again after S seconds")
    add_json(s)
    s = add("isolate", cmd_fault, "cut a site's host off the network (a site of smslab up --netns: its namespace's "
            "link goes down); healing brings it back", kinds)
    s.add_argument("site")
    s.add_argument("--for", dest="for_s", type=positive, metavar="S", help="bring it back after S seconds")
    add_json(s)
    s = add("broker-partition", cmd_fault, "cut one node of the lab's local cluster off from the others (iptables "
            "on their distribution traffic); healing joins it again", kinds)
    s.add_argument("node", metavar="NODE", help="its number (1, 2, 3), node name or HOST:PORT")
    s.add_argument("--for", dest="for_s", type=positive, metavar="S", help="heal it after S seconds")
    add_json(s)

    add_json(add("faults", cmd_faults, "the faults that are on, and what each has done so far"))
    s = add("heal", cmd_heal, "undo faults: smslab heal ID [ID...] or --all")
    s.add_argument("ids", nargs="*", metavar="ID")
    s.add_argument("--all", action="store_true", help="every fault that is on")
    add_json(s)
    s = add("history", cmd_history, "what happened: the sites' decisions and the harness's faults, merged")
    s.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    s.add_argument("--site", action="append", metavar="SITE", help="only events at or about SITE (repeatable)")
    s.add_argument("--kind", action="append", metavar="KIND", help="only events of KIND (repeatable, or KIND,KIND)")
    s.add_argument("--limit", type=count, metavar="N", help="only the last N events")
    add_json(s)
