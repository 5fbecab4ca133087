"""The topology file: which sites a lab has, how they report, and how busy they are.

A topology is a YAML file validated by pydantic. Bad hierarchies are refused before anything
starts, with a ``ConfigError`` whose message starts with ``<file>:<line>: `` and names the site
and the rule (with the real Hierarchy Manager status ID where one exists: 3300 loop, 3301
duplicate site code), and whose ``hint`` says what to do.

Example::

    lab: demo
    mode: sms20
    defaults: {clients: 3, workload: {inventory_interval: 2.0}}
    sites:
      - {code: CEN, type: central, clients: 0}
      - {code: P01, type: primary, parent: CEN}
      - {code: S01, type: secondary, parent: P01}
"""

from __future__ import annotations

import re
import types
import typing
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from emulator.errors import ConfigError

__all__ = [
    "Defaults",
    "Mode",
    "QueueType",
    "Settings",
    "SiteSpec",
    "SiteType",
    "Topology",
    "Workload",
    "WorkloadOverride",
    "load_topology",
    "parse_topology",
]

SiteType = Literal["central", "primary", "secondary"]
Mode = Literal["sms20", "hardened"]
QueueType = Literal["classic", "quorum"]

SITE_CODE_RE = re.compile(r"[A-Z0-9]{3}")
LAB_NAME_RE = re.compile(r"[a-z0-9-]{1,32}")

_CODE_RULE = "a site code is exactly 3 characters A-Z or 0-9"

Loc = tuple[str | int, ...]
# libyaml's safe loader when PyYAML has it (20x faster on a thousand-site topology), else Python's
_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _check_code(value: Any) -> str:
    """Return ``value`` if it is a valid site code, else raise ``ValueError``.

    Always ``ValueError`` (never ``TypeError``): pydantic turns only that into a located error.
    """
    text = value if isinstance(value, str) else None
    if text is not None and SITE_CODE_RE.fullmatch(text):
        return text
    suffix = "" if text is not None else ", written as text"
    raise ValueError(f"bad site code {value!r}: {_CODE_RULE}{suffix}")


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


class Workload(BaseModel):
    """Workload rates, in seconds between events; 0 disables that kind of event."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    inventory_interval: float = Field(default=2.0, ge=0)
    """Between inventory reports of one client."""
    discovery_interval: float = Field(default=10.0, ge=0)
    """Between discovery records of one client."""
    status_interval: float = Field(default=5.0, ge=0)
    """Between status messages of one site."""
    object_interval: float = Field(default=5.0, ge=0)
    """Between admin actions (packages, advertisements, collections); not at secondaries."""
    scf_interval: float = Field(default=15.0, ge=0)
    """Between site control changes of one site."""
    max_objects: int = Field(default=200, ge=0)
    """Live objects a site's administrator keeps: with this many, an admin action deletes one
    instead of creating another (0: no limit), so a long run holds a bounded set of objects."""


class WorkloadOverride(BaseModel):
    """A site's partial workload: only the keys given replace the lab defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    inventory_interval: float | None = Field(default=None, ge=0)
    discovery_interval: float | None = Field(default=None, ge=0)
    status_interval: float | None = Field(default=None, ge=0)
    object_interval: float | None = Field(default=None, ge=0)
    scf_interval: float | None = Field(default=None, ge=0)
    max_objects: int | None = Field(default=None, ge=0)

    def apply(self, base: Workload) -> Workload:
        """Return ``base`` with the keys set here replaced."""
        return base.model_copy(update=self.model_dump(exclude_none=True))


