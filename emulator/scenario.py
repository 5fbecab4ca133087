"""Scenario files: a lab, steps to run on it, expectations, and a seeded chaos schedule.

A scenario is YAML, validated by pydantic; a mistake is refused before anything starts with
``<file>:<line>:`` and the rule, as the topology's are::

    scenario: kb-failure
    topology: ../examples/lab.yaml     # a path (relative to this file) or the topology inline
    seed: 1                            # the default; smslab run --seed N replays another
    steps:
      - wait-envelopes: 200
      - backup: {site: P01, as: before}
      - kill: P01
      - start: {site: P01, restore: before}      # restored WITHOUT recovery: the KB failure
      - expect: {check: invalid, violation: link}
      - recover: {site: P01, backup: before}
      - wait-converged: 120
      - expect: {check: valid}
    chaos:                              # optional: a fault schedule drawn from the seed
      duration: 120
      interval: [3, 8]
      faults: {kill: 2, partition: 2, drop: 1, pause: 1}
      targets: [P01, P02, S01]

Each step is a mapping with one key, the step's name (``kill: P01``). ``draw_schedule`` turns a
``chaos`` block and a seed into the same list of actions every time, byte for byte.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from emulator.errors import ConfigError
from emulator.faults import check_link_fault
from emulator.protocol.shaping import LINK_FAULTS
from emulator.topology import _LOADER, Topology, Workload, _fail, _Lines, parse_topology
from emulator.topology import _describe as _describe_topology

SiteCode = Annotated[str, Field(pattern=r"^[A-Z0-9]{3}$")]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,40}$")]
Seconds = Annotated[float, Field(gt=0, le=86_400)]

CHAOS_KINDS = ("kill", "pause", "restart", "disconnect", "broker-restart", *LINK_FAULTS)


class _Step(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Up(_Step):
    timeout: Seconds = 60.0


class SiteStep(_Step):
    site: SiteCode


class Start(_Step):
    site: SiteCode
    restore: Name | None = None  # a backup taken by a step (its name)
    wipe: bool = False


class Backup(_Step):
    site: SiteCode
    as_: Name | None = Field(default=None, alias="as")  # the name later steps use (default: the site code)


class Recover(_Step):
    site: SiteCode
    backup: Name | None = None
    wipe: bool = False
    reference: SiteCode | None = None
    timeout: Seconds = 180.0


class Fault(_Step):
    kind: Literal["partition", "drop", "duplicate", "reorder", "delay", "disconnect", "alarm", "broker-restart"]
    a: SiteCode | None = None  # link faults: the two ends
    b: SiteCode | None = None
    site: SiteCode | None = None  # disconnect
    oneway: bool = False
    rate: float | None = Field(default=None, ge=0, le=1)
    window: int | None = Field(default=None, ge=1, le=100_000)
    ms: float | None = Field(default=None, ge=0, le=600_000)
    jitter: float | None = Field(default=None, ge=0, le=600_000)
    for_: Seconds | None = Field(default=None, alias="for")
    seed: int | None = None
    name: Name | None = None  # what a heal step calls it


class Workload_(_Step):
    """Change workload rates at running sites (seconds between events; 0 disables)."""

    rates: dict[str, float]
    sites: list[SiteCode] | None = None

    @field_validator("rates")
    @classmethod
    def _known(cls, value: dict[str, float]) -> dict[str, float]:
        allowed = set(Workload.model_fields)
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise ValueError(f"unknown workload rate(s) {', '.join(unknown)}; use {', '.join(sorted(allowed))}")
        if any(v < 0 for v in value.values()):
            raise ValueError("workload intervals are seconds >= 0 (0 disables)")
        return value


class Burst(_Step):
    site: SiteCode
    count: int = Field(ge=1, le=10_000_000)
    keys: int = Field(default=1000, ge=1, le=1_000_000)


class Create(_Step):
    site: SiteCode
    kind: Literal["package", "advertisement", "collection"] = "package"
    name: str | None = Field(default=None, min_length=1, max_length=200)


class StatusExpectation(_Step):
    site: SiteCode
    message_id: int = Field(ge=0)


class Expect(_Step):
    """What must hold now. ``check`` waits up to ``within`` seconds for the verdict (a lab in
    motion may take a moment to show it); ``violation`` names a kind that must be among the
    violations; ``status`` a status message that must be at a site."""

    check: Literal["valid", "invalid", "unknown"] | None = None
    violation: str | list[str] | None = None
    no_violation: str | list[str] | None = None
    status: StatusExpectation | None = None
    within: Seconds = 30.0

    def describe(self) -> str:
        parts = []
        if self.check:
            parts.append(f"check {self.check}")
        if self.violation:
            parts.append(f"violation {self.violation}")
        if self.no_violation:
            parts.append(f"no violation {self.no_violation}")
        if self.status:
            parts.append(f"status {self.status.message_id} at {self.status.site}")
        return ", ".join(parts) or "nothing"


def chaos_weights_problem(weights: dict[str, float]) -> str | None:
    """What is wrong with a chaos block's fault weights (``faults:``, ``smslab sim --chaos``), or None."""
    bad = [f"{kind}={w}" for kind, w in weights.items() if not (math.isfinite(w) and w >= 0)]
    if bad:
        return f"a fault kind's weight is a finite number >= 0, not {', '.join(bad)}"
    if not weights or sum(weights.values()) <= 0:
        return "give each fault kind a weight >= 0, at least one above 0"
    if not math.isfinite(sum(weights.values())):
        return "the weights are too large to add up: give smaller ones (kill=2,partition=1)"
    return None


