"""The compose lab on a real Docker engine (issue 9): the checked-in docker-compose.yml brings
the 5-site lab up and converged, a site container killed and restarted loses nothing, backup,
restore without recovery and the recovery service work end to end, the broker container
restarted under load loses nothing; the testcontainers broker and the container default of
``smslab up``. Everything is torn down afterwards: no container, network or volume is left.

The images come from ``scripts/build-local-images.sh`` (a local Debian base, no registry).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.local import free_ports

pytestmark = [pytest.mark.compose, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
RABBITMQ_IMAGE = os.environ.get("SMSLAB_RABBITMQ_IMAGE", "smslab/rabbitmq:3")


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1")


def _docker_ready() -> str | None:
    if shutil.which("docker") is None:
        return "docker is not installed (scripts/build-local-images.sh installs it)"
    done = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60, check=False)
    return None if done.returncode == 0 else f"no Docker engine answers: {done.stderr.strip()[:200]}"


@pytest.fixture(scope="session")
def images() -> None:
    """The local images, built (or found up to date) once per session."""
    if shutil.which("docker") is None and os.geteuid() != 0 and not _in_ci():
        pytest.skip("no docker here, and building the images needs root")
    done = subprocess.run(["bash", str(REPO / "scripts" / "build-local-images.sh")], capture_output=True,
                          text=True, timeout=1800, check=False)
    if done.returncode != 0:
        message = f"the local images could not be built: {done.stderr[-1500:] or done.stdout[-1500:]}"
        if _in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    why = _docker_ready()
    if why:
        pytest.fail(why) if _in_ci() else pytest.skip(why)


def compose_commands() -> list[list[str]]:
    out = []
    if subprocess.run(["docker", "compose", "version"], capture_output=True, check=False).returncode == 0:
        out.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        out.append(["docker-compose"])
    return out


class Compose:
    def __init__(self, command: list[str], project: str, env: dict[str, str],
                 file: Path = REPO / "docker-compose.yml") -> None:
        self.command = command
        self.project = project
        self.env = env
        self.file = file

    def __call__(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([*self.command, "-p", self.project, "-f", str(self.file), *args],
                              capture_output=True, text=True, timeout=timeout, env=self.env, cwd=self.file.parent,
                              check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(self.command)} {' '.join(args)}: {done.returncode}\n"
                                 f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return done

    def smslab(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return self("exec", "-T", "tools", "smslab", *args, check=check, timeout=timeout)

    def resume_workload(self, timeout: float = 180) -> None:
        """Resume the workload, retried until the broker answers again (a container restart does not wait)."""
        deadline = time.monotonic() + timeout
        while (done := self.smslab("workload", "resume", check=False)).returncode != 0:
            assert time.monotonic() < deadline, f"no broker {timeout}s after the restart: {done.stderr[-1500:]}"
            time.sleep(1)

    def site(self, code: str) -> dict[str, Any]:
        site: dict[str, Any] = next(s for s in json.loads(self.smslab("status", "--json").stdout)["sites"]
                                    if s["code"] == code)
        return site

    def wait_state(self, code: str, state: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while (now := self.site(code)["state"]) != state:
            assert time.monotonic() < deadline, f"{code} is {now}, not {state}, after {timeout}s"
            time.sleep(0.5)

    def traffic(self, code: str, transactions: int = 5, timeout: float = 60) -> None:
        """Wait until ``code`` has made ``transactions`` more transactions: load is in flight."""
        start = self.site(code)["txn_id"]
        deadline = time.monotonic() + timeout
        while self.site(code)["txn_id"] < start + transactions:
            assert time.monotonic() < deadline, f"{code} made no {transactions} transactions in {timeout}s"
            time.sleep(0.5)

    def converge(self, timeout: float = 120) -> dict[str, object]:
        done = self.smslab("wait-converged", "--timeout", str(timeout), "--json", check=False, timeout=timeout + 60)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
        report: dict[str, object] = json.loads(done.stdout)
        return report


def _up(command: list[str], tag: str, file: Path = REPO / "docker-compose.yml") -> Iterator[Compose]:
    amqp, mgmt = free_ports(2)
    project = f"smslabtest{tag}{os.getpid()}"
    env = dict(os.environ, SMSLAB_RABBITMQ_IMAGE=RABBITMQ_IMAGE, SMSLAB_AMQP_PORT=str(amqp),
               SMSLAB_MANAGEMENT_PORT=str(mgmt), SMSLAB_LAB_ID=f"compose-{tag}-{os.getpid()}")
    lab = Compose(command, project, env, file)
    try:
        started = time.monotonic()
        lab("up", "-d")
        lab.converge()
        print(f"\n{' '.join(command)}: up and converged in {time.monotonic() - started:.1f}s")
        yield lab
    finally:
        lab("down", "-v", "--remove-orphans", check=False)
        left = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={project}"],
                              capture_output=True, text=True, check=False).stdout.strip()
        volumes = subprocess.run(["docker", "volume", "ls", "-q", "--filter", f"name={project}"],
                                 capture_output=True, text=True, check=False).stdout.strip()
        assert not left and not volumes, f"left behind: containers {left!r}, volumes {volumes!r}"


@pytest.fixture(scope="module")
def lab(images: None) -> Iterator[Compose]:
    commands = compose_commands()
    if not commands:
        pytest.fail("neither docker compose nor docker-compose is installed")
    yield from _up(commands[0], "v2" if commands[0] == ["docker", "compose"] else "v1")


@pytest.mark.parametrize("command", compose_commands(), ids=" ".join)
def test_the_compose_file_is_valid_for_each_compose(command: list[str]) -> None:
    env = dict(os.environ, SMSLAB_RABBITMQ_IMAGE=RABBITMQ_IMAGE)
    done = subprocess.run([*command, "-f", str(REPO / "docker-compose.yml"), "config", "-q"], capture_output=True,
                          text=True, env=env, cwd=REPO, check=False)
    assert done.returncode == 0, done.stderr


def test_up_brings_the_five_sites_to_active_and_valid(lab: Compose) -> None:
    snap = json.loads(lab.smslab("status", "--json").stdout)
    assert [s["state"] for s in snap["sites"]] == ["active"] * 5 and snap["broker_kind"] == "compose"
    assert all(link["health"] == "active" for link in snap["links"])
    assert lab.converge()["verdict"] == "valid"


def test_a_site_container_killed_and_restarted_loses_nothing(lab: Compose) -> None:
    lab.smslab("workload", "resume")
    lab.traffic("P01")
    lab("kill", "-s", "KILL", "p01")
    lab.wait_state("P01", "down")
    lab("start", "p01")
    report = lab.converge()
    assert report["verdict"] == "valid"  # the history's invariants too: nothing lost, nothing twice
    starts = [json.loads(line) for line in lab.smslab("history", "--kind", "start", "--json").stdout.splitlines()]
    runs = {e["run"] for e in starts if e["site"] == "P01"}
    assert len(runs) >= 2, "P01's process started again after the kill"


def test_backup_restore_without_recovery_and_the_recovery_service(lab: Compose) -> None:
    lab.smslab("workload", "resume")
    backup_id = lab.smslab("backup", "P01").stdout.strip()
    lab.traffic("P01", 20)  # P01's counters move on past the backup
    lab("kill", "-s", "KILL", "p01")
    lab.wait_state("P01", "down")
    lab.smslab("restore", "P01", backup_id)
    lab("start", "p01")
    done = lab.smslab("check", "--json", check=False)
    deadline = time.monotonic() + 60
    while json.loads(done.stdout)["verdict"] != "invalid":
        assert time.monotonic() < deadline, done.stdout[-2000:]
        time.sleep(1)
        done = lab.smslab("check", "--json", check=False)
    assert "link" in {v["kind"] for v in json.loads(done.stdout)["violations"]}
    lab("stop", "p01")
    lab.wait_state("P01", "down")  # the recovery container takes the site over
    out = lab("run", "--rm", "-T", "recovery", "P01", "--backup", backup_id, timeout=600).stdout
    assert "complete" in out, out
    lab("start", "p01")
    assert lab.converge()["verdict"] == "valid"
    assert lab.site("P01")["incarnation"] == 2  # the recovery's, kept by the restarted container


def test_a_fault_from_the_tools_service(lab: Compose) -> None:
    lab.smslab("workload", "resume")
    out = lab.smslab("fault", "partition", "P02", "CEN", "--for", "3").stdout
    assert "is on" in out
    out = lab.smslab("fault", "disconnect", "S02", "--for", "2").stdout
    assert "is on" in out
    deadline = time.monotonic() + 40
    while (on := json.loads(lab.smslab("faults", "--json").stdout)) != []:
        assert time.monotonic() < deadline, f"{on}\n{lab('logs', 'tools').stdout[-3000:]}"
        time.sleep(1)
    assert lab.converge()["verdict"] == "valid"


def test_the_broker_container_restarted_under_load_loses_nothing(lab: Compose) -> None:
    lab.smslab("workload", "resume")
    lab.traffic("CEN", 1)
    lab.traffic("P02")
    lab("restart", "rabbitmq", timeout=300)
    lab.resume_workload()
    lab.traffic("P02")  # the sites are back on the broker and working
    report = lab.converge(timeout=180)
    assert report["verdict"] == "valid"


def test_a_compose_file_made_for_another_topology_brings_that_lab_up(images: None, tmp_path: Path) -> None:
    """``smslab compose TOPOLOGY -o FILE`` for a topology of other codes, in hardened mode."""
    topo = tmp_path / "gen.yaml"
    topo.write_text("lab: gen\nmode: hardened\nsites:\n  - {code: HQ1, type: central, clients: 0}\n"
                    "  - {code: PA1, type: primary, parent: HQ1}\n  - {code: SA1, type: secondary, parent: PA1}\n")
    out = tmp_path / "docker-compose.yml"
    subprocess.run([sys.executable, "-m", "emulator", "compose", str(topo), "-o", str(out)], check=True,
                   capture_output=True, cwd=REPO)
    for lab in _up(compose_commands()[0], "gen", out):
        snap = json.loads(lab.smslab("status", "--json").stdout)
        assert [(s["code"], s["state"]) for s in snap["sites"]] == [("HQ1", "active"), ("PA1", "active"),
                                                                    ("SA1", "active")]
        assert snap["mode"] == "hardened"


def test_the_other_compose_brings_the_lab_up_too(images: None) -> None:
    commands = compose_commands()
    if len(commands) < 2:
        pytest.skip("only one compose is installed")
    for lab in _up(commands[1], "other"):
        assert lab.converge()["verdict"] == "valid"


# -- brokers from containers -------------------------------------------------------------------------


def test_a_small_lab_on_the_testcontainers_broker(images: None, pytester: pytest.Pytester,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The plugin's amqp_url with no broker on the host: a RabbitMQ container, stopped after."""
    monkeypatch.delenv("SMSLAB_AMQP_URL", raising=False)
    monkeypatch.setenv("SMSLAB_DEFAULT_AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2F")
    monkeypatch.setenv("SMSLAB_RABBITMQ_IMAGE", RABBITMQ_IMAGE)
    before = _containers(RABBITMQ_IMAGE)
    pytester.makepyfile(test_user=f'''
import subprocess, urllib.parse

def test_two_sites(lab_factory, amqp_url):
    assert "127.0.0.1:1/" not in amqp_url
    port = urllib.parse.urlsplit(amqp_url).port
    running = subprocess.run(["docker", "ps", "-q", "--filter", "ancestor={RABBITMQ_IMAGE}",
                              "--filter", f"publish={{port}}"], capture_output=True, text=True).stdout.split()
    assert len(running) == 1, "the session's broker is a container of {RABBITMQ_IMAGE}"
    lab = lab_factory({{"lab": "tc", "sites": [{{"code": "CEN", "type": "central", "clients": 0}},
                                              {{"code": "P01", "type": "primary", "parent": "CEN"}}]}})
    assert lab.wait_converged(timeout=60).valid
''')
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=600)
    result.assert_outcomes(passed=1)
    assert _containers(RABBITMQ_IMAGE) == before, "the session's broker container was stopped"


