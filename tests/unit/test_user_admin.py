"""The user-admin backends of per-site identities (broker/users.py) without a broker: the
management API backend against a stand-in HTTP server (what it asks, with which body), and the
rabbitmqctl backend's Erlang (one eval, passwords only on stdin, never in an error)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest

from broker.users import BrokerUser, CtlUsers, ManagementUsers
from emulator.errors import BrokerUnavailable

USERS = [BrokerUser("smslab-t-1-P01", "pw-p01", ("^a$", "^b$", "^c$")),
         BrokerUser("smslab-t-1-controller", "pw-ctl", ("^x$", "^x$", "^x$"), tags=("impersonator",))]


class _Api(BaseHTTPRequestHandler):
    calls: ClassVar[list[tuple[str, str, Any]]] = []
    tags: ClassVar[list[str]] = ["administrator"]

    def _answer(self, code: int, body: Any = None) -> None:
        raw = json.dumps(body).encode() if body is not None else b""
        self.send_response(code)
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def _record(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        self.calls.append((self.command, self.path, body))

    def do_GET(self) -> None:
        self._record()
        if self.path == "/api/whoami":
            self._answer(200, {"name": "guest", "tags": self.tags})
        else:
            self._answer(200, [{"name": "guest"}, {"name": "smslab-t-1-P01"}])

    def do_PUT(self) -> None:
        self._record()
        self._answer(201)

    def do_DELETE(self) -> None:
        self._record()
        self._answer(404 if "missing" in self.path else 204)

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture
def api() -> Iterator[str]:
    _Api.calls = []
    _Api.tags = ["administrator"]
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Api)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_the_management_backend_creates_lists_and_deletes_users(api: str) -> None:
    users = ManagementUsers(api, "guest", "guest", "/")
    assert users.can_manage() is None
    users.create(USERS)
    assert ("PUT", "/api/users/smslab-t-1-P01", {"password": "pw-p01", "tags": ""}) in _Api.calls
    assert ("PUT", "/api/users/smslab-t-1-controller", {"password": "pw-ctl", "tags": "impersonator"}) in _Api.calls
    assert ("PUT", "/api/permissions/%2F/smslab-t-1-P01",
            {"configure": "^a$", "write": "^b$", "read": "^c$"}) in _Api.calls
    assert users.list() == ["guest", "smslab-t-1-P01"]
    users.delete(["smslab-t-1-P01", "missing"])  # a missing user is no error
    assert ("DELETE", "/api/users/smslab-t-1-P01", None) in _Api.calls


def test_a_management_user_that_is_no_administrator_cannot_manage(api: str) -> None:
    _Api.tags = ["monitoring"]
    assert "not an administrator" in (ManagementUsers(api, "guest", "guest", "/").can_manage() or "")


def test_no_management_api_is_a_reason_not_an_error() -> None:
    why = ManagementUsers("http://127.0.0.1:9", "guest", "guest", "/", timeout=1).can_manage()
    assert why is not None and "cannot reach" in why


def test_the_rabbitmqctl_backend_sends_one_expression_and_never_shows_a_password() -> None:
    seen: list[str] = []

    def run(expr: str) -> str:
        seen.append(expr)
        return "ok\n"

    ctl = CtlUsers(run, "test", "/")
    ctl.create(USERS)
    assert len(seen) == 1  # one eval for every user
    expr = seen[0]
    assert 'add_user(<<"smslab-t-1-P01">>, <<"pw-p01">>' in expr and "set_tags(<<\"smslab-t-1-controller\">>, [impersonator]" in expr
    assert 'set_permissions(<<"smslab-t-1-P01">>, <<"/">>, <<"^a$">>, <<"^b$">>, <<"^c$">>' in expr

    def failing(expr: str) -> str:
        raise BrokerUnavailable("rabbitmqctl eval failed: {badarg, <<\"pw-p01\">>}")

    with pytest.raises(BrokerUnavailable) as raised:
        CtlUsers(failing, "test", "/").create(USERS)
    assert "pw-p01" not in raised.value.message and "***" in raised.value.message


def test_regex_backslashes_survive_the_erlang_literal() -> None:
    seen: list[str] = []
    CtlUsers(lambda e: seen.append(e) or "ok", "test", "/").create(
        [BrokerUser("u", "p", (r"^smslab\.t$", r"^a\.b$", r"^c$"))])
    assert r'<<"^smslab\\.t$">>' in seen[0]
