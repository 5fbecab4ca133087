"""Per-site broker identities on the real broker (issue 10 item 1): what a client holding one
site's credentials cannot do (the broker refuses it), what a receiver refuses (a message whose
validated ``user_id`` is not the site it names), and that ``down`` leaves no user behind.
Asserted on broker refusals, site stores, counters and the dead-letter queue."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pika
import pika.exceptions
import pytest

from broker import admin, names
from emulator import identities
from emulator.protocol import envelope as wire
from emulator.protocol.envelope import DataClass, content_hash
from emulator.testing import DEMO_SITES, Lab, topology_yaml, wait_for
from sites.clients import inventory_payload

pytestmark = pytest.mark.integration

THREE = DEMO_SITES[:3]  # CEN, P01, P02


@pytest.fixture
def lab3(lab: Lab) -> Lab:
    lab.up(topology_yaml(THREE))
    assert lab.info is not None
    if lab.info.identities != "per-site":
        pytest.skip(f"this broker's users cannot be managed here: {lab.info.identities_note}")
    return lab


def refused(url: str, action: Callable[[Any], Any]) -> int:
    """Run ``action(channel)`` logged in with ``url``; the AMQP code the broker refused it with."""
    with admin.blocking(url, name="identity-probe") as conn:
        ch = conn.channel()
        ch.confirm_delivery()
        try:
            action(ch)
        except pika.exceptions.ChannelClosedByBroker as exc:
            return int(exc.reply_code)
    raise AssertionError("the broker allowed it")


def dead_reasons(lab: Lab) -> list[str]:
    return [json.loads(d["body"])["reason"] for d in admin.dead_letters(lab.url, lab.lab_id)]


def test_a_site_cannot_read_or_touch_another_sites_queues(lab3: Lab) -> None:
    p01, lab_id = lab3.site_url("P01"), lab3.lab_id
    for queue in (names.site_queue(lab_id, "CEN"), names.control_queue(lab_id, "P02"), names.dead_queue(lab_id)):
        assert refused(p01, lambda ch, q=queue: ch.basic_get(q)) == 403, queue  # read
        assert refused(p01, lambda ch, q=queue: ch.basic_consume(q, lambda *_: None)) == 403, queue
        assert refused(p01, lambda ch, q=queue: ch.queue_purge(q)) == 403, queue
        assert refused(p01, lambda ch, q=queue: ch.queue_delete(q)) == 403, queue  # configure
        assert refused(p01, lambda ch, q=queue: ch.queue_bind(q, names.exchange(lab_id), "x")) == 403, queue  # write
    # nor declare queues, or touch the exchange, or reach any queue by name through the default exchange
    assert refused(p01, lambda ch: ch.queue_declare(names.relay_queue(lab_id, "P02", "CEN"))) == 403
    assert refused(p01, lambda ch: ch.exchange_delete(names.exchange(lab_id))) == 403
    assert refused(p01, lambda ch: ch.basic_publish("", names.site_queue(lab_id, "CEN"), b"x",
                                                    pika.BasicProperties(user_id=admin.login_user(p01)))) == 403
    # its own inbox it may read (that is how it works), and the lab still runs
    with admin.blocking(p01) as conn:
        conn.channel().queue_declare(names.site_queue(lab_id, "P01"), passive=True)
    assert lab3.control("CEN", {"cmd": "ping"})["ok"]


def test_a_site_cannot_publish_as_another_site(lab3: Lab) -> None:
    p01 = lab3.site_url("P01")
    for other in ("CEN", "P02", names.CONTROLLER):
        user = names.broker_user(lab3.lab_id, other)
        assert refused(p01, lambda ch, u=user: ch.basic_publish(
            names.exchange(lab3.lab_id), names.link_key("P02", "CEN"), b"{}",
            pika.BasicProperties(user_id=u), mandatory=True)) == 406, other  # PRECONDITION_FAILED: user_id
    assert dead_reasons(lab3) == []  # none of it ever reached a site


def _inventory(lab: Lab, sender: str, seq: int) -> bytes:
    payload = inventory_payload(f"{sender}-FORGED", 1)
    return wire.encode_parts(lab.lab_id, sender, "CEN", [wire.encode_envelope(
        source=sender, dest="CEN", incarnation=1, origin=sender, data_class=DataClass.INVENTORY,
        key=f"{sender}-FORGED", txn_id=2**30, link_seq=seq, op="upsert", hash_=content_hash(payload),
        payload=payload)])


def test_what_another_user_publishes_in_a_sites_name_is_refused_and_nothing_is_lost(lab3: Lab) -> None:
    """A plausible envelope of P02's at the very number CEN expects, published by a foreign
    client and by P01 (with its own, valid user_id): refused for its identity, dead-lettered
    with the reason, nothing applied; the real envelope of that number is taken."""
    wait_for("traffic from P02", lambda: lab3.link("CEN", "P02")["next_expected"] > 3)
    nxt = lab3.link("CEN", "P02")["next_expected"]
    for url in (lab3.url, lab3.site_url("P01")):
        with admin.blocking(url, name="forger") as conn:
            ch = conn.channel()
            ch.confirm_delivery()
            ch.basic_publish(names.exchange(lab3.lab_id), names.link_key("P02", "CEN"), _inventory(lab3, "P02", nxt),
                             pika.BasicProperties(delivery_mode=2, user_id=admin.login_user(url)), mandatory=True)
    wait_for("CEN to refuse both", lambda: lab3.link("CEN", "P02")["extra"].get("refused_identity", 0) >= 2, timeout=20)
    reasons = dead_reasons(lab3)
    assert len(reasons) == 2 and all("identity: a packet from P02 published by broker user" in r for r in reasons)
    assert any("'guest'" in r for r in reasons) and any(names.broker_user(lab3.lab_id, "P01") in r for r in reasons)
    assert not lab3.query("CEN", "SELECT 1 FROM site_data WHERE key='P02-FORGED'")
    wait_for("CEN to take P02's real envelope of that number", lambda: lab3.link("CEN", "P02")["next_expected"] > nxt)
    assert lab3.link("CEN", "P02")["conflicts"] == 0
    # a control command from a site, or from the URL's user, is no command
    for url in (lab3.url, lab3.site_url("P01")):
        with admin.blocking(url) as conn:
            ch = conn.channel()
            ch.confirm_delivery()
            ch.basic_publish(names.exchange(lab3.lab_id), names.control_key("P02"),
                             json.dumps({"cmd": "create", "kind": "package", "name": "forged"}).encode(),
                             pika.BasicProperties(user_id=admin.login_user(url), correlation_id="forged"),
                             mandatory=True)
    wait_for("two more dead letters", lambda: len(dead_reasons(lab3)) >= 4, timeout=20)
    assert sum("identity: a control command" in r for r in dead_reasons(lab3)) == 2
    assert not lab3.query("P02", "SELECT 1 FROM objects WHERE name='forged'")
    assert all(lab3.dir.pid(c) for c in ("CEN", "P01", "P02"))
    report = lab3.wait_converged(timeout=90)
    assert report.verdict == "valid", report.render()


def test_status_says_which_and_down_leaves_no_user_behind(lab3: Lab) -> None:
    assert lab3.info is not None
    status = lab3.status()
    assert status["identities"] == "per-site" and "per-site" in status["identities_note"]
    assert "password" not in lab3.dir.info_path.read_text()
    secrets = lab3.dir.secrets()
    assert set(secrets) == set(identities.users_of(lab3.info))
    assert (lab3.dir.secrets_path.stat().st_mode & 0o777) == 0o600
    text = lab3.dir.info_path.read_text() + "".join(p.read_text(errors="replace") for p in lab3.dir.path.rglob("*.log"))
    assert not any(pw in text for pw in secrets.values()), "a password in lab.json or a log"
    admin_, _how = identities.find(lab3.info)
    assert admin_ is not None and set(identities.users_of(lab3.info)) <= set(admin_.list())
    lab3.down()
    assert not set(identities.users_of(lab3.info)) & set(admin_.list())


def test_a_lab_whose_users_cannot_be_managed_runs_unauthenticated(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(identities.OFF_ENV, "off")
    lab.up(topology_yaml(DEMO_SITES[:2]))
    status = lab.status()
    assert status["identities"] == "unauthenticated" and "unauthenticated" in status["identities_note"]
    assert not lab.dir.secrets_path.exists()
    assert lab.control("P01", {"cmd": "ping"})["ok"]
    lab.wait_converged(timeout=60)