def test_up_with_no_broker_and_no_rabbitmq_installed_starts_a_container(images: None, tmp_path: Path) -> None:
    env = dict(os.environ, SMSLAB_DEFAULT_AMQP_URL="amqp://guest:guest@127.0.0.1:1/%2F",
               SMSLAB_RABBITMQ_SERVER="none", SMSLAB_RABBITMQ_IMAGE=RABBITMQ_IMAGE)
    env.pop("SMSLAB_AMQP_URL", None)
    topo = tmp_path / "t.yaml"
    topo.write_text("lab: ctr\nsites:\n  - {code: CEN, type: central, clients: 1}\n  - {code: P01, type: primary,"
                    " parent: CEN}\n")
    before = _containers(RABBITMQ_IMAGE)

    def smslab(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "emulator", "--lab", str(tmp_path / "lab"), *args],
                              capture_output=True, text=True, env=env, timeout=600, check=False)

    up = smslab("up", str(topo))
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "starting a RabbitMQ container" in up.stdout
        status = json.loads(smslab("status", "--json").stdout)
        assert status["broker_kind"] == "container"
        assert smslab("wait-converged", "--timeout", "60").returncode == 0
    finally:
        down = smslab("down")
    assert down.returncode == 0 and "stopped the lab's RabbitMQ container" in down.stdout, down.stdout
    assert _containers(RABBITMQ_IMAGE) == before


def _containers(image: str) -> list[str]:
    return subprocess.run(["docker", "ps", "-q", "--filter", f"ancestor={image}"], capture_output=True, text=True,
                          check=False).stdout.split()