class Defaults(BaseModel):
    """Values applied to every site that does not override them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    clients: int = Field(default=3, ge=0)
    workload: Workload = Field(default_factory=Workload)


class Settings(BaseModel):
    """Lab-wide protocol and broker settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    degraded_after: int = Field(default=12, ge=1)
    """Consecutive failed syncs before a link is degraded."""
    failed_after: int = Field(default=24, ge=1)
    """Consecutive failed syncs before a link is failed; greater than ``degraded_after``."""
    sync_interval: float = Field(default=1.0, gt=0)
    """Seconds between sync attempts / heartbeats on a link."""
    resend_after: float = Field(default=3.0, gt=0)
    """Seconds without ack progress before unacknowledged envelopes are resent."""
    idle_heartbeat: float = Field(default=5.0, gt=0)
    """Seconds between heartbeats on a link whose two sides agree on every counter (each has
    acknowledged all the other sent, and said so); while they disagree in anything, a heartbeat
    goes every sync interval."""
    txn_margin: int = Field(default=20, ge=1)
    """Recovery moves the transaction ID to the peers' maximum plus this."""
    recovery_pause_timeout: float = Field(default=120.0, gt=0)
    """Seconds a link paused by a neighbour's recovery announce waits for its resync before it
    runs again (with a status message): a forged announce pauses nothing for good."""
    window: int = Field(default=2000, ge=1)
    """Max unacknowledged envelopes in flight per link."""
    prefetch: int = Field(default=500, ge=1)
    """Broker prefetch per site."""
    queue_type: QueueType = "classic"
    """``classic`` or ``quorum`` (for a clustered broker)."""
    quorum_delivery_limit: int = Field(default=50, ge=1, le=1_000_000)
    """Quorum queues: deliveries of one message past which the broker dead-letters it (a message
    that ends every consumer that takes it); a dead-lettered envelope is resent by its sender."""
    history_retention: float = Field(default=3600.0, ge=0)
    """Seconds a site keeps its history events (0: forever); the lab's history.jsonl keeps what
    was merged into it before."""
    applied_retention: float = Field(default=3600.0, ge=0)
    """Seconds a receiver keeps the record of each envelope it applied (its hash tells a
    conflict, a reused number with other content, from a duplicate), of each drop and of each
    control command's answer (0: forever). A site restored from a backup older than this has
    its reused numbers dropped as duplicates rather than counted as conflicts."""
    status_retention: float = Field(default=3600.0, ge=0)
    """Seconds status messages are kept (by the time they were made), at their site and as site
    data at every ancestor, with their ``.trs`` watermarks (0: forever). The newest of each site
    is always kept."""
    tombstone_lifetime: float = Field(default=86400.0, ge=0)
    """Seconds a deleted object is kept as a tombstone at every site before it is purged (AD's
    tombstone lifetime; 0: forever). Recover from backups younger than this: an older one can
    bring back objects deleted since (AD's lingering objects)."""
    retention_interval: float = Field(default=60.0, gt=0)
    """Seconds between two prunings by the retention settings above and ``history_retention``."""
    log_max_bytes: int = Field(default=10_000_000, ge=0)
    """A site's ``site.log`` is rotated past this size (0: never)."""
    log_backups: int = Field(default=3, ge=1)
    """Rotated logs kept beside it (``site.log.1`` ...)."""
    dead_letter_max: int = Field(default=10_000, ge=1)
    """Messages the lab's dead-letter queue keeps (``x-max-length``); past it the oldest go."""

    @field_validator("failed_after")
    @classmethod
    def _failed_after_degraded(cls, value: int, info: ValidationInfo) -> int:
        degraded = info.data.get("degraded_after")
        if degraded is not None and value <= degraded:
            raise ValueError(f"must be greater than degraded_after ({degraded}), got {value}")
        return value


