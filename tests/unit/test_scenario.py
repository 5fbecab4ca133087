"""Scenario files: validated with file:line errors before anything starts, and a chaos block
that draws the same schedule from the same seed, byte for byte."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from emulator.errors import ConfigError
from emulator.scenario import (
    Backup,
    Chaos,
    Expect,
    Fault,
    draw_schedule,
    load_scenario,
    parse_scenario,
    schedule_json,
)

REPO = Path(__file__).resolve().parents[2]
TOPO = """
topology:
  lab: sc
  sites:
    - {code: CEN, type: central, clients: 0}
    - {code: P01, type: primary, parent: CEN}
    - {code: S01, type: secondary, parent: P01}
"""


def scenario(body: str) -> str:
    return "scenario: t\n" + TOPO + body


@pytest.mark.parametrize("path", sorted((REPO / "scenarios").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_scenario_loads(path: Path) -> None:
    s = load_scenario(path)
    assert s.steps and s.topology.codes


def test_steps_parse_to_their_models() -> None:
    s = parse_scenario(scenario("""
steps:
  - kill: P01
  - backup: {site: P01, as: b1}
  - start: {site: P01, restore: b1}
  - fault: {kind: drop, a: P01, b: CEN, rate: 0.2, for: 3, name: lossy}
  - heal: lossy
  - wait: 2
  - expect: {check: valid, violation: [lost, link]}
chaos: {duration: 30, faults: {kill: 1, partition: 2}}
"""))
    assert [st.name for st in s.steps] == ["kill", "backup", "start", "fault", "heal", "wait", "expect", "chaos"]
    assert isinstance(s.steps[1].value, Backup) and s.steps[1].value.as_ == "b1"
    assert isinstance(s.steps[3].value, Fault) and s.steps[3].value.for_ == 3
    assert isinstance(s.steps[6].value, Expect) and isinstance(s.steps[7].value, Chaos)
    assert s.steps[0].line == 11


@pytest.mark.parametrize("body, line, message", [
    ("steps:\n  - kill: X99\n", 10, "unknown site X99"),
    ("steps:\n  - frobnicate: 1\n", 10, "unknown step 'frobnicate'"),
    ("steps:\n  - start: {site: P01, restore: nope}\n", 10, "no earlier backup step made 'nope'"),
    ("steps:\n  - heal: nobody\n", 10, "no earlier fault step is named nobody"),
    ("steps:\n  - fault: {kind: drop, a: P01, b: CEN, rate: 3}\n", 10, "less than or equal to 1"),
    ("steps:\n  - wait: -1\n", 10, "greater than 0"),
    ("steps:\n  - kill: P01\n    stop: P01\n", 10, "a mapping with one key"),
    ("colour: red\nsteps: []\n", 9, "unknown key 'colour'"),
    ("chaos: {duration: 10, faults: {meteor: 1}}\n", 9, "unknown chaos fault kind"),
])
def test_mistakes_are_refused_with_the_file_and_line(body: str, line: int, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_scenario(scenario(body), source="s.yaml")
    assert f"s.yaml:{line}:" in caught.value.message and message in caught.value.message, caught.value.message


def test_the_same_seed_draws_the_same_schedule_byte_for_byte() -> None:
    s = load_scenario(REPO / "scenarios" / "chaos-2min.yaml")
    chaos = next(st.value for st in s.steps if isinstance(st.value, Chaos))
    first = schedule_json(draw_schedule(chaos, s.topology, 42))
    again = schedule_json(draw_schedule(chaos, s.topology, 42))
    other = schedule_json(draw_schedule(chaos, s.topology, 43))
    assert first == again and first != other
    actions = draw_schedule(chaos, s.topology, 42)
    assert all(0 < a.at < chaos.duration for a in actions) and len(actions) >= 10
    assert {a.kind for a in actions} <= set(chaos.faults)
    for a in actions:  # link faults strike real links; site faults real sites
        if a.a:
            assert s.topology.parent(a.a) == a.b or s.topology.parent(str(a.b)) == a.a
        if a.site:
            assert a.site in s.topology.codes


def test_a_scenario_mistake_hints_at_scenarios_not_topologies() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_scenario(scenario("chaos: {duration: 10, interval: [3, 1], faults: {kill: 1}}\n"), source="s.yaml")
    assert "s.yaml:9:" in caught.value.message and "chaos.interval" in caught.value.message
    assert caught.value.hint and "scenarios/" in caught.value.hint and "topology" not in caught.value.hint


def test_the_schedule_is_the_same_in_another_process() -> None:
    """Across processes with other hash seeds (nothing drawn may depend on set or dict order
    of strings): the replay command runs in a new process."""
    code = ("import sys; from pathlib import Path; from emulator.scenario import *;"
            "s = load_scenario(Path(sys.argv[1])); c = next(x.value for x in s.steps if isinstance(x.value, Chaos));"
            "sys.stdout.write(schedule_json(draw_schedule(c, s.topology, 42)))")
    path = str(REPO / "scenarios" / "chaos-2min.yaml")
    outs = [subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, check=True, cwd=REPO,
                           env={**os.environ, "PYTHONHASHSEED": str(h)}).stdout for h in (1, 2)]
    s = load_scenario(REPO / "scenarios" / "chaos-2min.yaml")
    chaos = next(st.value for st in s.steps if isinstance(st.value, Chaos))
    assert outs[0] == outs[1] == schedule_json(draw_schedule(chaos, s.topology, 42))


# What only the topology can tell: refused before anything starts, at the step's line, as the
# lab would refuse it mid-run.
@pytest.mark.parametrize("step, message", [
    ("fault: {kind: drop, a: S01, b: CEN, rate: 0.5}", "S01 and CEN are not neighbours"),
    ("fault: {kind: partition, a: P01, b: P01}", "P01 and P01 are the same site"),
    ("fault: {kind: drop, a: P01, b: CEN}", "drop needs rate between 0 and 1, not None"),
    ("fault: {kind: delay, a: P01, b: CEN}", "delay needs ms >= 0"),
    ("fault: {kind: partition, a: P01}", "needs a: and b:"),
    ("fault: {kind: disconnect}", "needs site:"),
    ("burst: {site: CEN, count: 5}", "CEN has no parent to send a burst to"),
    ("backup: {site: S01, as: x}", "S01 is a secondary site: secondary sites are not backed up"),
    ("create: {site: S01}", "objects are created at primaries"),
    ("recover: {site: P01, reference: CEN}", "reference site CEN is not a child of P01"),
    ("recover: {site: S01, backup: b}", "S01 is a secondary site"),
    ("recover: {site: P01, backup: b, wipe: true}", "exclude each other"),
    ("start: {site: CEN, restore: b}", "backup 'b' is of P01, not CEN"),
    ("chaos: {duration: 10, faults: {kill: .nan}}", "finite number >= 0, not kill=nan"),
    ("chaos: {duration: 10, faults: {kill: 1e400}}", "finite number >= 0, not kill=inf"),
])
def test_what_the_topology_rules_out_is_refused_with_the_file_and_line(step: str, message: str) -> None:
    body = f"steps:\n  - backup: {{site: P01, as: b}}\n  - {step}\n"
    with pytest.raises(ConfigError) as caught:
        parse_scenario(scenario(body), source="s.yaml")
    assert "s.yaml:11: " in caught.value.message and message in caught.value.message, caught.value.message
    assert "also:" not in caught.value.message  # one mistake, one error


def test_what_the_topology_allows_is_left_alone() -> None:
    s = parse_scenario(scenario("""
