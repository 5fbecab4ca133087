"""Broker-level faults, applied from outside the sites: close a site's connections (and refuse its
broker user's reconnects), restart the broker application, raise a memory alarm (publishers
blocked).

``BrokerControl`` is the small interface the fault harness uses; ``Rabbitmqctl`` drives a broker
on this host through its own CLI (the default node, or a private node of ``broker.local``).
The sites know nothing of any of it: they see their connection closed or blocked, as they
would on a real network.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from emulator.errors import BrokerUnavailable, LabError


class BrokerControl(Protocol):
    def describe(self) -> str: ...

    def close_connections(self, name: str, reason: str) -> int: ...

    def refuse_user(self, user: str) -> None:
        """Refuse every new connection of this broker user (its connection limit set to 0)."""

    def allow_user(self, user: str) -> None:
        """Let it connect again (its connection limit cleared; a user that is gone is no error)."""

    def stop_app(self) -> None: ...

    def start_app(self) -> None: ...

    def memory_watermark(self) -> float: ...

    def set_memory_watermark(self, fraction: float) -> None: ...

    def alarms(self) -> str: ...


_CONN_NAME = re.compile(r'\{"connection_name","([^"]*)"\}')


class Rabbitmqctl:
    """A broker on this host, through ``rabbitmqctl``: ``run`` runs one rabbitmqctl command and
    returns its output (the default node's CLI on PATH, or ``LocalNode.ctl`` of a private one)."""

    def __init__(self, run: Callable[..., str], label: str) -> None:
        self.run = run
        self.label = label

    @classmethod
    def on_path(cls) -> Rabbitmqctl:
        exe = shutil.which("rabbitmqctl")
        if exe is None:
            raise LabError("broker faults need rabbitmqctl on this host, and it is not on PATH",
                           hint="run them where the broker runs, or give the lab a private broker")

        def run(*args: str, timeout: float = 60.0) -> str:
            try:
                done = subprocess.run([exe, "-q", *args], capture_output=True, text=True, timeout=timeout,
                                      check=False)
            except subprocess.TimeoutExpired as exc:
                raise BrokerUnavailable(f"rabbitmqctl {' '.join(args)} did not answer in {timeout:.0f}s") from exc
            if done.returncode != 0:
                raise BrokerUnavailable(f"rabbitmqctl {' '.join(args)} failed: "
                                        f"{(done.stderr or done.stdout).strip()[:300]}")
            return done.stdout

        return cls(run, "the broker on this host (rabbitmqctl)")

    @classmethod
    def private(cls, node_dir: Path) -> Rabbitmqctl:
        from broker.local import LocalNode

        node = LocalNode.load(node_dir)
        return cls(node.ctl, f"the lab's private node {node.node_name}")

    def describe(self) -> str:
        return self.label

    def _connections(self) -> list[tuple[str, str]]:
        out = []
        for line in self.run("list_connections", "pid", "client_properties").splitlines():
            pid, _, props = line.partition("\t")
            match = _CONN_NAME.search(props)
            if match:
                out.append((pid.strip(), match.group(1)))
        return out

    def close_connections(self, name: str, reason: str) -> int:
        closed = 0
        for pid, conn_name in self._connections():
            if conn_name == name:
                try:
                    self.run("close_connection", pid, reason)
                    closed += 1
                except BrokerUnavailable:
                    pass  # gone meanwhile
        return closed

    def refuse_user(self, user: str) -> None:
        self.run("set_user_limits", user, '{"max-connections": 0}')

    def allow_user(self, user: str) -> None:
        try:
            self.run("clear_user_limits", user, "max-connections")
        except BrokerUnavailable as exc:
            if "no_such_user" not in exc.message:
                raise

    def stop_app(self) -> None:
        self.run("stop_app", timeout=120)

    def start_app(self) -> None:
        self.run("start_app", timeout=120)
        self.run("await_startup", timeout=120)

    def memory_watermark(self) -> float:
        text = self.run("eval", "vm_memory_monitor:get_vm_memory_high_watermark().").strip()
        match = re.search(r"[\d.]+", text)
        if match is None:
            raise BrokerUnavailable(f"cannot read the broker's memory watermark from {text!r}")
        return float(match.group(0))

    def set_memory_watermark(self, fraction: float) -> None:
        self.run("set_vm_memory_high_watermark", repr(fraction))

    def alarms(self) -> str:
        """The broker's resource alarms, as it prints them ("[]" when there is none)."""
        return self.run("eval", "rabbit_alarm:get_alarms().").strip()


class ManagementApi:
    """A broker reached through RabbitMQ's management HTTP API (a compose lab's broker, from its
    tools container). It closes connections; restarts and memory alarms are the broker host's
    (``docker compose restart rabbitmq``, ``docker compose exec rabbitmq rabbitmqctl ...``)."""

    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        self.base = f"{parts.scheme}://{parts.hostname}:{parts.port or 15672}"
        user, password = parts.username or "guest", parts.password or "guest"
        self.auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def describe(self) -> str:
        return f"the broker's management API at {self.base}"

    def _call(self, method: str, path: str, reason: str | None = None, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers={"Authorization": self.auth, "Content-Type": "application/json"})
        if reason:
            request.add_header("X-Reason", reason)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                body = response.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise BrokerUnavailable(f"management API {method} {path}: HTTP {exc.code}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise BrokerUnavailable(f"cannot reach the management API at {self.base}: {exc}",
                                    hint="is the management plugin on? (the rabbitmq:3-management image)") from exc
        return json.loads(body) if body else None

    def close_connections(self, name: str, reason: str) -> int:
        closed = 0
        for conn in self._call("GET", "/api/connections") or []:
            if conn.get("client_properties", {}).get("connection_name") == name:
                self._call("DELETE", "/api/connections/" + urllib.parse.quote(conn["name"], safe=""), reason)
                closed += 1
        return closed

    def refuse_user(self, user: str) -> None:
        self._call("PUT", f"/api/user-limits/{urllib.parse.quote(user, safe='')}/max-connections", body={"value": 0})

    def allow_user(self, user: str) -> None:
        self._call("DELETE", f"/api/user-limits/{urllib.parse.quote(user, safe='')}/max-connections")

    def _not_here(self, what: str, how: str) -> LabError:
        return LabError(f"{what} is done on the broker's host, not through its management API", hint=how)

    def stop_app(self) -> None:
        raise self._not_here("a broker restart", "docker compose restart rabbitmq")

    def start_app(self) -> None:
        raise self._not_here("a broker restart", "docker compose restart rabbitmq")

    def memory_watermark(self) -> float:
        raise self._not_here("a memory alarm",
                             "docker compose exec rabbitmq rabbitmqctl set_vm_memory_high_watermark 0 (and 0.4 to heal)")

    def set_memory_watermark(self, fraction: float) -> None:
        self.memory_watermark()

    def alarms(self) -> str:
        nodes = self._call("GET", "/api/nodes") or []
        return "memory" if any(n.get("mem_alarm") for n in nodes) else "[]"
