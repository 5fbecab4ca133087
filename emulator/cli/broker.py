"""``smslab broker cluster up|down|status``: a local RabbitMQ cluster for a lab on several nodes.

``up`` starts N private nodes on this host (``broker.local.LocalCluster``: own node names, ports
and data folders under ``--dir``, one Erlang cookie), clusters them and prints their AMQP URLs
comma-separated on its last line, ready for ``smslab --amqp URLS up TOPOLOGY`` (with
``queue_type: quorum`` in the topology). ``down`` stops them and removes the folder.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path
from typing import Any

from broker import urls
from emulator.cli.common import add_json, emit_json, progress_for
from emulator.errors import ConfigError, LabError
from emulator.lab import LabDir

DEFAULT_DIR = ".smslab-cluster"
CLUSTER_FILE = "cluster.json"


def _cluster_name(base: Path) -> str:
    # Node names are host-wide (epmd): one per folder, so two clusters of two folders never meet.
    return "cl" + hashlib.blake2b(str(base.resolve()).encode(), digest_size=4).hexdigest()


def cmd_up(args: argparse.Namespace, _lab_dir: LabDir) -> int:
    from broker.local import LocalCluster

    tell = progress_for(args)
    base = Path(args.dir).resolve()
    if (base / CLUSTER_FILE).exists():
        cluster = LocalCluster.load(base)
        if cluster.size != args.nodes:
            raise ConfigError(f"{base} holds a cluster of {cluster.size} nodes, not {args.nodes}",
                              hint=f"smslab broker cluster down --dir {base} first, or use another --dir")
        tell(f"starting the {cluster.size} nodes of the cluster in {base} again")
    else:
        if base.exists() and any(base.iterdir()):
            raise ConfigError(f"{base} exists and is not a cluster's folder",
                              hint="choose an empty or new --dir")
        cluster = LocalCluster(base, args.nodes, name=_cluster_name(base), listen=args.listen)
        tell(f"starting {args.nodes} RabbitMQ nodes in {base} and clustering them")
    cluster.start(timeout=args.timeout)
    if args.json:
        emit_json(_describe(cluster))
        return 0
    for node in cluster.nodes:
        tell(f"  {node.node_name}: amqp {urls.where(node.amqp_url)}, pid {node.pid}, data {node.base_dir}")
    tell(f"cluster running ({', '.join(cluster.running_nodes())}); stop it with: "
         f"smslab broker cluster down --dir {base}")
    print(urls.join(cluster.urls), flush=True)
    return 0


def cmd_down(args: argparse.Namespace, _lab_dir: LabDir) -> int:
    from broker.local import LocalCluster

    tell = progress_for(args)
    base = Path(args.dir).resolve()
    if not (base / CLUSTER_FILE).exists():
        tell(f"no local cluster in {base}: nothing to stop")
        return 0
    cluster = LocalCluster.load(base)
    tell(f"stopping the {cluster.size} nodes in {base}")
    cluster.stop(timeout=args.timeout, remove=True)
    tell(f"stopped; {base} removed")
    return 0


def cmd_status(args: argparse.Namespace, _lab_dir: LabDir) -> int:
    from broker.local import LocalCluster

    base = Path(args.dir).resolve()
    if not (base / CLUSTER_FILE).exists():
        raise LabError(f"no local cluster in {base}", hint="start one: smslab broker cluster up --dir DIR")
    cluster = LocalCluster.load(base)
    described = _describe(cluster)
    if args.json:
        emit_json(described)
        return 0
    for node in described["nodes"]:
        print(f"{node['node_name']}: {'running' if node['running'] else 'stopped'}, amqp {node['amqp']},"
              f" pid {node['pid'] or '-'}")
    print(described["urls"])
    return 0


def _describe(cluster: Any) -> dict[str, Any]:
    try:
        running = cluster.running_nodes()
    except Exception:  # noqa: BLE001 - no node answers: every node is shown stopped
        running = []
    return {"dir": str(cluster.base_dir), "urls": urls.join(cluster.urls),
            "nodes": [{"node_name": n.node_name, "amqp": urls.where(n.amqp_url), "pid": n.pid,
                       "running": n.node_name in running, "dir": str(n.base_dir)} for n in cluster.nodes]}


def _positive(value: str) -> int:
    n = int(value)
    if not 1 <= n <= 9:
        raise argparse.ArgumentTypeError(f"{value}: use 1 to 9 nodes")
    return n


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    text = "brokers for labs: a local RabbitMQ cluster"
    s: argparse.ArgumentParser = sub.add_parser("broker", parents=[common], help=text, description=text)
    kinds = s.add_subparsers(dest="kind", metavar="KIND")
    kinds.required = True
    c: argparse.ArgumentParser = kinds.add_parser(
        "cluster", parents=[common], help="RabbitMQ nodes on this host, clustered",
        description="start, stop or show a cluster of private RabbitMQ nodes on this host")
    verbs = c.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True
    for verb, handler, help_text in (
        ("up", cmd_up, "start the nodes, cluster them, print their AMQP URLs comma-separated (last line)"),
        ("down", cmd_down, "stop the nodes and remove their folder"),
        ("status", cmd_status, "the nodes, whether they run, their URLs"),
    ):
        v: argparse.ArgumentParser = verbs.add_parser(verb, parents=[common], help=help_text, description=help_text)
        v.set_defaults(handler=handler)
        v.add_argument("--dir", default=DEFAULT_DIR, help=f"the cluster's folder (default {DEFAULT_DIR})")
        add_json(v)
        if verb == "up":
            v.add_argument("--nodes", type=_positive, default=3, help="how many nodes (default 3)")
            v.add_argument("--listen", default="127.0.0.1", metavar="ADDRESS",
                           help="where AMQP listens (default 127.0.0.1); 0.0.0.0 lets sites in network "
                                "namespaces of this host reach the nodes, with a user of the cluster's own")
        if verb != "status":
            v.add_argument("--timeout", type=float, default=180.0, help="seconds to wait (default 180)")
