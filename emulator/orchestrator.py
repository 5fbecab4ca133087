"""Bring a lab up and down, and start, stop and kill its site processes.

The orchestrator talks to sites only through process signals, the broker (control
requests) and the lab directory; it never imports the site runtime.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from broker import admin, urls
from emulator import backup, history, hostnet, identities
from emulator.errors import BrokerUnavailable, LabError, SmslabError
from emulator.lab import BrokerRef, LabDir, LabInfo, new_lab_id, write_atomically
from emulator.topology import load_topology

Progress = Callable[[str], None]


def _quiet(_msg: str) -> None:
    pass


def up(topology_path: Path, lab_dir: LabDir, amqp_url: str, *, timeout: float = 60.0,
       progress: Progress = _quiet, broker: BrokerRef | None = None, netns: Sequence[str] = ()) -> LabInfo:
    topology = load_topology(topology_path)  # refused here, before anything starts
    if lab_dir.exists():
        refuse_existing(lab_dir)
    admin.check(amqp_url)
    info = LabInfo(lab_id=new_lab_id(topology.lab), amqp_urls=urls.split(amqp_url), created=time.time(),
                   topology=topology, broker=broker or BrokerRef())
    lab_dir.save(info)
    (lab_dir.path / "topology.yaml").write_text(topology.to_yaml())
    codes = topology.depth_order()
    if netns:
        place_in_namespaces(lab_dir, info, hostnet.check_codes(netns, codes), progress)
    identities.setup(lab_dir, info, progress=progress)
    ensure_broker_objects(lab_dir, info)
    progress(f"lab {info.lab_id}: {len(codes)} sites, mode {topology.mode}, broker objects declared")
    ensure_zygote(lab_dir)  # sites are forked from it: a fork each, not an interpreter start
    for code in codes:
        spawn(lab_dir, code)
    ensure_daemon(lab_dir, info)
    wait_attached(lab_dir, info, codes, timeout=timeout, progress=progress)
    return info


def place_in_namespaces(lab_dir: LabDir, info: LabInfo, codes: list[str], progress: Progress = _quiet) -> None:
    """Each site of ``codes`` gets a network namespace of its own (a host of its own) and must
    reach every broker node from there; else the namespaces are deleted and ``up`` refused."""
    made = hostnet.create_hosts(lab_dir, info.lab_id, codes, info.topology.depth_order())
    for host in made:
        unreachable = [urls.where(u) for u in hostnet.urls_from(host, info.amqp_urls)
                       if not hostnet.reachable(host, u)]
        if unreachable:
            hostnet.delete_hosts(lab_dir)
            raise LabError(f"from {host.site}'s network namespace {host.netns} ({host.ns_address}) no broker "
                           f"answers at {', '.join(unreachable)}: the brokers listen on loopback only",
                           hint="start the cluster with smslab broker cluster up --listen 0.0.0.0, or give "
                                "--amqp URLs of brokers the namespaces reach")
        progress(f"  {host.site} on its own host: network namespace {host.netns}, {host.ns_address} "
                 f"(brokers at {host.host_address})")


def refuse_existing(lab_dir: LabDir) -> None:
    """``up`` never overwrites a lab: it says how to start it again or remove it."""
    old = lab_dir.load()
    running = [c for c in old.topology.depth_order() if lab_dir.pid(c)]
    if running:
        raise LabError(
            f"a lab ({old.lab_id}) is already up in {lab_dir.path} with {len(running)} site(s) running",
            hint=f"smslab --lab {lab_dir.path} down, or use another --lab DIR",
        )
    raise LabError(
        f"a stopped lab ({old.lab_id}) is kept in {lab_dir.path}, with its stores and backups",
        hint=f"start its sites (smslab start SITE), or remove it: smslab --lab {lab_dir.path} down",
    )


def spawn(lab_dir: LabDir, code: str, extra: list[str] | None = None) -> int:
    if lab_dir.pid(code):
        raise LabError(f"site {code} is already running (pid {lab_dir.pid(code)})",
                       hint=f"smslab stop {code} first")
    site_dir = lab_dir.site_dir(code)
    site_dir.mkdir(parents=True, exist_ok=True)
    # The site writes (and rotates) its own site.log; what escapes its logging goes to site.out.
    site_argv = ["--log", str(lab_dir.log_file(code)), "--lab", str(lab_dir.path), "--site", code, *(extra or [])]
    argv = [sys.executable, "-m", "sites", *site_argv]
    host = hostnet.host_of(lab_dir, code)
    if host is not None:
        # On a host of its own: inside its namespace, with the brokers where it reaches them
        # (not from the forkserver: a fork stays in the forkserver's network namespace).
        if not hostnet.exists(host):
            raise LabError(f"site {code}'s network namespace {host.netns} is gone",
                           hint="smslab down and up the lab again")
        argv = [*hostnet.exec_prefix(host), *argv, "--amqp", urls.join(hostnet.urls_from(host, lab_dir.load().amqp_urls))]
    else:
        pid = _fork_from_zygote(lab_dir, code, site_argv)
        if pid is not None:
            lab_dir.write_pid(code, pid)
            return pid
    with open(lab_dir.out_file(code), "ab") as log:
        proc = subprocess.Popen(
            argv,
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, close_fds=True,
        )
    lab_dir.write_pid(code, proc.pid)
    return proc.pid


def _fork_from_zygote(lab_dir: LabDir, code: str, argv: list[str]) -> int | None:
    """A site process forked by the lab's forkserver (``sites.zygote``), or None when there is
    none to ask or it did not answer (the caller then starts ``python -m sites`` itself)."""
    if lab_dir.zygote_pid() is None:
        return None
    request = {"argv": argv, "env": dict(os.environ), "cwd": os.getcwd(), "log": str(lab_dir.out_file(code))}
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(10)
            conn.connect(str(lab_dir.zygote_socket()))
            conn.sendall(json.dumps(request).encode() + b"\n")
            answer = b""
            while not answer.endswith(b"\n"):
                chunk = conn.recv(4096)
                if not chunk:
                    break
                answer += chunk
        pid = json.loads(answer).get("pid")
    except (OSError, ValueError):
        return None
    return pid if isinstance(pid, int) and pid > 0 else None


def _start_lab_process(lab_dir: LabDir, module: str, log_path: Path) -> subprocess.Popen[bytes]:
    """One of the lab's own processes (``python -m MODULE --lab DIR``), in a session of its own,
    writing to ``log_path``."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", module, "--lab", str(lab_dir.path)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            close_fds=True,
        )


