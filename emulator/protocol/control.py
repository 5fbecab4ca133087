"""Control commands: what the CLI, the harness and other sites ask a site to do.

A control command is one JSON object on the site's control queue, validated here before the
site acts on it: every field typed and bounded, unknown fields refused. A command that does
not validate is refused with its reason and never reaches the runtime (``burst`` with
``keys: 0`` once killed a site; ``chunk: 0`` busy-looped it).

``parse`` never raises anything but ``MalformedCommand``; deep nesting, huge numbers and
bytes that are not JSON all come out as one.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from emulator.errors import MalformedEnvelope

SiteCode = Annotated[str, Field(pattern=r"^[A-Z0-9]{3}$")]
ObjectId = Annotated[str, Field(pattern=r"^[A-Z0-9]{3}\d{5}$")]
ObjectName = Annotated[str, Field(min_length=1, max_length=200)]


class MalformedCommand(MalformedEnvelope):
    """A control command that is not JSON, not a known command, or out of bounds."""


class _Cmd(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Ping(_Cmd):
    cmd: Literal["ping"]


class PauseWorkload(_Cmd):
    cmd: Literal["pause-workload"]


class ResumeWorkload(_Cmd):
    cmd: Literal["resume-workload"]


class Create(_Cmd):
    cmd: Literal["create"]
    kind: Literal["package", "advertisement", "collection"]
    name: ObjectName | None = None


class Update(_Cmd):
    cmd: Literal["update"]
    id: ObjectId
    name: ObjectName | None = None


class Delete(_Cmd):
    cmd: Literal["delete"]
    id: ObjectId


Interval = Annotated[float, Field(ge=0, le=86_400)]


class SetWorkload(_Cmd):
    """New workload rates at this site (seconds between events; 0 disables); the others stay."""

    cmd: Literal["set-workload"]
    inventory_interval: Interval | None = None
    discovery_interval: Interval | None = None
    status_interval: Interval | None = None
    object_interval: Interval | None = None
    scf_interval: Interval | None = None


class Report(_Cmd):
    """The site's clients report their full inventory again."""

    cmd: Literal["report"]


class Burst(_Cmd):
    """``count`` inventory envelopes of ``keys`` synthetic clients, ``chunk`` per transaction."""

    cmd: Literal["burst"]
    count: int = Field(ge=1, le=10_000_000)
    keys: int = Field(default=1000, ge=1, le=1_000_000)
    chunk: int = Field(default=1000, ge=1, le=100_000)


class Stop(_Cmd):
    cmd: Literal["stop"]


class SyncChild(_Cmd):
    cmd: Literal["syncchild"]
    child: SiteCode


class SyncParent(_Cmd):
    cmd: Literal["syncparent"]


class DelJob(_Cmd):
    cmd: Literal["deljob"]
    dest: SiteCode


class DelSite(_Cmd):
    cmd: Literal["delsite"]
    site: SiteCode
    parent: SiteCode


class Key(_Cmd):
    """Hardened mode: this site's signing key (public part) and the keys it has pinned."""

    cmd: Literal["key"]


class TrustKey(_Cmd):
    """Preinst ``/keyforparent`` and ``/keyforchild``: pin a site's key by hand."""

    cmd: Literal["trustkey"]
    site: SiteCode
    inc: Annotated[int, Field(ge=0, le=2**31)]
    pub: Annotated[str, Field(pattern=r"^[A-Za-z0-9+/]{43}=$")]  # 32 bytes, base64


Command = Annotated[
    Ping | PauseWorkload | ResumeWorkload | SetWorkload | Create | Update | Delete | Report | Burst | Stop
    | SyncChild | SyncParent | DelJob | DelSite | Key | TrustKey,
    Field(discriminator="cmd"),
]

_COMMAND: TypeAdapter[Command] = TypeAdapter(Command)
MAX_COMMAND_BYTES = 64 * 2**10  # the largest command (a set-workload) is a few hundred bytes

# Commands that change nothing: answered afresh every time, never from the record of a first run.
READ_ONLY = frozenset({"ping", "key"})
# Administrative actions: refused while the site is recovering or quarantined.
ADMINISTRATIVE = frozenset({"create", "update", "delete", "burst", "syncchild", "syncparent"})


def parse(body: bytes) -> Command:
    """Validate one control command.

    Raises:
        MalformedCommand: with the first problem and where it is.
    """
    if len(body) > MAX_COMMAND_BYTES:
        raise MalformedCommand(f"control command of {len(body)} bytes, more than {MAX_COMMAND_BYTES}")
    try:
        return _COMMAND.validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "top level"
        name = _name_of(body)
        what = f"bad {name!r} command" if name else "malformed control command"
        raise MalformedCommand(f"{what}: {first.get('msg')} at {where}"
                               f" ({exc.error_count()} error(s))") from None


def _name_of(body: bytes) -> str | None:
    """The ``cmd`` of a command that did not validate, for the error message, if readable."""
    try:
        value = TypeAdapter(dict[str, object]).validate_json(body).get("cmd")
    except ValidationError:
        return None
    return value if isinstance(value, str) and len(value) <= 40 else None


def encode(command: Command) -> bytes:
    return command.model_dump_json(exclude_none=True).encode()
