"""Hardened mode's end-to-end signatures: the origin signs what it originates, every site that
receives it verifies it, also when a neighbour relayed it.

Theory of operation
-------------------
Each site holds one Ed25519 signing key per incarnation: a recovery bumps the incarnation and
the recovered site signs with a new key from then on (the restored backup's key is retired
with the incarnation it belonged to, like Active Directory's new invocation ID after a
restore). What a site originates (its clients' inventory and discovery, its status messages
and SCF, the objects it owns, the site control changes it sends) carries in its payload

    "_sig": {"inc": 3, "pub": "<public key, base64>", "sig": "<signature, base64>"}

over the origin, data class, key, operation and the payload without ``_sig``. Relaying
sites forward the payload unchanged, so an ancestor checks the origin's signature, not its
neighbour's word.

Keys are exchanged with the data. A receiver pins, per origin, the incarnation and public key
it last accepted (``Pin``):

    no pin yet                      the key is pinned (a site attaching; the broker's
                                    per-site identities say which neighbour sent it)
    same incarnation, same key      verified against the pin
    same incarnation, other key     refused: a forgery, or a site rebuilt under its code
                                    without a recovery (``smslab keyforparent`` re-pins a
                                    key by hand)
    higher incarnation              the origin was recovered: the new key is pinned
    lower incarnation               retired: data signed with a key of an incarnation before
                                    the origin's last recovery, relayed by a neighbour, is
                                    consumed and refused with its reason (``RETIRED``), never
                                    applied

From the neighbour itself (the origin is the sender) only its incarnation on the link (the
recovery handshake sets it) is accepted: a site signs again, with its current key, what it
sends of its own from before a recovery, so another incarnation there is a replay or a forgery.

A signature that does not verify, a missing or malformed ``_sig`` or a key that is not the
pinned one is ``FORGED``: its packet is refused and dead-lettered, the link does not move.

Pure: the private key's seed comes from the caller (the site's random generator, which the
simulator seeds), and so does every pin.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from enum import Enum
from typing import Any

from emulator.protocol import codec

# ``cryptography`` is imported where a key is first used: an sms20 site never loads it (0.1 s
# and a few MB of every site process otherwise).

SIG = "_sig"
_DOMAIN = b"smslab-signed-v1\0"


@dataclass(frozen=True)
class Pin:
    """The key a receiver holds for an origin: its incarnation and its public key (base64)."""

    inc: int
    pub: str

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.pub)


def fingerprint(pub: str) -> str:
    """A short name of a public key for people (status messages, ``keyforparent``)."""
    return hashlib.blake2b(pub.encode(), digest_size=6).hexdigest()


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def statement(origin: str, data_class: str, key: str, op: str, payload: dict[str, Any]) -> bytes:
    """What a signature covers: the record as its origin made it, ``_sig`` left out."""
    body = {k: v for k, v in payload.items() if k != SIG}
    return _DOMAIN + codec.canonical({"origin": origin, "class": data_class, "key": key, "op": op, "payload": body})


class Signer:
    """A site's signing key of one incarnation, made from a 32-byte seed."""

    def __init__(self, seed: bytes, inc: int) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        self.seed = seed
        self.inc = inc
        self._key = Ed25519PrivateKey.from_private_bytes(seed)
        self.pub = _b64(self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))

    @property
    def pin(self) -> Pin:
        return Pin(self.inc, self.pub)

    def sign(self, origin: str, data_class: str, key: str, op: str, payload: dict[str, Any]) -> dict[str, Any]:
        """The payload with this key's signature (a new dict; ``payload`` is not changed)."""
        sig = self._key.sign(statement(origin, data_class, key, op, payload))
        body = {k: v for k, v in payload.items() if k != SIG}
        body[SIG] = {"inc": self.inc, "pub": self.pub, "sig": _b64(sig)}
        return body

    def signed_by_me(self, payload: dict[str, Any]) -> bool:
        """Whether ``payload`` already carries a signature of this key (re-signing is then
        needed only if its content changed, which the caller knows)."""
        sig = payload.get(SIG)
        return isinstance(sig, dict) and sig.get("inc") == self.inc and sig.get("pub") == self.pub


def verify_key(pub: str) -> None:
    """Raise ValueError unless ``pub`` is an Ed25519 public key in base64."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(base64.b64decode(pub, validate=True))
    except binascii.Error as exc:
        raise ValueError(str(exc)) from exc


class Outcome(str, Enum):
    OK = "ok"
    FORGED = "forged"  # refuse the packet: nothing of it is applied, the link does not move
    RETIRED = "retired"  # consume it as a drop: signed by the key of an earlier incarnation


@dataclass(frozen=True)
class Check:
    outcome: Outcome
    reason: str = ""
    pin: Pin | None = None  # what to pin for the origin once the envelope is applied
    rotated: bool = False  # the pin is a new incarnation's key


def check(origin: str, data_class: str, key: str, op: str, payload: dict[str, Any], *,
          pinned: Pin | None, neighbour_incarnation: int | None) -> Check:
    """Judge one received record's signature against the receiver's pin for its origin.

    ``neighbour_incarnation`` is the origin's incarnation as the link knows it when the origin
    is the neighbour that sent it (None when a neighbour relays another site's data).
    """
    sig = payload.get(SIG)
    if not isinstance(sig, dict) or set(sig) != {"inc", "pub", "sig"}:
        return Check(Outcome.FORGED, f"it carries no signature of {origin}")
    inc, pub, value = sig["inc"], sig["pub"], sig["sig"]
    if type(inc) is not int or not isinstance(pub, str) or not isinstance(value, str) or len(pub) > 64 or len(value) > 128:
        return Check(Outcome.FORGED, f"its signature of {origin} is malformed")
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(base64.b64decode(pub, validate=True)).verify(
            base64.b64decode(value, validate=True), statement(origin, data_class, key, op, payload))
    except (InvalidSignature, ValueError, binascii.Error):
        return Check(Outcome.FORGED, f"its signature does not verify with the key it names for {origin}")
    theirs = Pin(inc, pub)
    if neighbour_incarnation is not None and inc != neighbour_incarnation:
        # a site signs what it sends of its own with its current key (it signs its old records
        # again after a recovery): from the neighbour itself, another key is a replay or a forgery
        return Check(Outcome.FORGED, f"{origin} signed it for incarnation {inc}, but {origin} is at incarnation"
                                     f" {neighbour_incarnation} on this link")
    if pinned is None:
        return Check(Outcome.OK, pin=theirs)
    if inc == pinned.inc:
        if pub != pinned.pub:
            return Check(Outcome.FORGED, f"signed with key {fingerprint(pub)}, not {origin}'s key"
                                         f" {pinned.fingerprint} of incarnation {inc}")
        return Check(Outcome.OK)
    if inc > pinned.inc:
        return Check(Outcome.OK, pin=theirs, rotated=True)
    return Check(Outcome.RETIRED, f"signed with {origin}'s key of incarnation {inc}, retired when {origin}"
                                  f" was recovered (its key now is {pinned.fingerprint}, incarnation {pinned.inc})")