def ensure_zygote(lab_dir: LabDir, timeout: float = 20.0) -> int | None:
    """The lab's site forkserver, started if it is not running; None if it did not come up
    (sites are then started as plain ``python -m sites`` processes)."""
    if os.environ.get("SMSLAB_NO_FORKSERVER"):
        return None  # every site a `python -m sites` of its own (slower to start, nothing shared)
    pid = lab_dir.zygote_pid()
    if pid is not None:
        return pid
    proc = _start_lab_process(lab_dir, "sites.zygote", lab_dir.zygote_log())
    deadline = time.monotonic() + timeout
    while not (lab_dir.zygote_pid() == proc.pid and lab_dir.zygote_socket().exists()):
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.kill()
            return None
        time.sleep(0.05)
    return proc.pid


def stop_zygote(lab_dir: LabDir) -> None:
    pid = lab_dir.zygote_pid()
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    if not _wait_pid(pid, 10):
        os.kill(pid, signal.SIGKILL)
        _wait_pid(pid, 5)


def attached(info: LabInfo, code: str, answer: dict[str, object]) -> bool:
    if answer.get("state") not in ("active", "quarantined") and not answer.get("recovering"):
        return False
    parent = info.topology.parent(code)
    if parent is None or answer.get("recovering"):
        return True
    heard = answer.get("heard_from")
    return isinstance(heard, list) and parent in heard  # its parent acknowledged it since this process started


