"""A lab from Python: what the pytest plugin's ``lab`` fixtures hand a test.

    lab = Lab.up("examples/lab.yaml", root=tmp_path, amqp_url=url)
    b = lab.backup("P01")
    lab.wait_envelopes(300)
    lab.kill("P01")
    lab.start("P01", restore=b)
    assert not lab.check().valid
    lab.recover("P01", backup=b)
    lab.wait_converged(timeout=120)
    assert lab.check().valid
    lab.down()

Every method does what the CLI command of the same name does, in this process, and raises
``SmslabError`` (with the message and hint the CLI prints) when it cannot.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml

from broker import admin
from emulator import backup as backups
from emulator import checker, faults, history, orchestrator, recover, status
from emulator.errors import LabError
from emulator.lab import BrokerRef, LabDir, LabInfo
from emulator.runner import RunResult, run_scenario
from emulator.scenario import load_scenario
from emulator.topology import Topology, load_topology, parse_topology
from sites.store import read_snapshot

Quiet = None


def _quiet(_msg: str) -> None:
    pass


class Lab:
    """One running lab, driven from Python."""

    def __init__(self, lab_dir: LabDir, info: LabInfo) -> None:
        self.dir = lab_dir
        self.info = info

    # -- lifetime -----------------------------------------------------------------------------

    @classmethod
    def up(cls, topology: str | Path | dict[str, Any] | Topology, *, root: Path, amqp_url: str,
           timeout: float = 60.0, broker: BrokerRef | None = None) -> Lab:
        """Bring a lab up from a topology file, a mapping or a ``Topology``; its directory is
        ``root/lab``. Returns once every site is attached."""
        root.mkdir(parents=True, exist_ok=True)
        path = root / "topology.yaml"
        if isinstance(topology, Topology):
            path.write_text(topology.to_yaml())
        elif isinstance(topology, dict):
            path.write_text(parse_topology(yaml.safe_dump(topology, sort_keys=False), "<dict>").to_yaml())
        else:
            path.write_text(load_topology(topology).to_yaml())  # refused here, with file:line
        lab_dir = LabDir(root / "lab")
        info = orchestrator.up(path, lab_dir, amqp_url, timeout=timeout, broker=broker)
        return cls(lab_dir, info)

    def down(self, *, keep: bool = True) -> None:
        """Heal every fault, stop every site, delete the lab's broker objects (and its
        directory unless ``keep``)."""
        if self.dir.exists():
            orchestrator.down(self.dir, keep=keep)

    @property
    def lab_id(self) -> str:
        return self.info.lab_id

    @property
    def topology(self) -> Topology:
        return self.info.topology

    # -- processes ------------------------------------------------------------------------------

    def kill(self, site: str) -> int:
        return orchestrator.kill(self.dir, self._site(site))

    def stop(self, site: str) -> int:
        return orchestrator.stop(self.dir, self._site(site))

    def start(self, site: str, *, restore: str | None = None, wipe: bool = False, timeout: float = 30.0) -> int:
        """Start a site; ``restore``/``wipe`` replace its store first, WITHOUT recovery."""
        return orchestrator.start(self.dir, self._site(site), restore=restore, wipe=wipe, timeout=timeout)

    def restart(self, site: str) -> int:
        return orchestrator.restart(self.dir, self._site(site))

    def pause(self, site: str, *, for_s: float | None = None) -> str:
        return faults.apply_pause(self.dir, self.info, self._site(site), for_s=for_s).id

    def resume(self, site: str) -> None:
        for spec in faults.active(self.dir):
            if spec.kind == "pause" and spec.site == self._site(site):
                faults.heal(self.dir, self.info, spec.id)

    # -- backups and recovery -------------------------------------------------------------------

    def backup(self, site: str) -> str:
        """Back up a running site; returns the backup id."""
        return backups.create(self.dir, self.info, self._site(site)).id

    def recover(self, site: str, *, backup: str | None = None, wipe: bool = False, reference: str | None = None,
                timeout: float = 180.0) -> dict[str, Any]:
        return recover.recover(self.dir, self._site(site), backup_id=backup, wipe=wipe, reference=reference,
                               timeout=timeout, progress=_quiet)

    # -- faults ---------------------------------------------------------------------------------

    def fault(self, kind: str, a: str | None = None, b: str | None = None, *, site: str | None = None,
              oneway: bool = False, rate: float | None = None, window: int | None = None, ms: float | None = None,
              jitter: float | None = None, seed: int | None = None, for_s: float | None = None) -> str | None:
        """Put a fault on: a link fault (``partition``, ``drop``, ``duplicate``, ``reorder``,
        ``delay``) between ``a`` and ``b``; ``disconnect`` of ``site``; ``alarm``;
        ``broker-restart`` (done at once: no id). Returns the fault's id."""
        if kind in ("partition", "drop", "duplicate", "reorder", "delay"):
            if a is None or b is None:
                raise LabError(f"a {kind} fault needs both ends of the link: fault({kind!r}, 'P01', 'CEN')")
            params = {k: float(v) for k, v in (("rate", rate), ("window", window), ("ms", ms), ("jitter", jitter))
                      if v is not None}
            return faults.apply_link_fault(self.dir, self.info, kind, a, b, oneway=oneway, params=params, seed=seed,
                                           for_s=for_s).id
        if kind == "disconnect":
            return faults.apply_disconnect(self.dir, self.info, self._site(site or a or ""), for_s=for_s).id
        if kind == "alarm":
            return faults.apply_alarm(self.dir, self.info, for_s=for_s).id
        if kind == "broker-restart":
            faults.broker_restart(self.dir, self.info)
            return None
        if kind == "broker-node-kill":
            return faults.apply_broker_node_kill(self.dir, self.info, str(site or a or ""), for_s=for_s).id
        if kind == "pause":
            return self.pause(site or a or "", for_s=for_s)
        raise LabError(f"unknown fault {kind!r}", hint=f"one of {', '.join(faults.FAULT_KINDS)}")

    def heal(self, fault_id: str | None = None) -> None:
        """Heal one fault, or every fault that is on."""
        if fault_id is None:
            faults.heal_all(self.dir, self.info)
        else:
            faults.find(self.dir, fault_id)
            faults.heal(self.dir, self.info, fault_id)

    def faults(self) -> list[dict[str, Any]]:
        return faults.listing(self.dir)

    # -- judging --------------------------------------------------------------------------------

    def history(self, *, kind: str | None = None, site: str | None = None) -> list[history.Event]:
        events = history.load(self.dir, self.info)
        return [e for e in events if (kind is None or e.kind == kind) and (site is None or e.site == site)]

    def check(self) -> checker.Report:
        return checker.check(self.dir, self.info)

    def wait_converged(self, timeout: float = 60.0) -> checker.Report:
        """Pause the workload and wait until the checker says valid; AssertionError with the
        last report if it does not within ``timeout`` seconds."""
        for code in self.topology.depth_order():
            if self.dir.pid(code):
                try:
                    self.control(code, {"cmd": "pause-workload"})
                except LabError:
                    pass
        deadline = time.monotonic() + timeout
        while True:
            report = checker.check(self.dir, self.info, with_history=False)
            if report.verdict == "valid":
                report = self.check()
                if report.verdict == "valid":
                    return report
            if time.monotonic() > deadline:
                raise AssertionError(f"lab {self.lab_id} did not converge in {timeout:.0f}s:\n{report.render()}")
            time.sleep(0.3)

    def wait_envelopes(self, count: int, timeout: float = 120.0) -> int:
        """Wait until ``count`` more envelopes were applied across the lab; returns the total."""
        start = self.applied()
        deadline = time.monotonic() + timeout
        while (now := self.applied()) < start + count:
            if time.monotonic() > deadline:
                raise AssertionError(f"only {now - start} of {count} envelopes applied in {timeout:.0f}s")
            time.sleep(0.1)
        return now

    def applied(self) -> int:
        """Envelopes applied so far, summed over every site's links."""
        total = 0
        for code in self.topology.depth_order():
            snap = read_snapshot(self.dir.site_db(code))
            if snap:
                total += sum(link.applied for link in snap.links.values())
        return total

    def status(self) -> dict[str, Any]:
        return status.collect(self.dir, self.info)

    def control(self, site: str, command: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        answer = admin.control_request(self.info.amqp_url, self.lab_id, self._site(site), command, timeout=timeout)
        if not answer.get("ok", False):
            raise LabError(f"{site}: {answer.get('error')}", hint=answer.get("hint"))
        return answer

    def run(self, scenario: str | Path, seed: int | None = None, *, run_dir: Path | None = None) -> RunResult:
        """Run a scenario's steps on this lab (it is not brought up again)."""
        loaded = load_scenario(scenario)
        chosen = loaded.seed if seed is None else seed
        out = run_dir or (self.dir.path.parent / f"run-{loaded.scenario}-seed{chosen}")
        return run_scenario(loaded, seed=chosen, run_dir=out, amqp_url=self.info.admin_url, lab_dir=self.dir,
                            scenario_path=Path(scenario), keep_up=True, progress=_quiet, existing_lab=True)

    def _site(self, code: str) -> str:
        code = code.upper()
        self.topology.site(code)
        return code
