"""``smslab run SCENARIO``: bring the scenario's lab up, run its steps and its chaos, judge it,
and keep everything in a run directory.

    <run>/scenario.yaml   the scenario as run          <run>/schedule.json  the drawn chaos
    <run>/run.json        seed, replay command, steps, expectations, exit code
    <run>/history.jsonl   the lab's history            <run>/verdict.json   the final check
    <run>/report.html     the report                   <run>/lab/           the lab directory

Exit code: 0 when every expectation held (the final verdict included, ``final: valid`` by
default), 1 when one failed or a step could not be done (named), 2 when the final verdict is
unknown. The same seed draws the same chaos schedule; the run prints the command that replays
it. Real processes on a real broker are not deterministic: the schedule is, the timing of
what happens between its faults is not.

The runner does every step through a ``Backend``: ``RealBackend`` (site processes on
RabbitMQ: ``emulator.orchestrator``, ``emulator.faults``...) or the simulator's
(``emulator.sim.SimBackend``: the same sites in one process on a virtual clock, where a run
is a function of its seed). Waits and deadlines are on the backend's clock.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from broker import admin
from emulator import backup, checker, faults, history, orchestrator, recover
from emulator.errors import LabError, OutputClosed, SmslabError
from emulator.lab import BrokerRef, LabDir, LabInfo
from emulator.scenario import (
    Backup,
    Burst,
    Chaos,
    ChaosAction,
    Create,
    Expect,
    Fault,
    Recover,
    Scenario,
    SiteStep,
    Start,
    Step,
    Up,
    Workload_,
    draw_schedule,
    schedule_json,
)
from sites.store import read_snapshot

Progress = Callable[[str], None]


@dataclass
class Outcome:
    step: int
    what: str
    ok: bool
    detail: str = ""


@dataclass
class RunResult:
    run_dir: Path
    seed: int
    replay: str
    exit_code: int
    outcomes: list[Outcome] = field(default_factory=list)
    verdict: str | None = None
    error: str | None = None
    schedule: list[ChaosAction] = field(default_factory=list)
    converged_in: list[float] = field(default_factory=list)
    report: checker.Report | None = None

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]


class Backend(Protocol):
    """What the runner does to a lab; every wait is on ``now``/``sleep``."""

    lab_dir: LabDir
    poll: float  # seconds between two looks while waiting on a condition

    def up(self, topology_path: Path, *, timeout: float, progress: Progress) -> LabInfo: ...
    def load(self) -> LabInfo: ...
    def now(self) -> float: ...
    def sleep(self, seconds: float) -> None: ...
    def running(self, site: str) -> bool: ...
    def kill(self, site: str) -> None: ...
    def stop(self, site: str) -> None: ...
    def restart(self, site: str) -> None: ...
    def start(self, site: str, *, restore: str | None = None, wipe: bool = False,
              progress: Progress) -> None: ...
    def pause(self, site: str, *, for_s: float | None = None) -> None: ...
    def resume(self, site: str) -> None: ...
    def backup(self, site: str) -> str: ...
    def recover(self, site: str, *, backup_id: str | None, wipe: bool, reference: str | None,
                timeout: float, progress: Progress) -> None: ...
    def link_fault(self, kind: str, a: str, b: str, *, oneway: bool, params: dict[str, float], seed: int,
                   for_s: float | None, progress: Progress) -> tuple[str, str]: ...
    def disconnect(self, site: str, *, for_s: float | None, progress: Progress) -> str: ...
    def alarm(self, *, for_s: float | None, progress: Progress) -> str: ...
    def broker_restart(self, *, progress: Progress) -> None: ...
    def heal(self, fault_id: str, *, progress: Progress) -> None: ...
    def heal_all(self, *, progress: Progress) -> None: ...
    def control(self, site: str, command: dict[str, Any]) -> dict[str, Any]: ...
    def applied(self) -> int: ...
    def quiet(self) -> bool: ...
    def check(self, *, with_history: bool = True) -> checker.Report: ...
    def down(self, *, progress: Progress) -> None: ...
    def simulated(self) -> float | None: ...  # virtual seconds run (None: real time)


class RealBackend:
    """Site processes on RabbitMQ, through the same functions as the CLI."""

    poll = 0.5

    def __init__(self, lab_dir: LabDir, amqp_url: str, broker: BrokerRef | None = None) -> None:
        self.lab_dir = lab_dir
        self.amqp_url = amqp_url
        self.broker = broker
        self._info: LabInfo | None = None

    def up(self, topology_path: Path, *, timeout: float, progress: Progress) -> LabInfo:
        self._info = orchestrator.up(topology_path, self.lab_dir, self.amqp_url, timeout=timeout,
                                     progress=progress, broker=self.broker)
        return self._info

    def load(self) -> LabInfo:
        self._info = self.lab_dir.load()
        return self._info

    def _lab(self) -> LabInfo:
        return self._info or self.load()

    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def running(self, site: str) -> bool:
        return self.lab_dir.pid(site) is not None

    def kill(self, site: str) -> None:
        orchestrator.kill(self.lab_dir, site)

    def stop(self, site: str) -> None:
        orchestrator.stop(self.lab_dir, site)

    def restart(self, site: str) -> None:
        orchestrator.restart(self.lab_dir, site)

    def start(self, site: str, *, restore: str | None = None, wipe: bool = False, progress: Progress) -> None:
        orchestrator.start(self.lab_dir, site, restore=restore, wipe=wipe, progress=progress)

    def pause(self, site: str, *, for_s: float | None = None) -> None:
        faults.apply_pause(self.lab_dir, self._lab(), site, for_s=for_s)

    def resume(self, site: str) -> None:
        for spec in faults.active(self.lab_dir):
            if spec.kind == "pause" and spec.site == site:
                faults.heal(self.lab_dir, self._lab(), spec.id)

    def backup(self, site: str) -> str:
        return backup.create(self.lab_dir, self._lab(), site).id

    def recover(self, site: str, *, backup_id: str | None, wipe: bool, reference: str | None, timeout: float,
                progress: Progress) -> None:
        recover.recover(self.lab_dir, site, backup_id=backup_id, wipe=wipe, reference=reference, timeout=timeout,
                        progress=progress)

    def link_fault(self, kind: str, a: str, b: str, *, oneway: bool, params: dict[str, float], seed: int,
                   for_s: float | None, progress: Progress) -> tuple[str, str]:
        spec = faults.apply_link_fault(self.lab_dir, self._lab(), kind, a, b, oneway=oneway, params=params,
                                       seed=seed, for_s=for_s, progress=progress)
        return spec.id, spec.describe()

    def disconnect(self, site: str, *, for_s: float | None, progress: Progress) -> str:
        return faults.apply_disconnect(self.lab_dir, self._lab(), site, for_s=for_s, progress=progress).id

    def alarm(self, *, for_s: float | None, progress: Progress) -> str:
        return faults.apply_alarm(self.lab_dir, self._lab(), for_s=for_s, progress=progress).id

    def broker_restart(self, *, progress: Progress) -> None:
        faults.broker_restart(self.lab_dir, self._lab(), progress=progress)

    def heal(self, fault_id: str, *, progress: Progress) -> None:
        faults.heal(self.lab_dir, self._lab(), fault_id, progress=progress)

    def heal_all(self, *, progress: Progress) -> None:
        faults.heal_all(self.lab_dir, self._lab(), progress=progress)

    def control(self, site: str, command: dict[str, Any]) -> dict[str, Any]:
        info = self._lab()
        return admin.control_request(info.amqp_url, info.lab_id, site, command)

    def applied(self) -> int:
        total = 0
        for code in self._lab().topology.depth_order():
            snap = read_snapshot(self.lab_dir.site_db(code))
            if snap:
                total += sum(link.applied for link in snap.links.values())
        return total

    def quiet(self) -> bool:
        return True  # no cheaper look than the checker's

    def check(self, *, with_history: bool = True) -> checker.Report:
        return checker.check(self.lab_dir, self._lab(), with_history=with_history)

    def down(self, *, progress: Progress) -> None:
        orchestrator.down(self.lab_dir, keep=True, progress=progress)

    def simulated(self) -> float | None:
        return None


class Runner:
    def __init__(self, scenario: Scenario, backend: Backend, *, seed: int, progress: Progress,
                 topology_path: Path | None = None) -> None:
        self.scenario = scenario
        self.backend = backend
        self.lab_dir = backend.lab_dir
        self.seed = seed
        self.say = progress
        self.topology_path = topology_path
        self.info: LabInfo | None = None
        self.backups: dict[str, str] = {}  # step name -> backup id
        self.faults: dict[str, str] = {}  # step name -> fault id
        self.outcomes: list[Outcome] = []
        self.schedule: list[ChaosAction] = []
        self.seeds = _SeedSequence(seed)
        self.converged_in: list[float] = []  # seconds each wait for convergence took

    # -- the run ------------------------------------------------------------------------------

    def run(self, *, bring_up: bool = True) -> None:
        steps = list(self.scenario.steps)
        if bring_up and not (steps and steps[0].name == "up"):
            self._up(Up())
        elif not bring_up:
            self.info = self.backend.load()
        for i, step in enumerate(steps, 1):
            self.say(f"step {i}/{len(steps)}: {step.describe()}")
            self._step(i, step)

    def _lab(self) -> LabInfo:
        if self.info is None:
            raise LabError("the lab is not up yet", hint="the first step brings it up")
        return self.info

    def _up(self, step: Up) -> None:
        assert self.topology_path is not None
        self.info = self.backend.up(self.topology_path, timeout=step.timeout,
                                    progress=lambda m: self.say(f"  {m.strip()}"))

    def _indent(self, msg: str) -> None:
        self.say(f"  {msg.strip()}")

    def _step(self, i: int, step: Step) -> None:
        v = step.value
        name = step.name
        lab = self.backend
        if name == "up":
            self._up(v if isinstance(v, Up) else Up())
        elif name in ("kill", "stop", "restart", "pause", "resume") and isinstance(v, SiteStep):
            self._process(name, v.site)
        elif isinstance(v, Start):
            restore = self.backups[v.restore] if v.restore else None
            lab.start(v.site, restore=restore, wipe=v.wipe, progress=self._indent)
        elif isinstance(v, Backup):
            backup_id = lab.backup(v.site)
            self.backups[v.as_ or v.site] = backup_id
            self.say(f"  backup {backup_id} of {v.site} as {v.as_ or v.site!r}")
        elif isinstance(v, Recover):
            lab.recover(v.site, backup_id=self.backups[v.backup] if v.backup else None, wipe=v.wipe,
                        reference=v.reference, timeout=v.timeout, progress=self._indent)
        elif isinstance(v, Fault):
            self._fault(v)
        elif name == "heal":
            names = [v] if isinstance(v, str) else list(v)
            if "all" in names:
                lab.heal_all(progress=self._indent)
            for n in names:
                if n != "all" and n in self.faults:
                    lab.heal(self.faults[n], progress=self._indent)
        elif name == "wait":
            lab.sleep(float(v))
        elif name == "wait-envelopes":
            self._wait_envelopes(int(v))
        elif name == "wait-converged":
            self._converge(float(v))
        elif isinstance(v, Workload_):
            for code in v.sites or self._running():
                self._control(code, {"cmd": "set-workload", **v.rates})
        elif name in ("pause-workload", "resume-workload"):
            for code in v or self._running():
                self._control(code, {"cmd": name})
        elif isinstance(v, Burst):
            self._control(v.site, {"cmd": "burst", "count": v.count, "keys": v.keys})
        elif isinstance(v, Create):
            command: dict[str, Any] = {"cmd": "create", "kind": v.kind}
            if v.name:
                command["name"] = v.name
            self._control(v.site, command)
        elif isinstance(v, Expect):
            self._expect(i, v)
        elif isinstance(v, Chaos):
            self._chaos(v)
        else:  # pragma: no cover - the scenario model allows only the steps above
            raise LabError(f"step {name} is not known to the runner")

    def _process(self, action: str, site: str) -> None:
        lab = self.backend
        if action == "kill":
            lab.kill(site)
        elif action == "stop":
            lab.stop(site)
        elif action == "restart":
            lab.restart(site)
        elif action == "pause":
            lab.pause(site)
        else:
            lab.resume(site)

    def _fault(self, v: Fault, hold: float | None = None) -> str | None:
        lab = self.backend
        for_s = hold if hold is not None else v.for_
        seed = v.seed if v.seed is not None else self.seeds.next()
        fault_id = None
        say = self._indent
        if v.kind in ("partition", "drop", "duplicate", "reorder", "delay"):
            if not (v.a and v.b):
                raise LabError(f"a {v.kind} fault needs a: and b:, the two ends of a link")
            params = {k: float(x) for k in ("rate", "window", "ms", "jitter") if (x := getattr(v, k)) is not None}
            fault_id, _ = lab.link_fault(v.kind, v.a, v.b, oneway=v.oneway, params=params, seed=seed, for_s=for_s,
                                         progress=say)
        elif v.kind == "disconnect":
            if not v.site:
                raise LabError("a disconnect fault needs site:")
            fault_id = lab.disconnect(v.site, for_s=for_s, progress=say)
        elif v.kind == "alarm":
            fault_id = lab.alarm(for_s=for_s, progress=say)
        else:
            lab.broker_restart(progress=say)
        if fault_id is not None and v.name:
            self.faults[v.name] = fault_id
        return fault_id

    def _control(self, site: str, command: dict[str, Any]) -> dict[str, Any]:
        answer = self.backend.control(site, command)
        if not answer.get("ok", False):
            raise LabError(f"{site}: {answer.get('error')}", hint=answer.get("hint"))
        return answer

    def _running(self) -> list[str]:
        return [c for c in self._lab().topology.depth_order() if self.backend.running(c)]

    def _wait_envelopes(self, count: int, timeout: float = 300.0) -> None:
        lab = self.backend
        start = lab.applied()
        deadline = lab.now() + timeout
        while lab.applied() < start + count:
            if lab.now() > deadline:
                raise LabError(f"{count} envelopes were not applied within {timeout:.0f}s"
                               f" ({lab.applied() - start} were)", hint="is the workload running?")
            lab.sleep(0.2)

    def _converge(self, timeout: float) -> checker.Report:
        lab = self.backend
        for code in self._running():
            try:
                self._control(code, {"cmd": "pause-workload"})
            except SmslabError:
                pass
        deadline = lab.now() + timeout
        started = lab.now()
        last = ""
        while True:
            report = lab.check(with_history=False) if lab.quiet() else None
            if report is not None and report.verdict == "valid":
                report = lab.check()
            if report is not None and report.verdict == "valid":
                self.converged_in.append(lab.now() - started)
                self.say(f"  converged in {lab.now() - started:.1f}s")
                return report
            lines = report.render(limit=3).splitlines() if report is not None else ["", "links still moving"]
            summary = lines[1] if len(lines) > 1 else ""
            if summary != last:
                self.say(f"  [{lab.now() - started:4.0f}s] {report.verdict if report else 'busy'}: {summary}")
                last = summary
            if lab.now() > deadline:
                if report is None:
                    report = lab.check()
                    lines = report.render(limit=3).splitlines()
                    summary = lines[1] if len(lines) > 1 else ""
                raise LabError(f"the lab did not converge within {timeout:.0f}s: {report.verdict}, {summary}")
            lab.sleep(lab.poll)

    def _expect(self, i: int, v: Expect) -> None:
        lab = self.backend
        deadline = lab.now() + v.within
        problems: list[str] = []
        while True:
            problems = []
            if v.check or v.violation or v.no_violation:
                report = lab.check()
                kinds = {x.kind for x in report.violations}
                if v.check and report.verdict != v.check:
                    problems.append(f"the verdict is {report.verdict}, not {v.check}"
                                    + (f" ({', '.join(sorted(report.kinds()))})" if report.kinds() else ""))
                for kind in _names(v.violation):
                    if kind not in kinds:
                        problems.append(f"no {kind} violation (found: {', '.join(sorted(kinds)) or 'none'})")
                for kind in _names(v.no_violation):
                    if kind in kinds:
                        problems.append(f"a {kind} violation is there")
            if v.status:
                snap = read_snapshot(self.lab_dir.site_db(v.status.site))
                ids = _status_ids(self.lab_dir, v.status.site) if snap else []
                if v.status.message_id not in ids:
                    problems.append(f"no status message {v.status.message_id} at {v.status.site}")
            if not problems or lab.now() > deadline:
                break
            lab.sleep(lab.poll)
        ok = not problems
        self.outcomes.append(Outcome(i, f"expect {v.describe()}", ok, "; ".join(problems)))
        self.say(f"  expectation {'held' if ok else 'FAILED'}: {v.describe()}" + ("" if ok else f": {'; '.join(problems)}"))

    # -- chaos --------------------------------------------------------------------------------

    def _chaos(self, chaos: Chaos) -> None:
        info = self._lab()
        lab = self.backend
        actions = draw_schedule(chaos, info.topology, self.seed)
        self.schedule.extend(actions)
        self.say(f"  chaos for {chaos.duration:g}s: {len(actions)} fault(s) drawn from seed {self.seed}")
        started = lab.now()
        restarts: list[tuple[float, str]] = []  # (due, site) of killed sites
        for n, action in enumerate(actions, 1):
            while lab.now() - started < action.at:
                restarts = self._due_restarts(restarts, started)
                lab.sleep(min(0.05, max(0.001, action.at - (lab.now() - started))))
            restarts = self._due_restarts(restarts, started)
            try:
                what = self._chaos_action(action, restarts, started)
                self.say(f"  [{action.at:6.1f}s] {n}/{len(actions)} {what}")
            except SmslabError as exc:
                self.say(f"  [{action.at:6.1f}s] {n}/{len(actions)} {action.kind} skipped: {exc.message}")
        while lab.now() - started < chaos.duration:
            restarts = self._due_restarts(restarts, started)
            lab.sleep(0.1)
        for _, site in restarts:
            self._start_quietly(site)
        if chaos.heal:
            lab.heal_all(progress=self._indent)
            for code in info.topology.depth_order():
                if not lab.running(code):
                    self._start_quietly(code)
            # The workload goes on as long as the checker looks for a fault's effects after
            # its heal, so a fault near the end is seen on traffic too (not vacuous).
            settings = info.topology.settings
            tail = settings.resend_after + 2 * settings.sync_interval
            self.say(f"  healed; the workload runs {tail:g}s more, then pauses for convergence")
            lab.sleep(tail)
            self._converge(chaos.converge_timeout)

    def _chaos_action(self, action: ChaosAction, restarts: list[tuple[float, str]], started: float) -> str:
        lab = self.backend
        if action.kind == "kill":
            assert action.site is not None
            if not lab.running(action.site):
                return f"kill {action.site}: not running, nothing to do"
            lab.kill(action.site)
            restarts.append((lab.now() - started + action.hold, action.site))
            return f"kill -9 {action.site}, restart in {action.hold:g}s"
        if action.kind in ("pause", "disconnect", "restart") and action.site and not lab.running(action.site):
            return f"{action.kind} {action.site}: not running, nothing to do"
        if action.kind == "restart":
            assert action.site is not None
            lab.restart(action.site)
            return f"restart {action.site}"
        if action.kind == "pause":
            assert action.site is not None
            lab.pause(action.site, for_s=action.hold)
            return f"pause {action.site} for {action.hold:g}s"
        if action.kind == "disconnect":
            assert action.site is not None
            lab.disconnect(action.site, for_s=action.hold, progress=_silent)
            return f"disconnect {action.site} for {action.hold:g}s"
        if action.kind == "broker-restart":
            lab.broker_restart(progress=_silent)
            return "broker restart"
        assert action.a is not None and action.b is not None
        down = [site for site in (action.a, action.b) if not lab.running(site)]
        if down:  # nothing would cross the link to prove the fault: not now
            return f"{action.kind} {action.a}<->{action.b}: {', '.join(down)} not running, nothing to do"
        fault_id, described = lab.link_fault(action.kind, action.a, action.b, oneway=False, params=dict(action.params),
                                             seed=action.seed, for_s=action.hold, progress=_silent)
        return f"{described} for {action.hold:g}s (fault {fault_id})"

    def _due_restarts(self, restarts: list[tuple[float, str]], started: float) -> list[tuple[float, str]]:
        now = self.backend.now() - started
        for _due, site in [r for r in restarts if r[0] <= now]:
            self._start_quietly(site)
        return [r for r in restarts if r[0] > now]

    def _start_quietly(self, site: str) -> None:
        if self.backend.running(site):
            return
        try:
            self.backend.start(site, progress=self._indent)
            self.say(f"  {site} started again")
        except SmslabError as exc:
            self.say(f"  {site} did not start again at once: {exc.message} (it keeps trying)")


def _silent(_msg: str) -> None:
    pass


class _SeedSequence:
    """Seeds for the faults of a run's steps, drawn from the run's seed."""

    def __init__(self, seed: int) -> None:
        import random

        self.rng = random.Random(f"smslab-steps:{seed}")

    def next(self) -> int:
        return self.rng.randrange(2**31)


def _names(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _status_ids(lab_dir: LabDir, site: str) -> list[int]:
    from sites.store import read_only

    with read_only(lab_dir.site_db(site)) as store:
        return [int(m["id"]) for m in store.recent_status(100_000)] if store else []


def run_scenario(scenario: Scenario, *, seed: int | None = None, run_dir: Path, amqp_url: str = "",
                 lab_dir: LabDir | None = None, scenario_path: Path | None = None, keep_up: bool = False,
                 progress: Progress = print, existing_lab: bool = False, broker: BrokerRef | None = None,
                 backend: Callable[[LabDir], Backend] | None = None, replay: str | None = None) -> RunResult:
    """Run a scenario and keep everything in ``run_dir``; ``backend`` makes the lab's backend
    (default: site processes on the broker at ``amqp_url``)."""
    seed = scenario.seed if seed is None else seed
    run_dir.mkdir(parents=True, exist_ok=True)
    lab_dir = lab_dir or LabDir(run_dir / "lab")
    replay = replay or f"smslab run {scenario_path or scenario.source} --seed {seed}"
    log = open(run_dir / "log.txt", "a")  # noqa: SIM115 - closed in finally

    # "running": the run's steps; after them its end is written and its lab taken down, whatever happens
    state = {"reader_gone": False, "running": False}

    def say(msg: str) -> None:
        log.write(msg + "\n")
        log.flush()
        if state["reader_gone"]:
            return
        try:
            progress(msg)
        except (BrokenPipeError, OutputClosed):
            # the reader of the progress went away (smslab run ... | head): as SIGTERM, the
            # run stops where it is and its lab is taken down; the log keeps every line
            state["reader_gone"] = True
            if state["running"]:
                raise OutputClosed("the output was closed") from None

    if scenario_path is not None and scenario_path.exists():
        shutil.copyfile(scenario_path, run_dir / "scenario.yaml")
    topology_path = run_dir / "topology.yaml"
    topology_path.write_text(scenario.topology.to_yaml())
    state["running"] = True  # a reader gone already: the run stops here, nothing started
    say(f"scenario {scenario.scenario}, seed {seed}, run directory {run_dir}")
    lab = backend(lab_dir) if backend is not None else RealBackend(lab_dir, amqp_url, broker)
    runner = Runner(scenario, lab, seed=seed, progress=say, topology_path=topology_path)
    started = time.time()
    error: str | None = None
    report: checker.Report | None = None
    try:
        runner.run(bring_up=not existing_lab)
        state["running"] = False
        report = lab.check()
    except SmslabError as exc:
        state["running"] = False
        error = f"{exc.message}" + (f" ({exc.hint})" if exc.hint else "")
        say(f"the run stopped: {error}")
        if runner.info is not None:
            try:  # what the lab looks like where the run stopped, for the verdict and the report
                report = lab.check()
            except SmslabError:
                report = None
    except KeyboardInterrupt as exc:
        state["running"] = False
        error = "interrupted"
        say("the run was interrupted" + (": its output was closed" if isinstance(exc, OutputClosed) else ""))
    finally:
        state["running"] = False
        result = _finish(runner, run_dir, lab_dir, seed, replay, started, report, error, keep_up, say)
        log.close()
    return result


def _finish(runner: Runner, run_dir: Path, lab_dir: LabDir, seed: int, replay: str, started: float,
            report: checker.Report | None, error: str | None, keep_up: bool, say: Progress) -> RunResult:
    scenario = runner.scenario
    # Always written, so every run directory has the same files: [] when nothing was drawn.
    (run_dir / "schedule.json").write_text(schedule_json(runner.schedule))
    if report is not None:
        (run_dir / "verdict.json").write_text(json.dumps(report.to_dict(), indent=2))
        final_ok = scenario.final in ("any", report.verdict)
        runner.outcomes.append(Outcome(len(scenario.steps) + 1, f"final verdict {scenario.final}", final_ok,
                                       "" if final_ok else f"the final verdict is {report.verdict}:"
                                       f" {_why(report)}"))
        say(report.render(limit=10))
    if lab_dir.exists() and not keep_up:
        try:
            runner.backend.down(progress=lambda m: say(f"  {m}"))
        except SmslabError as exc:
            say(f"bringing the lab down failed: {exc.message}")
    if lab_dir.exists():
        try:
            history.merge(lab_dir)
        except SmslabError:
            pass
        if history.history_path(lab_dir).exists():
            shutil.copyfile(history.history_path(lab_dir), run_dir / "history.jsonl")
    failed = [o for o in runner.outcomes if not o.ok]
    failed_steps = [o for o in failed if not o.what.startswith("final")]
    if error or failed_steps or report is None:
        code = 1
    elif scenario.final in ("any", report.verdict):
        code = 0
    elif scenario.final == "valid" and report.verdict == "unknown":
        code = 2
    else:
        code = 1
    result = RunResult(run_dir, seed, replay, code, runner.outcomes, report.verdict if report else None, error,
                       runner.schedule, runner.converged_in, report)
    (run_dir / "run.json").write_text(json.dumps({
        "scenario": scenario.scenario, "seed": seed, "replay": replay, "started": started, "finished": time.time(),
        "lab": runner.info.lab_id if runner.info else None, "verdict": result.verdict, "error": error,
        "exit": code, "simulated": runner.backend.simulated(), "steps": [s.describe() for s in scenario.steps],
        "expectations": [o.__dict__ for o in runner.outcomes],
    }, indent=2))
    try:
        from emulator import report as report_module

        path = report_module.write_report(run_dir)
        say(f"report: {path}")
    except ImportError:
        pass
    except SmslabError as exc:
        say(f"no report: {exc.message}")
    for o in failed:
        say(f"FAILED: step {o.step}: {o.what}: {o.detail}")
    if error:
        say(f"FAILED: {error}")
    say(f"{'passed' if code == 0 else 'failed' if code == 1 else 'unknown'}: replay with: {replay}")
    return result


def default_run_dir(scenario: Scenario, seed: int, root: Path | None = None) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return (root or Path("smslab-runs")) / f"{scenario.scenario}-{stamp}-seed{seed}"


def _why(report: checker.Report) -> str:
    """What made a verdict: the kinds that count, else (unknown) what kept it open, with sites."""
    if report.kinds():
        return ", ".join(sorted(report.kinds()))
    open_ = sorted({f"{v.kind} {v.site}" for v in report.violations if v.kind not in checker.NOTES})
    return ", ".join(open_[:8]) + (f" and {len(open_) - 8} more" if len(open_) > 8 else "") or "nothing"
