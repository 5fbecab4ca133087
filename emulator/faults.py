"""Faults from outside the sites: apply, verify on traffic, heal. The sites know nothing.

Theory of operation
-------------------
A fault is a value (``FaultSpec``) kept in the lab directory while it is on
(``faults/<id>.json``), written *before* anything changes: a CLI that crashes half way never
leaves a link cut that ``smslab faults`` does not show, and ``heal`` (or ``down``) undoes it.

- Link faults (partition, drop, duplicate, reorder, delay) live on the broker. Every directed
  link has its own routing key (``link.<FROM>.<TO>``), bound to the receiver's inbox. A fault
  moves the binding to the link's relay queue; the lab's fault daemon (``emulator.labd``)
  consumes the relay, asks the fault's seeded shaper what to do with each message
  (``emulator.protocol.shaping``) and republishes to the receiver. Healing moves the binding
  back and drains the relay: what it held arrives, late. So link faults work wherever the
  sites only share the broker.
- ``disconnect``: the site's broker connections are closed and its reconnects fail while the
  fault is on: in a lab with per-site identities its broker user's connection limit is 0 (the
  broker refuses it), and in any lab the daemon closes what connects anyway.
- ``alarm``: the broker's memory watermark is set to 0: a memory alarm blocks every publisher.
- ``pause``: SIGSTOP of the site's process; healing is SIGCONT.
- ``broker-restart`` happens at once (stop_app, start_app) and stays in the history only.
- ``broker-node-kill`` (a lab on a local cluster, ``smslab up --cluster DIR``): SIGKILL of one
  node's process; the sites on it fail over, the quorum queues it led elect new leaders.
  Healing starts the node again and waits until the cluster lists it running.
- ``isolate`` (a site on a host of its own, ``smslab up --netns``): the site's network namespace
  loses its link; healing sets it up again (``emulator.hostnet``).
- ``broker-partition`` (a lab on a local cluster): iptables rules cut one node's Erlang
  distribution traffic from the other nodes; with ``pause_minority`` the node pauses and its
  sites fail over. Healing deletes the rules and waits until the node runs in the cluster again.

A fault file that cannot be read (damaged by hand or by a full disk) is not hidden: it is listed
as ``damaged`` with what could be read of it, and healing it undoes what it names (a link fault
that names no links: every link no readable fault holds goes back to its inbox).

Each fault reports that it took effect, checked on traffic (a link fault: the relay has seen
the link's messages; disconnect: the site has no connection; alarm: the broker reports it;
pause: the process is stopped), or fails with a clear error and is healed. Every fault on and
off is an event of the lab's history, with the fault's id and seed.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import secrets
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from broker import admin, names, urls
from broker.control import BrokerControl, ManagementApi, Rabbitmqctl
from emulator import history, hostnet
from emulator.errors import ConfigError, LabError, SmslabError
from emulator.lab import LabDir, LabInfo
from emulator.protocol.shaping import LINK_FAULTS, Shaper
from emulator.topology import Settings, Topology

FaultKind = Literal["partition", "drop", "duplicate", "reorder", "delay", "disconnect", "alarm", "pause",
                    "broker-node-kill", "isolate", "broker-partition"]
FAULT_KINDS: tuple[str, ...] = (*LINK_FAULTS, "disconnect", "alarm", "pause", "broker-restart", "broker-node-kill",
                                "isolate", "broker-partition")
Progress = Callable[[str], None]


def _quiet(_msg: str) -> None:
    pass


class FaultSpec(BaseModel):
    # no NaN or infinity: JSON has neither, and a file that does not read back is a fault nobody sees
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    id: str
    kind: FaultKind
    target: str  # "P01->CEN", "P01<->CEN", "P01" or "broker"
    links: list[tuple[str, str]] = Field(default_factory=list)  # directed (sender, receiver)
    site: str | None = None
    seed: int
    params: dict[str, float] = Field(default_factory=dict)
    since: float
    until: float | None = None  # healed by the daemon at this time (--for)
    state: Literal["applying", "on", "healing", "damaged"] = "applying"
    damaged: str | None = None  # why its file could not be read (what is above is what could be)

    def shaper(self) -> Shaper:
        return shaper_for(self.kind, self.seed, self.params)

    @property
    def is_link_fault(self) -> bool:
        return self.kind in LINK_FAULTS

    def describe(self) -> str:
        params = " ".join(f"{k}={v:g}" for k, v in sorted(self.params.items()) if k not in ("watermark", "refused"))
        return f"{self.kind} {self.target}" + (f" {params}" if params else "")


def shaper_for(kind: str, seed: int, p: dict[str, float]) -> Shaper:
    """The seeded shaper of a link fault of this kind and these parameters."""
    if kind not in LINK_FAULTS:
        raise ConfigError(f"{kind} is not a link fault; one of {', '.join(LINK_FAULTS)}")
    return Shaper(kind, seed, rate=p.get("rate", 0.0), window=int(p.get("window", 20)),
                  max_hold=p.get("max_hold", 2.0), ms=p.get("ms", 0.0), jitter=p.get("jitter", 0.0))


class LinkStats(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seen: int = 0  # messages that reached the relay
    forwarded: int = 0  # copies republished to the receiver
    dropped: int = 0
    duplicated: int = 0  # extra copies
    held: int = 0  # held right now
    envelopes_seen: int = 0
    envelopes_dropped: int = 0
    envelopes_duplicated: int = 0


class FaultStats(BaseModel):
    """What a fault has done so far (written by the daemon)."""

    model_config = ConfigDict(extra="forbid")

    links: dict[str, LinkStats] = Field(default_factory=dict)  # "P01->CEN" -> counters
    closed: int = 0  # disconnect: connections closed
    drained: bool = False  # the relays are drained after the heal
    updated: float = 0.0


# -- the fault files ---------------------------------------------------------------------------


def _dir(lab_dir: LabDir) -> Path:
    path = lab_dir.faults_dir()
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def locked(lab_dir: LabDir) -> Iterator[None]:
    """One fault operation at a time in a lab (CLI calls and the daemon)."""
    with open(_dir(lab_dir) / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _spec_path(lab_dir: LabDir, fault_id: str) -> Path:
    return _dir(lab_dir) / f"{fault_id}.json"


def stats_path(lab_dir: LabDir, fault_id: str) -> Path:
    return _dir(lab_dir) / f"{fault_id}.stats.json"


def save(lab_dir: LabDir, spec: FaultSpec) -> None:
    path = _spec_path(lab_dir, spec.id)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(spec.model_dump_json(indent=2))
    os.replace(tmp, path)


def active(lab_dir: LabDir) -> list[FaultSpec]:
    """The faults that are on (or being applied, healed, or damaged), oldest first."""
    if not lab_dir.faults_dir().exists():
        return []
    out = []
    for path in lab_dir.faults_dir().glob("f*.json"):
        if path.name.endswith(".stats.json"):
            continue
        try:
            out.append(FaultSpec.model_validate_json(path.read_bytes()))
        except FileNotFoundError:
            continue  # healed meanwhile (files are replaced whole: never half written)
        except (OSError, ValidationError, ValueError) as exc:
            out.append(_damaged(path, exc))
    return sorted(out, key=lambda f: (f.since, f.id))


def _damaged(path: Path, exc: Exception) -> FaultSpec:
    """What can be read of a fault file that does not validate: enough to show it and heal it."""
    why = (f"{exc.errors()[0].get('loc')}: {exc.errors()[0].get('msg')}" if isinstance(exc, ValidationError)
           else str(exc) or type(exc).__name__)[:200]
    try:
        raw = json.loads(path.read_bytes())
    except (OSError, ValueError):
        raw = None
    raw = raw if isinstance(raw, dict) else {}

    def number(value: Any, default: float) -> float:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        return float(value) if ok else default

    kind: Any = raw.get("kind") if raw.get("kind") in get_args(FaultKind) else "partition"
    links = [(str(pair[0]), str(pair[1])) for pair in raw.get("links") or []
             if isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(x, str) for x in pair)]
    params: dict[Any, Any] = raw["params"] if isinstance(raw.get("params"), dict) else {}
    site = raw.get("site") if isinstance(raw.get("site"), str) else None
    try:
        since = path.stat().st_mtime
    except OSError:
        since = 0.0
    return FaultSpec(id=path.stem, kind=kind, target=str(raw.get("target") or site or "?"), links=links, site=site,
                     seed=int(number(raw.get("seed"), 0)),
                     params={str(k): float(v) for k, v in params.items() if number(v, math.nan) == v},
                     since=number(raw.get("since"), since), state="damaged", damaged=f"{path.name}: {why}")


def stats(lab_dir: LabDir, fault_id: str) -> FaultStats:
    try:
        return FaultStats.model_validate_json(stats_path(lab_dir, fault_id).read_bytes())
    except (OSError, ValidationError):
        return FaultStats()


def save_stats(lab_dir: LabDir, fault_id: str, value: FaultStats) -> None:
    path = stats_path(lab_dir, fault_id)
    tmp = path.with_suffix(".stmp")
    tmp.write_text(value.model_dump_json())
    os.replace(tmp, path)


def diverted_links(lab_dir: LabDir) -> frozenset[tuple[str, str]]:
    """Directed links whose key a link fault holds (not bound to the receiver's inbox)."""
    return frozenset(link for f in active(lab_dir) if f.is_link_fault for link in f.links)


def _new_id(lab_dir: LabDir) -> str:
    counter = _dir(lab_dir) / "next_id"
    try:
        n = int(counter.read_text().strip() or 1)
    except (OSError, ValueError):
        n = 1
    counter.write_text(f"{n + 1}\n")
    return f"f{n}"


# -- the broker's control ----------------------------------------------------------------------


def control_for(lab_dir: LabDir, info: LabInfo) -> BrokerControl:
    if info.broker.kind == "private" and info.broker.node_dir:
        return Rabbitmqctl.private(Path(info.broker.node_dir))
    if info.broker.kind == "compose" and info.broker.management:
        return ManagementApi(info.broker.management)
    if info.broker.kind == "container":
        raise LabError("broker faults are not available on a lab whose broker is a testcontainers container",
                       hint="give the lab a broker on this host (a private node: smslab up with no broker running)")
    if len(info.amqp_urls) > 1:
        # rabbitmqctl on PATH drives the host's own node, which is not one of the cluster's.
        raise LabError("broker faults are not available yet on a lab whose broker is a cluster of several nodes",
                       hint="kill a node of a local cluster by its pid (smslab broker cluster status lists them)")
    host = admin.parameters(info.amqp_url).host
    if host not in ("localhost", "127.0.0.1", "::1"):
        raise LabError(f"broker faults need the broker on this host; this lab's is at {host}",
                       hint="run the fault where the broker runs")
    return Rabbitmqctl.on_path()


# -- applying --------------------------------------------------------------------------------------


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def check_link_fault(topology: Topology, kind: str, a: str, b: str, params: Mapping[str, float] | None = None,
                     *, option: Callable[[str], str] = _flag) -> tuple[str, str]:
    """Refuse a link fault that the topology or its parameters rule out; the two ends, upper case.

    Pure (no lab, no broker, no clock): ``smslab fault``, the simulator and a scenario's check
    before anything starts all judge a link fault with this. ``option`` spells a parameter's
    name in the errors (``--rate`` on the command line, ``rate`` in a scenario).

    Raises:
        ConfigError: what is wrong, and a hint.
    """
    if kind not in LINK_FAULTS:
        raise ConfigError(f"unknown link fault {kind!r}; one of {', '.join(LINK_FAULTS)}")
    a, b = a.upper(), b.upper()
    topology.site(a)
    topology.site(b)
    if a == b:
        raise ConfigError(f"{a} and {b} are the same site: a link fault is between a site and its parent",
                          hint=f"{a}'s neighbours: {', '.join(_neighbours_of(topology, a)) or 'none'}")
    if topology.parent(a) != b and topology.parent(b) != a:
        raise ConfigError(f"{a} and {b} are not neighbours: link faults are between a site and its parent",
                          hint=f"{a}'s neighbours: {', '.join(_neighbours_of(topology, a)) or 'none'}")
    _check_params(kind, dict(params or {}), option)
    return a, b


def _neighbours_of(topology: Topology, code: str) -> list[str]:
    parent = topology.parent(code)
    return ([parent] if parent else []) + topology.children(code)


def _check_params(kind: str, params: dict[str, float], option: Callable[[str], str] = _flag) -> None:
    for name, value in params.items():
        if not math.isfinite(value):
            raise ConfigError(f"{kind}: {option(name)} must be a finite number, not {value}")
    rate = params.get("rate")
    if kind in ("drop", "duplicate") and (rate is None or not 0.0 <= rate <= 1.0):
        raise ConfigError(f"{kind} needs {option('rate')} between 0 and 1, not {rate}")
    if kind == "reorder" and not 1 <= params.get("window", 20) <= 100_000:
        raise ConfigError(f"reorder needs {option('window')} between 1 and 100000")
    if kind == "delay" and (params.get("ms", -1) < 0 or params.get("jitter", 0) < 0):
        raise ConfigError(f"delay needs {option('ms')} >= 0 (and {option('jitter')} >= 0)")
    if kind == "delay" and params["ms"] + params.get("jitter", 0) > MAX_HOLD_S * 1000:
        raise ConfigError(f"delay: {option('ms')} plus {option('jitter')} must be at most"
                          f" {MAX_HOLD_S * 1000:.0f} (an hour)",
                          hint="a link cut for longer is a partition: smslab fault partition A B")
    if kind == "reorder" and not 0 < params.get("max_hold", 2.0) <= MAX_HOLD_S:
        raise ConfigError(f"reorder needs {option('max_hold')} between 0 and {MAX_HOLD_S:.0f} seconds")


MAX_HOLD_S = 3600.0  # the longest a delay or a reorder holds one message


def apply_link_fault(lab_dir: LabDir, info: LabInfo, kind: str, a: str, b: str, *, oneway: bool = False,
                     params: dict[str, float] | None = None, seed: int | None = None, for_s: float | None = None,
                     verify: float | None = None, progress: Progress = _quiet) -> FaultSpec:
    """Put a link fault on a->b (and b->a unless ``oneway``)."""
    params = dict(params or {})
    a, b = check_link_fault(info.topology, kind, a, b, params)
    assert kind in LINK_FAULTS  # checked above; says so to the type checker
    links = [(a, b)] if oneway else [(a, b), (b, a)]
    from emulator import orchestrator

    orchestrator.ensure_daemon(lab_dir, info)
    with locked(lab_dir):
        busy = {link: f for f in active(lab_dir) if f.is_link_fault for link in f.links}
        for link in links:
            if link in busy:
                other = busy[link]
                raise LabError(f"link {link[0]}->{link[1]} already has fault {other.id} ({other.describe()})",
                               hint=f"heal it first: smslab heal {other.id}")
        now = time.time()
        spec = FaultSpec(id=_new_id(lab_dir), kind=kind, target=f"{a}->{b}" if oneway else f"{a}<->{b}",
                         links=links, seed=_seed(seed), params=params, since=now,
                         until=now + for_s if for_s else None)
        save(lab_dir, spec)  # first: whatever happens next, the fault shows and heals
        for sender, receiver in links:
            admin.divert_link(info.amqp_url, info.lab_id, sender, receiver, info.topology.settings.queue_type)
        _on(lab_dir, spec, for_s)
        history.record(lab_dir, "fault_on", link=spec.target, fault=spec.id,
                       detail={"kind": kind, "seed": spec.seed, "params": params, "links": [f"{s}->{r}" for s, r in links]})
    progress(f"fault {spec.id}: {spec.describe()} (seed {spec.seed}) is on; checking it on traffic")
    _verify_link_fault(lab_dir, info, spec, verify, progress)
    return spec


def verify_window(settings: Settings) -> float:
    """How long a link fault waits to see the link's traffic. A link carries a heartbeat every
    sync interval while its two sides disagree and every ``idle_heartbeat`` once they agree, so
    an idle link is seen too, within its keepalive and a few ticks."""
    return max(5.0, 6 * settings.sync_interval, settings.idle_heartbeat + 3 * settings.sync_interval)


def _verify_link_fault(lab_dir: LabDir, info: LabInfo, spec: FaultSpec, timeout: float | None,
                       progress: Progress = _quiet) -> None:
    """The relay must see the link's messages: they no longer reach the receiver directly. A
    fault whose ``--for`` ended first was on while nothing was sent (the checker calls it
    vacuous): said so, not an error."""
    wait = timeout if timeout is not None else verify_window(info.topology.settings)
    deadline = time.monotonic() + wait
    pending = {f"{s}->{r}" for s, r in spec.links}
    while pending and time.monotonic() < deadline:
        seen = stats(lab_dir, spec.id).links
        pending = {name for name in pending if not (name in seen and seen[name].seen > 0)}
        if pending and not _spec_path(lab_dir, spec.id).exists():
            down = sorted({n.split("->")[0] for n in pending if lab_dir.pid(n.split("->")[0]) is None})
            progress(f"fault {spec.id}: healed before a message crossed {', '.join(sorted(pending))}"
                     f" (nothing was sent there while it was on{': ' + ', '.join(down) + ' not running' if down else ''})")
            return
        if pending:
            time.sleep(0.1)
    if pending:
        senders = sorted({name.split("->")[0] for name in pending})
        down = [s for s in senders if lab_dir.pid(s) is None]
        heal(lab_dir, info, spec.id, verified=False)
        why = f" ({', '.join(down)} not running)" if down else ""
        raise LabError(f"fault {spec.id} did not take effect: no message crossed {', '.join(sorted(pending))}"
                       f" within {wait:g}s{why}; it was healed",
                       hint=(f"start {down[0]} first (smslab start {down[0]})" if down
                             else f"give the link longer to carry a message (--verify S; an idle link sends one"
                                  f" every idle_heartbeat), or see the fault daemon's log: {lab_dir.daemon_log()}"))


def _on(lab_dir: LabDir, spec: FaultSpec, for_s: float | None) -> None:
    """The fault has taken effect: its ``--for`` counts from now (the broker's CLI may have
    taken seconds to get here)."""
    spec.state = "on"
    if for_s:
        spec.until = time.time() + for_s
    save(lab_dir, spec)


def apply_disconnect(lab_dir: LabDir, info: LabInfo, site: str, *, for_s: float | None = None,
                     progress: Progress = _quiet) -> FaultSpec:
    site = site.upper()
    info.topology.site(site)
    control = control_for(lab_dir, info)
    from emulator import orchestrator

    orchestrator.ensure_daemon(lab_dir, info)
    name = names.connection_name(info.lab_id, site)
    # With per-site identities the broker itself refuses the site's reconnects (its user's
    # connection limit is 0); else the daemon closes them as they come, as fast as the broker's
    # CLI lets it (a site may get a few seconds of connection between two closes).
    user = names.broker_user(info.lab_id, site) if info.identities == "per-site" else None
    with locked(lab_dir):
        for f in active(lab_dir):
            if f.kind == "disconnect" and f.site == site:
                raise LabError(f"{site} is already disconnected by fault {f.id}", hint=f"smslab heal {f.id}")
        now = time.time()
        spec = FaultSpec(id=_new_id(lab_dir), kind="disconnect", target=site, site=site, seed=_seed(None),
                         since=now, until=now + for_s if for_s else None, params={"refused": 1.0} if user else {})
        save(lab_dir, spec)
        if user is not None:
            control.refuse_user(user)
        closed = control.close_connections(name, "smslab fault: connection closed")
        _on(lab_dir, spec, for_s)
        save_stats(lab_dir, spec.id, FaultStats(closed=closed, updated=time.time()))
        history.record(lab_dir, "fault_on", link=site, fault=spec.id, site=site,
                       detail={"kind": "disconnect", "closed": closed, "for": for_s,
                               "reconnects": "refused" if user else "closed"})
    if closed == 0:
        heal(lab_dir, info, spec.id, verified=False)
        raise LabError(f"site {site} has no broker connection to close: fault {spec.id} did not take effect;"
                       " it was healed", hint=f"is {site} running? (smslab status)")
    progress(f"fault {spec.id}: {site} disconnected ({closed} connection(s) closed; its reconnects "
             + ("refused by the broker" if user else "closed as they come") + ")"
             + (f" for {for_s:g}s" if for_s else "; smslab heal lets it reconnect"))
    return spec


def apply_alarm(lab_dir: LabDir, info: LabInfo, *, for_s: float | None = None, progress: Progress = _quiet) -> FaultSpec:
    control = control_for(lab_dir, info)
    from emulator import orchestrator

    orchestrator.ensure_daemon(lab_dir, info)
    with locked(lab_dir):
        for f in active(lab_dir):
            if f.kind == "alarm":
                raise LabError(f"a memory alarm is already on (fault {f.id})", hint=f"smslab heal {f.id}")
        now = time.time()
        spec = FaultSpec(id=_new_id(lab_dir), kind="alarm", target="broker", seed=_seed(None), since=now,
                         until=now + for_s if for_s else None,
                         params={"watermark": control.memory_watermark()})
        save(lab_dir, spec)
        control.set_memory_watermark(0.0)
        _on(lab_dir, spec, for_s)
        history.record(lab_dir, "fault_on", link="broker", fault=spec.id, detail={"kind": "alarm", "for": for_s})
    deadline = time.monotonic() + 15
    while "memory" not in control.alarms():
        if time.monotonic() > deadline:
            heal(lab_dir, info, spec.id, verified=False)
            raise LabError(f"fault {spec.id}: the broker raised no memory alarm; it was healed")
        time.sleep(0.2)
    progress(f"fault {spec.id}: memory alarm on {control.describe()}: publishers are blocked"
             + (f" for {for_s:g}s" if for_s else ""))
    return spec


def apply_pause(lab_dir: LabDir, info: LabInfo, site: str, *, for_s: float | None = None,
                progress: Progress = _quiet) -> FaultSpec:
    site = site.upper()
    info.topology.site(site)
    pid = lab_dir.pid(site)
    if pid is None:
        raise LabError(f"site {site} is not running", hint=f"smslab start {site}")
    from emulator import orchestrator

    orchestrator.not_here(lab_dir, site)
    with locked(lab_dir):
        for f in active(lab_dir):
            if f.kind == "pause" and f.site == site:
                raise LabError(f"{site} is already paused by fault {f.id}", hint=f"smslab resume {site}")
        now = time.time()
        spec = FaultSpec(id=_new_id(lab_dir), kind="pause", target=site, site=site, seed=_seed(None), since=now,
                         until=now + for_s if for_s else None, params={"pid": float(pid)})
        save(lab_dir, spec)
        os.kill(pid, signal.SIGSTOP)
        _on(lab_dir, spec, for_s)
        history.record(lab_dir, "fault_on", link=site, fault=spec.id, site=site, detail={"kind": "pause", "pid": pid})
    if for_s:
        from emulator import orchestrator

        orchestrator.ensure_daemon(lab_dir, info)
    deadline = time.monotonic() + 5
    while _proc_state(pid) not in ("T", "t"):
        if time.monotonic() > deadline:
            heal(lab_dir, info, spec.id, verified=False)
            raise LabError(f"fault {spec.id}: {site} (pid {pid}) did not stop; it was resumed")
        time.sleep(0.02)
    progress(f"fault {spec.id}: {site} paused (SIGSTOP to pid {pid})")
    return spec


def broker_restart(lab_dir: LabDir, info: LabInfo, *, progress: Progress = _quiet, timeout: float = 120.0) -> None:
    """stop_app, start_app; then every running site must reconnect."""
    from emulator import orchestrator

    control = control_for(lab_dir, info)
    running = [c for c in info.topology.depth_order() if lab_dir.pid(c)]
    before = {c: orchestrator.connects(info, c) for c in running}
    history.record(lab_dir, "fault_on", link="broker", detail={"kind": "broker-restart"})
    progress(f"restarting {control.describe()} (stop_app, start_app)")
    control.stop_app()
    control.start_app()
    history.record(lab_dir, "fault_off", link="broker", detail={"kind": "broker-restart"})
    deadline = time.monotonic() + timeout
    pending = [c for c in running if before[c] is not None]
    while pending:
        pending = [c for c in pending if (orchestrator.connects(info, c) or 0) <= (before[c] or 0)]
        if pending and time.monotonic() > deadline:
            raise LabError(f"after the broker restart, not reconnected within {timeout:.0f}s: {', '.join(pending)}")
        if pending:
            time.sleep(0.3)
    progress(f"broker restarted; {len(running)} site(s) reconnected")


def _local_cluster(info: LabInfo, kind: str = "broker-node-kill") -> Any:
    from broker.local import LocalCluster

    if info.broker.kind != "cluster" or not info.broker.node_dir:
        raise LabError(f"{kind} needs a lab on a local cluster",
                       hint="smslab broker cluster up --dir DIR, then smslab up --cluster DIR TOPOLOGY")
    return LocalCluster.load(Path(info.broker.node_dir))


def _cluster_node(cluster: Any, node: str) -> int:
    """The 1-based index of ``node``: its number, its node name (or the part before @), or host:port."""
    for i, n in enumerate(cluster.nodes, start=1):
        if node in (str(i), n.node_name, n.node_name.split("@")[0], urls.where(n.amqp_url)):
            return i
    names_ = ", ".join(f"{i} ({n.node_name}, {urls.where(n.amqp_url)})" for i, n in enumerate(cluster.nodes, start=1))
    raise ConfigError(f"no node {node!r} in the lab's cluster; its nodes: {names_}")


def apply_broker_node_kill(lab_dir: LabDir, info: LabInfo, node: str, *, for_s: float | None = None,
                           progress: Progress = _quiet) -> FaultSpec:
    """SIGKILL of one node of the lab's local cluster (a crash); healed by starting it again."""
    cluster = _local_cluster(info)
    index = _cluster_node(cluster, node)
    victim = cluster.node(index)
    if not victim.is_running():
        raise LabError(f"node {victim.node_name} is not running", hint="smslab broker cluster status --dir "
                       f"{cluster.base_dir}")
    where = urls.where(victim.amqp_url)
    # By port: a site in a network namespace names the node by the host end of its veth.
    on_it = [c for c in info.topology.depth_order()
             if lab_dir.pid(c) and (lab_dir.broker_node(c) or "").rsplit(":", 1)[-1] == str(victim.amqp_port)]
    if for_s:
        from emulator import orchestrator

        orchestrator.ensure_daemon(lab_dir, info)
    with locked(lab_dir):
        for f in active(lab_dir):
            if f.kind == "broker-node-kill" and int(f.params.get("node", 0)) == index:
                raise LabError(f"node {victim.node_name} is already killed by fault {f.id}", hint=f"smslab heal {f.id}")
        now = time.time()
        spec = FaultSpec(id=_new_id(lab_dir), kind="broker-node-kill", target=victim.node_name, seed=_seed(None),
                         since=now, until=now + for_s if for_s else None, params={"node": float(index)})
        save(lab_dir, spec)
        pid = victim.pid
        cluster.kill_node(index)
        _on(lab_dir, spec, for_s)
        history.record(lab_dir, "fault_on", link="broker", fault=spec.id,
                       detail={"kind": "broker-node-kill", "node": victim.node_name, "where": where, "pid": pid,
                               "sites_on_it": on_it, "for": for_s})
    if victim.is_running():
        heal(lab_dir, info, spec.id, verified=False)
        raise LabError(f"fault {spec.id}: node {victim.node_name} survived SIGKILL; it was healed")
    progress(f"fault {spec.id}: node {victim.node_name} ({where}, pid {pid}) killed"
             + (f"; the sites on it ({', '.join(on_it)}) fail over" if on_it else "")
             + (f"; started again in {for_s:g}s" if for_s else ""))
    return spec


def apply_isolate(lab_dir: LabDir, info: LabInfo, site: str, *, for_s: float | None = None,
                  progress: Progress = _quiet) -> FaultSpec:
    """The site's host (its network namespace) loses the network; the process runs on."""
    site = site.upper()
    info.topology.site(site)
    host = hostnet.host_of(lab_dir, site)
    if host is None:
        raise LabError(f"site {site} is not on a host of its own (it runs in this host's network), so it "
                       f"cannot be isolated", hint=f"bring the lab up with its sites in network namespaces: "
                                                  f"smslab up TOPOLOGY --netns {site} (or --netns all)")
    if not hostnet.exists(host):
        raise LabError(f"site {site}'s network namespace {host.netns} is gone", hint="smslab down, then up again")
    if for_s:
        from emulator import orchestrator

        orchestrator.ensure_daemon(lab_dir, info)
    with locked(lab_dir):
        for f in active(lab_dir):
            if f.kind == "isolate" and f.site == site:
                raise LabError(f"{site} is already isolated by fault {f.id}", hint=f"smslab heal {f.id}")
        now = time.time()
        spec = FaultSpec(id=_new_id(lab_dir), kind="isolate", target=site, site=site, seed=_seed(None), since=now,
                         until=now + for_s if for_s else None)
        save(lab_dir, spec)
        hostnet.isolate(host)
        _on(lab_dir, spec, for_s)
        history.record(lab_dir, "fault_on", link=site, fault=spec.id, site=site,
                       detail={"kind": "isolate", "netns": host.netns, "address": host.ns_address, "for": for_s})
    # Taken effect: the link is down and no broker node answers from inside the namespace.
    reached = [urls.where(u) for u in hostnet.urls_from(host, info.amqp_urls)[:1] if hostnet.reachable(host, u, 1.0)]
    if hostnet.link_up(host) or reached:
        heal(lab_dir, info, spec.id, verified=False)
        raise LabError(f"fault {spec.id}: {site}'s namespace {host.netns} still reaches "
                       f"{', '.join(reached) or 'the network'}; it was healed")
    progress(f"fault {spec.id}: {site}'s host ({host.netns}, {host.ns_address}) is cut off the network"
             + (f" for {for_s:g}s" if for_s else "; smslab heal brings it back"))
    return spec


def apply_broker_partition(lab_dir: LabDir, info: LabInfo, node: str, *, for_s: float | None = None,
                           verify: float = 90.0, progress: Progress = _quiet) -> FaultSpec:
    """One node of the lab's local cluster cut off from the others (its distribution traffic);
    taken effect once the other nodes no longer list it running."""
    why = hostnet.missing(("iptables",))
    if why:
        raise LabError(f"broker-partition cannot cut a node off here: {why}",
                       hint="run as root with iptables installed")
    cluster = _local_cluster(info, "broker-partition")
    index = _cluster_node(cluster, node)
    victim = cluster.node(index)
    others = [n for n in cluster.nodes if n is not victim]
    if victim.dist_source is None or any(n.dist_source is None for n in others):
        raise LabError(f"the cluster in {cluster.base_dir} was started before its nodes had distribution addresses "
                       "of their own", hint="smslab broker cluster down, then up again")
    if not victim.is_running():
        raise LabError(f"node {victim.node_name} is not running", hint="smslab broker cluster status --dir "
                       f"{cluster.base_dir}")
    if for_s:
        from emulator import orchestrator

        orchestrator.ensure_daemon(lab_dir, info)
    with locked(lab_dir):
        for f in active(lab_dir):
            if f.kind in ("broker-partition", "broker-node-kill"):
                raise LabError(f"fault {f.id} ({f.describe()}) is on a node already: one node at a time keeps "
                               "the majority", hint=f"smslab heal {f.id}")
        now = time.time()
        spec = FaultSpec(id=_new_id(lab_dir), kind="broker-partition", target=victim.node_name, seed=_seed(None),
                         since=now, until=now + for_s if for_s else None, params={"node": float(index)})
        save(lab_dir, spec)
        rules = hostnet.partition_rules((victim.dist_source, victim.dist_port),
                                        [(str(n.dist_source), n.dist_port) for n in others])
        hostnet.add_chain(hostnet.chain_name(info.lab_id, spec.id), rules)
        _on(lab_dir, spec, for_s)
        history.record(lab_dir, "fault_on", link="broker", fault=spec.id,
                       detail={"kind": "broker-partition", "node": victim.node_name,
                               "where": urls.where(victim.amqp_url), "for": for_s})
    deadline = time.monotonic() + verify
    while True:
        try:
            seen = set(cluster.running_nodes_seen_by(others[0]))
        except SmslabError:
            seen = {victim.node_name}
        if victim.node_name not in seen:
            break
        if time.monotonic() > deadline:
            heal(lab_dir, info, spec.id, verified=False)
            raise LabError(f"fault {spec.id}: {others[0].node_name} still lists {victim.node_name} running "
                           f"{verify:.0f}s after its distribution traffic was cut; it was healed")
        time.sleep(0.3)
    progress(f"fault {spec.id}: node {victim.node_name} cut off from {', '.join(n.node_name for n in others)}"
             + (f" for {for_s:g}s" if for_s else "; smslab heal joins it again"))
    return spec


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return "?"


def _seed(seed: int | None) -> int:
    return seed if seed is not None else secrets.randbelow(2**31)


# -- healing ---------------------------------------------------------------------------------------


def find(lab_dir: LabDir, fault_id: str) -> FaultSpec:
    for f in active(lab_dir):
        if f.id == fault_id:
            return f
    on = ", ".join(f"{f.id} ({f.describe()})" for f in active(lab_dir)) or "none"
    raise LabError(f"no fault {fault_id!r} is on in this lab (on: {on})", hint="smslab faults lists them")


def heal(lab_dir: LabDir, info: LabInfo, fault_id: str, *, wait_drain: float = 30.0,
         progress: Progress = _quiet, verified: bool = True) -> FaultSpec | None:
    """Undo one fault (idempotent: a fault half applied or half healed is healed all the way)."""
    with locked(lab_dir):
        try:
            spec = find(lab_dir, fault_id)
        except LabError:
            return None  # healed meanwhile (by the daemon at its --for, or another command)
        if spec.is_link_fault and spec.damaged and not spec.links:
            # which links it held cannot be read: every link that no readable fault holds goes back
            held = {link for f in active(lab_dir) if f.is_link_fault and not f.damaged for link in f.links}
            spec.links = [link for p, c in info.topology.links() for link in ((c, p), (p, c)) if link not in held]
        spec.state = "healing"
        save(lab_dir, spec)
        if spec.is_link_fault:
            for sender, receiver in spec.links:
                admin.restore_link(info.amqp_url, info.lab_id, sender, receiver)
        elif spec.kind == "disconnect" and spec.site and (spec.params.get("refused") or spec.damaged):
            control_for(lab_dir, info).allow_user(names.broker_user(info.lab_id, spec.site))
        elif spec.kind == "alarm":
            control_for(lab_dir, info).set_memory_watermark(spec.params.get("watermark", 0.4))
        elif spec.kind == "pause" and "pid" in spec.params:
            try:
                os.kill(int(spec.params["pid"]), signal.SIGCONT)
            except ProcessLookupError:
                pass
        elif spec.kind == "broker-node-kill":
            # Started again from its own folder; it rejoins the cluster and its quorum replicas
            # catch up from the leaders.
            cluster = _local_cluster(info)
            index = int(spec.params["node"])
            if not cluster.node(index).is_running():
                cluster.restart_node(index, timeout=120)
        elif spec.kind == "isolate" and spec.site:
            host = hostnet.host_of(lab_dir, spec.site)
            if host is not None:
                hostnet.reconnect(host)
        elif spec.kind == "broker-partition":
            # The rules go; the paused node sees the majority again and starts serving.
            hostnet.delete_chain(hostnet.chain_name(info.lab_id, spec.id))
            cluster = _local_cluster(info, spec.kind)
            cluster.await_running(timeout=180)
    if spec.is_link_fault:
        _drain(lab_dir, info, spec, wait_drain, progress)
    with locked(lab_dir):
        if not _spec_path(lab_dir, spec.id).exists():
            return spec  # another heal of the same fault finished first (and recorded its fault_off)
        done = stats(lab_dir, spec.id)
        off: dict[str, Any] = {"kind": spec.kind, "stats": summarize(done)}
        if not verified:
            off["verified"] = False
        history.record(lab_dir, "fault_off", link=spec.target, fault=spec.id, detail=off)
        _spec_path(lab_dir, spec.id).unlink(missing_ok=True)
        stats_path(lab_dir, spec.id).unlink(missing_ok=True)
    progress(f"fault {spec.id} ({spec.describe()}) healed" + (f": {_summary_text(done)}" if summarize(done) else ""))
    return spec


def _drain(lab_dir: LabDir, info: LabInfo, spec: FaultSpec, wait: float, progress: Progress = _quiet) -> None:
    """The daemon forwards what the relays hold and deletes them; if it is not running (or
    never ran this fault's relays), the relays are drained from here. A daemon that is slow
    (publishers blocked by a memory alarm) is not raced: it holds messages it has not
    forwarded yet, and finishes the drain itself once it can, with the fault's file gone."""
    from broker import relay

    deadline = time.monotonic() + wait
    # a fault whose relays the daemon never ran (healed at once, or damaged) has no stats
    ran = stats_path(lab_dir, spec.id).exists()
    while lab_dir.daemon_pid() is not None and ran and time.monotonic() < deadline:
        if stats(lab_dir, spec.id).drained or not _spec_path(lab_dir, spec.id).exists():
            return  # drained, or healed all the way by another heal of the same fault
        time.sleep(0.1)
    if lab_dir.daemon_pid() is not None and ran:
        progress(f"fault {spec.id}: the fault daemon has not drained its relays within {wait:.0f}s; it goes on"
                 f" draining them (see {lab_dir.daemon_log()})")
        return
    for sender, receiver in spec.links:
        relay.drain(info.amqp_url, info.lab_id, sender, receiver, keep_user_id=info.identities == "per-site")


def heal_all(lab_dir: LabDir, info: LabInfo, *, progress: Progress = _quiet) -> list[FaultSpec]:
    healed = []
    # faults of the broker and the sites first: a memory alarm still on would block the relays
    # of the link faults as they drain
    for spec in sorted(active(lab_dir), key=lambda f: f.is_link_fault):
        done = heal(lab_dir, info, spec.id, progress=progress)
        if done is not None:
            healed.append(done)
    return healed


def summarize(s: FaultStats) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, link in s.links.items():
        out[name] = {k: v for k, v in link.model_dump().items() if v}
    if s.closed:
        out["closed"] = s.closed
    return out


def _summary_text(s: FaultStats) -> str:
    parts = []
    for name, link in sorted(s.links.items()):
        bits = [f"{link.seen} seen", f"{link.forwarded} forwarded"]
        if link.dropped:
            bits.append(f"{link.dropped} dropped ({link.envelopes_dropped} envelopes)")
        if link.duplicated:
            bits.append(f"{link.duplicated} duplicated ({link.envelopes_duplicated} envelopes)")
        parts.append(f"{name}: " + ", ".join(bits))
    if s.closed:
        parts.append(f"{s.closed} connection(s) closed")
    return "; ".join(parts)


def listing(lab_dir: LabDir) -> list[dict[str, Any]]:
    """What ``smslab faults`` shows: each fault that is on and what it has done so far."""
    out = []
    for spec in active(lab_dir):
        row = json.loads(spec.model_dump_json())
        row["description"] = spec.describe() + (f" (damaged fault file: {spec.damaged})" if spec.damaged else "")
        row["done"] = summarize(stats(lab_dir, spec.id))
        row["done_text"] = _summary_text(stats(lab_dir, spec.id))
        out.append(row)
    return out
