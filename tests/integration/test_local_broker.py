"""Private RabbitMQ nodes on this host (broker/local.py): one node's whole life on its own
ports, a start that cannot succeed, and a 3-node cluster whose quorum queue keeps a message
through a kill -9.

Needs the RabbitMQ server installed, not a running broker. Without it the tests are skipped
with the reason, except under CI=true, where they fail. The shared broker on 5672 is never
touched.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pytest

from broker.local import LocalCluster, LocalNode, NodeInfo, find_server, free_port, management_get
from emulator.errors import BrokerUnavailable, ConfigError, LabError, SmslabError
from emulator.testing import wait_for

pytestmark = pytest.mark.integration

# Every node of this session carries this in its name, so one pgrep finds any node left behind.
SESSION = f"t{secrets.token_hex(3)}"
QUEUE = "smslab.local-broker.durable"
QUORUM_QUEUE = "smslab.local-broker.quorum"


def pgrep(pattern: str) -> list[str]:
    """The processes whose command line contains ``pattern`` (pid and command line)."""
    done = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True, check=False)
    return done.stdout.splitlines()


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def connect(url: str) -> Any:
    params = pika.URLParameters(url)
    params.connection_attempts = 1
    params.socket_timeout = 5
    params.blocked_connection_timeout = 10
    return pika.BlockingConnection(params)


def publish(url: str, queue: str, bodies: Sequence[bytes], arguments: dict[str, Any] | None = None) -> None:
    """Declare a durable queue and publish persistent messages to it, each one confirmed."""
    conn = connect(url)
    try:
        channel = conn.channel()
        channel.confirm_delivery()
        channel.queue_declare(queue, durable=True, arguments=arguments)
        for body in bodies:
            channel.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=2), mandatory=True)
    finally:
        conn.close()


def get_one(url: str, queue: str) -> tuple[bytes, int | None] | None:
    """One message (body, delivery mode) taken from ``queue``, or None if it is empty."""
    conn = connect(url)
    try:
        method, properties, body = conn.channel().basic_get(queue, auto_ack=True)
        return None if method is None else (body, properties.delivery_mode)
    finally:
        conn.close()


def ready_messages(url: str, queue: str) -> int | None:
    """The queue's ready messages as ``url``'s node reports them; None while it cannot answer."""
    try:
        conn = connect(url)
    except (pika.exceptions.AMQPError, OSError):
        return None
    try:
        return int(conn.channel().queue_declare(queue, passive=True).method.message_count)
    except (pika.exceptions.AMQPError, OSError):
        return None
    finally:
        try:
            if conn.is_open:
                conn.close()
        except (pika.exceptions.AMQPError, OSError):
            pass


def timing(what: str, seconds: float) -> None:
    print(f"\nTIMING {what}: {seconds:.1f}s")


def stop_for_sure(node: LocalNode) -> None:
    try:
        node.stop(timeout=30)
    except SmslabError:
        node.kill()


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def rabbitmq_server() -> Path:
    server = find_server()
    if server is None:
        reason = "RabbitMQ is not installed here (find_server() found no rabbitmq-server script)"
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"{reason}, and CI=true requires it: install rabbitmq-server on the CI machine")
        pytest.skip(reason)
    return server


@pytest.fixture(scope="session", autouse=True)
def no_node_outlives_the_session() -> Iterator[None]:
    yield
    left = pgrep(f"smslab-{SESSION}")
    for line in left:  # kill them so the machine is clean, then say so
        try:
            os.kill(int(line.split()[0]), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    assert not left, "private RabbitMQ nodes outlived the test session:\n" + "\n".join(left)


@pytest.fixture
def solo(tmp_path: Path, rabbitmq_server: Path) -> Iterator[LocalNode]:
    node = LocalNode(tmp_path / "solo", name=f"{SESSION}-solo", management_port=free_port(),
                     server=rabbitmq_server)
    try:
        yield node
    finally:
        stop_for_sure(node)


@pytest.fixture
def cluster(tmp_path: Path, rabbitmq_server: Path) -> Iterator[LocalCluster]:
    handle = LocalCluster(tmp_path / "cluster", 3, name=f"{SESSION}-qq", server=rabbitmq_server)
    try:
        yield handle
    finally:
        try:
            handle.stop(timeout=30)
        except SmslabError:
            for node in handle.nodes:
                node.kill()


# -- one node --------------------------------------------------------------------------------------


@pytest.mark.slow  # test_brokers.py starts and stops a private node in the default run
def test_a_private_node_runs_on_its_own_ports_survives_an_app_restart_and_stops(solo: LocalNode) -> None:
    began = time.monotonic()
    solo.start()
    timing("private node start (with management)", time.monotonic() - began)
    assert solo.is_running() and solo.pid is not None
    assert solo.amqp_url == f"amqp://guest:guest@127.0.0.1:{solo.amqp_port}/%2F"
    assert solo.node_name == f"smslab-{SESSION}-solo@localhost"

    # Its own listeners only: AMQP on 127.0.0.1, never 5672; distribution and HTTP on their ports.
    listeners = json.loads(solo.ctl("status", "--formatter", "json"))["listeners"]
    by_protocol = {entry["protocol"]: entry for entry in listeners}
    assert {p: e["port"] for p, e in by_protocol.items()} == {
        "amqp": solo.amqp_port, "clustering": solo.dist_port, "http": solo.management_port}
    assert by_protocol["amqp"]["interface"] == "127.0.0.1"
    assert 5672 not in {e["port"] for e in listeners}
    assert management_get(solo, "api/overview")["node"] == solo.node_name

    publish(solo.amqp_url, QUEUE, [b"first", b"kept"])
    assert get_one(solo.amqp_url, QUEUE) == (b"first", 2)

    # The broker-restart fault: the app stops (AMQP goes away), starts, the persistent message is kept.
    began = time.monotonic()
    solo.stop_app()
    assert not accepts(solo.amqp_port)
    assert solo.is_running()  # the VM stays
    solo.start_app()
    timing("stop_app + start_app", time.monotonic() - began)
    assert get_one(solo.amqp_url, QUEUE) == (b"kept", 2)

    # Another process (here: a second handle made from the folder alone) finds it and stops it.
    again = LocalNode.load(solo.base_dir)
    assert (again.node_name, again.amqp_port, again.dist_port, again.management_port, again.pid) == (
        solo.node_name, solo.amqp_port, solo.dist_port, solo.management_port, solo.pid)
    began = time.monotonic()
    again.stop()
    timing("private node stop (with management)", time.monotonic() - began)
    assert not solo.is_running() and not again.is_running()
    assert pgrep(solo.node_name) == []
    assert not accepts(solo.amqp_port)
    assert solo.log_file.exists() and (solo.base_dir / "node.json").exists()  # the folder stays
    assert NodeInfo.load(solo.base_dir).pid is None  # what a later process reads: stopped


def test_a_node_that_cannot_boot_fails_fast_names_its_log_and_leaves_nothing(
        tmp_path: Path, rabbitmq_server: Path) -> None:
    node = LocalNode(tmp_path / "bad", name=f"{SESSION}-bad", extra_config=["no_such.setting = 1"],
                     server=rabbitmq_server)
    try:
        began = time.monotonic()
        with pytest.raises(BrokerUnavailable) as caught:
            node.start(timeout=60)
        assert time.monotonic() - began < 30, "a boot failure must not wait for the whole timeout"
        message = str(caught.value)
        assert "no_such.setting" in message
        assert str(node.startup_log) in message and str(node.log_file) in message
        assert caught.value.hint
        assert not node.is_running()
        assert pgrep(node.node_name) == []
    finally:
        stop_for_sure(node)


def test_ports_are_checked_before_anything_starts(tmp_path: Path, rabbitmq_server: Path) -> None:
    with pytest.raises(ConfigError, match="5672"):
        LocalNode(tmp_path / "std", name=f"{SESSION}-std", amqp_port=5672)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        node = LocalNode(tmp_path / "clash", name=f"{SESSION}-clash", amqp_port=port, server=rabbitmq_server)
        try:
            with pytest.raises(LabError, match=f"AMQP port {port} is already in use") as caught:
                node.start()
            assert caught.value.hint
        finally:
            stop_for_sure(node)
    assert pgrep(node.node_name) == []


# -- a cluster -------------------------------------------------------------------------------------


@pytest.mark.slow  # three nodes started and one killed: in the slow suite with the other cluster tests
def test_a_three_node_cluster_keeps_a_quorum_queue_message_through_a_kill_9(cluster: LocalCluster) -> None:
    began = time.monotonic()
    cluster.start()
    timing("3-node cluster start (start, join, all running)", time.monotonic() - began)
    status = cluster.cluster_status()
    assert sorted(status["running_nodes"]) == sorted(cluster.node_names)
    assert sorted(status["disk_nodes"]) == sorted(cluster.node_names)
    assert len(set(cluster.urls)) == 3

    # Declared through node 1, which leads the queue; the confirm means a majority has it.
    publish(cluster.urls[0], QUORUM_QUEUE, [b"survivor"], arguments={"x-queue-type": "quorum"})
    victim = cluster.node(1)
    cluster.kill_node(1)
    assert not victim.is_running()
    assert pgrep(victim.node_name) == []

    # Two of three remain, a majority: node 2 answers for the queue and still has the message.
    wait_for("node 2 to report the quorum queue's message after node 1's kill -9",
             lambda: ready_messages(cluster.urls[1], QUORUM_QUEUE) == 1, timeout=30)
    assert victim.node_name not in cluster.running_nodes()

    began = time.monotonic()
    cluster.restart_node(1)
    timing("restart of the killed node until the cluster lists it running", time.monotonic() - began)
    assert sorted(cluster.running_nodes()) == sorted(cluster.node_names)
    assert get_one(cluster.urls[2], QUORUM_QUEUE) == (b"survivor", 2)
