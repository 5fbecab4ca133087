"""Broker users of a lab with per-site identities (issue 10): create them at ``up``, delete
them at ``down``.

``UserAdmin`` is the small interface; two backends, tried in this order by ``find``:

- ``ManagementUsers``: RabbitMQ's management HTTP API (a compose lab's broker, the management
  image), with the broker URL's own user, which must be an ``administrator``;
- ``CtlUsers``: ``rabbitmqctl`` of a broker on this host (the default node on PATH, or a
  private node of ``broker.local``). One ``rabbitmqctl eval`` per batch, its Erlang read from
  stdin: no password is ever on a command line (``ps``), and a lab of 20 sites costs one
  call, not sixty.

Neither works (a remote broker without the management plugin, a user that may not manage
users): ``find`` says why, and the lab runs unauthenticated.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from emulator.errors import BrokerUnavailable

ACTING_USER = "smslab"  # who the broker's own log says did it


@dataclass(frozen=True)
class BrokerUser:
    name: str
    password: str
    permissions: tuple[str, str, str]  # configure, write, read (regexes)
    tags: tuple[str, ...] = ()


class UserAdmin(Protocol):
    def describe(self) -> str: ...

    def create(self, users: list[BrokerUser]) -> None:
        """Create (or reset) each user with its password, tags and permissions on the vhost."""

    def delete(self, names: list[str]) -> None:
        """Delete each user that exists (a missing one is not an error)."""

    def list(self) -> list[str]: ...


class ManagementUsers:
    def __init__(self, base: str, user: str, password: str, vhost: str, *, timeout: float = 5.0) -> None:
        self.base = base.rstrip("/")
        self.auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.vhost = vhost
        self.timeout = timeout

    def describe(self) -> str:
        return f"the management API at {self.base}"

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers={"Authorization": self.auth, "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 404 and method == "DELETE":
                return None
            raise BrokerUnavailable(f"management API {method} {path.split('/')[2]}: HTTP {exc.code}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise BrokerUnavailable(f"cannot reach the management API at {self.base}: {exc}") from exc
        return json.loads(raw) if raw else None

    def can_manage(self) -> str | None:
        """None if the URL's user may manage users here, else why not."""
        try:
            me = self._call("GET", "/api/whoami")
        except BrokerUnavailable as exc:
            return exc.message
        tags = me.get("tags", []) if isinstance(me, dict) else []
        tags = tags.split(",") if isinstance(tags, str) else tags
        return None if "administrator" in tags else f"the broker user {me.get('name')!r} is not an administrator"

    def create(self, users: list[BrokerUser]) -> None:
        vhost = urllib.parse.quote(self.vhost, safe="")
        for u in users:
            name = urllib.parse.quote(u.name, safe="")
            self._call("PUT", f"/api/users/{name}", {"password": u.password, "tags": ",".join(u.tags)})
            configure, write, read = u.permissions
            self._call("PUT", f"/api/permissions/{vhost}/{name}",
                       {"configure": configure, "write": write, "read": read})

    def delete(self, names: list[str]) -> None:
        for name in names:
            self._call("DELETE", "/api/users/" + urllib.parse.quote(name, safe=""))

    def list(self) -> list[str]:
        return [u["name"] for u in self._call("GET", "/api/users") or []]


def _erl(text: str) -> str:
    """An Erlang binary literal."""
    return '<<"' + text.replace("\\", "\\\\").replace('"', '\\"') + '">>'


class CtlUsers:
    """``run(erlang)`` evaluates an Erlang expression on the broker node (``rabbitmqctl eval``
    with the expression on stdin) and returns what it printed."""

    def __init__(self, run: Callable[[str], str], label: str, vhost: str) -> None:
        self.run = run
        self.label = label
        self.vhost = vhost

    @classmethod
    def on_path(cls, vhost: str) -> CtlUsers | None:
        exe = shutil.which("rabbitmqctl")
        if exe is None:
            return None

        def run(expr: str) -> str:
            return _ctl([exe, "-q", "eval"], expr, env=None)

        return cls(run, "rabbitmqctl on this host", vhost)

    @classmethod
    def private(cls, node_dir: str, vhost: str) -> CtlUsers:
        from pathlib import Path

        from broker.local import LocalNode

        node = LocalNode.load(Path(node_dir))

        def run(expr: str) -> str:
            out = node.ctl("-q", "eval", input=expr)
            if "error" in out[:40]:
                raise BrokerUnavailable(f"rabbitmqctl eval failed: {' '.join(out.split())[:300]}")
            return out

        return cls(run, f"rabbitmqctl of the lab's private node {node.node_name}", vhost)

    def describe(self) -> str:
        return self.label

    def can_manage(self) -> str | None:
        try:
            self.list()
        except BrokerUnavailable as exc:
            return exc.message
        return None

    def create(self, users: list[BrokerUser]) -> None:
        acting, vhost = _erl(ACTING_USER), _erl(self.vhost)
        steps = []
        for u in users:
            name = _erl(u.name)
            configure, write, read = (_erl(p) for p in u.permissions)
            steps += [
                f"_ = (catch rabbit_auth_backend_internal:delete_user({name}, {acting}))",
                f"ok = rabbit_auth_backend_internal:add_user({name}, {_erl(u.password)}, {acting})",
                f"ok = rabbit_auth_backend_internal:set_tags({name}, [{', '.join(u.tags)}], {acting})",
                (f"ok = rabbit_auth_backend_internal:set_permissions({name}, {vhost}, {configure}, {write},"
                 f" {read}, {acting})"),
            ]
        if steps:
            try:
                self.run(",\n".join([*steps, "ok."]))
            except BrokerUnavailable as exc:
                message = exc.message
                for u in users:  # an Erlang error may quote its arguments
                    message = message.replace(u.password, "***")
                raise BrokerUnavailable(message) from None

    def delete(self, names: list[str]) -> None:
        if names:
            listed = ", ".join(_erl(n) for n in names)
            self.run(f"[catch rabbit_auth_backend_internal:delete_user(U, {_erl(ACTING_USER)}) || U <- [{listed}]], ok.")

    def list(self) -> list[str]:
        out = self.run("[binary_to_list(proplists:get_value(user, U)) || U <- rabbit_auth_backend_internal:list_users()].")
        return [part.strip().strip('"') for part in out.strip().strip("[]").split(",") if part.strip()]


def _ctl(argv: list[str], expr: str, env: dict[str, str] | None, cwd: str | None = None) -> str:
    try:
        done = subprocess.run(argv, input=expr, capture_output=True, text=True, timeout=60, check=False, env=env,
                              cwd=cwd)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BrokerUnavailable(f"rabbitmqctl eval did not run: {exc}") from exc
    if done.returncode != 0 or "error" in done.stdout[:40]:
        # what it printed, never the expression (it may hold a password)
        detail = " ".join((done.stderr.strip() or done.stdout.strip()).split())[:300]
        raise BrokerUnavailable(f"rabbitmqctl eval failed (exit {done.returncode}): {detail}")
    return done.stdout
