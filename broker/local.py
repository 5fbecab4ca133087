"""Private RabbitMQ nodes on this host: for tests, for the embedded broker of ``smslab up``, and
for a local cluster.

Theory of operation
-------------------
A node lives in one folder of its own and nothing else on the host is read or written::

    BASE/node.json          NodeInfo: name, ports, pid; how a later process finds the node
    BASE/home/.erlang.cookie the node's cookie (HOME points here, for the node and rabbitmqctl)
    BASE/rabbitmq.conf      listeners on 127.0.0.1:AMQP only (and management if asked)
    BASE/rabbitmq-env.conf  empty on purpose: /etc/rabbitmq/rabbitmq-env.conf sets the NODENAME
                            and ERL_FLAGS of the system node and must not be sourced
    BASE/advanced.config    empty (``[].``), so /etc/rabbitmq/advanced.config is never read
    BASE/conf.d/            empty, so /etc/rabbitmq/conf.d is never read
    BASE/enabled_plugins    ``[].`` or ``[rabbitmq_management].``
    BASE/mnesia/, log/      the node's database and its log (log/NODE.log)
    BASE/startup.log        stdout/stderr of the server script: early boot errors land only here

The server script (not Debian's ``rabbitmq-server`` wrapper, which switches to the rabbitmq
user and reads /etc) is run in its own session through ``setsid -f``: the node outlives the
Python process that started it (``smslab up`` exits, the broker stays), and unlike
``-detached``, which sends the boot output to /dev/null, a configuration error is still
written to startup.log where the error message can quote it.

Every node's Erlang command line carries ``-smslab_node NODE_NAME`` (an argument Erlang
ignores): it is how the node's OS process is found again (``pgrep -f NODE_NAME``) when the
pid file is stale or not written yet, and it protects ``kill`` from a recycled pid.

Starting is launch, then wait: the process must appear, must not print ``BOOT FAILED``, must not
exit, and AMQP must accept a guest login on 127.0.0.1 before ``rabbitmqctl await_startup`` is
asked. Anything else before the deadline kills the half-started node and raises
``BrokerUnavailable`` naming the log files.
"""

from __future__ import annotations

import base64
import glob
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, NoReturn

import pika
import pika.exceptions
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from emulator.errors import BrokerUnavailable, ConfigError, LabError

__all__ = [
    "ClusterInfo",
    "LocalCluster",
    "LocalNode",
    "NodeInfo",
    "epmd_names",
    "find_server",
    "free_port",
    "free_ports",
    "management_get",
]

HOST = "127.0.0.1"
INFO_FILE = "node.json"
CLUSTER_FILE = "cluster.json"
MARKER = "-smslab_node"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,80}$")
_COOKIE_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,255}$")
_KNOWN_SERVERS = (
    "/usr/lib/rabbitmq/bin/rabbitmq-server",
    "/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin/rabbitmq-server",
    "/usr/local/lib/rabbitmq/sbin/rabbitmq-server",
    "/opt/rabbitmq/sbin/rabbitmq-server",
    "/opt/homebrew/opt/rabbitmq/sbin/rabbitmq-server",
    "/usr/local/opt/rabbitmq/sbin/rabbitmq-server",
)
# epmd, the standard AMQP/TLS/management/prometheus/dist ports, and rabbitmqctl's own
# distribution ports (35672-35682): a private node never takes one of them.
_RESERVED_PORTS = frozenset({4369, 5671, 5672, 15672, 15692, 25672, *range(35672, 35683)})
# Settings the RabbitMQ scripts also read without their RABBITMQ_ prefix: none of the caller's may
# leak into a private node.
_SHORT_SETTINGS = frozenset({
    "NODENAME", "NODE_IP_ADDRESS", "NODE_PORT", "DIST_PORT", "CONFIG_FILE", "CONFIG_FILES",
    "ADVANCED_CONFIG_FILE", "MNESIA_BASE", "MNESIA_DIR", "LOG_BASE", "LOGS", "PID_FILE",
    "ENABLED_PLUGINS_FILE", "PLUGINS_DIR", "PLUGINS_EXPAND_DIR", "USE_LONGNAME", "SERVER_ERL_ARGS",
    "SERVER_ADDITIONAL_ERL_ARGS", "SERVER_START_ARGS", "SERVER_CODE_PATH", "CTL_ERL_ARGS",
    "CTL_DIST_PORT_MIN", "CTL_DIST_PORT_MAX", "BOOT_MODULE", "SCHEDULER_BIND_TYPE",
    "DISTRIBUTION_BUFFER_SIZE", "MAX_NUMBER_OF_PROCESSES", "MAX_NUMBER_OF_ATOMS", "CONF_ENV_FILE",
    "NOTIFY_SOCKET",
})
PARTITION_HANDLING = "cluster_partition_handling = pause_minority"
_LOG_PREFIX = re.compile(r"^.*?\[error\] <[^>]*> ?")
_POLL = 0.1


# -- finding the server and free ports ------------------------------------------------------------


def find_server() -> Path | None:
    """The RabbitMQ server script that runs a node as the calling user, or None if RabbitMQ is
    not installed. ``SMSLAB_RABBITMQ_SERVER`` overrides the search."""
    override = os.environ.get("SMSLAB_RABBITMQ_SERVER")
    if override == "none":  # as if RabbitMQ were not installed (tests of the other ways)
        return None
    if override:
        path = Path(override)
        if not _is_server_script(path):
            raise ConfigError(
                f"SMSLAB_RABBITMQ_SERVER={override}: not a RabbitMQ server script with rabbitmqctl beside it",
                hint="point it at .../rabbitmq/bin/rabbitmq-server (dpkg -L rabbitmq-server | grep bin/) "
                     "or unset it")
        return path
    for candidate in (*_dpkg_servers(), *_globbed_servers(), *_path_server()):
        if _is_server_script(candidate):
            return candidate
    return None


