"""What every ``smslab`` command shares: the registry, output, sites, control requests."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import select
import signal
import stat
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from broker import admin
from emulator.errors import ConfigError, LabError, OutputClosed
from emulator.lab import LabDir

Handler = Callable[[argparse.Namespace, LabDir], int]


def _silence(stream: TextIO) -> None:
    """What is still written to ``stream`` goes nowhere (its reader is gone): no second error,
    at the next write or when the interpreter flushes it at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def write(msg: str, stream: TextIO | None = None) -> None:
    """A line to stdout (or ``stream``), flushed. When its reader went away (``| head``) the
    stream is silenced and ``OutputClosed`` raised, once: the command stops as on SIGTERM."""
    out = stream if stream is not None else sys.stdout
    try:
        print(msg, file=out, flush=True)
    except BrokenPipeError:
        _silence(out)
        raise OutputClosed(f"{getattr(out, 'name', 'output')} was closed") from None


def say(msg: str) -> None:
    write(msg)


def note(msg: str) -> None:
    """Progress and notes: on stderr when the command prints JSON, so stdout stays JSON."""
    write(msg, sys.stderr)


def output_gone(stream: TextIO | None = None) -> bool:
    """Whether the reader of ``stream`` (stdout) went away: a pipe whose other end is closed
    (POLLERR), a socket hung up (POLLHUP). A regular file never is."""
    out = stream if stream is not None else sys.stdout
    try:
        poller = select.poll()
        poller.register(out.fileno(), 0)  # only the conditions that are always reported
        return any(ev & (select.POLLERR | select.POLLHUP) for _fd, ev in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


_gone = threading.Event()


def output_was_closed() -> bool:
    """Whether ``watch_output``'s thread found stdout's reader gone."""
    return _gone.is_set()


def watch_output(interval: float = 0.5) -> Callable[[], None]:
    """While a long command prints nothing (a run's ``wait: 60``), notice the reader of its
    stdout going away: the main thread then gets SIGTERM, whose handler ends the command as
    Ctrl-C does (``smslab run`` takes its lab down; ``output_was_closed()`` says why).
    Watches only a pipe or a socket. Returns the function that stops the watch."""
    stop = threading.Event()
    _gone.clear()
    try:
        if not _is_pipe_or_socket(sys.stdout.fileno()):
            return stop.set
    except (OSError, ValueError, AttributeError):
        return stop.set

    def watch() -> None:
        while not stop.wait(interval):
            if output_gone():
                _gone.set()
                if not stop.is_set():
                    signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGTERM)
                return

    threading.Thread(target=watch, name="smslab-output-watch", daemon=True).start()
    return stop.set


def _is_pipe_or_socket(fd: int) -> bool:
    mode = os.fstat(fd).st_mode
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def _terminated(signum: int, _frame: object) -> None:
    if output_was_closed():
        raise OutputClosed("the output was closed")
    raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def ends_like_ctrl_c() -> Iterator[None]:
    """While it is on, SIGTERM (a CI job's timeout, `timeout`, kill) ends the command as Ctrl-C
    does (a run takes its lab down and writes its run directory), and so does the reader of
    stdout going away (``| head``): at the next line written, or noticed by ``watch_output``
    while the command prints nothing."""
    signal.signal(signal.SIGTERM, _terminated)
    stop_watch = watch_output()
    try:
        yield
    finally:
        stop_watch()


def refuse_used_dir(path: Path, what: str = "the run directory", option: str = "--out") -> None:
    """A run directory holds one run: one that exists and is not empty is refused, before
    anything is written or started (the files of two runs would be mixed)."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        state = "is a file" if not path.is_dir() else "already exists and is not empty"
        raise ConfigError(f"{what} {path} {state}: it would mix two runs",
                          hint=f"choose another {option} DIR, or remove {path}")


def progress_for(args: argparse.Namespace) -> Callable[[str], None]:
    return note if getattr(args, "json", False) else say


def emit_json(value: Any) -> None:
    write(json.dumps(value, indent=2, default=str))


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
