"""The simulator: every site's real runtime and store in one process on the memory broker and
a virtual clock. A run is a function of its seed; every harness verb means what it means on
real processes; a seed sweep finds a planted protocol bug; scenarios and topologies run from
the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from emulator import history, sim
from emulator.errors import ConfigError, LabError
from emulator.lab import LabDir
from emulator.scenario import load_scenario, parse_scenario
from emulator.topology import load_topology
from sites import runtime as site_runtime
from tests.scenario_texts import IDLE_PARTITION, WRONG_EXPECTATION

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "lab.yaml"


def quiet(_msg: str) -> None:
    pass


def events(lab_dir: LabDir) -> list[history.Event]:
    return history.load(lab_dir)  # merged first


def harness(lab_dir: LabDir, kind: str) -> list[history.Event]:
    return [e for e in events(lab_dir) if e.site == history.HARNESS and e.kind == kind]


def kb_failure(tmp_path: Path, seed: int, name: str) -> sim.RunResult:
    path = ROOT / "scenarios" / "kb-failure-sms20.yaml"
    return sim.simulate(load_scenario(path), seed=seed, run_dir=tmp_path / name, scenario_path=path, progress=quiet)


# -- one seed, one run -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["kb-failure-sms20", "kb-failure-hardened", "secondary-rebuilt",
                                  "central-recovered"])
def test_every_shipped_scenario_passes_in_the_simulator(tmp_path: Path, name: str) -> None:
    # the same files on real processes: tests/integration/test_scenarios.py (slow suite)
    path = ROOT / "scenarios" / f"{name}.yaml"
    result = sim.simulate(load_scenario(path), seed=1, run_dir=tmp_path / name, scenario_path=path, progress=quiet)
    assert result.exit_code == 0, (result.error, result.failed)
    assert all(o.ok for o in result.outcomes) and result.outcomes


def test_the_same_seed_gives_the_same_history_and_the_same_stores_byte_for_byte(tmp_path: Path) -> None:
    first, again = kb_failure(tmp_path, 3, "a"), kb_failure(tmp_path, 3, "b")
    kb_failure(tmp_path, 4, "c")
    assert first.exit_code == again.exit_code == 0, (first.error, first.failed)
    assert (tmp_path / "a" / "history.jsonl").read_bytes() == (tmp_path / "b" / "history.jsonl").read_bytes()
    topo = load_topology(DEMO)
    for code in topo.codes:
        for name in ("site.db", "clients.db"):
            a, b = tmp_path / "a" / "lab" / "sites" / code / name, tmp_path / "b" / "lab" / "sites" / code / name
            assert a.exists() == b.exists()
            if a.exists():
                assert a.read_bytes() == b.read_bytes(), f"{code}/{name} differs between two runs of seed 3"
    assert (tmp_path / "a" / "history.jsonl").read_bytes() != (tmp_path / "c" / "history.jsonl").read_bytes()
    run = json.loads((tmp_path / "a" / "run.json").read_text())
    assert run["replay"] == f"smslab sim {ROOT / 'scenarios' / 'kb-failure-sms20.yaml'} --seed 3"
    assert run["simulated"] > 20  # virtual seconds: the scenario waits on 400 envelopes and a recovery
    assert (tmp_path / "a" / "report.html").stat().st_size > 10_000


def test_a_run_keeps_its_stores_on_tmpfs_while_it_goes_and_in_its_run_directory_after(tmp_path: Path) -> None:
    lab_dir = LabDir(tmp_path / "lab")
    lab = sim.SimLab(lab_dir, load_topology(DEMO), seed=1)
    sites = lab_dir.path / "sites"
    if not sites.is_symlink():
        pytest.skip(f"{sim.SCRATCH} has not {sim.SCRATCH_FREE >> 30} GiB free or is not writable")
    place = sites.resolve()
    assert place.parent == sim.SCRATCH
    lab.start_all()
    lab.run(5.0)
    applied = lab.applied()
    lab.close()
    assert not sites.is_symlink() and not place.exists()  # moved back, nothing left in RAM
    assert (sites / "CEN" / "site.db").is_file() and applied > 0
    lab_dir2 = LabDir(tmp_path / "kept")
    (lab_dir2.path / "sites").mkdir(parents=True)  # a lab directory with sites already: left as it is
    other = sim.SimLab(lab_dir2, load_topology(DEMO), seed=1)
    assert not (lab_dir2.path / "sites").is_symlink()
    other.close()


def test_the_kb_failure_is_named_in_the_simulator_and_the_recovery_fixes_it(tmp_path: Path) -> None:
    result = kb_failure(tmp_path, 1, "kb")
    assert result.exit_code == 0, (result.error, result.failed)
    expectations = {o.what: o.ok for o in result.outcomes}
    assert expectations["expect check invalid, violation link"]
    assert expectations["expect check valid"]
    lab = LabDir(tmp_path / "kb" / "lab")
    stores = [e.detail for e in harness(lab, "store") if e.detail]
    assert [d["action"] for d in stores] == ["backup", "restore", "restore"]
    recoveries = [e for e in events(lab) if e.kind == "recovery" and e.site == "P01"]
    assert recoveries and recoveries[-1].detail and recoveries[-1].detail.get("phase") == "complete"


# -- every harness verb, with the meaning it has on real processes -----------------------------


@pytest.fixture
def demo(tmp_path: Path) -> sim.SimLab:
    lab = sim.SimLab(LabDir(tmp_path / "lab"), load_topology(DEMO), seed=11)
    lab.start_all()
    lab.run(5)
    return lab


def settle(lab: sim.SimLab, timeout: float = 120.0) -> None:
    for code in sorted(lab.running_codes()):
        assert lab.control(code, {"cmd": "pause-workload"})["ok"]
    last: list[str] = []

    def valid() -> bool:
        nonlocal last
        report = lab.check()
        last = [f"{v.kind} {v.site}: {v.detail}" for v in report.violations]
        return report.verdict == "valid"

    assert lab.wait_for(valid, timeout=timeout, poll=1.0), last


def test_link_faults_drop_duplicate_hold_and_delay_on_the_relay_and_lose_nothing(demo: sim.SimLab) -> None:
    drop = demo.link_fault("drop", "P01", "CEN", params={"rate": 0.5}, seed=5)
    dup = demo.link_fault("duplicate", "P02", "CEN", params={"rate": 0.5}, seed=6)
    demo.run(4)
    held = demo.link_fault("partition", "S01", "P01", oneway=True)
    demo.run(3)
    holding = sum(len(r.held) for r in held.relays)
    assert holding > 0  # a partition holds, it does not drop
    delay = demo.link_fault("delay", "S02", "P02", params={"ms": 300, "jitter": 50})
    demo.run(3)
    for fault in (drop, dup, held, delay):
        demo.heal(fault.id)
    stats = {e.fault: (e.detail or {}).get("stats", {}) for e in harness(demo.dir, "fault_off")}
    assert stats[drop.id]["P01->CEN"]["dropped"] > 0
    assert stats[dup.id]["P02->CEN"]["duplicated"] > 0
    assert stats[held.id]["S01->P01"]["forwarded"] >= holding  # what it held arrives, late
    assert stats[delay.id]["S02->P02"]["forwarded"] > 0
    relay = [e for e in events(demo.dir) if e.kind == "relay"]
    assert {(e.detail or {}).get("action") for e in relay} == {"dropped", "duplicated"}
    assert not any(q.startswith(f"smslab.{demo.lab_id}.relay.") for q in demo.broker.queues)
    settle(demo)  # nothing lost, nothing applied twice: the checker's history invariants hold


def test_a_reordering_link_still_applies_each_envelope_once_in_order(demo: sim.SimLab) -> None:
    fault = demo.link_fault("reorder", "P01", "CEN", params={"window": 4}, seed=2)
    demo.run(6)
    demo.heal(fault.id)
    assert harness(demo.dir, "fault_off")[-1].detail["stats"]["P01->CEN"]["seen"] > 4  # type: ignore[index]
    settle(demo)


def test_a_disconnected_site_is_refused_until_healed_then_catches_up(demo: sim.SimLab) -> None:
    before = demo.sites["P01"].transport.connects
    fault = demo.disconnect("P01")
    demo.run(4)
    assert not demo.sites["P01"].transport.ready
    assert demo.sites["P01"].transport.connects == before  # its reconnects were refused
    demo.heal(fault.id)
    assert demo.wait_for(lambda: demo.sites["P01"].transport.ready, timeout=10)  # within its backoff (5 s at most)
    assert demo.sites["P01"].transport.connects == before + 1
    on = [e for e in harness(demo.dir, "fault_on") if e.fault == fault.id]
    assert on and on[0].detail and on[0].detail["closed"] == 1
    settle(demo)


def test_a_paused_site_runs_nothing_and_loses_its_connection_after_missed_heartbeats(demo: sim.SimLab) -> None:
    site = demo.sites["P02"]
    counted = site.store.db.execute("SELECT count(*) FROM events").fetchone()[0]
    fault = demo.pause("P02")
    demo.run(15)  # longer than the heartbeat: the broker closes it
    assert site.store.db.execute("SELECT count(*) FROM events").fetchone()[0] == counted
    assert site.transport.connection is None or not site.transport.connection.open
    demo.resume("P02")
    demo.run(5)
    assert site.transport.ready and site.transport.connects == 2
    assert not demo.faults and harness(demo.dir, "fault_off")[-1].fault == fault.id
    settle(demo)


def test_a_memory_alarm_blocks_every_publisher_until_it_clears(demo: sim.SimLab) -> None:
    demo.alarm()
    demo.run(1)
    published = demo.broker.stats["published"]
    demo.run(5)
    assert demo.broker.stats["published"] == published  # the workload runs, nothing reaches the broker
    demo.heal_all()
    demo.run(2)
    assert demo.broker.stats["published"] > published
    settle(demo)


def test_a_broker_restart_drops_every_connection_and_keeps_the_queued_messages(demo: sim.SimLab) -> None:
    before = {c: s.transport.connects for c, s in demo.sites.items()}
    demo.broker_restart()
    assert all(s.transport.connects == before[c] + 1 for c, s in demo.sites.items())
    kinds = [(e.kind, (e.detail or {}).get("kind")) for e in harness(demo.dir, "fault_on") + harness(demo.dir, "fault_off")]
    assert ("fault_on", "broker-restart") in kinds and ("fault_off", "broker-restart") in kinds
    settle(demo)


def test_kill_restart_and_a_fault_on_a_stopped_site_mean_what_they_mean_on_processes(demo: sim.SimLab) -> None:
    demo.kill("S01")
    assert not demo.running("S01")
    with pytest.raises(LabError, match="did not take effect"):
        demo.link_fault("partition", "S01", "P01", oneway=True, verify=2.0)  # S01 sends nothing: unverified
    with pytest.raises(LabError, match="not running"):
        demo.pause("S01")
    demo.run(2)
    demo.start("S01")
    demo.restart("P02")
    processes = [(e.detail or {}).get("action") for e in harness(demo.dir, "process")]
    assert processes[-4:] == ["kill", "start", "stop", "start"]
    off = harness(demo.dir, "fault_off")[-1]
    assert off.detail and off.detail.get("verified") is False
    settle(demo)


def test_bad_fault_requests_are_refused_with_what_to_do(demo: sim.SimLab) -> None:
    with pytest.raises(ConfigError, match="not neighbours"):
        demo.link_fault("partition", "S01", "S02")
    with pytest.raises(ConfigError, match="rate"):
        demo.link_fault("drop", "P01", "CEN", params={"rate": 2.0})
    fault = demo.link_fault("partition", "P01", "CEN")
    with pytest.raises(LabError, match="already has fault"):
        demo.link_fault("delay", "CEN", "P01", params={"ms": 10})
    demo.heal(fault.id)
    assert demo.heal(fault.id) is None  # idempotent


EVERY_FAULT = """
scenario: every-fault
topology: {topology}
seed: 5
steps:
  - wait-envelopes: 50
  - fault: {{kind: partition, a: P01, b: CEN, for: 2}}
  - fault: {{kind: drop, a: P02, b: CEN, rate: 0.4, name: lossy}}
  - wait: 3
  - heal: lossy
  - fault: {{kind: duplicate, a: S01, b: P01, rate: 0.5, for: 2}}
  - fault: {{kind: reorder, a: S02, b: P02, window: 3, for: 2}}
  - fault: {{kind: delay, a: P01, b: CEN, ms: 200, for: 2}}
  - wait: 3
  - fault: {{kind: disconnect, site: P02, for: 2}}
  - pause: S01
  - wait: 2
  - resume: S01
  - fault: {{kind: alarm, for: 2}}
  - wait: 3
  - fault: {{kind: broker-restart}}
  - kill: P01
  - start: P01
  - restart: P02
  - wait-converged: 120
  - expect: {{check: valid}}
