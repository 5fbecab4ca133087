"""``smslab up`` with no broker given and none running on this host: a private RabbitMQ node of
the lab's own (the RabbitMQ installed here, on other ports), stopped by ``down``; with neither
a broker, RabbitMQ nor a Docker engine, an error naming every way to provide one."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from broker.local import find_server

pytestmark = pytest.mark.integration

TOPOLOGY = "lab: emb\nsites:\n  - {code: CEN, type: central, clients: 1}\n  - {code: P01, type: primary, parent: CEN}\n"
NOWHERE = "amqp://guest:guest@127.0.0.1:1/%2F"  # where "the broker of this host" is looked for: nothing


def smslab(lab: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "emulator", "--lab", str(lab), *args], capture_output=True,
                          text=True, env=env, timeout=300, check=False)


def no_broker_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, SMSLAB_DEFAULT_AMQP_URL=NOWHERE, **extra)
    env.pop("SMSLAB_AMQP_URL", None)
    return env


def test_up_with_no_broker_running_starts_a_private_node_and_down_stops_it(tmp_path: Path) -> None:
    if find_server() is None:
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail("CI: RabbitMQ is not installed", pytrace=False)
        pytest.skip("RabbitMQ is not installed here")
    topo = tmp_path / "t.yaml"
    topo.write_text(TOPOLOGY)
    lab = tmp_path / "lab"
    env = no_broker_env()
    up = smslab(lab, env, "up", str(topo))
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "starting a private RabbitMQ node" in up.stdout
        status = json.loads(smslab(lab, env, "status", "--json").stdout)
        assert status["broker_kind"] == "private" and ":5672" not in status["broker"]
        assert "private RabbitMQ node" in smslab(lab, env, "status").stdout
        done = smslab(lab, env, "wait-converged", "--timeout", "60")
        assert done.returncode == 0, done.stdout + done.stderr
        node = json.loads((lab / "broker" / "node.json").read_text())["node_name"]
    finally:
        down = smslab(lab, env, "down")
    assert down.returncode == 0 and "stopped the lab's private RabbitMQ node" in down.stdout, down.stdout
    beams = subprocess.run(["pgrep", "-f", node], capture_output=True, text=True, check=False).stdout.strip()
    assert beams == "" and not lab.exists()


def test_with_no_way_to_get_a_broker_up_says_each_way(tmp_path: Path) -> None:
    topo = tmp_path / "t.yaml"
    topo.write_text(TOPOLOGY)
    env = no_broker_env(SMSLAB_RABBITMQ_SERVER="none", DOCKER_HOST="unix:///nonexistent.sock")
    up = smslab(tmp_path / "lab", env, "up", str(topo))
    assert up.returncode == 2 and "Traceback" not in up.stderr
    for way in ("no broker for the lab", "nothing answers at", "no private node", "no RabbitMQ container",
                "rabbitmq-server -detached", "apt-get install rabbitmq-server", "start a Docker engine",
                "SMSLAB_RABBITMQ_IMAGE", "pass --amqp URL"):
        assert way in up.stderr, up.stderr
    assert not (tmp_path / "lab" / "lab.json").exists()


@pytest.mark.slow  # a private node started and stopped (16 s); test_up_with_no_broker_running... in the default run
def test_the_readme_first_command_with_nothing_on_localhost_starts_a_private_node(tmp_path: Path) -> None:
    """No override of where the local broker is looked for: in a fresh network namespace nothing
    answers on localhost:5672, so ``up`` takes the private node, ``down`` stops it, and no process
    of the lab is left in the namespace (but Erlang's epmd, which the node's VM starts when none runs)."""
    if find_server() is None or shutil.which("ip") is None or os.geteuid() != 0:
        why = "needs root, ip (iproute2) and RabbitMQ installed, for a fresh network namespace"
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"CI: {why}", pytrace=False)
        pytest.skip(why)
    netns = f"smslab-nobroker-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", netns, "ip", "link", "set", "lo", "up"], check=True)
        topo = tmp_path / "t.yaml"
        topo.write_text(TOPOLOGY)
        lab = tmp_path / "lab"
        env = dict(os.environ)
        for name in ("SMSLAB_AMQP_URL", "SMSLAB_DEFAULT_AMQP_URL", "SMSLAB_RABBITMQ_SERVER"):
            env.pop(name, None)

        def inside(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-m", "emulator", "--lab", str(lab),
                                   *args], capture_output=True, text=True, env=env, timeout=300, check=False)

        up = inside("up", str(topo))
        try:
            assert up.returncode == 0, up.stdout + up.stderr
            assert "starting a private RabbitMQ node" in up.stdout
            status = json.loads(inside("status", "--json").stdout)
            assert status["broker_kind"] == "private" and status["broker"].startswith("a private RabbitMQ node")
            done = inside("wait-converged", "--timeout", "60")
            assert done.returncode == 0, done.stdout + done.stderr
        finally:
            down = inside("down")
        assert down.returncode == 0 and "stopped the lab's private RabbitMQ node" in down.stdout, down.stdout
        assert not lab.exists()
    finally:
        left = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True,
                              check=False).stdout.split()
        commands = {pid: Path(f"/proc/{pid}/comm").read_text().strip() for pid in left
                    if Path(f"/proc/{pid}/comm").exists()}
        for pid in commands:
            os.kill(int(pid), 9)
        subprocess.run(["ip", "netns", "delete", netns], check=False)
    assert set(commands.values()) <= {"epmd"}, f"left in the namespace after down: {commands}"