def wait_attached(lab_dir: LabDir, info: LabInfo, codes: list[str], *, timeout: float,
                  progress: Progress = _quiet) -> None:
    """Wait until every site answers on the broker and its parent acknowledged it."""
    deadline = time.monotonic() + timeout
    pending = list(codes)
    while pending:
        for code in list(pending):
            if time.monotonic() > deadline:
                break
            if lab_dir.pid(code) is None:
                raise LabError(
                    f"site {code} exited during start-up",
                    hint=f"see its log: {lab_dir.log_file(code)} (and {lab_dir.out_file(code).name} beside it)",
                )
            try:
                answer = admin.control_request(info.amqp_url, info.lab_id, code, {"cmd": "ping"}, timeout=2)
            except LabError:
                continue
            if attached(info, code, answer):
                pending.remove(code)
                progress(f"  {code} attached and {answer.get('state')} ({len(codes) - len(pending)}/{len(codes)})")
        if pending and time.monotonic() > deadline:
            parents = sorted({p for c in pending if (p := info.topology.parent(c)) and lab_dir.pid(p) is None})
            why = f"; parent(s) not running: {', '.join(parents)}" if parents else ""
            raise LabError(
                f"not attached after {timeout:.0f}s: {', '.join(pending)}{why}"
                " (they keep running and attach when they can)",
                hint=(f"smslab start {parents[0]}" if parents
                      else "check their logs under " + str(lab_dir.path / "sites")),
            )
        if pending:
            time.sleep(0.2)


def ensure_broker_objects(lab_dir: LabDir, info: LabInfo) -> None:
    """(Re)declare the lab's exchange, queues and link bindings: a lab kept by ``down --keep``
    starts again. A link a fault holds stays with its relay."""
    from emulator import faults

    topo = info.topology
    admin.declare_lab(info.amqp_url, info.lab_id, topo.depth_order(), topo.settings.queue_type, topo.links(),
                      diverted=faults.diverted_links(lab_dir), delivery_limit=topo.settings.quorum_delivery_limit,
                      dead_letter_max=topo.settings.dead_letter_max)


def ensure_daemon(lab_dir: LabDir, info: LabInfo, timeout: float = 15.0) -> int:
    """The lab's fault daemon (``emulator.labd``): started if it is not running."""
    pid = lab_dir.daemon_pid()
    if pid is not None:
        return pid
    proc = _start_lab_process(lab_dir, "emulator.labd", lab_dir.daemon_log())
    write_atomically(lab_dir.daemon_pid_file(), f"{proc.pid}\n")
    deadline = time.monotonic() + timeout
    while lab_dir.daemon_pid() is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise LabError("the lab's fault daemon did not start", hint=f"see {lab_dir.daemon_log()}")
        time.sleep(0.05)
    return proc.pid


def stop_daemon(lab_dir: LabDir) -> None:
    pid = lab_dir.daemon_pid()
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    if not _wait_pid(pid, 15):
        os.kill(pid, signal.SIGKILL)
        _wait_pid(pid, 5)