"""


def test_every_fault_kind_of_a_scenario_runs_in_the_simulator_and_the_lab_converges(tmp_path: Path) -> None:
    scenario = parse_scenario(EVERY_FAULT.format(topology=DEMO), "every-fault.yaml")
    result = sim.simulate(scenario, seed=5, run_dir=tmp_path / "run", progress=quiet)
    assert result.exit_code == 0, (result.error, [o.detail for o in result.failed])
    on = [(e.detail or {}).get("kind") for e in harness(LabDir(tmp_path / "run" / "lab"), "fault_on")]
    assert on == ["partition", "drop", "duplicate", "reorder", "delay", "disconnect", "pause", "alarm",
                  "broker-restart"]


# -- seed sweeps -------------------------------------------------------------------------------


def sweep_job(tmp_path: Path, name: str = "chaos-2min") -> sim.SweepJob:
    path = ROOT / "scenarios" / f"{name}.yaml"
    return sim.SweepJob(scenario_path=str(path), scenario_text=None, source=str(path), out_root=str(tmp_path),
                        replay_extra="", keep=False)


def test_a_seed_sweep_finds_a_planted_protocol_bug_and_names_its_replay(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(site_runtime, "PLANTED_BUGS", frozenset({"purge-past-ack"}))
    result = sim.sweep(sweep_job(tmp_path), list(range(1, 11)), jobs=1, fail_fast=True)
    assert result.failed, "ten seeds of chaos did not expose an ack that purges one envelope too many"
    first = result.failed[0]
    assert first.verdict == "invalid"
    assert any(v.startswith(("lost", "link")) for v in first.violations), first.violations
    assert first.replay == f"smslab sim {ROOT / 'scenarios' / 'chaos-2min.yaml'} --seed {first.seed}"
    assert first.run_dir and (Path(first.run_dir) / "history.jsonl").exists()  # kept to look at
    assert len(result.outcomes) == first.seed  # --fail-fast: nothing after it


def test_without_the_planted_bug_the_same_seeds_pass_and_leave_nothing_behind(tmp_path: Path) -> None:
    result = sim.sweep(sweep_job(tmp_path), [1, 2, 3], jobs=2)
    assert not result.failed, [o.line() for o in result.failed]
    assert [o.seed for o in result.outcomes] == [1, 2, 3]
    assert not any(tmp_path.iterdir())  # passing runs are deleted (--keep keeps them)


@pytest.mark.slow
def test_the_shipped_chaos_scenario_passes_200_seeds(tmp_path: Path) -> None:
    result = sim.sweep(sweep_job(tmp_path), list(range(1, 201)), jobs=2)
    assert not result.failed, "\n".join(o.line() for o in result.failed)


def test_seed_ranges_parse_and_bad_ones_are_refused() -> None:
    assert sim.parse_seeds("1..5,9,3") == [1, 2, 3, 4, 5, 9]
    for bad in ("5..1", "a..b", "", "1,x"):
        with pytest.raises(ConfigError):
            sim.parse_seeds(bad)


# -- the command line --------------------------------------------------------------------------


def smslab(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "emulator", *args], cwd=cwd, capture_output=True, text=True, check=False,
                          timeout=600)


def test_smslab_sim_runs_a_topology_with_chaos_and_prints_its_replay(tmp_path: Path) -> None:
    done = smslab("sim", str(DEMO), "--duration", "40s", "--chaos", "kill=1,drop=1,partition=1", "--seed", "2",
                  "--out", str(tmp_path / "run"), "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    out = json.loads(done.stdout)
    assert out["verdict"] == "valid" and out["simulated"] >= 40
    assert out["replay"] == f"smslab sim {DEMO} --seed 2 --duration 40s --chaos kill=1,drop=1,partition=1"
    schedule = json.loads((tmp_path / "run" / "schedule.json").read_text())
    assert {a["kind"] for a in schedule} <= {"kill", "drop", "partition"} and schedule


def test_smslab_sim_sweeps_seeds_on_several_jobs(tmp_path: Path) -> None:
    done = smslab("sim", str(ROOT / "scenarios" / "kb-failure-sms20.yaml"), "--seeds", "1..4", "--jobs", "2",
                  "--out", str(tmp_path / "sweep"), "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    out = json.loads(done.stdout)
    assert (out["seeds"], out["run"], out["passed"], out["failed"]) == (4, 4, 4, [])


def test_smslab_sim_refuses_what_it_cannot_run(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("scenario: x\ntopology: nowhere.yaml\n")
    for args, expected in (((str(tmp_path / "none.yaml"),), "no such file"),
                           ((str(bad),), "nowhere.yaml"),
                           ((str(DEMO), "--duration", "soon"), "not a duration"),
                           ((str(DEMO), "--chaos", "meteor=1"), "unknown fault kind"),
                           ((str(ROOT / "scenarios" / "kb-failure-sms20.yaml"), "--chaos"), "has none"),
                           ((str(DEMO), "--seeds", "1..3", "--seed", "2"), "exclude each other")):
        done = smslab("sim", *args, cwd=tmp_path)
        assert done.returncode != 0 and expected in done.stdout + done.stderr, (args, done.stdout + done.stderr)
        assert "Traceback" not in done.stderr


# -- exit codes, as smslab run gives them on real processes (tests/integration/test_scenarios.py) --


def test_a_failed_expectation_is_named_and_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "wrong.yaml"
    path.write_text(WRONG_EXPECTATION)
    result = sim.simulate(load_scenario(path), seed=1, run_dir=tmp_path / "run", scenario_path=path, progress=quiet)
    assert result.exit_code == 1
    assert [o.ok for o in result.outcomes] == [False, True]
    assert "expect check invalid" in result.outcomes[0].what


def test_an_unknown_final_verdict_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "idle.yaml"
    path.write_text(IDLE_PARTITION)
    result = sim.simulate(load_scenario(path), seed=1, run_dir=tmp_path / "run", scenario_path=path, progress=quiet)
    assert result.exit_code == 2
    verdict = json.loads((tmp_path / "run" / "verdict.json").read_text())
    assert verdict["verdict"] == "unknown" and {v["kind"] for v in verdict["violations"]} == {"vacuous"}