class Chaos(_Step):
    duration: Seconds
    interval: tuple[float, float] = (3.0, 8.0)  # seconds between two faults, drawn in this range
    faults: dict[str, float] = Field(default_factory=lambda: {"kill": 1.0, "partition": 1.0, "drop": 1.0})
    targets: list[SiteCode] | None = None  # sites struck (and links between them and their neighbours)
    hold: tuple[float, float] = (1.0, 6.0)  # how long a fault stays on, drawn in this range
    heal: bool = True  # at the end: heal, start every site, wait until converged
    converge_timeout: Seconds = 180.0
    broker_restarts: int = Field(default=0, ge=0, le=100)  # spread evenly over the duration

    @field_validator("faults")
    @classmethod
    def _kinds(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(CHAOS_KINDS))
        if unknown:
            raise ValueError(f"unknown chaos fault kind(s) {', '.join(unknown)}; use {', '.join(CHAOS_KINDS)}")
        problem = chaos_weights_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("interval", "hold")
    @classmethod
    def _range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not (0 < value[0] <= value[1] and math.isfinite(value[1])):
            raise ValueError(f"a range is [low, high] with 0 < low <= high, not {list(value)}")
        return value


STEPS: dict[str, type[BaseModel] | TypeAdapter[Any]] = {
    "up": Up, "kill": SiteStep, "stop": SiteStep, "start": Start, "restart": SiteStep, "pause": SiteStep,
    "resume": SiteStep, "backup": Backup, "recover": Recover, "fault": Fault, "heal": TypeAdapter(str | list[str]),
    "wait": TypeAdapter(Seconds), "wait-envelopes": TypeAdapter(Annotated[int, Field(ge=1)]),
    "wait-converged": TypeAdapter(Seconds), "workload": Workload_, "pause-workload": TypeAdapter(list[SiteCode]),
    "resume-workload": TypeAdapter(list[SiteCode]), "burst": Burst, "create": Create, "expect": Expect,
    "chaos": Chaos,
}
# a bare site code is enough for these
_SITE_ONLY = {"kill", "stop", "start", "restart", "pause", "resume", "backup", "recover"}


class Step(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    value: Any  # the validated model of the step (or a plain value: seconds, a count, names)
    line: int = 0

    def describe(self) -> str:
        v = self.value
        if isinstance(v, BaseModel):
            fields = {k: x for k, x in v.model_dump(by_alias=True, exclude_none=True).items()
                      if x not in (False, None) and k not in ("timeout", "within", "converge_timeout")}
            if isinstance(v, Expect):
                return f"expect {v.describe()}"
            inner = " ".join(f"{k}={x}" if k not in ("site", "kind") else str(x) for k, x in fields.items())
            return f"{self.name} {inner}".strip()
        return f"{self.name} {v}" if v not in (None, {}) else self.name


class Scenario(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    scenario: str
    description: str = ""
    topology: Topology
    seed: int = 1
    steps: list[Step]
    final: Literal["valid", "invalid", "unknown", "any"] = "valid"  # the verdict expected at the end
    source: str = ""


class _Raw(BaseModel):
    """The file as written, before steps are resolved."""

    model_config = ConfigDict(extra="forbid")

    scenario: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,60}$")]
    description: str = ""
    topology: str | dict[str, Any]
    mode: Literal["sms20", "hardened"] | None = None
    seed: int = 1
    steps: list[Any] = Field(default_factory=list)
    chaos: dict[str, Any] | None = None
    final: Literal["valid", "invalid", "unknown", "any"] = "valid"


def load_scenario(path: str | Path) -> Scenario:
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"scenario file {file} not found",
                          hint="give the path of a scenario YAML file, e.g. scenarios/kb-failure-sms20.yaml") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read scenario file {file}: {exc}") from None
    return parse_scenario(text, source=str(path), base=file.resolve().parent)


