"""``smslab topology generate``: a valid topology file of any size."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from emulator.cli.common import say
from emulator.lab import LabDir
from emulator.topogen import generate


def cmd_generate(args: argparse.Namespace, lab_dir: LabDir) -> int:
    workload = None
    if args.workload_of:
        from emulator.topology import load_topology

        workload = load_topology(args.workload_of).defaults.workload.model_dump()
    topo = generate(args.sites, depth=args.depth, fanout=args.fanout, secondaries=args.secondaries,
                    clients=args.clients, lab=args.name, mode=args.mode, workload=workload)
    text = f"# smslab topology generate --sites {args.sites} --depth {args.depth} --fanout {args.fanout}" \
           f" --secondaries {args.secondaries}\n" + topo.to_yaml()
    if args.output:
        Path(args.output).write_text(text)
        types = [s.type for s in topo.sites]
        say(f"wrote {args.output}: {len(types)} sites ({types.count('primary')} primaries,"
            f" {types.count('secondary')} secondaries)")
    else:
        print(text, end="")
    return 0


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    text = "topology files: generate one of any size"
    s: argparse.ArgumentParser = sub.add_parser("topology", parents=[common], help=text, description=text)
    verbs = s.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True
    g: argparse.ArgumentParser = verbs.add_parser(
        "generate", parents=[common], help="a tree of N sites", description="write a valid topology of N sites:"
        " primaries --fanout to a node down to --depth levels, --secondaries under each primary")
    g.set_defaults(handler=cmd_generate)
    g.add_argument("--sites", type=int, required=True, help="how many sites, the central one included")
    g.add_argument("--depth", type=int, default=2, help="levels of primaries below the central site (default 2)")
    g.add_argument("--fanout", type=int, default=4, help="primaries under each primary (default 4)")
    g.add_argument("--secondaries", type=int, default=2, help="secondaries under each primary (default 2)")
    g.add_argument("--clients", type=int, default=3, help="simulated clients per site (default 3)")
    g.add_argument("--name", default="gen", help="the lab's name (default gen)")
    g.add_argument("--mode", choices=["sms20", "hardened"], default="sms20")
    g.add_argument("--workload-of", metavar="TOPOLOGY", help="take the workload rates of this topology file")
    g.add_argument("-o", "--output", metavar="FILE", help="write it there (default: standard output)")
