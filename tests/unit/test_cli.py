"""The command line as people expect it: the global options (--lab, --amqp, --debug) in any
position, and --json on every command that prints data (the YAML writers excepted)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import pytest

from emulator.cli import build_parser, main

# They print a YAML file (compose, a topology) that is the data itself.
NO_JSON = {"compose", "topology generate"}


def leaves(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> Iterator[
        tuple[tuple[str, ...], argparse.ArgumentParser]]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield prefix, parser
        return
    for name, child in subs[0].choices.items():
        yield from leaves(child, (*prefix, name))


def options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


COMMANDS = list(leaves(build_parser()))


def test_the_walk_finds_every_command() -> None:
    names = {" ".join(c) for c, _ in COMMANDS}
    assert {"status", "run", "report", "fault partition", "broker cluster up", "topology generate"} <= names
    assert len(names) > 40


@pytest.mark.parametrize("command", [c for c, _ in COMMANDS], ids=" ".join)
def test_every_command_takes_the_global_options_and_json(command: tuple[str, ...]) -> None:
    parser = dict(COMMANDS)[command]
    assert {"--lab", "--amqp", "--debug"} <= options(parser)
    if " ".join(command) not in NO_JSON:
        assert "--json" in options(parser), f"smslab {' '.join(command)} has no --json"


@pytest.mark.parametrize("argv", [
    ["status", "--lab", "X"], ["--lab", "X", "status"], ["--lab", "Y", "status", "--lab", "X"],
    ["fault", "partition", "P01", "CEN", "--lab", "X"], ["broker", "cluster", "status", "--lab", "X"],
    ["run", "s.yaml", "--lab", "X", "--seed", "3"], ["report", "--lab", "X", "-o", "r.html"],
])
def test_a_global_option_after_the_command_counts(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    assert args.lab == "X"


def test_debug_and_amqp_after_the_command() -> None:
    args = build_parser().parse_args(["check", "--debug", "--amqp", "amqp://h/%2F"])
    assert args.debug is True and args.amqp == "amqp://h/%2F"
    args = build_parser().parse_args(["check"])
    assert args.debug is False and args.amqp is None


def test_the_lab_after_the_command_is_the_lab_used(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such-lab"
    assert main(["status", "--lab", str(missing)]) == 2
    after = capsys.readouterr().err
    assert main(["--lab", str(missing), "status"]) == 2
    before = capsys.readouterr().err
    assert str(missing) in after and after == before


@pytest.mark.parametrize("weights", ["kill=nan", "kill=1e400", "kill=-1", "kill=1e308,drop=1e308"])
def test_sim_refuses_a_chaos_weight_that_is_not_a_finite_number_naming_the_option(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], weights: str) -> None:
    topology = Path(__file__).resolve().parents[2] / "examples" / "lab.yaml"
    out = tmp_path / "run"
    assert main(["sim", str(topology), "--chaos", weights, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--chaos {weights}:" in err and f"{topology}:" not in err, err  # the option, not a line of the topology
    assert not out.exists()