class SiteSpec(BaseModel):
    """One site of the lab as written in the topology file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    code: str
    type: SiteType
    parent: str | None = None
    clients: int | None = Field(default=None, ge=0)
    """Simulated clients; ``None`` means the lab default."""
    workload: WorkloadOverride | None = None
    """Partial override merged over the lab default workload."""

    @field_validator("code", mode="before")
    @classmethod
    def _code_format(cls, value: Any) -> str:
        return _check_code(value)

    @field_validator("parent", mode="before")
    @classmethod
    def _parent_format(cls, value: Any) -> str | None:
        return None if value is None else _check_code(value)


@dataclass(frozen=True)
class _Problem:
    """One hierarchy rule broken, located by its path in the document."""

    loc: Loc
    message: str
    hint: str
    also: Loc | None = None
    """Another place the message refers to as ``{also}`` (e.g. the first duplicate)."""


class _HierarchyError(ValueError):
    """Hierarchy rules broken; raised inside pydantic, unwrapped by ``parse_topology``."""

    def __init__(self, problems: list[_Problem]) -> None:
        self.problems = problems
        first = problems[0]
        text = first.message.replace("{also}", _loc_text(first.also) if first.also else "")
        super().__init__(f"{_loc_text(first.loc)}: {text}")


class _Tree:
    """Lookup tables derived from ``sites``; a cache, so it never affects equality."""

    def __init__(self, sites: list[SiteSpec]) -> None:
        self.sites = tuple(sites)
        self.by_code = {s.code: s for s in sites}
        self.children: dict[str, list[str]] = {s.code: [] for s in sites}
        for s in sites:
            if s.parent in self.children:
                self.children[s.parent].append(s.code)

    def __eq__(self, other: object) -> bool:
        return True

    __hash__ = None  # type: ignore[assignment]


class Topology(BaseModel):
    """A validated lab topology: the sites, their tree, their workload and the settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lab: str = "lab"
    mode: Mode = "sms20"
    defaults: Defaults = Field(default_factory=Defaults)
    settings: Settings = Field(default_factory=Settings)
    sites: list[SiteSpec]

    _tree_cache: _Tree | None = PrivateAttr(None)

    @field_validator("lab", mode="before")
    @classmethod
    def _lab_name(cls, value: Any) -> str:
        if isinstance(value, str) and LAB_NAME_RE.fullmatch(value):
            return value
        raise ValueError(
            f"bad lab name {value!r}: a lab name is 1 to 32 characters a-z, 0-9 or '-'"
        )

    @field_validator("sites")
    @classmethod
    def _not_empty(cls, value: list[SiteSpec]) -> list[SiteSpec]:
        if not value:
            raise ValueError("a lab needs at least one site (its central site)")
        return value

    @model_validator(mode="after")
    def _hierarchy(self) -> Topology:
        problems = _hierarchy_problems(self.sites)
        if problems:
            raise _HierarchyError(problems)
        return self

    # -- lookups -------------------------------------------------------------------------------

    def _tree(self) -> _Tree:
        tree = self._tree_cache
        if tree is None or tree.sites != tuple(self.sites):  # e.g. after model_copy(update=)
            tree = self._tree_cache = _Tree(self.sites)
        return tree

    @property
    def codes(self) -> list[str]:
        """Every site code, in file order."""
        return [s.code for s in self.sites]

    @property
    def central(self) -> str:
        """The code of the central site."""
        return next(s.code for s in self.sites if s.type == "central")

    def site(self, code: str) -> SiteSpec:
        """The site ``code``; ``ConfigError`` if the lab has no such site."""
        spec = self._tree().by_code.get(code)
        if spec is None:
            raise ConfigError(
                f"unknown site {code}; sites in this lab: {', '.join(self.codes)}",
                hint="use one of the site codes of the topology file",
            )
        return spec

    def parent(self, code: str) -> str | None:
        """The parent of ``code`` (``None`` for the central site)."""
        return self.site(code).parent

    def children(self, code: str) -> list[str]:
        """The direct children of ``code``, in file order."""
        self.site(code)
        return list(self._tree().children[code])

    def ancestors(self, code: str) -> list[str]:
        """The parent of ``code``, its parent, ... up to the central site."""
        out: list[str] = []
        parent = self.parent(code)
        while parent is not None:
            out.append(parent)
            parent = self.parent(parent)
        return out

    def subtree(self, code: str) -> list[str]:
        """``code`` and all its descendants, depth first in file order (parents first)."""
        out: list[str] = []
        stack = [code]
        self.site(code)
        while stack:
            current = stack.pop()
            out.append(current)
            stack.extend(reversed(self.children(current)))
        return out

    def depth_order(self) -> list[str]:
        """Every site, level by level from the central site: parents before children."""
        out: list[str] = []
        queue = deque([self.central])
        while queue:
            current = queue.popleft()
            out.append(current)
            queue.extend(self.children(current))
        return out

    def links(self) -> list[tuple[str, str]]:
        """Every (parent, child) pair, parents before children."""
        return [(p, c) for c in self.depth_order() if (p := self.parent(c)) is not None]

    def clients_of(self, code: str) -> int:
        """Number of simulated clients of ``code`` (its own value or the lab default)."""
        spec = self.site(code)
        return self.defaults.clients if spec.clients is None else spec.clients

    def workload_of(self, code: str) -> Workload:
        """Effective workload of ``code``: defaults merged with the site's override.

        Secondary sites have no administrators, so their ``object_interval`` is always 0.
        """
        spec = self.site(code)
        workload = self.defaults.workload
        if spec.workload is not None:
            workload = spec.workload.apply(workload)
        if spec.type == "secondary" and workload.object_interval:
            workload = workload.model_copy(update={"object_interval": 0.0})
        return workload

    # -- serialization -------------------------------------------------------------------------

    def to_yaml(self) -> str:
        """The topology as YAML that ``parse_topology`` reads back to an equal model."""
        data = self.model_dump(mode="json")
        data["sites"] = [s.model_dump(mode="json", exclude_none=True) for s in self.sites]
        for site in data["sites"]:
            if "workload" in site:
                site["workload"] = {k: v for k, v in site["workload"].items() if v is not None}
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


