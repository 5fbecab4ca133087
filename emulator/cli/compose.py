"""``smslab compose``: a lab's docker compose file; ``smslab compose-init``: what its init
service does before the sites start."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from broker import urls
from emulator import brokers, orchestrator
from emulator.cli.common import emit_json, say
from emulator.compose import compose_file, relative_topology
from emulator.errors import BrokerUnavailable, ConfigError
from emulator.lab import BrokerRef, LabDir, LabInfo
from emulator.topology import load_topology


def cmd_compose(args: argparse.Namespace, lab_dir: LabDir) -> int:
    path = Path(args.topology)
    topology = load_topology(path)  # refused here, with file:line
    out = Path(args.output) if args.output else None
    text = compose_file(topology, relative_topology(path, out), source=args.topology)
    if out is None:
        print(text, end="")
    else:
        out.write_text(text)
        say(f"wrote {out} ({len(topology.sites)} sites): docker compose -f {out} up -d")
    return 0


def cmd_compose_init(args: argparse.Namespace, lab_dir: LabDir) -> int:
    topology = load_topology(args.topology)
    lab_id = os.environ.get("SMSLAB_LAB_ID") or f"{topology.lab}-compose"
    url = getattr(args, "amqp", None) or os.environ.get("SMSLAB_AMQP_URL")
    if not url:
        raise ConfigError("compose-init needs the broker's URL", hint="set SMSLAB_AMQP_URL")
    if lab_dir.exists():
        info = lab_dir.load()
        if info.lab_id != lab_id or info.topology != topology:
            raise ConfigError(f"{lab_dir.path} holds lab {info.lab_id} of another topology",
                              hint="docker compose down -v starts afresh")
    else:
        info = LabInfo(lab_id=lab_id, amqp_urls=urls.split(url), created=time.time(), topology=topology,
                       broker=BrokerRef(kind="compose", management=os.environ.get("SMSLAB_MANAGEMENT_URL")),
                       identities_note="a compose lab: per-site broker identities are not set up there yet")
        lab_dir.save(info)
        (lab_dir.path / "topology.yaml").write_text(topology.to_yaml())
    deadline = time.monotonic() + args.timeout
    # On a cluster every node first: a quorum queue's members are the nodes there when it is declared.
    for node_url in info.amqp_urls if len(info.amqp_urls) > 1 else []:
        while (why := brokers.answers(node_url)) is not None:
            if time.monotonic() > deadline:
                raise BrokerUnavailable(f"broker node {urls.where(node_url)} did not answer within "
                                        f"{args.timeout:.0f}s: {why}", hint="docker compose logs rabbitmq-2 rabbitmq-3")
            time.sleep(1)
    while True:
        try:
            orchestrator.ensure_broker_objects(lab_dir, info)
            break
        except BrokerUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    for code in topology.codes:
        lab_dir.site_dir(code).mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:  # the volumes are root's when docker makes them: the sites' user gets them
        uid, gid = int(os.environ.get("SMSLAB_UID", "1000")), int(os.environ.get("SMSLAB_GID", "1000"))
        for root, dirs, files in os.walk(lab_dir.path):
            for name in [root, *(os.path.join(root, d) for d in dirs), *(os.path.join(root, f) for f in files)]:
                os.chown(name, uid, gid)
    if args.json:
        emit_json({"lab": info.lab_id, "sites": topology.depth_order()})
    else:
        say(f"lab {info.lab_id}: {len(topology.sites)} sites, broker objects declared in {lab_dir.path}")
    return 0


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    text = "write the docker compose file of a topology (one service per site, a broker, tools, recovery)"
    s: argparse.ArgumentParser = sub.add_parser("compose", parents=[common], help=text, description=text)
    s.set_defaults(handler=cmd_compose)
    s.add_argument("topology")
    s.add_argument("-o", "--output", metavar="FILE", help="write it there (default: standard output)")
    text = "(the compose lab's init service) write lab.json and declare the lab's broker objects"
    s = sub.add_parser("compose-init", parents=[common], help=text, description=text)
    s.set_defaults(handler=cmd_compose_init)
    s.add_argument("--topology", required=True)
    s.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the broker")
    s.add_argument("--json", action="store_true")
