"""The lab directory: everything of one lab (topology, site stores, backups, logs, history).

    <lab dir>/lab.json                 LabInfo: lab id, broker URLs (one per cluster node), topology
    <lab dir>/broker-secrets.json      mode 0600: the passwords of the lab's broker users (per-site
                                       identities); no other file holds one
    <lab dir>/sites/<CODE>/site.db     the site's store (SQLite, WAL)
    <lab dir>/sites/<CODE>/clients.db  its simulated clients (not part of the site: never restored)
    <lab dir>/sites/<CODE>/site.pid    pid of the running site process
    <lab dir>/sites/<CODE>/site.log    its log
    <lab dir>/sites/<CODE>/site.broker the broker node it is connected to (host:port)
    <lab dir>/sites/<CODE>/backups/<ID>/  one backup of the site: site.db + backup.json
    <lab dir>/faults/                  the faults that are on (one file each) and their counters
    <lab dir>/labd.pid, labd.log       the lab's fault daemon (relays, timed heals, history)
    <lab dir>/harness.db               what the harness did (faults, kills, restores)
    <lab dir>/history.jsonl            the merged history of the lab
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from broker import urls
from emulator.errors import ConfigError, LabError
from emulator.topology import Topology

DEFAULT_LAB_DIR = ".smslab"
ALIVE_FOR = 6.0  # seconds a site on another host counts as alive after its last heartbeat


class BrokerRef(BaseModel):
    """Which broker a lab uses, and how the harness reaches it for broker faults."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["external", "private", "container", "compose", "simulated", "cluster"] = "external"
    node_dir: str | None = None  # private: the node's folder (broker.local.LocalNode); cluster: the
    # local cluster's folder (broker.local.LocalCluster, smslab broker cluster up), for node faults
    container: str | None = None  # container: its id (testcontainers)
    management: str | None = None  # compose: the broker's management API (http://user:password@host:port)
    owned: bool = True  # started for the lab: down stops it (False: the lab only uses it)

    def describe(self, url: str) -> str:
        nodes = url.split(",")
        where = nodes[0].split("@")[-1]
        if len(nodes) > 1:
            shown = ", ".join(urls.where(u) if u.startswith(urls.SCHEMES) else u for u in nodes)
            local = f", local, in {self.node_dir}" if self.kind == "cluster" else ""
            return f"a RabbitMQ cluster of {len(nodes)} nodes ({shown}{local})"
        if self.kind == "private":
            return f"a private RabbitMQ node of the lab ({where}, {self.node_dir})"
        if self.kind == "container":
            return f"a RabbitMQ container of the lab ({where})"
        if self.kind == "compose":
            return f"the compose lab's RabbitMQ service ({where})"
        if self.kind == "simulated":
            return "the simulator's in-memory broker (smslab sim): no RabbitMQ, no processes"
        return f"RabbitMQ at {where}"


class LabInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lab_id: str
    amqp_urls: list[str] = Field(min_length=1)
    """The broker's URL, or the URLs of the nodes of its cluster (each site connects to one and
    fails over to the others)."""
    created: float
    topology: Topology
    broker: BrokerRef = Field(default_factory=BrokerRef)
    identities: Literal["per-site", "unauthenticated"] = "unauthenticated"
    """per-site: every site publishes as its own broker user (validated ``user_id``), the CLI and
    the fault daemon as the lab's controller; the passwords are in ``broker-secrets.json``."""
    identities_note: str | None = None  # how the users are managed, or why the lab is unauthenticated
    # The controller's login (from the secrets file, never from lab.json): what amqp_url logs in as.
    _login: tuple[str, str] | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _one_url_or_several(cls, data: Any) -> Any:
        # ``amqp_url`` (one URL or several comma-separated) is what lab files before the list
        # held, and what callers pass; it becomes the list.
        if isinstance(data, dict) and "amqp_url" in data:
            data = dict(data)
            given = data.pop("amqp_url")
            data.setdefault("amqp_urls", [given] if given == "memory://" else urls.split(given))
        return data

    @property
    def amqp_url(self) -> str:
        """The URLs comma-separated: what broker.admin and the transport take. With per-site
        identities, logged in as the lab's controller (the harness's identity)."""
        if self._login is not None:
            return urls.join(urls.with_login(u, *self._login) for u in self.amqp_urls)
        return self.admin_url

    @property
    def admin_url(self) -> str:
        """The URLs as given to ``up``, with their own user (which manages the lab's users)."""
        return urls.join(self.amqp_urls)

    def login_as(self, user: str, password: str) -> None:
        self._login = (user, password)


def new_lab_id(name: str) -> str:
    return f"{name}-{secrets.token_hex(3)}"


