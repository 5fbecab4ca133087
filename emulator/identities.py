"""Per-site broker identities of a lab (issue 10 item 1): made by ``up``, deleted by ``down``.

``up`` creates one broker user per site, ``smslab-<lab id>-<CODE>``, and one for the lab's
controller (the CLI, the fault daemon, the recovery agent's commands), each with a random
password kept in ``broker-secrets.json`` (mode 0600) in the lab directory and nowhere else.

- a site may declare and consume only its own two queues, bind them to the lab's exchange and
  publish only to that exchange (``broker.names.site_permissions``); every message it publishes
  carries its ``user_id``, which RabbitMQ validates, and a receiver takes a packet only from
  the user of the site it names as sender, a control command only from the controller
  (``emulator.protocol.admission.sender_refusal``);
- the controller may do anything to the lab's own objects and nothing to another lab's; it is
  an ``impersonator``, so its fault relays republish a site's messages with the site's
  ``user_id``.

Who manages the users: ``broker.users.find`` (the management API, else rabbitmqctl of a broker
on this host). When neither can, or the lab is on a cluster, the lab runs as before,
unauthenticated, and ``status`` says so with the reason.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Callable

from broker import names
from broker.users import BrokerUser, CtlUsers, ManagementUsers, UserAdmin
from emulator.errors import BrokerUnavailable, SmslabError
from emulator.lab import LabDir, LabInfo
from emulator.protocol.admission import Identities

Progress = Callable[[str], None]
OFF_ENV = "SMSLAB_IDENTITIES"  # "off": every lab unauthenticated, as before issue 10


def users_of(info: LabInfo) -> list[str]:
    return [names.broker_user(info.lab_id, who) for who in [*info.topology.depth_order(), names.CONTROLLER]]


def identities_of(info: LabInfo) -> Identities | None:
    """What a site checks senders against (None: the lab is unauthenticated)."""
    if info.identities != "per-site":
        return None
    return Identities(sites={code: names.broker_user(info.lab_id, code) for code in info.topology.depth_order()},
                      controller=names.broker_user(info.lab_id, names.CONTROLLER))


def _local(host: str | None) -> bool:
    if host in (None, "", "localhost", "127.0.0.1", "::1"):
        return True
    try:
        return host in (socket.gethostname(), socket.getfqdn()) or socket.gethostbyname(host).startswith("127.")
    except OSError:
        return False


def find(info: LabInfo) -> tuple[UserAdmin | None, str]:
    """Who can manage the lab's broker users, and how (or None and why nobody can)."""
    import urllib.parse

    if os.environ.get(OFF_ENV, "").lower() in ("off", "0", "false", "no"):
        return None, f"{OFF_ENV}=off"
    ref = info.broker
    if len(info.amqp_urls) > 1 or ref.kind == "cluster":
        return None, "a lab on a cluster: per-site identities are not set up there yet"
    if ref.kind in ("simulated", "compose"):
        return None, f"a {ref.kind} lab: per-site identities are not set up there yet"
    parts = urllib.parse.urlsplit(info.admin_url)
    vhost = urllib.parse.unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    user, password = urllib.parse.unquote(parts.username or "guest"), urllib.parse.unquote(parts.password or "guest")
    why: list[str] = []
    management = ref.management or f"http://{parts.hostname or 'localhost'}:15672"
    api = ManagementUsers(management, user, password, vhost, timeout=2.0)
    problem = api.can_manage()
    if problem is None:
        return api, api.describe()
    why.append(f"management API: {problem}")
    ctl: CtlUsers | None = None
    if ref.kind == "private" and ref.node_dir:
        ctl = CtlUsers.private(ref.node_dir, vhost)
    elif ref.kind == "external" and _local(parts.hostname):
        ctl = CtlUsers.on_path(vhost)
        if ctl is None:
            why.append("rabbitmqctl: not on PATH")
    else:
        why.append("rabbitmqctl: the broker is not on this host")
    if ctl is not None:
        problem = ctl.can_manage()
        if problem is None:
            return ctl, ctl.describe()
        why.append(f"rabbitmqctl: {problem}")
    return None, "the broker's users cannot be managed from here (" + "; ".join(why) + ")"


