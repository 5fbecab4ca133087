"""``smslab``: the command line. Errors print what was wrong and what to do, no traceback
(unless ``--debug``). Global options (``--lab``, ``--amqp``, ``--debug``) go anywhere on the
line: ``smslab --lab X status`` and ``smslab status --lab X`` are the same command."""

from __future__ import annotations

import argparse
import os
import sys

from broker import admin, urls
from emulator.cli import broker as broker_commands
from emulator.cli import compose as compose_commands
from emulator.cli import faults as faults_commands
from emulator.cli import lab as lab_commands
from emulator.cli import report as report_commands
from emulator.cli import run as run_commands
from emulator.cli import sim as sim_commands
from emulator.cli import sites as site_commands
from emulator.cli import topology as topology_commands
from emulator.errors import ConfigError, OutputClosed, SmslabError
from emulator.lab import DEFAULT_LAB_DIR, LabDir


class _AmqpUrls(argparse.Action):
    """``--amqp`` repeated or comma-separated: one comma-separated string of every URL given."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        before = getattr(namespace, self.dest, None)
        try:
            given = urls.split([before or "", str(values)])
        except ConfigError as exc:
            parser.error(f"--amqp: {exc.message}")
        setattr(namespace, self.dest, urls.join(given))


def _global_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """The options every command takes. Below the top level their default is SUPPRESS, so a
    value given after the command overrides the top level's and an absent one leaves it."""
    def default(value: object) -> object:
        return value if top else argparse.SUPPRESS

    parser.add_argument("--lab", default=default(None),
                        help=f"lab directory (default {DEFAULT_LAB_DIR}, or SMSLAB_LAB)")
    parser.add_argument("--amqp", default=default(None), action=_AmqpUrls, metavar="URL",
                        help="broker URL (default SMSLAB_AMQP_URL or amqp://guest:guest@localhost:5672/%%2F); "
                             "the nodes of a cluster comma-separated or --amqp repeated: each site "
                             "connects to one and fails over to the others")
    parser.add_argument("--debug", action="store_true", default=default(False), help="show tracebacks")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="smslab",
        description="A lab emulator of an SMS 2.0 site hierarchy over RabbitMQ: bring labs up, inject "
                    "faults, restore sites without recovery and recover them, judge the result.",
    )
    _global_options(p, top=True)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, top=False)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in (lab_commands, site_commands, faults_commands, run_commands, sim_commands, report_commands,
                   compose_commands, topology_commands, broker_commands):
        module.register(sub, common)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.lab_given = args.lab is not None or "SMSLAB_LAB" in os.environ
    lab_dir = LabDir(args.lab or os.environ.get("SMSLAB_LAB") or DEFAULT_LAB_DIR)
    try:
        if args.amqp and args.command != "up" and lab_dir.exists():
            used = lab_dir.load().admin_url
            if urls.split(used) != urls.split(args.amqp):
                print(f"smslab: note: this lab's sites use the broker given at `up` ({admin._safe(used)});"
                      " --amqp is ignored", file=sys.stderr)
        code: int = args.handler(args, lab_dir)
        return code
    except SmslabError as exc:
        if args.debug:
            raise
        print(f"smslab: error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"smslab: hint: {exc.hint}", file=sys.stderr)
        return 2
    except OutputClosed:
        return 141  # the reader went away (smslab history | head); what still prints goes nowhere
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader went away (smslab history | head): stop quietly, as other tools do
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        except (OSError, ValueError, AttributeError):
            pass
        return 141


if __name__ == "__main__":
    sys.exit(main())
