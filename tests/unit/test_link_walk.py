"""A seeded random walk over one directed link, built only from the protocol core.

A child site (the sender) numbers its envelopes and keeps them until they are acknowledged;
its parent (the receiver) judges each one with ``judge``/``record`` and acknowledges what it
applied. Between them runs an in-memory broker that loses, duplicates and reorders packets,
and now and then partitions one direction for a while
(a copy or a packet delivered out of publish order comes flagged ``redelivered``, as AMQP
does). The sender resends when ``resend_due`` says so and when the receiver, holding a gap,
asks for it.

Invariants, after every step: nothing is applied twice; the consumed sequence numbers are
exactly 1..k; the sender still holds every envelope not yet acknowledged and never believes
more was acknowledged than was applied. After the channel heals and everything settles: every
sent envelope was consumed exactly once (applied, or stale when an earlier envelope of the
same transaction already wrote that key), the outbox is empty and both ends are healthy.
On failure the whole step list is printed, with the seed to replay it.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

import pytest

from emulator.protocol.envelope import (
    Envelope,
    LinkAck,
    ResendRequest,
    decode,
    encode_message,
    encode_parts,
)
from emulator.protocol.sequencing import (
    AckOutcome,
    LinkState,
    Mode,
    Verdict,
    health,
    judge,
    on_ack,
    record,
    resend_due,
    should_request_resend,
    sync_tick,
)
from tests.unit.helpers import CHILD, LAB, PARENT, envelope

SEEDS = range(30)
SYNC_INTERVAL = 1.0
RESEND_AFTER = 3.0
LOSSY_STEPS = 250
MAX_ENVELOPES = 80
SETTLE_STEPS = 3000
KEYS = ("client-1", "client-2", "client-3", "client-4")


class WalkFailure(AssertionError):
    pass


@dataclass
class Delivery:
    body: bytes
    what: str
    redelivered: bool = False


@dataclass
class Channel:
    """One direction of the in-memory broker: a FIFO queue that misbehaves while lossy."""

    name: str
    rng: random.Random
    log: list[str]
    loss: float
    dup: float
    delay: float
    queue: deque[Delivery] = field(default_factory=deque)
    lossy: bool = True
    down_for: int = 0  # steps of partition left: everything published is lost

    def publish(self, body: bytes, what: str) -> None:
        if self.lossy and (self.down_for > 0 or self.rng.random() < self.loss):
            self.log.append(f"  {self.name} lost {what}")
            return
        self.queue.append(Delivery(body, what))

    def _requeue(self, item: Delivery) -> None:
        """Put a copy back at a random later place, flagged redelivered (AMQP requeue)."""
        at = self.rng.randint(0, len(self.queue))
        self.queue.insert(at, Delivery(item.body, item.what, redelivered=True))

    def take(self) -> Delivery | None:
        if not self.queue:
            return None
        item = self.queue.popleft()
        if self.lossy and self.queue and self.rng.random() < self.delay:
            self.log.append(f"  {self.name} held back {item.what}")
            self._requeue(item)
            item = self.queue.popleft()
        if self.lossy and self.rng.random() < self.dup:
            self.log.append(f"  {self.name} will deliver {item.what} again")
            self._requeue(item)
        return item


class Sender:
    """The child's outbound side: numbers envelopes, keeps them until acked, resends."""

    def __init__(self, walk: Walk) -> None:
        self.walk = walk
        self.link = LinkState(peer=PARENT, role="parent")
        self.outbox: dict[int, Envelope] = {}
        self.txn = 0
        self.txn_keys: set[str] = set()  # keys already written in the current transaction
        self.expect_stale: set[int] = set()  # the oracle: envelopes the receiver must not apply

    def send_new(self) -> None:
        rng = self.walk.rng
        key = rng.choice(KEYS)
        if self.txn == 0 or rng.random() > 0.2:  # most envelopes start a new transaction
            self.txn += 1
            self.txn_keys = set()
        seq = self.link.next_send_seq
        if key in self.txn_keys:
            self.expect_stale.add(seq)  # second write of one key in one txn: at the watermark
        self.txn_keys.add(key)
        env = envelope(source=CHILD, dest=PARENT, link_seq=seq, txn_id=self.txn, key=key,
                       payload={"key": key, "txn": self.txn, "seq": seq, "v": rng.random()})
        self.link.next_send_seq += 1
        self.link.sent += 1
        self.outbox[seq] = env
        self.walk.say(f"{CHILD} sends #{seq} txn {self.txn} {key}")
        self.publish([env])

    def publish(self, envs: list[Envelope]) -> None:
        for start in range(0, len(envs), 3):  # up to 3 envelopes a packet
            chunk = envs[start:start + 3]
            body = encode_parts(LAB, CHILD, PARENT, [encode_message(e) for e in chunk])
            self.walk.up.publish(body, "data#" + ",".join(str(e.link_seq) for e in chunk))

    def resend_from(self, from_seq: int, why: str) -> None:
        envs = [self.outbox[s] for s in sorted(self.outbox) if s >= from_seq]
        self.walk.say(f"{CHILD} resends {[e.link_seq for e in envs]} ({why})")
        self.publish(envs)

    def receive(self, delivery: Delivery) -> None:
        packet = decode(delivery.body, lab=LAB, dest=CHILD)
        for msg in packet.messages:
            if isinstance(msg, LinkAck):
                outcome = on_ack(self.link, msg, now=self.walk.now, redelivered=delivery.redelivered)
                self.walk.say(f"{CHILD} gets ack through {msg.through}"
                              f"{' (redelivered)' if delivery.redelivered else ''}: {outcome.value}")
                if outcome not in (AckOutcome.PROGRESS, AckOutcome.NO_CHANGE):
                    raise WalkFailure(f"a healthy link reported {outcome.value}")
                if outcome is AckOutcome.PROGRESS:
                    for seq in [s for s in self.outbox if s <= self.link.acked_through]:
                        del self.outbox[seq]
            elif isinstance(msg, ResendRequest):
                self.walk.say(f"{CHILD} gets resend request from {msg.from_seq}")
                self.resend_from(msg.from_seq, "asked")
            else:
                raise WalkFailure(f"unexpected {msg.kind} at the sender")

    def tick(self) -> None:
        if resend_due(self.link, now=self.walk.now, resend_after=RESEND_AFTER,
                      unacked=len(self.outbox)):
            self.resend_from(self.link.acked_through + 1, "resend due")


