"""The lab's site forkserver (``sites.zygote``) on the real broker with real processes: sites are
forked from it and are real site processes (their own session, command line, environment and
log), a site starts as a plain ``python -m sites`` when there is no forkserver, and nothing of
it outlives the lab."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from emulator.testing import DEMO_SITES, Lab, topology_yaml, wait_for

pytestmark = pytest.mark.integration


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_sites_are_forked_from_the_labs_forkserver_and_nothing_outlives_the_lab(lab: Lab) -> None:
    lab.up(topology_yaml(DEMO_SITES))
    zygote = lab.dir.zygote_pid()
    assert zygote is not None
    for code in ("CEN", "P01", "S01"):
        pid = lab.dir.pid(code)
        assert pid and parent_of(pid) == zygote
        line = cmdline(pid)  # python -m sites --log DIR/sites/CODE/site.log --lab DIR --site CODE
        assert "-m sites --log " in line and line.endswith(f" --lab {lab.dir.path} --site {code}"), line
        assert os.getsid(pid) == pid, "a session of its own, like a spawned site"
    # a site killed and started again is forked again (that its environment is the caller's,
    # test_recovery's SMSLAB_HOLD_PHASE tests show: the agent holds in the phase the CLI names)
    os.kill(lab.dir.pid("P01") or 0, signal.SIGKILL)
    wait_for("P01 to die", lambda: lab.dir.pid("P01") is None, timeout=10)
    lab.cli("start", "P01")
    pid = lab.dir.pid("P01")
    assert pid and parent_of(pid) == zygote
    # without the forkserver, a site is a `python -m sites` of its own, and works the same
    os.kill(zygote, signal.SIGKILL)
    wait_for("the forkserver to die", lambda: lab.dir.zygote_pid() is None, timeout=10)
    lab.cli("restart", "S01")
    pid = lab.dir.pid("S01")
    assert pid and parent_of(pid) != zygote and "-m sites --log " in cmdline(pid)
    assert lab.cli("wait-converged", "--timeout", "90", check=False).returncode == 0
    lab.down()
    assert lab.dir.zygote_pid() is None and not any(
        f"--lab {lab.dir.path}" in cmdline(int(p)) for p in os.listdir("/proc") if p.isdigit() and _exists(int(p)))


def _exists(pid: int) -> bool:
    try:
        return bool(cmdline(pid))
    except OSError:
        return False


def test_the_forkserver_goes_when_its_lab_directory_goes(lab: Lab) -> None:
    lab.up(topology_yaml(DEMO_SITES))
    zygote = lab.dir.zygote_pid()
    assert zygote is not None
    lab.down()  # deletes the directory; the forkserver was stopped, and would stop by itself
    wait_for("the forkserver to be gone", lambda: not _exists(zygote), timeout=15)