def parse_scenario(text: str, source: str = "<string>", base: Path | None = None) -> Scenario:
    try:
        root = yaml.compose(text, Loader=_LOADER)
        data = yaml.load(text, Loader=_LOADER)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise ConfigError(f"{source}:{mark.line + 1 if mark else 1}: YAML syntax error: {exc.problem or exc.context}",
                          hint="fix the YAML at that line") from None
    if not isinstance(data, dict) or root is None:
        raise ConfigError(f"{source}:1: a scenario is a YAML mapping with 'scenario:', 'topology:' and 'steps:'",
                          hint="see scenarios/kb-failure-sms20.yaml")
    lines = _Lines(root)
    try:
        raw = _Raw.model_validate(data)
    except ValidationError as exc:
        raise _errors(exc, source, lines, ()) from None
    topology = _topology(raw, source, base, lines)
    steps: list[Step] = []
    located: list[tuple[int, str, str]] = []
    entries = list(raw.steps) + ([{"chaos": raw.chaos}] if raw.chaos is not None else [])
    for i, entry in enumerate(entries):
        loc: tuple[str | int, ...] = ("steps", i) if i < len(raw.steps) else ("chaos",)
        line = lines.line(loc)
        if isinstance(entry, str):
            entry = {entry: None}
        if not isinstance(entry, dict) or len(entry) != 1:
            what = f"steps[{i}]" if loc[0] == "steps" else "chaos"
            located.append((line, f"{what}: a step is a mapping with one key, its name (e.g. '- kill: P01')",
                            "steps: " + ", ".join(STEPS)))
            continue
        name, value = next(iter(entry.items()))
        if name not in STEPS:
            located.append((line, f"steps[{i}]: unknown step {name!r}", "steps: " + ", ".join(STEPS)))
            continue
        if name in _SITE_ONLY and isinstance(value, str):
            value = {"site": value}
        if value is None:
            value = {} if name in ("up",) else value
        checker = STEPS[name]
        value_loc = (*loc, name) if loc[0] == "steps" else loc
        try:
            parsed = (checker.model_validate(value) if isinstance(checker, type)
                      else checker.validate_python(value))
        except ValidationError as exc:
            for error in exc.errors():
                where = value_loc + tuple(error["loc"])
                message, hint = _describe({**error, "loc": where}, lines.written(where))
                located.append((lines.line(where), message, hint))
            continue
        unknown = _check_sites(name, parsed, topology, i, line)
        located.extend(unknown or _check_step(name, parsed, topology, i, line))
        steps.append(Step(name=name, value=parsed, line=line))
    located.extend(_check_names(steps, topology))
    if located:
        raise _fail(source, located)
    return Scenario(scenario=raw.scenario, description=raw.description, topology=topology, seed=raw.seed,
                    steps=steps, final=raw.final, source=source)


def _topology(raw: _Raw, source: str, base: Path | None, lines: _Lines) -> Topology:
    if isinstance(raw.topology, str):
        path = (base or Path.cwd()) / raw.topology
        if not path.exists():
            raise ConfigError(f"{source}:{lines.line(('topology',))}: topology file {raw.topology} not found"
                              f" (looked in {path.parent})", hint="a path relative to the scenario file")
        text = path.read_text()
        topo = parse_topology(text, str(path))
    else:
        topo = parse_topology(yaml.safe_dump(raw.topology, sort_keys=False), f"{source} (topology)")
    if raw.mode and raw.mode != topo.mode:
        topo = topo.model_copy(update={"mode": raw.mode})
    return topo


