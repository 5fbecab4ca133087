"""``smslab run``: scenarios end to end on the real broker, as a user runs them; each shipped
scenario passes; a failed expectation and an unknown verdict give their exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from broker import admin
from emulator.testing import wait_for
from tests.scenario_texts import IDLE_PARTITION, WRONG_EXPECTATION

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def run(scenario: Path, out: Path, url: str, *extra: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, SMSLAB_AMQP_URL=url)
    return subprocess.run([sys.executable, "-m", "emulator", "run", str(scenario), "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=out.parent, check=False)


def assert_run_dir(out: Path, seed: int) -> dict[str, object]:
    for name in ("scenario.yaml", "run.json", "schedule.json", "history.jsonl", "verdict.json", "report.html",
                 "log.txt", "topology.yaml"):
        assert (out / name).exists(), name
    meta: dict[str, object] = json.loads((out / "run.json").read_text())
    assert meta["seed"] == seed and f"--seed {seed}" in str(meta["replay"])
    lab = str(meta["lab"])
    assert admin.queue_depths(os.environ.get("SMSLAB_AMQP_URL", admin.DEFAULT_URL), lab, ["CEN"])["CEN"] == -1
    return meta


# Half a minute each on real processes: the slow suite (.ci/run runs it after the default run);
# the default run has every shipped scenario in the simulator (tests/unit/test_sim.py).
@pytest.mark.slow
@pytest.mark.parametrize("name", ["kb-failure-sms20", "kb-failure-hardened", "secondary-rebuilt", "central-recovered"])
def test_a_shipped_scenario_passes(name: str, tmp_path: Path, amqp_url: str) -> None:
    out = tmp_path / "run"
    done = run(REPO / "scenarios" / f"{name}.yaml", out, amqp_url)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "replay with: smslab run" in done.stdout
    meta = assert_run_dir(out, 1)
    assert all(e["ok"] for e in meta["expectations"])  # type: ignore[attr-defined, union-attr]
    assert json.loads((out / "verdict.json").read_text())["verdict"] == "valid"


@pytest.mark.slow
def test_the_two_minute_chaos_scenario_passes_and_keeps_its_schedule(tmp_path: Path, amqp_url: str) -> None:
    out = tmp_path / "run"
    done = run(REPO / "scenarios" / "chaos-2min.yaml", out, amqp_url, "--seed", "7")
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert_run_dir(out, 7)
    schedule = json.loads((out / "schedule.json").read_text())
    assert len(schedule) >= 10
    events = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    kinds = {e["kind"] for e in events}
    assert {"fault_on", "fault_off", "process"} <= kinds
    verdict = json.loads((out / "verdict.json").read_text())
    assert verdict["verdict"] == "valid", verdict["violations"][:5]


@pytest.mark.slow  # a real lab for ten seconds; the same in the simulator: tests/unit/test_sim.py
def test_a_failed_expectation_is_named_and_exits_1(tmp_path: Path, amqp_url: str) -> None:
    scenario = tmp_path / "wrong.yaml"
    scenario.write_text(WRONG_EXPECTATION)
    out = tmp_path / "run"
    done = run(scenario, out, amqp_url)
    assert done.returncode == 1, done.stdout[-3000:]
    assert "FAILED: step 2: expect check invalid" in done.stdout
    meta = assert_run_dir(out, 1)
    assert [e["ok"] for e in meta["expectations"]] == [False, True]  # type: ignore[attr-defined, union-attr]


@pytest.mark.slow  # a real lab for ten seconds; the same in the simulator: tests/unit/test_sim.py
def test_an_unknown_final_verdict_exits_2(tmp_path: Path, amqp_url: str) -> None:
    scenario = tmp_path / "idle.yaml"
    scenario.write_text(IDLE_PARTITION)
    out = tmp_path / "run"
    done = run(scenario, out, amqp_url)
    assert done.returncode == 2, done.stdout[-3000:]
    verdict = json.loads((out / "verdict.json").read_text())
    assert verdict["verdict"] == "unknown" and {v["kind"] for v in verdict["violations"]} == {"vacuous"}


def test_a_bad_scenario_is_refused_before_anything_starts(tmp_path: Path, amqp_url: str) -> None:
    scenario = tmp_path / "bad.yaml"
    scenario.write_text(f"scenario: bad\ntopology: {REPO / 'examples' / 'lab.yaml'}\nsteps:\n  - kill: X99\n")
    out = tmp_path / "run"
    done = run(scenario, out, amqp_url)
    assert done.returncode == 2 and "bad.yaml:4:" in done.stderr and "unknown site X99" in done.stderr
    assert not out.exists()


LONG = """
scenario: long
topology:
  lab: long
  sites:
    - {code: CEN, type: central, clients: 0}
    - {code: P01, type: primary, parent: CEN}
steps:
  - wait: 600
