"""What every ``smslab`` command shares: the registry, output, sites, control requests."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Callable
from typing import Any

from broker import admin
from emulator.errors import LabError
from emulator.lab import LabDir

Handler = Callable[[argparse.Namespace, LabDir], int]


def say(msg: str) -> None:
    print(msg, flush=True)


def note(msg: str) -> None:
    """Progress and notes: on stderr when the command prints JSON, so stdout stays JSON."""
    print(msg, file=sys.stderr, flush=True)


def progress_for(args: argparse.Namespace) -> Callable[[str], None]:
    return note if getattr(args, "json", False) else say


def emit_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str), flush=True)


def result(args: argparse.Namespace, data: dict[str, Any], text: str) -> None:
    """What a command did: ``data`` as JSON with ``--json``, else the line ``text``."""
    if getattr(args, "json", False):
        emit_json(data)
    else:
        say(text)


def amqp_url(args: argparse.Namespace) -> str:
    return getattr(args, "amqp", None) or os.environ.get("SMSLAB_AMQP_URL") or admin.DEFAULT_URL


def known_site(lab_dir: LabDir, code: str) -> str:
    code = code.upper()
    lab_dir.load().topology.site(code)  # raises "unknown site" with the list
    return code


def control(lab_dir: LabDir, code: str, cmd: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Send a control command to a running site; its refusal is an error."""
    info = lab_dir.load()
    if lab_dir.pid(code) is None:
        raise LabError(f"site {code} is not running", hint=f"smslab start {code}")
    answer = admin.control_request(info.amqp_url, info.lab_id, code, cmd, timeout=timeout)
    if not answer.get("ok", False):
        raise LabError(f"{code}: {answer.get('error')}", hint=answer.get("hint"))
    return answer


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text}")
    return value


def positive(text: str) -> float:
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
    return value


def non_negative(text: str) -> float:
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


def count(text: str) -> int:
    """A whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {text}")
    return value


def object_id(text: str) -> str:
    """An object's ID as the sites make them: the owning site's code and five digits."""
    if not re.fullmatch(r"[A-Z0-9]{3}\d{5}", text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an object ID: the owning site's code and five digits, e.g. CEN00001"
            " (smslab create prints the ID it made)")
    return text


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, not {text}")
    return value


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON (progress goes to stderr)")
