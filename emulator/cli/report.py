"""The report command: one self-contained HTML page of what happened in a lab run."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from emulator.cli.common import emit_json, note, say
from emulator.errors import LabError
from emulator.lab import LabDir


def cmd_report(args: argparse.Namespace, lab_dir: LabDir) -> int:
    try:
        from emulator import report  # plotly is imported only by the command that draws
    except ImportError as exc:
        raise LabError(f"smslab report needs plotly and jinja2: {exc}",
                       hint="pip install -e . (or: pip install plotly jinja2)") from exc
    source = Path(args.source) if args.source else lab_dir.path
    written = report.generate(source, Path(args.output) if args.output else None)
    if written.note:
        note(f"smslab: note: no verdict in the report: {written.note}")
    if args.json:
        emit_json({"report": str(written.path), "events": written.events})
    else:
        say(str(written.path))
    return 0


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    text = ("write one self-contained HTML page (opens offline) of a lab run: timeline with the faults,"
            " per-link rates and outbox depth, drops by kind, recovery phases, the verdict")
    parser: argparse.ArgumentParser = sub.add_parser("report", parents=[common], help=text, description=text)
    parser.set_defaults(handler=cmd_report)
    parser.add_argument("source", nargs="?", metavar="RUN_OR_LAB",
                        help="a lab directory (has lab.json) or a run directory (has history.jsonl);"
                             " default: the lab (--lab)")
    parser.add_argument("-o", "--output", metavar="FILE",
                        help="where to write it (default: report.html in RUN_OR_LAB)")
    parser.add_argument("--json", action="store_true", help='print {"report": path, "events": n}')