def _wait_pid(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_alive(pid):
            return True
        time.sleep(0.05)
    return False


def connects(info: LabInfo, code: str) -> int | None:
    """How many broker connections a running site has made (None: it does not answer)."""
    try:
        answer = admin.control_request(info.amqp_url, info.lab_id, code, {"cmd": "ping"}, timeout=2)
    except (LabError, BrokerUnavailable):
        return None
    value = answer.get("connects")
    return int(value) if isinstance(value, int) else None


def signal_site(lab_dir: LabDir, code: str, sig: int) -> int:
    pid = lab_dir.pid(code)
    if pid is None:
        raise LabError(f"site {code} is not running", hint=f"smslab start {code}")
    not_here(lab_dir, code)
    os.kill(pid, sig)
    return pid


def not_here(lab_dir: LabDir, code: str) -> None:
    """Processes on another host (a container) are not ours to signal."""
    if not lab_dir.local(code):
        raise LabError(f"site {code} runs on host {lab_dir.site_host(code)} (a container?): its process is not"
                       " this host's to signal",
                       hint=f"in a compose lab: docker compose kill -s KILL {code.lower()}, docker compose stop"
                            f" {code.lower()}, docker compose start {code.lower()}")


def wait_exit(lab_dir: LabDir, code: str, pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_alive(pid):
            return True
        time.sleep(0.05)
    return False


def is_alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def kill(lab_dir: LabDir, code: str) -> int:
    _resume_if_paused(lab_dir, code, "killed")
    pid = signal_site(lab_dir, code, signal.SIGKILL)
    wait_exit(lab_dir, code, pid, 5)
    history.record(lab_dir, "process", link=code, site=code, detail={"action": "kill", "pid": pid})
    return pid


def stop(lab_dir: LabDir, code: str, timeout: float = 15.0) -> int:
    _resume_if_paused(lab_dir, code, "stopped")
    pid = signal_site(lab_dir, code, signal.SIGTERM)
    if not wait_exit(lab_dir, code, pid, timeout):
        os.kill(pid, signal.SIGKILL)
        wait_exit(lab_dir, code, pid, 5)
    history.record(lab_dir, "process", link=code, site=code, detail={"action": "stop", "pid": pid})
    return pid


def _resume_if_paused(lab_dir: LabDir, code: str, why: str) -> None:
    """A paused site that is stopped or killed is not paused any more: its fault goes."""
    from emulator import faults

    for spec in faults.active(lab_dir):
        if spec.kind == "pause" and spec.site == code:
            faults.heal(lab_dir, lab_dir.load(), spec.id)


def restart(lab_dir: LabDir, code: str, *, timeout: float = 30.0, progress: Progress = _quiet) -> int:
    """Stop a site gracefully and start it again (waits until it is attached)."""
    if lab_dir.pid(code):
        stop(lab_dir, code)
    return start(lab_dir, code, timeout=timeout, progress=progress)


def start(lab_dir: LabDir, code: str, *, timeout: float = 30.0, progress: Progress = _quiet,
          restore: str | None = None, wipe: bool = False) -> int:
    """Start a site; ``restore``/``wipe`` first replace its store, with no recovery at all
    (the failure of Q201603: the site comes back under its old code with old counters)."""
    info = lab_dir.load()
    info.topology.site(code)
    if lab_dir.pid(code):
        raise LabError(f"site {code} is already running (pid {lab_dir.pid(code)})",
                       hint=f"smslab stop {code} (or kill) first")
    done = backup.replace_store(lab_dir, info, code, backup_id=restore, wipe=wipe)
    if done:
        progress(f"  {done}, no recovery")
    identities.ensure(lab_dir, info)
    ensure_broker_objects(lab_dir, info)
    pid = spawn(lab_dir, code)
    history.record(lab_dir, "process", link=code, site=code,
                   detail={"action": "start", "pid": pid, "restore": restore, "wipe": wipe})
    ensure_daemon(lab_dir, info)
    wait_attached(lab_dir, info, [code], timeout=timeout, progress=progress)
    return pid


def down(lab_dir: LabDir, *, keep: bool = False, progress: Progress = _quiet) -> LabInfo:
    from emulator import faults

    info = lab_dir.load()
    codes = info.topology.depth_order()
    healed = faults.heal_all(lab_dir, info, progress=progress)
    if healed:
        progress(f"healed {len(healed)} fault(s)")
    pids = {}
    for code in codes:
        pid = lab_dir.pid(code)
        if pid:
            os.kill(pid, signal.SIGTERM)
            pids[code] = pid
    for code, pid in pids.items():
        if not wait_exit(lab_dir, code, pid, 15):
            os.kill(pid, signal.SIGKILL)
            wait_exit(lab_dir, code, pid, 5)
    progress(f"stopped {len(pids)} site process(es)")
    stop_daemon(lab_dir)
    stop_zygote(lab_dir)
    try:
        history.merge(lab_dir, info)
    except SmslabError:
        pass  # the history is kept with the lab directory; a damaged one is not a reason to stay up
    try:
        try:
            # with the URL's own user: the controller may be gone already (an ``up`` that died half way)
            admin.delete_lab(info.admin_url, info.lab_id, codes, info.topology.links())
            progress(f"deleted broker objects of lab {info.lab_id}")
        finally:
            deleted = identities.teardown(info)  # the users go even if their lab's objects would not
            if deleted:
                progress(deleted)
    finally:
        from emulator import brokers

        if hostnet.delete_hosts(lab_dir):
            progress("deleted the sites' network namespaces")
        released = brokers.release(info.broker)
        if released:
            progress(released)
        if not keep:
            shutil.rmtree(lab_dir.path, ignore_errors=True)
    return info

