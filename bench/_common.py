"""What the benchmarks in bench/ share: logging, CPU and machine facts, the lab's life, the CLI frame.

Imported as ``_common`` by the scripts (run as ``python bench/<script>.py``, so bench/ is on
``sys.path``). Importing it puts this checkout first on ``sys.path`` and on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# The site processes are started with ``python -m sites``: make them run this checkout too.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
)

import pika
import pika.exceptions

from broker import admin
from emulator import orchestrator
from emulator.errors import SmslabError
from emulator.lab import LabDir


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# ----------------------------------------------------------------------------------------
# CPU of processes and of the machine
# ----------------------------------------------------------------------------------------


def cpu_seconds(pids: list[int]) -> float | None:
    """User+system CPU seconds used so far by these processes (Linux /proc), None if unknown."""
    total = 0.0
    try:
        for pid in pids:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None
    return total


def broker_pids() -> list[int]:
    """The local RabbitMQ's Erlang VM, to account its CPU (empty if the broker is remote)."""
    pids = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() == "beam.smp":
                pids.append(int(comm.parent.name))
        except (OSError, ValueError):
            pass
    return pids


def cpu_delta(before: float | None, after: float | None) -> float | None:
    return round(after - before, 3) if before is not None and after is not None else None


def cpu_snapshot(site_pids: dict[str, int | None], beam: list[int]) -> dict[str, float | None]:
    """CPU seconds so far of each site's process (by code) and of the broker (key ``broker``)."""
    snap = {code: cpu_seconds([pid]) if pid else None for code, pid in site_pids.items()}
    snap["broker"] = cpu_seconds(beam) if beam else None
    return snap


def cpu_deltas(before: dict[str, float | None], after: dict[str, float | None]) -> dict[str, float | None]:
    return {k: cpu_delta(before[k], after[k]) for k in before}


def _cpu_times() -> tuple[int, int] | None:
    """(idle + iowait, total) ticks of all CPUs so far (Linux /proc/stat), None if unknown."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return values[3] + values[4], sum(values[:8])
    except (OSError, ValueError, IndexError):
        return None


def _busy(start: tuple[int, int] | None, end: tuple[int, int] | None) -> float | None:
    if start is None or end is None:
        return None
    (i0, t0), (i1, t1) = start, end
    return round(1 - (i1 - i0) / max(1, t1 - t0), 3)


def machine_busy(interval: float = 1.0) -> float | None:
    """Fraction of all CPUs busy over ``interval`` seconds (Linux /proc/stat), None if unknown."""
    start = _cpu_times()
    if start is None:
        return None
    time.sleep(interval)
    return _busy(start, _cpu_times())


class BusyMeter:
    """Fraction of all CPUs busy between ``start()`` and ``stop()`` (the whole machine)."""

    def __init__(self) -> None:
        self.start_sample: tuple[int, int] | None = None

    def start(self) -> None:
        self.start_sample = _cpu_times()

    def stop(self) -> float | None:
        return _busy(self.start_sample, _cpu_times())


# ----------------------------------------------------------------------------------------
# machine facts
# ----------------------------------------------------------------------------------------


def git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10, check=False).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+changes" if dirty else "")) if head else None


def machine_facts(url: str, load_before: float | None, *, sqlite: bool = False,
                  commit: bool = False) -> dict[str, Any]:
    """Cores, CPU, versions (SQLite if ``sqlite``), load before the run, git commit if ``commit``."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    rabbit, source = None, None
    if shutil.which("rabbitmqctl"):
        try:
            out = subprocess.run(["rabbitmqctl", "version"], capture_output=True, text=True,
                                 timeout=20, check=False)
            if out.returncode == 0 and out.stdout.strip():
                rabbit, source = out.stdout.strip().splitlines()[-1], "rabbitmqctl version"
        except (OSError, subprocess.SubprocessError):
            pass
    if rabbit is None:
        try:
            with admin.blocking(url, "smslab-bench") as conn:
                props = conn._impl.server_properties  # pika keeps the broker's Connection.Start
                v = props.get("version")
                rabbit = v.decode() if isinstance(v, bytes) else v
                source = "AMQP server properties"
        except (SmslabError, AttributeError):
            pass
    facts: dict[str, Any] = {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "pika": pika.__version__,
    }
    if sqlite:
        facts["sqlite"] = sqlite3.sqlite_version
    facts.update({
        "rabbitmq": rabbit,
        "rabbitmq_from": source,
        "platform": platform.platform(),
        "cpu_busy_before": load_before,
    })
    if commit:
        facts["commit"] = git_commit()
    return facts