class Receiver:
    """The parent's inbound side: the core's verdicts, a watermark store, and acks."""

    def __init__(self, walk: Walk) -> None:
        self.walk = walk
        self.link = LinkState(peer=CHILD, role="child")
        self.watermarks: dict[str, int] = {}
        self.hashes: dict[int, str] = {}
        self.consumed: list[int] = []
        self.applied: list[int] = []
        self.stale: list[int] = []

    def receive(self, delivery: Delivery) -> None:
        packet = decode(delivery.body, lab=LAB, dest=PARENT)
        must_ack = False
        for env in packet.messages:
            assert isinstance(env, Envelope)
            link = self.link
            applied_hash = self.hashes.get(env.link_seq) if env.link_seq < link.next_expected else None
            verdict = judge(link, env, mode=self.walk.mode,
                            watermark=self.watermarks.get(env.key, 0), applied_hash=applied_hash)
            record(link, verdict)
            self.walk.say(f"{PARENT} judges #{env.link_seq}: {verdict.value}")
            if verdict in (Verdict.CONFLICT, Verdict.FENCED, Verdict.QUARANTINED):
                raise WalkFailure(f"a healthy link judged #{env.link_seq} {verdict.value}")
            if verdict.consumes:
                if env.link_seq != len(self.consumed) + 1:
                    raise WalkFailure(f"consumed #{env.link_seq} after {self.consumed[-3:]}")
                self.consumed.append(env.link_seq)
                self.hashes[env.link_seq] = env.hash
            if verdict is Verdict.APPLY:
                if env.link_seq in self.applied:
                    raise WalkFailure(f"#{env.link_seq} applied twice")
                self.applied.append(env.link_seq)
                self.watermarks[env.key] = env.txn_id
            if verdict is Verdict.STALE:
                self.stale.append(env.link_seq)
            if verdict in (Verdict.APPLY, Verdict.DUPLICATE, Verdict.STALE):
                must_ack = True
            if verdict is Verdict.GAP and should_request_resend(link, self.walk.now, SYNC_INTERVAL):
                self.ask_resend()
        if must_ack:
            self.send_ack()

    def send_ack(self) -> None:
        msg = LinkAck(source=PARENT, dest=CHILD, incarnation=0,
                      through=self.link.applied_through, sent_through=self.link.sent_through)
        self.walk.down.publish(encode_parts(LAB, PARENT, CHILD, [encode_message(msg)]),
                               f"ack<={msg.through}")

    def ask_resend(self) -> None:
        msg = ResendRequest(source=PARENT, dest=CHILD, incarnation=0, from_seq=self.link.next_expected)
        self.walk.say(f"{PARENT} asks for a resend from {msg.from_seq}")
        self.walk.down.publish(encode_parts(LAB, PARENT, CHILD, [encode_message(msg)]),
                               f"resend>={msg.from_seq}")

    def tick(self) -> None:
        self.send_ack()  # the heartbeat
        sync_tick(self.link)
        if self.link.gap_outstanding and should_request_resend(self.link, self.walk.now, SYNC_INTERVAL):
            self.ask_resend()