def _check_sites(name: str, value: Any, topo: Topology, i: int, line: int) -> list[tuple[int, str, str]]:
    codes: list[str] = []
    if isinstance(value, BaseModel):
        for field in ("site", "a", "b", "reference"):
            code = getattr(value, field, None)
            if isinstance(code, str):
                codes.append(code)
        if isinstance(value, Expect) and value.status:
            codes.append(value.status.site)
        if isinstance(value, Chaos | Workload_):
            codes.extend(getattr(value, "targets", None) or getattr(value, "sites", None) or [])
    elif name in ("pause-workload", "resume-workload"):
        codes.extend(value)
    bad = [c for c in codes if c not in topo.codes]
    return [(line, f"steps[{i}] ({name}): unknown site {c}; sites in this lab: {', '.join(topo.codes)}",
             "use the site codes of the topology") for c in bad]


def _check_step(name: str, value: Any, topo: Topology, i: int, line: int) -> list[tuple[int, str, str]]:
    """What the topology alone rules out in a step whose sites are all in it, judged as the
    lab would judge it mid-run (link faults by ``emulator.faults.check_link_fault`` itself)."""
    where = f"steps[{i}] ({name})" if name != "chaos" else "chaos"

    def refuse(message: str, hint: str) -> list[tuple[int, str, str]]:
        return [(line, f"{where}: {message}", hint)]

    if isinstance(value, Fault):
        if value.kind in LINK_FAULTS:
            if not (value.a and value.b):
                return refuse(f"a {value.kind} fault needs a: and b:, the two ends of a link",
                              "e.g. '- fault: {kind: " + value.kind + ", a: P01, b: CEN}'")
            params = {k: float(x) for k in ("rate", "window", "ms", "jitter") if (x := getattr(value, k)) is not None}
            try:
                check_link_fault(topo, value.kind, value.a, value.b, params, option=str)
            except ConfigError as exc:
                return refuse(exc.message, exc.hint or "a fault step's parameters: rate (drop, duplicate),"
                              " window (reorder), ms and jitter (delay)")
        elif value.kind == "disconnect" and not value.site:
            return refuse("a disconnect fault needs site:", "e.g. '- fault: {kind: disconnect, site: P01}'")
    elif isinstance(value, Backup) and topo.site(value.site).type == "secondary":
        return refuse(f"{value.site} is a secondary site: secondary sites are not backed up (as in SMS 2.0;"
                      " they have no site database of their own)",
                      f"back up a primary or the central site; a secondary is rebuilt with"
                      f" '- recover: {{site: {value.site}, wipe: true}}'")
    elif isinstance(value, Recover):
        if value.backup and value.wipe:
            return refuse("backup: and wipe: exclude each other", "a recovery starts from a backup or from nothing")
        if value.backup and topo.site(value.site).type == "secondary":
            return refuse(f"{value.site} is a secondary site: secondary sites are not backed up; their"
                          " recovery is a reinstall", f"'- recover: {{site: {value.site}, wipe: true}}'")
        if value.reference and value.reference not in topo.children(value.site):
            return refuse(f"reference site {value.reference} is not a child of {value.site}",
                          f"children of {value.site}: {', '.join(topo.children(value.site)) or 'none'}")
    elif isinstance(value, Burst) and topo.parent(value.site) is None:
        return refuse(f"{value.site} has no parent to send a burst to (the {topo.site(value.site).type} site)",
                      "a burst is of a site with a parent: a primary or a secondary")
    elif isinstance(value, Create) and topo.site(value.site).type == "secondary":
        return refuse(f"{value.site} is a secondary site: objects are created at primaries",
                      "create at a primary or the central site")
    return []