def _is_server_script(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK) and (path.parent / "rabbitmqctl").exists()


def _dpkg_servers() -> list[Path]:
    if shutil.which("dpkg") is None:
        return []
    try:
        listing = subprocess.run(["dpkg", "-L", "rabbitmq-server"], capture_output=True, text=True,
                                 timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if listing.returncode != 0:
        return []
    lines = [line.strip() for line in listing.stdout.splitlines()]
    bins = [Path(line) for line in lines if line.endswith("rabbitmq/bin/rabbitmq-server")]
    sbins = [Path(line) for line in lines if re.search(r"/rabbitmq_server-[^/]+/sbin/rabbitmq-server$", line)]
    return bins + sorted(sbins, reverse=True)


def _globbed_servers() -> list[Path]:
    found: list[Path] = []
    for pattern in _KNOWN_SERVERS:
        found += sorted((Path(p) for p in _glob(pattern)), reverse=True)
    return found


def _glob(pattern: str) -> list[str]:
    return glob.glob(pattern)


def _path_server() -> list[Path]:
    """``rabbitmq-server`` on PATH, unless it is a wrapper that switches user (Debian's)."""
    which = shutil.which("rabbitmq-server")
    if which is None:
        return []
    path = Path(which).resolve()
    try:
        head = path.read_bytes()[:8192]
    except OSError:
        return []
    if b"su rabbitmq" in head or b"rabbitmq-script-wrapper" in head:
        return []
    return [path]


_ports_lock = threading.Lock()
_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port free on this host now, never one handed out before by this process."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports, held open together while they are chosen so that the
    AMQP, distribution and management ports of a node (or of a cluster) never collide.

    They come from below the kernel's ephemeral range, so an outgoing connection of another
    program cannot take one between now and the node's start."""
    if count < 1:
        raise ConfigError(f"free_ports: count must be at least 1, not {count}")
    low, high = _port_range()
    rng = random.Random()
    held: list[socket.socket] = []
    with _ports_lock:
        try:
            tries = 0
            while len(held) < count:
                tries += 1
                if tries > 20 * (high - low):
                    raise LabError(f"no {count} free TCP ports between {low} and {high} on this host",
                                   hint="free some ports or pass explicit ports to LocalNode")
                port = rng.randrange(low, high)
                if port in _RESERVED_PORTS or port in _handed_out:
                    continue
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                try:
                    sock.bind(("", port))
                except OSError:
                    sock.close()
                    continue
                held.append(sock)
            ports = [sock.getsockname()[1] for sock in held]
            _handed_out.update(ports)
            return ports
        finally:
            for sock in held:
                sock.close()


def _port_range() -> tuple[int, int]:
    low, high = 20000, 32768
    try:
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return low, high
    if ephemeral_low > low + 1000:
        high = min(high, ephemeral_low)
    return low, high


def _port_in_use(port: int) -> bool:
    """True if a listener holds ``port`` on any address. SO_REUSEADDR like the node's own
    listeners, so connections in TIME_WAIT (left by a killed node) do not count."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("", port))
        return False
    except OSError:
        return True
    finally:
        sock.close()


def _accepts(port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def epmd_names() -> dict[str, int]:
    """The node names registered with the local epmd and their distribution ports ({} if epmd
    does not answer): the EPMD NAMES_REQ, so no Erlang VM is started to ask."""
    port = int(os.environ.get("ERL_EPMD_PORT", "4369"))
    try:
        with socket.create_connection((HOST, port), timeout=2) as sock:
            sock.sendall(b"\x00\x01n")
            chunks = []
            while chunk := sock.recv(4096):
                chunks.append(chunk)
    except OSError:
        return {}
    text = b"".join(chunks)[4:].decode("utf-8", "replace")
    return {m[1]: int(m[2]) for m in re.finditer(r"^name (\S+) at port (\d+)$", text, re.MULTILINE)}


# -- the saved description of a node --------------------------------------------------------------


class NodeInfo(BaseModel):
    """What a later process (another CLI call) needs to find, drive and stop a node."""

    model_config = ConfigDict(extra="forbid")

    format: Literal[1] = 1
    name: str
    node_name: str
    base_dir: Path
    amqp_port: int = Field(ge=1, le=65535)
    dist_port: int = Field(ge=1, le=65535)
    management_port: int | None = Field(default=None, ge=1, le=65535)
    pid: int | None = None
    server: Path | None = None
    extra_config: list[str] = Field(default_factory=list)
    listen: str = HOST  # the address AMQP listens on (0.0.0.0: every interface, network namespaces too)
    dist_source: str | None = None  # the loopback address its distribution connections leave from

    @property
    def path(self) -> Path:
        return self.base_dir / INFO_FILE

    def save(self) -> None:
        """Write ``BASE/node.json`` atomically."""
        _write_atomic(self.path, self.model_dump_json(indent=2) + "\n")

    @classmethod
    def load(cls, base_dir: Path) -> NodeInfo:
        path = Path(base_dir) / INFO_FILE
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise LabError(f"no private RabbitMQ node in {base_dir}: {path} does not exist",
                           hint="start one first (LocalNode(DIR, name=...).start()) or check the folder") from None
        except OSError as exc:
            raise LabError(f"cannot read {path}: {exc}") from exc
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise ConfigError(f"{path}: not a valid node description: {_first_error(exc)}",
                              hint="delete the folder and start the node again") from exc


class ClusterInfo(BaseModel):
    """A local cluster's folder: ``BASE/cluster.json`` and one node folder per member."""

    model_config = ConfigDict(extra="forbid")

    format: Literal[1] = 1
    name: str
    size: int = Field(ge=1, le=9)
    base_dir: Path
    listen: str = HOST
    user: str | None = None  # a user of the cluster's own, for clients beyond loopback (guest is loopback only)
    password: str | None = None

    def save(self) -> None:
        _write_atomic(self.base_dir / CLUSTER_FILE, self.model_dump_json(indent=2) + "\n")
        (self.base_dir / CLUSTER_FILE).chmod(0o600)  # it may hold the password

    @classmethod
    def load(cls, base_dir: Path) -> ClusterInfo:
        path = Path(base_dir) / CLUSTER_FILE
        try:
            return cls.model_validate_json(path.read_text())
        except FileNotFoundError:
            raise LabError(f"no local RabbitMQ cluster in {base_dir}: {path} does not exist",
                           hint="start one first (LocalCluster(DIR).start())") from None
        except ValidationError as exc:
            raise ConfigError(f"{path}: not a valid cluster description: {_first_error(exc)}",
                              hint="delete the folder and start the cluster again") from exc


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    return f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# -- one node -------------------------------------------------------------------------------------


class LocalNode:
    """A private RabbitMQ node in ``base_dir``, listening on 127.0.0.1 only.

    Ports not given are chosen free. ``management_port`` enables rabbitmq_management there.
    ``cookie`` defaults to the one already in the folder, else a new random one. ``extra_config``
    lines are appended to the node's rabbitmq.conf."""

    def __init__(self, base_dir: Path, *, name: str, amqp_port: int | None = None,
                 dist_port: int | None = None, management_port: int | None = None,
                 cookie: str | None = None, server: Path | None = None,
                 extra_config: Sequence[str] = (), listen: str = HOST, dist_source: str | None = None) -> None:
        if not _NAME_RE.match(name):
            raise ConfigError(f"node name {name!r}: use letters, digits, '-' and '_' (at most 81)",
                              hint="for example name='lab1'")
        # Canonical, so that the -home argument that identifies the process is one spelling only.
        self.base_dir = Path(base_dir).resolve()
        if any(ch.isspace() for ch in str(self.base_dir)):
            # The RabbitMQ scripts split the Erlang arguments on whitespace.
            raise ConfigError(f"{self.base_dir}: a private RabbitMQ node's folder may not contain whitespace",
                              hint="choose a folder whose path has no spaces")
        if cookie is not None and not _COOKIE_RE.match(cookie):
            raise ConfigError("the Erlang cookie may hold only letters, digits and _.@- (1 to 255)",
                              hint="omit it to have a random one made")
        for label, port in (("amqp_port", amqp_port), ("dist_port", dist_port),
                            ("management_port", management_port)):
            if port is not None and not 1 <= port <= 65535:
                raise ConfigError(f"{label}={port}: not a TCP port")
            if port in (4369, 5672, 15672, 25672):
                raise ConfigError(f"{label}={port} is a standard port of the host's own RabbitMQ (epmd, "
                                  f"AMQP, management or distribution); a private node never takes it",
                                  hint="omit it to have a free port chosen")
        given = [p for p in (amqp_port, dist_port, management_port) if p is not None]
        if len(given) != len(set(given)):
            raise ConfigError(f"node {name}: the AMQP, distribution and management ports must differ, "
                              f"got {given}", hint="omit them to have free ports chosen")
        needed = (amqp_port is None) + (dist_port is None)
        chosen = iter(free_ports(needed) if needed else [])
        self.name = name
        self.node_name = f"smslab-{name}@localhost"
        self.amqp_port: int = amqp_port if amqp_port is not None else next(chosen)
        self.dist_port: int = dist_port if dist_port is not None else next(chosen)
        self.management_port = management_port
        self.extra_config = list(extra_config)
        for label, address in (("listen", listen), ("dist_source", dist_source)):
            if address is not None and not re.fullmatch(r"\d{1,3}(\.\d{1,3}){3}", address):
                raise ConfigError(f"{label}={address!r}: an IPv4 address", hint="for example 0.0.0.0 or 127.0.1.2")
        self.listen = listen
        self.dist_source = dist_source
        self._cookie = cookie
        self._server = server
        self._child: subprocess.Popen[bytes] | None = None
        self._log_offset = 0  # where this boot's output starts in startup.log ...
        self._node_log_offset = 0  # ... and in the node's log

    def __repr__(self) -> str:
        return f"LocalNode({self.node_name}, amqp={self.amqp_port}, dir={self.base_dir})"

    # -- where things are

    @property
    def home_dir(self) -> Path:
        return self.base_dir / "home"

    @property
    def log_file(self) -> Path:
        return self.base_dir / "log" / f"{self.node_name}.log"

    @property
    def startup_log(self) -> Path:
        return self.base_dir / "startup.log"

    @property
    def pid_file(self) -> Path:
        return self.base_dir / "rabbitmq.pid"

    @property
    def amqp_url(self) -> str:
        # guest may log in from loopback only (RabbitMQ's default), which 127.0.0.1 is.
        return f"amqp://guest:guest@{HOST}:{self.amqp_port}/%2F"

    @property
    def management_url(self) -> str | None:
        return None if self.management_port is None else f"http://{HOST}:{self.management_port}/"

    @property
    def cookie(self) -> str:
        if self._cookie is None:
            self._cookie = self._saved_cookie() or secrets.token_hex(20).upper()
        return self._cookie

    @property
    def info(self) -> NodeInfo:
        return NodeInfo(name=self.name, node_name=self.node_name, base_dir=self.base_dir,
                        amqp_port=self.amqp_port, dist_port=self.dist_port,
                        management_port=self.management_port, pid=self.pid, server=self._server,
                        extra_config=self.extra_config, listen=self.listen, dist_source=self.dist_source)

    # -- saving and loading

    def save(self) -> NodeInfo:
        info = self.info
        info.save()
        return info

    @classmethod
    def load(cls, base_dir: Path) -> LocalNode:
        """The node a previous process set up in ``base_dir`` (running or not)."""
        info = NodeInfo.load(base_dir)
        node = cls(Path(base_dir), name=info.name, amqp_port=info.amqp_port, dist_port=info.dist_port,
                   management_port=info.management_port, server=info.server,
                   extra_config=info.extra_config, listen=info.listen, dist_source=info.dist_source)
        if node.node_name != info.node_name:
            raise ConfigError(f"{info.path}: node_name {info.node_name} does not match name {info.name}",
                              hint="delete the folder and start the node again")
        return node

    @classmethod
    def load_or_new(cls, base_dir: Path, *, name: str, management_port: int | None = None) -> LocalNode:
        """The node saved in ``base_dir``, else a new one with free ports (an embedded broker)."""
        if (Path(base_dir) / INFO_FILE).exists():
            return cls.load(base_dir)
        return cls(base_dir, name=name, management_port=management_port)

    # -- the OS process

    @property
    def pid(self) -> int | None:
        """The node's OS process (the Erlang VM), if it is alive."""
        pids = self._pids()
        return pids[0] if pids else None

    def is_running(self) -> bool:
        """True while the node's OS process is alive (booting, running or with its app stopped)."""
        return self.pid is not None

    def _pids(self) -> list[int]:
        recorded = self._recorded_pid()
        found = [recorded] if recorded is not None and self._is_ours(_cmdline(recorded)) else []
        found += [pid for pid, argv in _processes() if pid != recorded and self._is_ours(argv)]
        return found

    def _recorded_pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def _is_ours(self, argv: list[str]) -> bool:
        return _follows(argv, MARKER, self.node_name) and _follows(argv, "-home", str(self.home_dir))

    # -- starting

    def start(self, timeout: float = 60.0) -> None:
        """Start the node detached and return once AMQP answers on 127.0.0.1 and
        ``rabbitmqctl await_startup`` agrees. A node already running is waited for, not started
        twice. On failure the half-started node is killed and ``BrokerUnavailable`` names its logs."""
        deadline = time.monotonic() + timeout
        if self.is_running():
            self._log_offset = self.startup_log.stat().st_size if self.startup_log.exists() else 0
            self._await_ready(deadline, timeout, launched=False)
            return
        self._launch()
        self._await_ready(deadline, timeout, launched=True)

    def _server_path(self) -> Path:
        if self._server is None:
            self._server = find_server()
        if self._server is None:
            raise LabError("RabbitMQ is not installed on this host (no rabbitmq-server script found)",
                           hint="apt-get install rabbitmq-server, or set SMSLAB_RABBITMQ_SERVER to the "
                                "server script, or pass --amqp URL of a broker")
        return self._server

    def _ctl_path(self) -> Path:
        return self._server_path().parent / "rabbitmqctl"

    def _launch(self) -> None:
        server = self._server_path()
        self._check_free()
        self._write_files()
        self.pid_file.unlink(missing_ok=True)
        self._node_log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        setsid = shutil.which("setsid")
        argv = [setsid, "-f", str(server)] if setsid else [str(server)]
        with open(self.startup_log, "ab") as out:
            self._log_offset = out.tell()
            out.write(f"--- smslab: starting {self.node_name} at {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
            out.flush()
            try:
                proc = subprocess.Popen(argv, env=self._env(), cwd=self.base_dir, stdin=subprocess.DEVNULL,
                                        stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as exc:
                raise LabError(f"cannot run {server}: {exc}", hint="check the RabbitMQ installation") from exc
        if setsid:
            try:
                rc = proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
            if rc != 0:
                raise BrokerUnavailable(f"setsid -f {server} exited {rc}; see {self.startup_log}")
        else:
            self._child = proc  # reaped in _reap()
        self.save()

    def _check_free(self) -> None:
        short = self.node_name.split("@")[0]
        registered = epmd_names()
        # Right after a kill -9, epmd may not have noticed the closed registration yet.
        if short in registered and _wait_until(lambda: short not in epmd_names(), 3.0):
            registered = {}
        if short in registered:
            raise LabError(
                f"node name {self.node_name} is already registered with epmd (distribution port "
                f"{registered[short]}) by a process that is not this node of {self.base_dir}",
                hint="stop that node (LocalNode.load(ITS_DIR).stop()) or choose another name")
        for label, port in (("AMQP", self.amqp_port), ("distribution", self.dist_port),
                            ("management", self.management_port)):
            if port is not None and _port_in_use(port):
                raise LabError(f"cannot start {self.node_name}: its {label} port {port} is already in use "
                               f"on this host", hint="stop what holds it, or omit the port to have a free "
                                                     "one chosen")

    def _write_files(self) -> None:
        for folder in (self.base_dir, self.home_dir, self.base_dir / "mnesia", self.base_dir / "log",
                       self.base_dir / "conf.d"):
            folder.mkdir(parents=True, exist_ok=True)
        self._write_cookie(self.cookie)
        lines = [
            "# A private smslab node (broker/local.py); nothing under /etc/rabbitmq is read.",
            f"listeners.tcp.1 = {self.listen}:{self.amqp_port}",
            "loopback_users.guest = true",
            "log.console = false",
            "log.file.level = info",
        ]
        if self.management_port is not None:
            lines += [f"management.tcp.port = {self.management_port}", f"management.tcp.ip = {HOST}"]
        (self.base_dir / "rabbitmq.conf").write_text("\n".join([*lines, *self.extra_config]) + "\n")
        (self.base_dir / "rabbitmq-env.conf").write_text(
            "# Empty on purpose: the node's settings come from the environment smslab passes.\n")
        (self.base_dir / "advanced.config").write_text("[].\n")
        plugins = "[rabbitmq_management]." if self.management_port is not None else "[]."
        (self.base_dir / "enabled_plugins").write_text(plugins + "\n")

    def _saved_cookie(self) -> str | None:
        try:
            text = (self.home_dir / ".erlang.cookie").read_text().strip()
        except OSError:
            return None
        return text or None

    def _write_cookie(self, cookie: str) -> None:
        path = self.home_dir / ".erlang.cookie"
        if self._saved_cookie() == cookie:
            return
        if path.exists():
            path.chmod(0o600)
        path.write_text(cookie)
        path.chmod(0o400)  # Erlang refuses a cookie file others can read

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RABBITMQ_", "ERL_")) and k not in _SHORT_SETTINGS}
        base = self.base_dir
        env.update({
            "HOME": str(self.home_dir),
            "RABBITMQ_NODENAME": self.node_name,
            "RABBITMQ_USE_LONGNAME": "false",
            "RABBITMQ_NODE_IP_ADDRESS": self.listen,
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_PID_FILE": str(self.pid_file),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
            "RABBITMQ_CONFIG_FILES": str(base / "conf.d"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
            "ERL_EPMD_ADDRESS": HOST,
            "ERL_CRASH_DUMP": str(base / "erl_crash.dump"),
            # What /etc/rabbitmq/rabbitmq-env.conf gives the system node (distribution on loopback),
            # plus the marker that finds this node's process again.
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS":
                f"-kernel inet_dist_use_interface {{127,0,0,1}}{self._dist_source_arg()} {MARKER} {self.node_name}",
        })
        return env

    def _dist_source_arg(self) -> str:
        """Its distribution connections leave from its own loopback address, so that a firewall
        rule can tell them from its peers' (``broker/netfault.py``: a partitioned node)."""
        if self.dist_source is None:
            return ""
        return f" -kernel inet_dist_connect_options [{{ip,{{{self.dist_source.replace('.', ',')}}}}}]"

    def _await_ready(self, deadline: float, timeout: float, *, launched: bool) -> None:
        launched_at = time.monotonic()
        seen: int | None = None
        while True:
            pid = self.pid
            failure = self._boot_failure()
            if failure:
                self._fail_start(f"boot failed: {failure}")
            if pid is None and (seen is not None or not launched):
                self._fail_start("its process exited during boot" if seen is None
                                 else f"its process {seen} exited during boot")
            if pid is None and time.monotonic() - launched_at > 15:
                self._fail_start("no Erlang VM for it appeared within 15s of running the server script")
            seen = pid if pid is not None else seen
            answers, why = self._amqp_answers()
            if answers and (self.management_port is None or _accepts(self.management_port)):
                break
            if time.monotonic() >= deadline:
                self._fail_start(f"not ready within {timeout:.0f}s ({why})")
            time.sleep(_POLL)
        try:
            self.ctl("await_startup", timeout=max(10.0, deadline - time.monotonic()))
        except BrokerUnavailable as exc:
            self._fail_start(f"rabbitmqctl await_startup: {exc.message}")
        self.save()

    def _amqp_answers(self) -> tuple[bool, str]:
        if not _accepts(self.amqp_port):
            return False, f"nothing accepts on {HOST}:{self.amqp_port} yet"
        params = pika.URLParameters(self.amqp_url)
        params.connection_attempts = 1
        params.socket_timeout = 3
        params.client_properties = {"connection_name": "smslab-local-probe"}
        try:
            conn = pika.BlockingConnection(params)
        except pika.exceptions.ProbableAuthenticationError as exc:
            self._fail_start(f"the node refused the guest login over {HOST}: {exc!r}",
                             hint="the node's rabbitmq.conf must keep loopback_users.guest = true "
                                  "and not delete the guest user")
        except (pika.exceptions.AMQPError, OSError) as exc:
            return False, f"AMQP on {HOST}:{self.amqp_port}: {exc.__class__.__name__} {exc}"
        try:
            conn.close()
        except (pika.exceptions.AMQPError, OSError):
            pass
        return True, ""

    def _boot_failure(self) -> str | None:
        text = self._startup_output()
        if "BOOT FAILED" not in text and "Kernel pid terminated" not in text:
            return None
        return self._error_summary() or "see the logs"

    def _startup_output(self) -> str:
        try:
            with open(self.startup_log, "rb") as f:
                f.seek(self._log_offset)
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def _error_summary(self, limit: int = 3) -> str:
        """The first error lines of this boot, without their timestamps; indented lines (details,
        suggestions, stack traces) are left to the log."""
        lines: list[str] = []
        sources = [self._startup_output()]
        try:
            with open(self.log_file, "rb") as f:
                f.seek(self._node_log_offset)
                sources.append(f.read(1_000_000).decode("utf-8", "replace"))
        except OSError:
            pass
        for text in sources:
            for line in text.splitlines():
                if "[error]" not in line:
                    continue
                raw = _LOG_PREFIX.sub("", line)
                msg = raw.strip()
                if raw[:1].isspace() or not msg or set(msg) <= {"="} or msg == "BOOT FAILED":
                    continue
                if msg not in lines:
                    lines.append(msg)
                if len(lines) >= limit:
                    return " / ".join(lines)
        return " / ".join(lines)

    def _fail_start(self, reason: str, hint: str | None = None) -> NoReturn:
        detail = self._error_summary() if "boot failed" not in reason else ""
        self._kill_quietly()
        msg = (f"RabbitMQ node {self.node_name} did not start on {HOST}:{self.amqp_port}: {reason}"
               f"{'; first errors: ' + detail if detail else ''}; "
               f"log: {self.log_file}, boot output: {self.startup_log}")
        raise BrokerUnavailable(msg, hint=hint or (
            f"read {self.startup_log} and {self.log_file}; the half-started node was killed, its folder "
            f"{self.base_dir} kept"))

    def _kill_quietly(self) -> None:
        self._signal(signal.SIGKILL)
        _wait_until(lambda: not self._pids(), 10.0)
        self._reap()
        self.pid_file.unlink(missing_ok=True)

    # -- stopping

    def stop(self, timeout: float = 30.0, *, remove: bool = False) -> None:
        """Stop the node: ``rabbitmqctl stop``, then SIGTERM and SIGKILL of its process if it is
        still there. The folder stays unless ``remove``. Stopping a stopped node does nothing."""
        deadline = time.monotonic() + timeout
        reserve = min(5.0, timeout / 4)
        if self._pids():
            graceful = max(1.0, deadline - reserve - time.monotonic())
            try:
                self.ctl("stop", timeout=graceful)
            except BrokerUnavailable:
                self._signal(signal.SIGTERM)
            if not _wait_until(lambda: not self._pids(), max(0.5, deadline - reserve - time.monotonic())):
                self._signal(signal.SIGKILL)
                if not _wait_until(lambda: not self._pids(), max(reserve, 5.0)):
                    raise LabError(f"RabbitMQ node {self.node_name} (pid {self.pid}) did not stop, "
                                   f"even after SIGKILL", hint=f"kill it by hand: kill -9 {self.pid}")
        self._reap()
        self.pid_file.unlink(missing_ok=True)
        if remove:
            shutil.rmtree(self.base_dir, ignore_errors=True)
        elif self.base_dir.exists():
            self.save()

    def kill(self, timeout: float = 10.0) -> None:
        """kill -9 of the node's OS process (a crash); returns once it is gone."""
        self._signal(signal.SIGKILL)
        if not _wait_until(lambda: not self._pids(), timeout):
            raise LabError(f"RabbitMQ node {self.node_name} (pid {self.pid}) survived SIGKILL for {timeout:.0f}s")
        self._reap()

    def _signal(self, sig: signal.Signals) -> None:
        for pid in self._pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
            except PermissionError as exc:
                raise LabError(f"not allowed to signal {self.node_name}'s process {pid}: {exc}",
                               hint="run as the user that started the node") from exc

    def _reap(self) -> None:
        if self._child is not None and self._child.poll() is not None:
            self._child = None

    # -- the application inside the VM

    def stop_app(self, timeout: float = 60.0) -> None:
        """Stop the RabbitMQ application, keep the VM (a broker restart fault)."""
        self.ctl("stop_app", timeout=timeout)

    def start_app(self, timeout: float = 60.0) -> None:
        """Start the application again; returns once AMQP answers."""
        deadline = time.monotonic() + timeout
        self.ctl("start_app", timeout=timeout)
        why = ""
        while time.monotonic() < deadline:
            answers, why = self._amqp_answers()
            if answers:
                return
            time.sleep(_POLL)
        raise BrokerUnavailable(f"RabbitMQ node {self.node_name}: AMQP did not answer within {timeout:.0f}s "
                                f"of start_app ({why})", hint=f"read {self.log_file}")

    def ctl(self, *args: str, timeout: float = 60.0, input: str | None = None) -> str:
        """Run ``rabbitmqctl -n NODE ARGS`` with this node's HOME (cookie) and settings; its stdout.
        ``input`` goes to its stdin (``eval`` reads its expression there)."""
        argv = [str(self._ctl_path()), "-n", self.node_name, *args]
        shown = "rabbitmqctl " + " ".join(args)
        try:
            done = subprocess.run(argv, env=self._env(), cwd=self.base_dir if self.base_dir.exists() else None,
                                  stdin=subprocess.DEVNULL if input is None else None, input=input,
                                  capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise BrokerUnavailable(f"{shown} against {self.node_name} did not finish within {timeout:.0f}s",
                                    hint=f"is the node up? read {self.log_file}") from None
        except OSError as exc:
            raise LabError(f"cannot run {argv[0]}: {exc}", hint="check the RabbitMQ installation") from exc
        if done.returncode != 0:
            detail = " ".join((done.stderr.strip() or done.stdout.strip()).split())[:600]
            raise BrokerUnavailable(f"{shown} against {self.node_name} failed (exit {done.returncode}): {detail}",
                                    hint=f"is the node running (LocalNode.load({self.base_dir}).is_running())? "
                                         f"read {self.log_file}")
        return done.stdout


# -- processes ------------------------------------------------------------------------------------


def _follows(argv: list[str], flag: str, value: str) -> bool:
    return any(argv[i] == flag and argv[i + 1] == value for i in range(len(argv) - 1))


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        if Path("/proc/self/cmdline").exists():
            return []
        return next((argv for p, argv in _processes() if p == pid), [])
    return raw.decode("utf-8", "replace").split("\0")


def _processes() -> Iterable[tuple[int, list[str]]]:
    """(pid, argv) of every process; argv is empty for a zombie."""
    proc = Path("/proc")
    if (proc / "self" / "cmdline").exists():
        for entry in proc.iterdir():
            if entry.name.isdigit():
                yield int(entry.name), _cmdline(int(entry.name))
        return
    try:
        out = subprocess.run(["ps", "-axww", "-o", "pid=,args="], capture_output=True, text=True,
                             timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return
    for line in out.splitlines():
        pid, _, args = line.strip().partition(" ")
        if pid.isdigit():
            yield int(pid), args.split()


def _wait_until(done: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


# -- a local cluster ------------------------------------------------------------------------------


class LocalCluster:
    """``size`` private nodes on this host clustered together, named ``smslab-NAME-1@localhost``
    ... ``smslab-NAME-N@localhost``, all with one cookie, each with its own AMQP and distribution
    port (epmd, shared with the host, maps each name to its port). Nodes are numbered from 1 like
    their names: ``node(1)`` is the seed the others join, ``urls[0]`` its URL."""

    def __init__(self, base_dir: Path, size: int = 3, *, name: str = "cluster", cookie: str | None = None,
                 server: Path | None = None, listen: str = HOST) -> None:
        if not 1 <= size <= 9:
            raise ConfigError(f"cluster size {size}: use 1 to 9 nodes")
        base = Path(base_dir).resolve()
        if cookie is None:
            first = base / "node1" / "home" / ".erlang.cookie"
            cookie = first.read_text().strip() if first.exists() else secrets.token_hex(20).upper()
        ports = free_ports(2 * size)
        # pause_minority: a node cut off from the majority stops serving (its clients fail over to
        # the majority) and rejoins by itself once it sees the others again; what quorum queues
        # are meant to run with. Each node's distribution connections leave from 127.0.1.I.
        nodes = [LocalNode(base / f"node{i}", name=f"{name}-{i}", amqp_port=ports[2 * i - 2],
                           dist_port=ports[2 * i - 1], cookie=cookie, server=server, listen=listen,
                           dist_source=f"127.0.1.{i}", extra_config=[PARTITION_HANDLING])
                 for i in range(1, size + 1)]
        user, password = (None, None) if listen == HOST else ("smslab", secrets.token_urlsafe(18))
        self._setup(base, name, nodes, ClusterInfo(name=name, size=size, base_dir=base, listen=listen, user=user,
                                                   password=password))

    def _setup(self, base: Path, name: str, nodes: list[LocalNode], info: ClusterInfo) -> None:
        self.base_dir = base
        self.name = name
        self._nodes = nodes
        self._info = info

    @classmethod
    def load(cls, base_dir: Path) -> LocalCluster:
        """The cluster a previous process set up in ``base_dir``."""
        info = ClusterInfo.load(base_dir)
        base = Path(base_dir).resolve()
        cluster = cls.__new__(cls)
        cluster._setup(base, info.name, [LocalNode.load(base / f"node{i}") for i in range(1, info.size + 1)], info)
        return cluster

    @property
    def listen(self) -> str:
        """The address the nodes' AMQP listeners are on (127.0.0.1, or 0.0.0.0 for clients in
        network namespaces of this host)."""
        return self._info.listen

    @property
    def size(self) -> int:
        return len(self._nodes)

    @property
    def nodes(self) -> list[LocalNode]:
        return list(self._nodes)

    @property
    def urls(self) -> list[str]:
        """The nodes' AMQP URLs on 127.0.0.1; with the cluster's own user when it listens beyond
        loopback (guest may log in from loopback only)."""
        if self._info.user is None or self._info.password is None:
            return [n.amqp_url for n in self._nodes]
        return [f"amqp://{self._info.user}:{self._info.password}@{HOST}:{n.amqp_port}/%2F" for n in self._nodes]

    @property
    def node_names(self) -> list[str]:
        return [n.node_name for n in self._nodes]

    def node(self, i: int) -> LocalNode:
        """The i-th node, 1-based like its name."""
        if not 1 <= i <= len(self._nodes):
            raise ConfigError(f"cluster {self.name} has nodes 1 to {len(self._nodes)}, not {i}")
        return self._nodes[i - 1]

    def start(self, timeout: float = 120.0) -> None:
        """Start every node (in parallel), join nodes 2..n to node 1 (stop_app, join_cluster,
        start_app) and return once ``cluster_status`` lists every node running. On failure every
        node is stopped again."""
        deadline = time.monotonic() + timeout
        self._info.save()
        try:
            self._each(lambda n: n.start(timeout=max(1.0, deadline - time.monotonic())))
            seed = self._nodes[0]
            members = set(self._status(seed).get("disk_nodes", []))
            for node in self._nodes[1:]:
                if node.node_name in members:
                    continue  # a restarted cluster: the node rejoined by itself
                left = max(5.0, deadline - time.monotonic())
                node.stop_app(timeout=left)
                node.ctl("join_cluster", seed.node_name, timeout=left)
                node.start_app(timeout=max(5.0, deadline - time.monotonic()))
            self.await_running(timeout=max(1.0, deadline - time.monotonic()))
            self._ensure_user(seed, timeout=max(5.0, deadline - time.monotonic()))
        except BaseException:
            self._each(lambda n: n.stop(timeout=20), raise_first=False)
            raise

    def _ensure_user(self, node: LocalNode, timeout: float) -> None:
        """The cluster's own administrator (users are cluster-wide: made once, through node 1)."""
        user, password = self._info.user, self._info.password
        if user is None or password is None:
            return
        listed = node.ctl("list_users", "--formatter", "json", timeout=timeout)
        if user not in {row.get("user") for row in json.loads(listed or "[]") if isinstance(row, dict)}:
            node.ctl("add_user", user, password, timeout=timeout)
        node.ctl("set_user_tags", user, "administrator", timeout=timeout)
        node.ctl("set_permissions", "-p", "/", user, ".*", ".*", ".*", timeout=timeout)

    def await_running(self, timeout: float = 60.0, names: Sequence[str] | None = None) -> list[str]:
        """Wait until ``cluster_status`` lists ``names`` (default: every node) as running."""
        want = set(names if names is not None else self.node_names)
        deadline = time.monotonic() + timeout
        running: list[str] = []
        last = ""
        while True:
            try:
                running = self.running_nodes()
                if want <= set(running):
                    return running
            except (BrokerUnavailable, LabError) as exc:
                last = exc.message
            if time.monotonic() >= deadline:
                raise BrokerUnavailable(
                    f"cluster {self.name}: not all of {sorted(want)} running within {timeout:.0f}s "
                    f"(running: {running or 'unknown'}{'; ' + last if last else ''})",
                    hint=f"read the nodes' logs under {self.base_dir}/node*/log/")
            time.sleep(0.3)

    def cluster_status(self) -> dict[str, Any]:
        """``rabbitmqctl cluster_status`` (JSON) as seen by the first running node."""
        for node in self._nodes:
            if node.is_running():
                return self._status(node)
        raise LabError(f"cluster {self.name}: no node is running", hint="start it: LocalCluster.start()")

    def running_nodes(self) -> list[str]:
        return list(self.cluster_status().get("running_nodes", []))

    def running_nodes_seen_by(self, node: LocalNode) -> list[str]:
        """The nodes ``node`` lists running (another node may see otherwise in a partition)."""
        return list(self._status(node).get("running_nodes", []))

    @staticmethod
    def _status(node: LocalNode) -> dict[str, Any]:
        out = node.ctl("cluster_status", "--formatter", "json", timeout=30)
        try:
            status = json.loads(out)
        except json.JSONDecodeError as exc:
            raise BrokerUnavailable(f"{node.node_name}: cluster_status is not JSON: {out[:200]!r}") from exc
        if not isinstance(status, dict):
            raise BrokerUnavailable(f"{node.node_name}: unexpected cluster_status {out[:200]!r}")
        return status

    def kill_node(self, i: int) -> None:
        """kill -9 of node i's OS process."""
        self.node(i).kill()

    def restart_node(self, i: int, timeout: float = 60.0) -> None:
        """Start node i again (stopping it first if it runs); it rejoins from its own database.
        Returns once the cluster lists it running."""
        deadline = time.monotonic() + timeout
        node = self.node(i)
        if node.is_running():
            node.stop(timeout=max(5.0, timeout / 2))
        node.start(timeout=max(5.0, deadline - time.monotonic()))
        self.await_running(timeout=max(1.0, deadline - time.monotonic()), names=[node.node_name])

    def stop(self, timeout: float = 60.0, *, remove: bool = False) -> None:
        """Stop every node (in parallel); the folders stay unless ``remove``."""
        self._each(lambda n: n.stop(timeout=timeout))
        if remove:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def _each(self, fn: Callable[[LocalNode], None], *, raise_first: bool = True) -> None:
        errors: list[BaseException] = []
        with ThreadPoolExecutor(max_workers=len(self._nodes)) as pool:
            for future in [pool.submit(fn, n) for n in self._nodes]:
                exc = future.exception()
                if exc is not None:
                    errors.append(exc)
        if errors and raise_first:
            raise errors[0]


def management_get(node: LocalNode, path: str, timeout: float = 10.0) -> Any:
    """GET the management HTTP API of ``node`` as guest (``path`` like ``api/overview``)."""
    if node.management_url is None:
        raise ConfigError(f"{node.node_name} was started without a management_port")
    url = node.management_url + path.lstrip("/")
    auth = base64.b64encode(b"guest:guest").decode()
    request = urllib.request.Request(url, headers={"Authorization": f"Basic {auth}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except (urllib.error.URLError, OSError, json.JSONDecodeError) as exc:
        raise BrokerUnavailable(f"management API of {node.node_name} at {url}: {exc}",
                                hint=f"read {node.log_file}") from exc
