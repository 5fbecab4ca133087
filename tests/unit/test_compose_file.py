"""``smslab compose``: the checked-in docker-compose.yml is what it makes of examples/lab.yaml
(in the default run, so a change to emulator/compose.py that is not regenerated fails here, not
only in the compose suite), and what it makes of another topology: one service and one volume
per site, the broker healthy before init, init done before the sites, host ports that can be
changed, the recovery service under its profile, nothing compose 1.29 does not know.

Running the files on a real engine is tests/compose/test_compose.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]

TOPOLOGY = """\
lab: gen
sites:
  - {code: HQ1, type: central, clients: 0}
  - {code: PA1, type: primary, parent: HQ1}
  - {code: SA1, type: secondary, parent: PA1, clients: 2}
"""


def smslab_compose(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "emulator", "compose", *args], capture_output=True, text=True,
                          cwd=cwd, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=60, check=False)


def test_the_checked_in_compose_file_is_what_smslab_compose_makes() -> None:
    made = smslab_compose("examples/lab.yaml")
    assert made.returncode == 0, made.stderr
    assert made.stdout == (REPO / "docker-compose.yml").read_text(), \
        "docker-compose.yml is stale: smslab compose examples/lab.yaml > docker-compose.yml"


def test_a_compose_file_for_another_topology_has_a_service_and_a_volume_per_site(tmp_path: Path) -> None:
    (tmp_path / "topologies").mkdir()
    topo = tmp_path / "topologies" / "gen.yaml"
    topo.write_text(TOPOLOGY)
    out = tmp_path / "lab" / "docker-compose.yml"
    out.parent.mkdir()
    done = smslab_compose(str(topo), "-o", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    document = yaml.safe_load(out.read_text())

    assert set(document) == {"services", "volumes"}  # no version:, no name: (compose 1.29 reads it)
    services = document["services"]
    sites = {"hq1": "HQ1", "pa1": "PA1", "sa1": "SA1"}
    assert set(services) == {"rabbitmq", "rabbitmq-2", "rabbitmq-3", "init", *sites, "tools", "recovery"}
    for service, code in sites.items():
        spec = services[service]
        assert spec["command"] == ["python", "-m", "sites", "--lab", "/lab", "--site", code]
        assert spec["volumes"] == ["lab:/lab", f"site-{service}:/lab/sites/{code}"]
        assert spec["depends_on"] == {"init": {"condition": "service_completed_successfully"}}
        assert spec["restart"] == "on-failure"
    assert set(document["volumes"]) == {"rabbitmq", "rabbitmq-2", "rabbitmq-3", "lab", *(f"site-{s}" for s in sites)}

    broker = services["rabbitmq"]
    assert broker["image"] == "${SMSLAB_RABBITMQ_IMAGE:-rabbitmq:3-management}"
    assert broker["ports"] == ["${SMSLAB_AMQP_PORT:-5673}:5672", "${SMSLAB_MANAGEMENT_PORT:-15673}:15672"]
    assert broker["healthcheck"]["test"][:2] == ["CMD", "rabbitmq-diagnostics"]
    assert services["init"]["depends_on"] == {"rabbitmq": {"condition": "service_healthy"}}
    assert {"profiles" in services[name] for name in ("rabbitmq", "init", *sites, "tools")} == {False}
    assert services["recovery"]["profiles"] == ["recovery"]
    assert services["recovery"]["entrypoint"] == ["smslab", "recover", "--then-stop"]

    # The topology is mounted from where the compose file is: a path relative to its folder.
    mount = next(v for v in services["init"]["volumes"] if v.endswith(":/etc/smslab/topology.yaml:ro"))
    relative = mount.removeprefix("${SMSLAB_TOPOLOGY:-").split("}:")[0]
    assert relative.startswith(".") and (out.parent / relative).resolve() == topo.resolve()


def test_a_bad_topology_is_refused_with_its_line_and_no_file_is_written(tmp_path: Path) -> None:
    topo = tmp_path / "bad.yaml"
    topo.write_text("lab: bad\nsites:\n  - {code: CEN, type: centrl}\n")
    done = smslab_compose(str(topo), "-o", str(tmp_path / "out.yml"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{topo}:3" in done.stderr
    assert not (tmp_path / "out.yml").exists()
