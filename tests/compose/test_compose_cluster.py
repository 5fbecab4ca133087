"""The compose file's ``cluster`` profile (issue 12): three broker containers clustered as they
boot, the lab on them with quorum queues converges valid, and a broker container killed under
traffic loses nothing. Everything is torn down afterwards: no container, network or volume is
left. Judged by the checker in the tools container and by the brokers' own listings."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator

import pytest

from broker.local import free_ports
from emulator.compose import CLUSTER_NODES, CLUSTER_URLS
from tests.compose.test_compose import RABBITMQ_IMAGE, Compose, compose_commands, images  # noqa: F401

pytestmark = [pytest.mark.compose, pytest.mark.integration]


@pytest.fixture(scope="module")
def cluster_lab(images: None) -> Iterator[Compose]:  # noqa: F811
    commands = compose_commands()
    if not commands:
        pytest.fail("neither docker compose nor docker-compose is installed")
    amqp, mgmt = free_ports(2)
    project = f"smslabtestcluster{os.getpid()}"
    env = dict(os.environ, SMSLAB_RABBITMQ_IMAGE=RABBITMQ_IMAGE, SMSLAB_AMQP_PORT=str(amqp),
               SMSLAB_MANAGEMENT_PORT=str(mgmt), SMSLAB_LAB_ID=f"compose-cluster-{os.getpid()}",
               SMSLAB_AMQP_URLS=CLUSTER_URLS, SMSLAB_TOPOLOGY="./examples/lab-quorum.yaml")
    lab = Compose([*commands[0], "--profile", "cluster"], project, env)
    try:
        lab("up", "-d", timeout=600)
        yield lab
    finally:
        lab("down", "-v", "--remove-orphans", check=False)
        left = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={project}"],
                              capture_output=True, text=True, check=False).stdout.strip()
        volumes = subprocess.run(["docker", "volume", "ls", "-q", "--filter", f"name={project}"],
                                 capture_output=True, text=True, check=False).stdout.strip()
        assert not left and not volumes, f"left behind: containers {left!r}, volumes {volumes!r}"


def ctl_json(lab: Compose, node: str, *args: str) -> object:
    return json.loads(lab("exec", "-T", node, "rabbitmqctl", *args, "--formatter", "json").stdout)


def test_the_cluster_profile_runs_the_lab_on_three_clustered_broker_containers(cluster_lab: Compose) -> None:
    lab = cluster_lab
    report = lab.converge(timeout=180)
    assert report["verdict"] == "valid", report

    status = ctl_json(lab, "rabbitmq-3", "cluster_status")
    assert isinstance(status, dict)
    assert sorted(status["running_nodes"]) == sorted(f"rabbit@{host}" for host in CLUSTER_NODES)
    queues = ctl_json(lab, "rabbitmq", "list_queues", "name", "type", "members")
    assert isinstance(queues, list)
    ours = [q for q in queues if q["name"].startswith("smslab.compose-cluster-")]
    assert ours and {q["type"] for q in ours} == {"quorum"}
    assert all(len(q["members"]) == 3 for q in ours), ours  # declared once every node was there

    snap = json.loads(lab.smslab("status", "--json").stdout)
    assert [s["state"] for s in snap["sites"]] == ["active"] * 5
    on = {s["broker_node"] for s in snap["sites"]}
    assert on <= {f"{host}:5672" for host in CLUSTER_NODES} and len(on) > 1, on  # spread over the nodes

    # A broker container killed under traffic: its sites fail over, nothing is lost or applied twice.
    lab.resume_workload()
    lab("kill", "-s", "KILL", "rabbitmq-2")
    report = lab.converge(timeout=240)
    assert report["verdict"] == "valid", report
    lab("start", "rabbitmq-2")