def _check_names(steps: list[Step], topo: Topology) -> list[tuple[int, str, str]]:
    """A restore or a recovery names a backup made by an earlier step, of the same site; a
    heal, a fault."""

    def secondary(code: str) -> bool:  # no backup is of its site: _check_step said so already
        return code in topo.codes and topo.site(code).type == "secondary"

    backups: dict[str, str] = {}  # name -> the site backed up
    faults: set[str] = set()
    out = []
    for i, step in enumerate(steps):
        v = step.value
        if isinstance(v, Backup):
            backups[v.as_ or v.site] = v.site
        elif isinstance(v, Start | Recover):
            wanted = v.restore if isinstance(v, Start) else v.backup
            if wanted and wanted not in backups:
                out.append((step.line, f"steps[{i}] ({step.name}): no earlier backup step made {wanted!r}",
                            "add '- backup: {site: ..., as: " + wanted + "}' before it"))
            elif wanted and backups[wanted] != v.site and not (isinstance(v, Recover) and secondary(v.site)):
                out.append((step.line, f"steps[{i}] ({step.name}): backup {wanted!r} is of {backups[wanted]}, not {v.site}",
                            f"a site is restored from a backup of its own: back up {v.site}"))
        elif isinstance(v, Fault) and v.name:
            faults.add(v.name)
        elif step.name == "heal":
            names = [v] if isinstance(v, str) else v
            missing = [n for n in names if n != "all" and n not in faults]
            if missing:
                out.append((step.line, f"steps[{i}] (heal): no earlier fault step is named {', '.join(missing)}",
                            "name a fault with 'name:', or heal: all"))
    return out


_TOPOLOGY_HINT = "see examples/lab.yaml for a valid topology"
_SCENARIO_HINT = "see the shipped scenarios/*.yaml and the README's Scenarios section"


def _describe(error: Any, written: str | None) -> tuple[str, str]:
    """A pydantic error in a scenario: the topology's wording, and a hint about scenarios
    where the topology's default hint (about topologies) would be wrong."""
    message, hint = _describe_topology(error, written)
    return message, _SCENARIO_HINT if hint == _TOPOLOGY_HINT else hint


def _errors(exc: ValidationError, source: str, lines: _Lines, prefix: tuple[str | int, ...]) -> ConfigError:
    located = []
    for error in exc.errors():
        loc = prefix + tuple(error["loc"])
        message, hint = _describe({**error, "loc": loc}, lines.written(loc))
        located.append((lines.line(loc), message, hint))
    return _fail(source, located)


# -- the chaos schedule ------------------------------------------------------------------------


class ChaosAction(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    at: float  # seconds after the chaos step began
    kind: str
    site: str | None = None
    a: str | None = None
    b: str | None = None
    hold: float  # how long it stays on (a kill: until the restart)
    params: dict[str, float] = Field(default_factory=dict)
    seed: int


def draw_schedule(chaos: Chaos, topology: Topology, seed: int) -> list[ChaosAction]:
    """The faults a chaos step injects, drawn from ``seed``: the same seed, the same list."""
    rng = random.Random(f"smslab-chaos:{seed}")
    targets = chaos.targets or [c for c in topology.depth_order()]
    links = sorted({(c, p) for c in targets for p in [topology.parent(c)] if p}
                   | {(child, c) for c in targets for child in topology.children(c)})
    kinds = sorted(chaos.faults)
    weights = [chaos.faults[k] for k in kinds]
    out: list[ChaosAction] = []
    t = rng.uniform(*chaos.interval)
    while t < chaos.duration:
        kind = rng.choices(kinds, weights)[0]
        hold = round(min(rng.uniform(*chaos.hold), max(0.5, chaos.duration - t)), 3)
        params: dict[str, float] = {}
        site = a = b = None
        if kind in LINK_FAULTS:
            if not links:
                t += rng.uniform(*chaos.interval)
                continue
            a, b = links[rng.randrange(len(links))]
            if kind in ("drop", "duplicate"):
                params["rate"] = round(rng.uniform(0.1, 0.5), 3)
            elif kind == "reorder":
                params["window"] = float(rng.randint(2, 10))
            elif kind == "delay":
                params["ms"] = float(rng.randint(50, 500))
                params["jitter"] = float(rng.randint(0, 100))
        elif kind != "broker-restart":
            site = targets[rng.randrange(len(targets))]
        out.append(ChaosAction(at=round(t, 3), kind=kind, site=site, a=a, b=b, hold=hold, params=params,
                               seed=rng.randrange(2**31)))
        t += rng.uniform(*chaos.interval)
    for n in range(chaos.broker_restarts):
        at = round(chaos.duration * (n + 1) / (chaos.broker_restarts + 1), 3)
        out.append(ChaosAction(at=at, kind="broker-restart", hold=0.0, seed=rng.randrange(2**31)))
    return sorted(out, key=lambda a: a.at)


def schedule_json(actions: list[ChaosAction]) -> str:
    """The schedule as written to the run directory: the same seed gives the same bytes."""
    return json.dumps([a.model_dump() for a in actions], sort_keys=True, indent=1) + "\n"
