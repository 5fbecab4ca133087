"""The RabbitMQ transport of a site, without a broker: pika's errors never escape ``reply()``
and ``ack()`` (an unanswered request is asked again, an unacknowledged delivery comes again),
``publish()`` maps them to ``BrokerUnavailable``, and an exception in a timer callback does not
leave pika's I/O loop (which would end the site process silently): it drops the connection
and the site reconnects."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pika.exceptions
import pytest

from broker.transport import PikaTransport
from emulator.errors import BrokerUnavailable


class BrokenChannel:
    is_open = True

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.calls: list[str] = []

    def basic_publish(self, *_a: Any, **_k: Any) -> None:
        self.calls.append("publish")
        raise self.error

    def basic_ack(self, *_a: Any, **_k: Any) -> None:
        self.calls.append("ack")
        raise self.error


class Loop:
    def __init__(self) -> None:
        self.timers: list[Callable[[], None]] = []

    def call_later(self, _delay: float, fn: Callable[[], None]) -> object:
        self.timers.append(fn)
        return object()


class Connection:
    is_open = True

    def __init__(self) -> None:
        self.ioloop = Loop()
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


def transport(user: str | None = None) -> PikaTransport:
    t = PikaTransport("amqp://guest:guest@127.0.0.1:1/%2F", lab="t-1", site="P01", user=user, password="pw")
    t._ready = True
    return t


ERRORS = [pika.exceptions.ChannelWrongStateError("channel closed"), pika.exceptions.StreamLostError("lost"),
          pika.exceptions.ConnectionWrongStateError("closing"), OSError("broken pipe")]


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
def test_reply_and_ack_on_a_broken_channel_raise_nothing(error: Exception) -> None:
    t = transport()
    channel = BrokenChannel(error)
    t._channel = channel  # type: ignore[assignment]
    t.reply("reply.abc", "corr-1", b"{}")
    t.reply("amq.gen-queue", "corr-2", b"{}")  # an unauthenticated asker's own queue
    t.ack(7)
    t.ack(9, multiple=True)
    assert channel.calls == ["publish", "publish", "ack", "ack"]  # each was tried, none raised


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
def test_publish_on_a_broken_channel_is_broker_unavailable(error: Exception) -> None:
    t = transport()
    t._channel = BrokenChannel(error)  # type: ignore[assignment]
    with pytest.raises(BrokerUnavailable):
        t.publish("link.P01.CEN", b"{}", token=1)


def test_an_exception_in_a_timer_callback_drops_the_connection_instead_of_ending_the_loop() -> None:
    t = transport()
    conn = Connection()
    t._conn = conn  # type: ignore[assignment]
    ran: list[str] = []

    def boom() -> None:
        ran.append("boom")
        raise RuntimeError("a bug in a timer")

    t.call_later(0.5, boom)
    t.call_later(0.5, lambda: ran.append("next"))
    for timer in conn.ioloop.timers:
        timer()  # what pika's loop does: an exception here would leave ioloop.start()
    assert ran == ["boom", "next"] and conn.closed == 1
    assert t._error and "unexpected error" in t._error  # what run() raises as BrokerUnavailable: reconnect


class RelayChannel:
    is_open = True

    def __init__(self) -> None:
        self.acked: list[int] = []

    def basic_cancel(self, _tag: str) -> None:
        pass

    def basic_publish(self, *_a: Any, **_k: Any) -> None:
        raise pika.exceptions.ChannelWrongStateError("Channel is closed.")

    def basic_ack(self, tag: int) -> None:
        self.acked.append(tag)


def test_a_relay_that_loses_its_channel_while_draining_is_kept_to_drain_after_the_reconnect() -> None:
    from broker.relay import Held, LinkRelay, RelayHub
    from emulator.protocol.shaping import Shaper

    hub = RelayHub("amqp://guest:guest@127.0.0.1:1/%2F", "t-1")
    channel = RelayChannel()
    hub._ch = channel  # type: ignore[assignment]
    relay = LinkRelay("f1", "P01", "CEN", Shaper("partition", seed=1), consumer="ctag")
    hub.relays[("P01", "CEN")] = relay
    relay.held[1] = Held(tag=7, body=b"{}")
    relay.shaper.arrive(1, 0.0)
    with pytest.raises(BrokerUnavailable):
        hub.shut("P01", "CEN")
    assert ("P01", "CEN") in hub.relays and channel.acked == []  # nothing acked that was not forwarded