class LabDir:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path).resolve()

    @property
    def info_path(self) -> Path:
        return self.path / "lab.json"

    def exists(self) -> bool:
        return self.info_path.exists()

    def load(self) -> LabInfo:
        if not self.info_path.exists():
            raise LabError(
                f"no lab in {self.path}",
                hint="bring one up with: smslab up TOPOLOGY (or pass --lab DIR)",
            )
        try:
            info = LabInfo.model_validate_json(self.info_path.read_bytes())
        except ValidationError as exc:
            raise ConfigError(f"{self.info_path} is not a valid lab file: {exc}") from exc
        if info.identities == "per-site":
            from broker import names

            controller = names.broker_user(info.lab_id, names.CONTROLLER)
            password = self.secrets().get(controller)
            if password is None:
                raise LabError(f"lab {info.lab_id} has per-site broker identities but {self.secrets_path} holds"
                               " no password of its controller",
                               hint="run as the user that brought the lab up (the file is mode 0600)")
            info.login_as(controller, password)
        return info

    @property
    def secrets_path(self) -> Path:
        return self.path / "broker-secrets.json"

    def secrets(self) -> dict[str, str]:
        """broker user -> password ({} when there is no secrets file, or it is not ours to read)."""
        try:
            data = json.loads(self.secrets_path.read_text())
        except (OSError, ValueError):
            return {}
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def save_secrets(self, secrets: dict[str, str]) -> None:
        """Written mode 0600 from the first byte (created so, then renamed over the old one)."""
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / f".broker-secrets.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(secrets, f)
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.secrets_path)

    def save(self, info: LabInfo) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_atomically(self.info_path, info.model_dump_json(indent=2))

    def site_dir(self, code: str) -> Path:
        return self.path / "sites" / code

    def site_db(self, code: str) -> Path:
        return self.site_dir(code) / "site.db"

    def clients_db(self, code: str) -> Path:
        return self.site_dir(code) / "clients.db"

    def pid_file(self, code: str) -> Path:
        return self.site_dir(code) / "site.pid"

    def write_pid(self, code: str, pid: int) -> None:
        """Write a site's pid file in one step: a reader never sees it empty (a truncated file
        read between the truncate and the write would say the site is not running)."""
        write_atomically(self.pid_file(code), f"{pid} {socket.gethostname()}\n")

    def log_file(self, code: str) -> Path:
        return self.site_dir(code) / "site.log"

    def out_file(self, code: str) -> Path:
        """What a site process writes outside its (rotated) log: a crash before its logging
        started, an interpreter's last words."""
        return self.site_dir(code) / "site.out"

    def backups_dir(self, code: str) -> Path:
        """A site's backups: beside its store, so one volume holds both (compose)."""
        return self.site_dir(code) / "backups"

    def backup_dir(self, backup_id: str) -> Path:
        """The folder of one backup (its id starts with its site's code)."""
        return self.backups_dir(backup_id[:3].upper()) / backup_id

    def all_backup_dirs(self) -> list[Path]:
        root = self.path / "sites"
        return sorted(p for p in root.glob("*/backups/*") if p.is_dir()) if root.exists() else []

    def faults_dir(self) -> Path:
        return self.path / "faults"

    def daemon_pid_file(self) -> Path:
        return self.path / "labd.pid"

    def daemon_log(self) -> Path:
        return self.path / "labd.log"

    def daemon_pid(self) -> int | None:
        """The pid of the lab's fault daemon if it is alive, else None."""
        try:
            pid = int(self.daemon_pid_file().read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid
        if _is_zombie(pid):
            return None
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return pid
        return pid if b"emulator.labd" in argv else None

    def zygote_socket(self) -> Path:
        return self.path / "zygote.sock"

    def zygote_log(self) -> Path:
        return self.path / "zygote.log"

    def zygote_pid(self) -> int | None:
        """The pid of the lab's site forkserver (``sites.zygote``) if it is alive, else None."""
        try:
            pid = int((self.path / "zygote.pid").read_text().split()[0])
            os.kill(pid, 0)
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            return None
        return pid if b"sites.zygote" in argv and not _is_zombie(pid) else None

    def alive_file(self, code: str) -> Path:
        return self.site_dir(code) / "site.alive"

    def broker_file(self, code: str) -> Path:
        """The broker node the site's process is connected to (JSON, written by the site)."""
        return self.site_dir(code) / "site.broker"

    def broker_node(self, code: str) -> str | None:
        """``host:port`` of the broker node the site is connected to, None if it is not (or
        does not say)."""
        try:
            node = json.loads(self.broker_file(code).read_text()).get("node")
        except (OSError, ValueError, AttributeError):
            return None
        return node if isinstance(node, str) else None

    def site_host(self, code: str) -> str | None:
        """The host (container) a site's process runs on, as its pid file says."""
        try:
            parts = self.pid_file(code).read_text().split()
        except OSError:
            return None
        return parts[1] if len(parts) > 1 else None

    def local(self, code: str) -> bool:
        """Whether the site's process runs on this host (so its pid can be signalled)."""
        host = self.site_host(code)
        return host is None or host == socket.gethostname()

    def pid(self, code: str) -> int | None:
        """The pid of the site's process if it is alive, else None. A site on another host (a
        container of a compose lab) is alive while it touches its ``site.alive`` file."""
        try:
            pid = int(self.pid_file(code).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        if not self.local(code):
            try:
                fresh = time.time() - self.alive_file(code).stat().st_mtime < ALIVE_FOR
            except OSError:
                return None
            return pid if fresh else None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid
        if _is_zombie(pid) or not _is_site_process(pid, code):
            return None  # dead, or the pid was reused by another process since
        return pid


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename: readers see the old file or the new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _is_site_process(pid: int, code: str) -> bool:
    try:
        # a site forked by the lab's forkserver has its command line set as one string
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").split()
    except OSError:
        return True  # no /proc to ask: trust the pid file
    return b"sites" in argv and code.encode() in argv


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"

