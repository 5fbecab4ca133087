"""The transport interface the site runtime uses: what every broker adapter provides.

Pika-free, so the in-memory broker (``broker.memory``) and the runtime's tests can use it
without importing pika; ``broker.transport`` is the RabbitMQ adapter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Delivery:
    queue: str  # "site" or "control"
    tag: int
    body: bytes
    redelivered: bool
    reply_to: str | None
    correlation_id: str | None
    # The broker user that published it (AMQP ``user_id``), which RabbitMQ validates against
    # the publisher's login; None when the publisher set none (a lab without identities).
    user_id: str | None = None


class TransportHandler(Protocol):
    def on_ready(self) -> None: ...

    def on_delivery(self, delivery: Delivery) -> None: ...

    def on_confirm(self, token: Any, ok: bool) -> None: ...

    def on_queue_restored(self, queue: str) -> None:
        """The broker deleted the site's ``queue`` ("site" or "control") and the transport
        declared it again."""


class Transport(Protocol):
    """What the site runtime needs from a broker."""

    def run(self, handler: TransportHandler) -> None: ...

    def publish(self, routing_key: str, body: bytes, token: Any = None, *,
                correlation_id: str | None = None) -> None: ...

    def reply(self, reply_to: str, correlation_id: str | None, body: bytes) -> None: ...

    def ack(self, tag: int, multiple: bool = False) -> None: ...

    def call_later(self, delay: float, fn: Callable[[], None]) -> object: ...

    def stop(self) -> None: ...

    @property
    def ready(self) -> bool: ...
