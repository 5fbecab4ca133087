"""Where ``smslab run`` and ``smslab sim`` write, and what they do when nobody reads their output:
a run directory that already holds something is refused before anything is written or started
(two runs are never mixed); a reader gone (``| head``) ends a run as SIGTERM does, its lab
taken down and its run directory written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from emulator import runner, sim
from emulator.cli import main
from emulator.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[2]
SCENARIO = ROOT / "scenarios" / "kb-failure-sms20.yaml"
NOWHERE = "amqp://guest:guest@127.0.0.1:1/%2F"  # no broker: a run that got as far as `up` fails there


def an_old_run(out: Path) -> dict[str, tuple[bytes, int]]:
    """A run directory as an earlier run left it; each file's bytes and mtime."""
    out.mkdir()
    for name in ("scenario.yaml", "run.json", "history.jsonl", "report.html", "verdict.json", "log.txt"):
        (out / name).write_text(f"the earlier run's {name}\n")
    return snapshot(out)


def snapshot(out: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(out)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(out.rglob("*"))
            if p.is_file()}


def test_run_refuses_a_run_directory_that_holds_a_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    before = an_old_run(out)
    started: list[object] = []
    monkeypatch.setattr("emulator.cli.run.run_scenario", lambda *a, **k: started.append(a))
    code = main(["run", str(SCENARIO), "--out", str(out), "--amqp", NOWHERE])
    assert code == 2
    assert started == []  # refused before the run (its lab, its files) began
    assert snapshot(out) == before and not (out / "lab").exists()
    assert str(out) in capsys.readouterr().err


def test_run_refuses_it_on_its_own_too(tmp_path: Path) -> None:
    """The real command, nothing patched: nothing in the old run directory is touched."""
    out = tmp_path / "run"
    before = an_old_run(out)
    assert main(["run", str(SCENARIO), "--out", str(out), "--amqp", NOWHERE]) == 2
    assert snapshot(out) == before


def test_an_empty_run_directory_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    out.mkdir()
    started: list[object] = []

    def fake(*_a: object, **k: object) -> runner.RunResult:
        started.append(k["run_dir"])
        return runner.RunResult(Path(str(k["run_dir"])), 1, "", 0)

    monkeypatch.setattr("emulator.cli.run.run_scenario", fake)
    assert main(["run", str(SCENARIO), "--out", str(out), "--amqp", NOWHERE]) == 0
    assert started == [out]


def test_sim_refuses_a_run_directory_or_a_sweep_folder_that_holds_something(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    before = an_old_run(out)
    started: list[object] = []
    monkeypatch.setattr(sim, "simulate", lambda *a, **k: started.append(a))
    monkeypatch.setattr(sim, "sweep", lambda *a, **k: started.append(a))
    assert main(["sim", str(SCENARIO), "--out", str(out)]) == 2
    assert main(["sim", str(SCENARIO), "--seeds", "1..2", "--out", str(out)]) == 2
    assert started == [] and snapshot(out) == before


def test_a_reader_gone_ends_a_run_as_sigterm_does(tmp_path: Path) -> None:
    """The progress's reader goes away after the first line: the run stops at the next one,
    its lab is taken down and the run directory is written (in the simulator: no broker)."""
    lines: list[str] = []

    def head_1(msg: str) -> None:
        if lines:
            raise BrokenPipeError(32, "Broken pipe")
        lines.append(msg)

    downs: list[str] = []
    real = sim.SimBackend.down

    def down(self: sim.SimBackend, *, progress: runner.Progress) -> None:
        downs.append("down")
        real(self, progress=progress)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sim.SimBackend, "down", down)
        result = sim.simulate(load_scenario(SCENARIO), seed=1, run_dir=tmp_path / "run", scenario_path=SCENARIO,
                              progress=head_1)
    assert len(lines) == 1
    assert result.error == "interrupted" and result.exit_code == 1
    assert downs == ["down"]
    assert (tmp_path / "run" / "run.json").exists()


def test_smslab_sim_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    """``smslab sim SCENARIO | head -1``: the run ends (exit 1, interrupted), no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "emulator", "sim", str(SCENARIO), "--out", str(tmp_path / "run")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()
    proc.stdout.close()
    try:
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 1 and proc.stderr.read() == b""
    assert (tmp_path / "run" / "run.json").exists()


def test_a_final_verdict_that_failed_says_what_made_it() -> None:
    from emulator import checker, runner

    def report(verdict: str, *violations: checker.Violation) -> checker.Report:
        return checker.Report(verdict, list(violations), {})  # type: ignore[arg-type]

    down = checker.Violation("down", "S01", "site is not running", hard=False)
    assert runner._why(report("unknown", down)) == "down S01"  # was "nothing hard"
    lost = checker.Violation("site_data_lost", "CEN", "...", hard=True)
    assert runner._why(report("invalid", lost, down)) == "site_data_lost"