# --------------------------------------------------------------------------------------------
# Hierarchy rules
# --------------------------------------------------------------------------------------------


def _hierarchy_problems(sites: list[SiteSpec]) -> list[_Problem]:
    """Check the tree rules, most specific first; return the problems of the first stage hit."""
    for stage in (_duplicates, _site_rules, _loops, _central_present):
        problems = stage(sites)
        if problems:
            return problems
    return []


def _duplicates(sites: list[SiteSpec]) -> list[_Problem]:
    """HMAN 3301: two sites with the same code."""
    first: dict[str, int] = {}
    problems = []
    for i, site in enumerate(sites):
        if site.code in first:
            problems.append(
                _Problem(
                    ("sites", i, "code"),
                    f"HMAN 3301: duplicate site code {site.code} (also at {{also}})",
                    hint="every site needs its own code; give one of them an unused code",
                    also=("sites", first[site.code], "code"),
                )
            )
        else:
            first[site.code] = i
    return problems


def _site_rules(sites: list[SiteSpec]) -> list[_Problem]:
    """Per-site rules: one central, parents present and existing, secondaries are leaves."""
    by_code = {s.code: s for s in sites}
    known = ", ".join(by_code)
    has_central = any(s.type == "central" for s in sites)
    central_at: int | None = None
    problems = []
    for i, site in enumerate(sites):
        here = ("sites", i)
        if site.type == "central":
            if central_at is not None:
                problems.append(
                    _Problem(
                        (*here, "type"),
                        f"site {site.code}: a lab has exactly one central site and "
                        f"{sites[central_at].code} (at {{also}}) is already the central site",
                        hint="make this site a primary with a parent, or remove it",
                        also=("sites", central_at, "type"),
                    )
                )
            else:
                central_at = i
            if site.parent is not None:
                problems.append(
                    _Problem(
                        (*here, "parent"),
                        f"site {site.code}: the central site has no parent "
                        f"(it says parent {site.parent})",
                        hint="remove the parent, or make this site a primary",
                    )
                )
            continue
        if site.parent is None:
            allowed = "the central site or a primary" if site.type == "primary" else "a primary"
            message = f"site {site.code}: a {site.type} site must have a parent"
            hint = f"add 'parent: <code>' naming {allowed} site"
            if not has_central and site.type == "primary":
                message += " (and the lab has no central site)"
                hint = f"if {site.code} is the top of the hierarchy, make it 'type: central'"
            problems.append(_Problem(here, message, hint=hint))
            continue
        parent = by_code.get(site.parent)
        if parent is None:
            problems.append(
                _Problem(
                    (*here, "parent"),
                    f"site {site.code}: parent {site.parent} is not in the topology",
                    hint=f"add site {site.parent}, or use one of: {known}",
                )
            )
        elif parent.type == "secondary" and site.type == "secondary":
            problems.append(
                _Problem(
                    (*here, "parent"),
                    f"secondary site {site.code} cannot report to secondary site {parent.code}",
                    hint="a secondary site reports to a primary site (or the central site)",
                )
            )
        elif parent.type == "secondary":
            problems.append(
                _Problem(
                    (*here, "parent"),
                    f"site {site.code}: parent {parent.code} is a secondary site; "
                    "secondary sites cannot have children",
                    hint=f"attach {site.code} to a primary site, or make {parent.code} a primary",
                )
            )
    return problems


def _loops(sites: list[SiteSpec]) -> list[_Problem]:
    """HMAN 3300: following parents comes back to the start (parents all exist by now)."""
    parent_of = {s.code: s.parent for s in sites}
    index_of = {s.code: i for i, s in enumerate(sites)}
    reported: set[str] = set()
    problems = []
    for site in sites:
        path: list[str] = []
        current: str | None = site.code
        while current is not None and current not in path and current not in reported:
            path.append(current)
            current = parent_of.get(current)
        if current is None or current in reported:
            continue
        cycle = path[path.index(current) :]
        reported.update(cycle)
        start = min(cycle, key=index_of.__getitem__)  # the loop member written first
        at = cycle.index(start)
        ring = cycle[at:] + cycle[:at] + [start]
        problems.append(
            _Problem(
                ("sites", index_of[start], "parent"),
                f"HMAN 3300: site {start} is trying to report to a site that already reports "
                f"to site {start} (loop {' -> '.join(ring)})",
                hint="change the parent of one site of the loop so every chain of parents "
                "ends at the central site",
            )
        )
    return problems