class Walk:
    def __init__(self, seed: int, mode: Mode) -> None:
        self.seed = seed
        self.mode: Mode = mode
        self.rng = random.Random(seed)
        self.now = 1000.0
        self.steps: list[str] = []
        loss, dup, delay = (self.rng.uniform(0.0, 0.35) for _ in range(3))
        self.steps.append(f"seed {seed}, {mode}: loss {loss:.2f}, dup {dup:.2f}, delay {delay:.2f}")
        self.up = Channel(f"{CHILD}->{PARENT}", self.rng, self.steps, loss, dup, delay)
        self.down = Channel(f"{PARENT}->{CHILD}", self.rng, self.steps, loss, dup, delay)
        # half the walks lose their tail: only resend_due can bring it back
        self.tail_partition = LOSSY_STEPS - 30 if self.rng.random() < 0.5 else -1
        self.sender = Sender(self)
        self.receiver = Receiver(self)

    def say(self, text: str) -> None:
        self.steps.append(f"t={self.now:7.1f} {text}")

    # -- one step -----------------------------------------------------------------------------

    def deliver(self, channel: Channel) -> bool:
        item = channel.take()
        if item is None:
            return False
        self.say(f"{channel.name} delivers {item.what}{' (redelivered)' if item.redelivered else ''}")
        if channel is self.up:
            self.receiver.receive(item)
        else:
            self.sender.receive(item)
        return True

    def tick(self) -> None:
        self.now += SYNC_INTERVAL * self.rng.choice((0.5, 1.0, 1.0, 2.0))
        self.say("tick")
        self.sender.tick()
        self.receiver.tick()

    def lossy_step(self, step: int) -> None:
        for channel in (self.up, self.down):
            channel.down_for = max(0, channel.down_for - 1)
        if step == self.tail_partition:  # the last envelopes vanish, no later one shows a gap
            self.up.down_for = LOSSY_STEPS
            self.say(f"{self.up.name} partitioned until the heal")
            self.sender.send_new()
            return
        if self.rng.random() < 0.02:
            channel = self.rng.choice((self.up, self.down))
            channel.down_for = self.rng.randint(5, 40)
            self.say(f"{channel.name} partitioned for {channel.down_for} steps")
        roll = self.rng.random()
        if roll < 0.25 and self.sender.link.sent < MAX_ENVELOPES:
            self.sender.send_new()
        elif roll < 0.8:
            channel = self.rng.choice((self.up, self.down))
            if not self.deliver(channel):
                self.deliver(self.down if channel is self.up else self.up)
        else:
            self.tick()

    def settled(self) -> bool:
        return not self.sender.outbox and not self.up.queue and not self.down.queue

    # -- invariants ---------------------------------------------------------------------------

    def check(self) -> None:
        s, r = self.sender, self.receiver
        k = len(r.consumed)
        if r.consumed != list(range(1, k + 1)):
            raise WalkFailure(f"consumed {r.consumed} is not 1..{k}")
        if len(set(r.applied)) != len(r.applied):
            raise WalkFailure("something applied twice")
        if r.link.next_expected != k + 1:
            raise WalkFailure(f"next_expected {r.link.next_expected} after consuming {k}")
        if s.link.acked_through > r.link.applied_through:
            raise WalkFailure(f"sender thinks {s.link.acked_through} acked, receiver applied "
                              f"{r.link.applied_through}")
        unacked = list(range(s.link.acked_through + 1, s.link.sent_through + 1))
        if sorted(s.outbox) != unacked:
            raise WalkFailure(f"outbox {sorted(s.outbox)} is not the unacked {unacked}")
        wrong = [q for q in r.applied if q in s.expect_stale] + \
                [q for q in r.stale if q not in s.expect_stale]
        if wrong:
            raise WalkFailure(f"applied/stale disagrees with the oracle for {wrong}")

    def run(self) -> None:
        try:
            for step in range(LOSSY_STEPS):
                self.lossy_step(step)
                self.check()
            self.say("the channel heals")
            self.up.lossy = self.down.lossy = False
            for _ in range(SETTLE_STEPS):
                if self.settled():
                    break
                if not (self.deliver(self.up) or self.deliver(self.down)):
                    self.tick()
                self.check()
            self.final_check()
        except WalkFailure as exc:
            listing = "\n".join(f"{i:5d} {line}" for i, line in enumerate(self.steps))
            pytest.fail(f"seed {self.seed} ({self.mode}): {exc}\n{listing}", pytrace=False)

    def final_check(self) -> None:
        s, r = self.sender, self.receiver
        if not self.settled():
            raise WalkFailure(f"no quiescence after {SETTLE_STEPS} settling steps: outbox "
                              f"{sorted(s.outbox)}, {len(self.up.queue)}+{len(self.down.queue)} queued")
        sent = list(range(1, s.link.sent_through + 1))
        if r.consumed != sent:
            raise WalkFailure(f"sent {len(sent)} but consumed {r.consumed}")
        if sorted(r.applied + r.stale) != sent:
            raise WalkFailure("not every envelope was applied or stale exactly once")
        if set(r.stale) != s.expect_stale:
            raise WalkFailure(f"stale {r.stale}, expected {sorted(s.expect_stale)}")
        if s.link.acked_through != s.link.sent_through:
            raise WalkFailure(f"acked {s.link.acked_through} of {s.link.sent_through}")
        for side, link in (("sender", s.link), ("receiver", r.link)):
            state = health(link, degraded_after=12, failed_after=24)
            if state != "active":
                raise WalkFailure(f"{side} link is {state} after settling")
        if r.link.gap_outstanding:
            raise WalkFailure("a gap is still outstanding")
        if r.link.applied != len(r.applied) or r.link.stale != len(r.stale):
            raise WalkFailure("the link's counters disagree with what was applied")