"""


def test_sigterm_brings_the_lab_down_and_keeps_the_run(tmp_path: Path, amqp_url: str) -> None:
    """A CI timeout (SIGTERM) in the middle of a run ends it as Ctrl-C does: the lab down, its
    broker objects gone, no site left running, the run directory written."""
    scenario = tmp_path / "long.yaml"
    scenario.write_text(LONG)
    out = tmp_path / "run"
    env = dict(os.environ, SMSLAB_AMQP_URL=amqp_url)
    proc = subprocess.Popen([sys.executable, "-m", "emulator", "run", str(scenario), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    try:
        lab_json = out / "lab" / "lab.json"
        wait_for("the run's first step", lambda: "step 1/1" in ((out / "log.txt").read_text()
                                                                 if (out / "log.txt").exists() else ""),
                 timeout=120)
        lab = json.loads(lab_json.read_text())["lab_id"]
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, output[-3000:]
    assert "interrupted" in json.loads((out / "run.json").read_text())["error"]
    assert admin.queue_depths(amqp_url, lab, ["CEN", "P01"]) == {"CEN": -1, "P01": -1, "dead": -1}
    alive = subprocess.run(["pgrep", "-f", str(out / "lab")], capture_output=True, text=True, check=False).stdout
    assert alive.strip() == "", alive


@pytest.mark.parametrize("close_after", ["scenario long", "step 1/1"], ids=["while-up", "while-silent"])
def test_a_closed_stdout_brings_the_lab_down_as_sigterm_does(close_after: str, tmp_path: Path, amqp_url: str) -> None:
    """``smslab run X | head``: the reader goes away while the lab comes up (the run stops at
    the next line it prints) or during a step that prints nothing (the run notices the pipe
    closed): the run ends as on SIGTERM, its broker queues and users gone, no process left."""
    from emulator import identities
    from emulator.lab import LabDir

    scenario = tmp_path / "long.yaml"
    scenario.write_text(LONG)
    out = tmp_path / "run"
    env = dict(os.environ, SMSLAB_AMQP_URL=amqp_url)
    proc = subprocess.Popen([sys.executable, "-m", "emulator", "run", str(scenario), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    assert proc.stdout is not None and proc.stderr is not None
    passed = False
    try:
        while close_after.encode() not in proc.stdout.readline():
            assert proc.poll() is None, "the run ended before the line the test waits for"
        if close_after == "step 1/1":  # the lab is up with its broker users: the checks below are not vacuous
            up = LabDir(out / "lab").load()
            users, _how = identities.find(up)
            assert users is None or set(identities.users_of(up)) <= set(users.list())
        proc.stdout.close()  # `head` has what it wanted and exits
        code = proc.wait(timeout=60)
        stderr = proc.stderr.read().decode()
        assert code == 1, stderr[-3000:]
        assert "Traceback" not in stderr, stderr[-3000:]
        assert "interrupted" in json.loads((out / "run.json").read_text())["error"]
        lab_dir = LabDir(out / "lab")
        info = lab_dir.load()
        assert admin.queue_depths(amqp_url, info.lab_id, ["CEN", "P01"]) == {"CEN": -1, "P01": -1, "dead": -1}
        users, _how = identities.find(info)
        if users is not None and info.identities == "per-site":  # the broker users made for its sites
            assert not set(identities.users_of(info)) & set(users.list())
        assert [c for c in ("CEN", "P01") if lab_dir.pid(c)] == []
        assert lab_dir.zygote_pid() is None and lab_dir.daemon_pid() is None
        alive = subprocess.run(["pgrep", "-f", str(out / "lab")], capture_output=True, text=True, check=False).stdout
        assert alive.strip() == "", alive
        passed = True
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if not passed and (out / "lab" / "lab.json").exists():  # what a failed run left on the shared broker
            subprocess.run([sys.executable, "-m", "emulator", "--lab", str(out / "lab"), "down"], env=env,
                           capture_output=True, timeout=120, check=False)



def test_up_foreground_into_a_closed_pipe_brings_the_lab_down(tmp_path: Path, amqp_url: str) -> None:
    """``smslab up --foreground | head``: the reader gone ends it as Ctrl-C does, the lab down."""
    topology = tmp_path / "two.yaml"
    topology.write_text("lab: fg\nsites:\n  - {code: CEN, type: central, clients: 0}\n"
                        "  - {code: P01, type: primary, parent: CEN}\n")
    lab = tmp_path / "lab"
    env = dict(os.environ, SMSLAB_AMQP_URL=amqp_url)
    proc = subprocess.Popen([sys.executable, "-m", "emulator", "--lab", str(lab), "up", str(topology), "--foreground"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    assert proc.stdout is not None and proc.stderr is not None
    lab_id = None
    try:
        while b"staying attached" not in proc.stdout.readline():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        lab_id = json.loads((lab / "lab.json").read_text())["lab_id"]
        proc.stdout.close()
        proc.wait(timeout=60)
        stderr = proc.stderr.read().decode()
        assert "Traceback" not in stderr, stderr[-3000:]
        assert not lab.exists()
        assert admin.queue_depths(amqp_url, lab_id, ["CEN", "P01"]) == {"CEN": -1, "P01": -1, "dead": -1}
        alive = subprocess.run(["pgrep", "-f", str(lab)], capture_output=True, text=True, check=False).stdout
        assert alive.strip() == "", alive
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if (lab / "lab.json").exists():  # what a failed test left on the shared broker
            subprocess.run([sys.executable, "-m", "emulator", "--lab", str(lab), "down"], env=env,
                           capture_output=True, timeout=120, check=False)