def _central_present(sites: list[SiteSpec]) -> list[_Problem]:
    """Safety net: no central site (earlier stages already catch every way to get here)."""
    if any(s.type == "central" for s in sites):
        return []
    return [
        _Problem(
            ("sites",),
            "the lab has no central site",
            hint="add one site with 'type: central' and no parent",
        )
    ]


# --------------------------------------------------------------------------------------------
# Parsing and error locations
# --------------------------------------------------------------------------------------------


def _loc_text(loc: Loc) -> str:
    """``("sites", 2, "parent")`` -> ``sites[2].parent``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out or "<document>"


class _Lines:
    """Maps a path in the document to its 1-based line, from the composed YAML nodes."""

    def __init__(self, root: yaml.Node) -> None:
        self.root = root

    def line(self, loc: Loc) -> int:
        """Line of the deepest node of ``loc`` present (a mapping key's line for a field)."""
        return self._walk(loc)[1]

    def written(self, loc: Loc) -> str | None:
        """The source text of the scalar at ``loc``, if ``loc`` is fully present."""
        node, _, found = self._walk(loc)
        return node.value if found and isinstance(node, yaml.ScalarNode) else None

    def _walk(self, loc: Loc) -> tuple[yaml.Node, int, bool]:
        node: yaml.Node = self.root
        line = node.start_mark.line + 1
        for part in loc:
            if isinstance(node, yaml.SequenceNode) and isinstance(part, int):
                if not 0 <= part < len(node.value):
                    return node, line, False
                node = node.value[part]
                line = node.start_mark.line + 1
            elif isinstance(node, yaml.MappingNode):
                for key, value in node.value:
                    if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                        node, line = value, key.start_mark.line + 1
                        break
                else:
                    return node, line, False
            else:
                return node, line, False
        return node, line, True


def _duplicate_keys(node: yaml.Node) -> Iterator[tuple[yaml.Node, yaml.Node]]:
    """Yield (repeated key, first key) for every key written twice in one mapping."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, yaml.Node] = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value != "<<":
                if key.value in seen:
                    yield key, seen[key.value]
                else:
                    seen[key.value] = key
            yield from _duplicate_keys(value)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            yield from _duplicate_keys(item)


def _twice(key: yaml.Node, first: yaml.Node) -> str:
    """Message for a mapping key written twice."""
    return (
        f"key {key.value!r} written twice in one mapping (also at line {first.start_mark.line + 1})"
    )


def _model_at(loc: Loc) -> type[BaseModel] | None:
    """The model class whose fields live at ``loc`` (``()`` is ``Topology``)."""
    current: Any = Topology
    for part in loc:
        model = _as_model(current)
        if isinstance(part, str):
            if model is None or part not in model.model_fields:
                return None
            current = model.model_fields[part].annotation
        else:
            args = [a for a in typing.get_args(current) if a is not type(None)]
            if typing.get_origin(current) is not list or not args:
                return None
            current = args[0]
    return _as_model(current)


def _as_model(annotation: Any) -> type[BaseModel] | None:
    """``annotation`` (or the model inside ``X | None``) if it is a model class."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                return arg
    return None


_HINTS = {
    "code": "use 3 characters A-Z or 0-9, e.g. P01; quote codes YAML reads as a number "
    'or a boolean, e.g. code: "001"',
    "parent": "name the parent by its 3-character code, e.g. CEN; quote codes YAML reads "
    'as a number or a boolean, e.g. parent: "001"',
    "type": "use central, primary or secondary",
    "lab": "use lowercase letters, digits and '-', e.g. demo",
    "mode": "use sms20 (faithful) or hardened",
    "queue_type": "use classic, or quorum for a clustered broker",
    "failed_after": "set failed_after above degraded_after (defaults: 12 and 24)",
    "sites": "list the sites under 'sites:', exactly one of them central; see examples/lab.yaml",
}
_INTERVAL_HINT = "use a number of seconds >= 0 (0 disables that kind of event)"


def _describe(error: ErrorDetails, written: str | None) -> tuple[str, str]:
    """Message and hint for one pydantic error; ``written`` is the value's source text."""
    loc = tuple(error["loc"])
    path = _loc_text(loc)
    last = next((part for part in reversed(loc) if isinstance(part, str)), "")
    default_hint = "see examples/lab.yaml for a valid topology"
    if "workload" in loc and last.endswith("_interval"):
        hint = _INTERVAL_HINT
    elif loc and loc[0] == "settings" and error["type"] in ("greater_than", "greater_than_equal"):
        hint = "see the settings and their defaults under 'Topology file' in README.md"
    else:
        hint = _HINTS.get(last) or default_hint
    kind = error["type"]
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1])
        allowed = ", ".join(model.model_fields) if model else "see examples/lab.yaml"
        return f"{path}: unknown key {loc[-1]!r}", f"allowed keys here: {allowed}"
    if kind == "missing":
        return (
            f"{path}: required key {loc[-1]!r} is missing",
            f"add '{loc[-1]}:' to that entry",
        )
    value = error.get("input")
    if kind == "value_error":
        cause = (error.get("ctx") or {}).get("error")
        text = str(cause) if cause is not None else error["msg"].removeprefix("Value error, ")
    else:
        scalar = isinstance(value, str | int | float | bool | None)
        text = error["msg"] + (f" (got {value!r})" if scalar else "")
    if written is not None and not isinstance(value, str) and written != str(value):
        text += f" (YAML read {written} as {value!r})"
    return f"{path}: {text}", hint


