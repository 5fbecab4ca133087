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
from emulator.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[2]
SCENARIO = ROOT / "scenarios" / "kb-failure-sms20.yaml"


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