@pytest.mark.parametrize("mode", ["sms20", "hardened"])
@pytest.mark.parametrize("seed", SEEDS)
def test_lossy_link_heals_and_applies_everything_once(seed: int, mode: Mode) -> None:
    walk = Walk(seed, mode)
    walk.run()
    # the walk did something worth checking
    assert walk.sender.link.sent > 10


def test_a_lost_tail_comes_back_only_through_resend_due() -> None:
    """The last envelope is lost and nothing after it shows a gap: the sender's timer heals it."""
    walk = Walk(0, "sms20")
    walk.up.lossy = walk.down.lossy = False
    for _ in range(3):
        walk.sender.send_new()
    lost = walk.up.queue.pop()
    walk.say(f"test drops {lost.what}")
    while walk.deliver(walk.up) or walk.deliver(walk.down):
        pass
    assert walk.receiver.consumed == [1, 2] and not walk.receiver.link.gap_outstanding
    assert sorted(walk.sender.outbox) == [3]
    for _ in range(int(RESEND_AFTER / SYNC_INTERVAL) * 2 + 2):
        if walk.settled():
            break
        walk.tick()
        while walk.deliver(walk.up) or walk.deliver(walk.down):
            pass
    assert walk.settled(), "\n".join(walk.steps)
    assert walk.receiver.consumed == [1, 2, 3]
    assert walk.sender.link.resends == 1


def test_the_walks_exercise_the_interesting_paths() -> None:
    """Across the seeds, the channel really lost, duplicated and reordered, and the receiver
    saw every verdict a healthy link can give."""
    verdicts: set[str] = set()
    resends = requests = 0
    for seed in range(10):
        walk = Walk(seed, "sms20")
        walk.run()
        link = walk.receiver.link
        verdicts |= {name for name in ("applied", "duplicates", "gaps", "stale") if getattr(link, name)}
        resends += walk.sender.link.resends
        requests += sum("asks for a resend" in line for line in walk.steps)
    assert verdicts == {"applied", "duplicates", "gaps", "stale"}
    assert resends > 0 and requests > 0