def _fail(source: str, located: list[tuple[int, str, str]]) -> ConfigError:
    """One ``ConfigError`` for (line, message, hint) triples, the first line first."""
    located.sort(key=lambda item: item[0])
    line, message, hint = located[0]
    text = f"{source}:{line}: {message}"
    if len(located) > 1:
        text += "\nalso:" + "".join(f"\n  {source}:{ln}: {msg}" for ln, msg, _ in located[1:])
    return ConfigError(text, hint=hint)


def parse_topology(text: str, source: str = "<string>") -> Topology:
    """Parse and validate a topology from YAML ``text``; ``source`` names it in errors."""
    try:
        root = yaml.compose(text, Loader=_LOADER)
        data = yaml.load(text, Loader=_LOADER)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        problem = exc.problem or exc.context or "invalid YAML"
        raise ConfigError(
            f"{source}:{line}: YAML syntax error: {problem}",
            hint="fix the YAML at that line (indentation, a missing ':' or an unclosed quote)",
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}:1: YAML error: {exc}", hint="fix the YAML") from None
    if root is None:
        raise ConfigError(
            f"{source}:1: the topology is empty",
            hint="a topology is a mapping with at least a 'sites:' list; see examples/lab.yaml",
        )
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}:{root.start_mark.line + 1}: the topology must be a YAML mapping "
            f"(keys like 'lab:' and 'sites:'), not a {type(data).__name__}",
            hint="start the file with 'sites:' and the list of sites; see examples/lab.yaml",
        )
    duplicated = [
        (key.start_mark.line + 1, _twice(key, first), "keep only one of them")
        for key, first in _duplicate_keys(root)
    ]
    if duplicated:
        raise _fail(source, duplicated)

    lines = _Lines(root)
    try:
        return Topology.model_validate(data)
    except ValidationError as exc:
        located: list[tuple[int, str, str]] = []
        for error in exc.errors():
            cause = (error.get("ctx") or {}).get("error")
            if isinstance(cause, _HierarchyError):
                # Only the most specific stage of hierarchy rules is reported (see
                # _hierarchy_problems); pydantic errors never come with it.
                for p in cause.problems:
                    also = f"line {lines.line(p.also)}" if p.also else ""
                    located.append((lines.line(p.loc), p.message.replace("{also}", also), p.hint))
                continue
            loc = tuple(error["loc"])
            message, hint = _describe(error, lines.written(loc))
            located.append((lines.line(loc), message, hint))
        raise _fail(source, located) from None


def load_topology(path: str | Path) -> Topology:
    """Read and validate the topology file at ``path``."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"topology file {file} not found",
            hint="give the path of a topology YAML file, e.g. examples/lab.yaml",
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read topology file {file}: {exc}") from None
    return parse_topology(text, source=str(path))
