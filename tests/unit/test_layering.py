"""The layers hold: the protocol core does no I/O and reads no clock, and only ``broker/``
talks to pika. Checked on the source (AST), so a lazy import inside a function counts too."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTOCOL = ROOT / "emulator" / "protocol"
FIRST_PARTY = ("emulator", "broker", "sites")

# What the pure core must never import: I/O, processes, threads, clocks, the broker, the sites.
FORBIDDEN_IN_CORE = frozenset(
    {"pika", "sqlite3", "socket", "threading", "subprocess", "time", "asyncio", "os",
     "broker", "sites"}
)


@dataclass(frozen=True)
class Import:
    module: str  # absolute dotted name of what is imported
    path: Path
    line: int

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line} imports {self.module}"

    @property
    def top(self) -> str:
        return self.module.split(".")[0]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, source: str | None = None) -> list[Import]:
    """Every module ``path`` imports, anywhere in the file, as absolute dotted names.

    Covers ``import a.b``, ``from a.b import c`` (both ``a.b`` and ``a.b.c``, as ``c`` may be a
    module), relative imports, and ``importlib.import_module("x")`` / ``__import__("x")``
    with a literal name.
    """
    text = path.read_text() if source is None else source
    tree = ast.parse(text, filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Import(alias.name, path, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(p for p in [*base_parts, node.module or ""] if p)
            else:
                base = node.module or ""
            found.append(Import(base, path, node.lineno))
            found += [Import(f"{base}.{a.name}", path, node.lineno) for a in node.names if a.name != "*"]
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            arg = node.args[0]
            if name in ("import_module", "__import__") and isinstance(arg, ast.Constant) \
                    and isinstance(arg.value, str):
                found.append(Import(arg.value, path, node.lineno))
    return found


def python_files(*dirs: Path) -> list[Path]:
    return sorted(p for d in dirs for p in d.rglob("*.py") if "__pycache__" not in p.parts)


def resolve_first_party(module: str) -> Path | None:
    """The file of a first-party module, if ``module`` is one and exists."""
    if module.split(".")[0] not in FIRST_PARTY:
        return None
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


CORE_FILES = python_files(PROTOCOL)


def test_the_core_is_where_we_think() -> None:
    names = {p.name for p in CORE_FILES}
    assert {"envelope.py", "sequencing.py", "objects.py"} <= names


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_protocol_core_imports_nothing_impure(path: Path) -> None:
    bad = [str(i) for i in imports_of(path) if i.top in FORBIDDEN_IN_CORE]
    assert not bad, "the protocol core must stay pure:\n" + "\n".join(bad)


def test_protocol_core_pulls_nothing_impure_through_first_party_modules() -> None:
    """Following the core's imports into emulator/ (e.g. emulator.errors) finds nothing impure."""
    seen: set[Path] = set()
    todo = list(CORE_FILES)
    chain: dict[Path, str] = {p: str(p.relative_to(ROOT)) for p in CORE_FILES}
    bad: list[str] = []
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for imp in imports_of(path):
            if imp.top in FORBIDDEN_IN_CORE:
                bad.append(f"{chain[path]} -> {imp.module} (line {imp.line})")
                continue
            target = resolve_first_party(imp.module)
            if target is not None and target not in seen:
                chain.setdefault(target, f"{chain[path]} -> {imp.module}")
                todo.append(target)
    assert not bad, "the protocol core reaches impure modules:\n" + "\n".join(bad)


# The product's own packages; bench/ and tests/ may drive the broker directly.
OUTSIDE_BROKER = python_files(ROOT / "emulator", ROOT / "sites")


@pytest.mark.parametrize("path", OUTSIDE_BROKER, ids=lambda p: str(p.relative_to(ROOT)))
def test_only_broker_imports_pika(path: Path) -> None:
    bad = [str(i) for i in imports_of(path) if i.top == "pika"]
    assert not bad, "only broker/ may talk to pika:\n" + "\n".join(bad)


def test_recovery_uses_the_runtime_only_through_its_protocol() -> None:
    """No runtime <-> recovery cycle: sites/recovery.py knows the runtime as ``RecoveryHost``."""
    bad = [str(i) for i in imports_of(ROOT / "sites" / "recovery.py") if i.module.startswith("sites.runtime")]
    assert not bad, "\n".join(bad)


# Where SQL may be written: the site's store (site.db) and the clients' (clients.db) in sites/,
# the harness's own event log (harness.db) in emulator/history.py, and the tests' query helper.
SQL_HOMES = {ROOT / "sites" / "store.py", ROOT / "sites" / "clients.py", ROOT / "emulator" / "history.py",
             ROOT / "emulator" / "testing.py"}


@pytest.mark.parametrize("path", python_files(ROOT / "emulator", ROOT / "sites", ROOT / "broker"),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_store_sql_has_one_home(path: Path) -> None:
    if path in SQL_HOMES:
        return
    calls = [node.lineno for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
             and node.func.attr in ("execute", "executemany", "executescript")]
    assert not calls, f"{path.relative_to(ROOT)} runs SQL at lines {calls}: it belongs in sites/store.py"


# -- the scanner itself -----------------------------------------------------------------------


def test_scanner_sees_the_pika_imports_of_broker() -> None:
    found = {i.top for p in python_files(ROOT / "broker") for i in imports_of(p)}
    assert "pika" in found


@pytest.mark.parametrize(
    ("source", "module"),
    [
        ("import os", "os"),
        ("import os.path as p", "os.path"),
        ("from time import monotonic", "time"),
        ("def f():\n    import socket\n", "socket"),
        ("try:\n    import threading\nexcept ImportError:\n    pass\n", "threading"),
        ("from .. import sites", "emulator.sites"),
        ("from ...broker import transport", "broker.transport"),
        ("import importlib\nimportlib.import_module('subprocess')", "subprocess"),
        ("__import__('asyncio')", "asyncio"),
    ],
)
def test_scanner_catches(source: str, module: str) -> None:
    fake = PROTOCOL / "fake.py"
    modules = {i.module for i in imports_of(fake, source)}
    assert module in modules, modules


def test_scanner_does_not_cry_wolf() -> None:
    fake = PROTOCOL / "fake.py"
    source = "import ostruct\nfrom timeit import x\nfrom emulator.protocol import time_utils\nx = 'import os'\n"
    tops = {i.top for i in imports_of(fake, source)}
    assert not tops & FORBIDDEN_IN_CORE, tops