steps:
  - backup: {site: P01, as: b}
  - fault: {kind: drop, a: S01, b: P01, rate: 0.5}
  - fault: {kind: delay, a: CEN, b: P01, ms: 100}
  - burst: {site: S01, count: 5}
  - create: {site: P01}
  - start: {site: P01, restore: b}
  - recover: {site: P01, backup: b, reference: S01}
  - recover: {site: S01, wipe: true}
"""))
    assert len(s.steps) == 8


@pytest.mark.parametrize("command", ["run", "sim"])
@pytest.mark.parametrize("step", ["fault: {kind: drop, a: P01, b: S02, rate: 0.5}", "burst: {site: CEN, count: 5}",
                                  "backup: {site: S01, as: x}"])
def test_smslab_run_and_sim_refuse_it_before_anything_starts(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch, command: str,
                                                             step: str) -> None:
    from emulator import sim
    from emulator.cli import main
    from emulator.cli import run as cli_run

    started: list[str] = []

    def never(*_args: object, **_kwargs: object) -> None:  # a run that starts would be a lab on the broker
        started.append(command)
        raise AssertionError("the scenario ran")

    monkeypatch.setattr(cli_run, "run_scenario", never)
    monkeypatch.setattr(sim, "simulate", never)
    path = tmp_path / "s.yaml"
    path.write_text(f"scenario: t\ntopology: {REPO / 'examples' / 'lab.yaml'}\nsteps:\n  - wait: 1\n  - {step}\n")
    out = tmp_path / "run"
    assert main([command, str(path), "--out", str(out), "--lab", str(tmp_path / "lab")]) == 2
    assert f"{path}:5: steps[1]" in capsys.readouterr().err
    assert not started and not out.exists() and not (tmp_path / "lab").exists()  # no run, no run directory, no lab