def setup(lab_dir: LabDir, info: LabInfo, *, progress: Progress | None = None) -> None:
    """Give the lab its broker users, or leave it unauthenticated with the reason. Saves lab.json
    (the mode first, so ``down`` deletes the users even if ``up`` dies half way)."""
    admin, how = find(info)
    if admin is None:
        info.identities, info.identities_note = "unauthenticated", how
        lab_dir.save(info)
        if progress:
            progress(f"broker identities: none, the lab is unauthenticated ({how})")
        return
    info.identities, info.identities_note = "per-site", how
    lab_dir.save(info)
    passwords = {user: secrets.token_hex(24) for user in users_of(info)}
    lab_dir.save_secrets(passwords)
    users = _create(admin, info, passwords)
    try:  # the users are the URL's broker's (rabbitmqctl on this host could drive another node)
        from broker import admin as broker_admin

        broker_admin.check(info.amqp_url)
    except BrokerUnavailable as exc:
        admin.delete(users_of(info))
        lab_dir.secrets_path.unlink(missing_ok=True)
        info._login = None
        info.identities, info.identities_note = "unauthenticated", f"{how} made users the broker refused: {exc.message}"
        lab_dir.save(info)
    if progress:
        progress(f"broker identities: {len(users)} users ({how})" if info.identities == "per-site"
                 else f"broker identities: none, the lab is unauthenticated ({info.identities_note})")


def _create(admin: UserAdmin, info: LabInfo, passwords: dict[str, str]) -> list[BrokerUser]:
    users = [BrokerUser(names.broker_user(info.lab_id, code), passwords[names.broker_user(info.lab_id, code)],
                        names.site_permissions(info.lab_id, code)) for code in info.topology.depth_order()]
    controller = names.broker_user(info.lab_id, names.CONTROLLER)
    users.append(BrokerUser(controller, passwords[controller], names.controller_permissions(info.lab_id),
                            tags=("impersonator",)))
    admin.create(users)
    info.login_as(controller, passwords[controller])
    return users


def ensure(lab_dir: LabDir, info: LabInfo) -> None:
    """A lab kept by ``down --keep`` (its users deleted) starts again: its users are made again,
    with the passwords its secrets file keeps."""
    if info.identities != "per-site":
        return
    from broker import admin as broker_admin

    try:
        broker_admin.check(info.amqp_url)
        return
    except BrokerUnavailable:
        pass
    admin, how = find(info)
    if admin is None:
        raise SmslabError(f"lab {info.lab_id}'s broker users are gone and cannot be made again: {how}")
    _create(admin, info, lab_dir.secrets())


def teardown(info: LabInfo) -> str | None:
    """Delete the lab's broker users (what ``down`` says it did, or None)."""
    if info.identities != "per-site":
        return None
    admin, how = find(info)
    if admin is None:
        raise SmslabError(f"cannot delete lab {info.lab_id}'s broker users: {how}",
                          hint=f"delete them by hand: rabbitmqctl delete_user {users_of(info)[0]} ...")
    admin.delete(users_of(info))
    return f"deleted {len(users_of(info))} broker users of lab {info.lab_id} ({how})"


def site_login(lab_dir: LabDir, info: LabInfo, code: str) -> tuple[str, str] | None:
    """The broker user and password site ``code`` logs in as (None: unauthenticated)."""
    if info.identities != "per-site":
        return None
    user = names.broker_user(info.lab_id, code)
    password = lab_dir.secrets().get(user)
    if password is None:
        raise SmslabError(f"no broker password of {user} in {lab_dir.secrets_path}")
    return user, password


def describe(info: LabInfo) -> str:
    if info.identities == "per-site":
        return f"per-site broker identities ({info.identities_note})"
    return "unauthenticated" + (f" ({info.identities_note})" if info.identities_note else "")