# ----------------------------------------------------------------------------------------
# the lab
# ----------------------------------------------------------------------------------------


@contextmanager
def temp_lab(prefix: str, topology: str, what: str = "") -> Iterator[tuple[Path, LabDir]]:
    """A temporary directory with ``topology`` written in it: (topology file, lab directory).

    At the end, also on errors, the lab (if it was brought up) is taken down, which deletes
    its broker objects, and the directory is removed. ``what`` prefixes the log lines.
    """
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    topo = tmp / "topology.yaml"
    topo.write_text(topology)
    lab_dir = LabDir(tmp / "lab")
    try:
        yield topo, lab_dir
    finally:
        if lab_dir.exists():
            try:
                orchestrator.down(lab_dir)
                log(f"{what}lab down, broker objects deleted")
            except SmslabError as exc:
                log(f"{what}WARNING: lab down failed: {exc}"
                    f"{' (' + exc.hint + ')' if exc.hint else ''}")
        shutil.rmtree(tmp, ignore_errors=True)


def check_sites_alive(lab_dir: LabDir, codes: tuple[str, ...], what: str) -> None:
    for code in codes:
        if lab_dir.pid(code) is None:
            raise BenchError(f"{what}: site {code} exited; see {lab_dir.log_file(code)}")


# ----------------------------------------------------------------------------------------
# the command line and the report
# ----------------------------------------------------------------------------------------


def add_amqp_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--amqp", default=os.environ.get("SMSLAB_AMQP_URL", admin.DEFAULT_URL),
                        help="broker URL (default SMSLAB_AMQP_URL or %(default)s)")


def add_json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def busy_before_run(url: str) -> float | None:
    """Checks the broker, then how busy the CPUs are (a warning when other work will skew)."""
    admin.check(url)
    load = machine_busy()
    if load is not None and load > 0.25:
        log(f"WARNING: the CPUs were {load:.0%} busy before the run: other work will skew the figures")
    return load


def fmt_s(v: float | None) -> str:
    return "?" if v is None else f"{v:.2f}"


def fmt_pct(v: float | None) -> str:
    return "?" if v is None else f"{v:.0%}"


def _interrupted(_sig: int, _frame: object) -> None:
    raise KeyboardInterrupt


def run_cli(measure: Callable[[], dict[str, Any]], as_json: bool,
            print_table: Callable[[dict[str, Any]], None]) -> int:
    """Runs ``measure`` and prints its report (JSON or table); the exit status.

    SIGTERM is turned into KeyboardInterrupt like Ctrl-C, so that the ``finally`` clauses
    clean up (lab down, queues deleted). Errors are printed in one line: 2 for the broker's
    and the emulator's, 1 for the benchmark's own and OS errors, 130 when interrupted.
    """
    signal.signal(signal.SIGTERM, _interrupted)
    try:
        report = measure()
    except pika.exceptions.AMQPError as exc:
        print(f"error: broker error: {exc!r}", file=sys.stderr)
        return 2
    except SmslabError as exc:  # BrokerUnavailable (with its hint), LabError, ConfigError, CorruptBackup...
        print(f"error: {exc}" + (f"\nhint: {exc.hint}" if exc.hint else ""), file=sys.stderr)
        return 2
    except (BenchError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted (cleaned up)", file=sys.stderr)
        return 130
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 0
