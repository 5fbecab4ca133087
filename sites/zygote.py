"""The lab's site forkserver: one process that has imported what a site runs and forks a site
process for each request, so starting a site costs a fork, not an interpreter start and half a
second of imports (``up`` of a 50-site lab was mostly that: 50 interpreters importing pydantic,
pika and the protocol models on two cores).

    python -m sites.zygote --lab DIR

``emulator.orchestrator`` starts it with the lab and asks it over a UNIX socket in the lab
directory (``zygote.sock``): one JSON line ``{"argv": [...], "env": {...}, "cwd": ..., "log":
...}`` in, ``{"pid": N}`` back. The child is a real site process like one ``python -m sites``
starts: a session of its own, ``log`` (its site.out) as stdout and stderr, the requester's environment and
working directory, its command line set to ``python -m sites --log ... --lab DIR --site CODE`` (what
``ps`` and the lab's pid checks read). The forkserver only forks: the children are reaped by
the kernel (SIGCHLD ignored) and outlive it. It holds no broker connection, no store and no
thread, so a fork copies nothing a site must not share. It exits when its lab directory goes
away, on SIGTERM, and on ``down``.

Where it cannot serve (not running yet, a site in a network namespace) the orchestrator starts
``python -m sites`` itself: the same process, only slower to start.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import select
import signal
import socket
import sys
import traceback
from pathlib import Path
from typing import Any

MAX_REQUEST = 1 << 20
CHECK_EVERY = 2.0  # seconds between looks at whether the lab directory is still there


def title(argv: list[str]) -> str:
    return " ".join([Path(sys.executable).name, "-m", "sites", *argv])


def _child(request: dict[str, Any], listener: socket.socket, conn: socket.socket, ready: int) -> None:
    """In the forked child: become the site process and run it; never returns. ``ready`` is
    written once the process looks like a site (its title set): only then is its pid given out,
    so nobody checks the pid and sees the forkserver's command line."""
    code = 1
    try:
        listener.close()
        conn.close()
        argv = [str(a) for a in request["argv"]]
        try:  # before the environment is replaced: setproctitle moved it to make room
            import setproctitle

            setproctitle.setproctitle(title(argv))
        except ImportError:  # pragma: no cover - a dependency
            pass
        os.write(ready, b"1")
        os.close(ready)
        os.setsid()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(null)
        os.close(log)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        from sites import __main__ as site_main
        from sites import runtime

        runtime.PLANTED_BUGS = runtime.planted_bugs()  # read again: the requester's environment
        sys.argv = ["python -m sites", *argv]
        code = site_main.main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - whatever it is goes to the site's log
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve(lab: Path) -> int:
    # What a site imports, once, before any fork.
    from sites import __main__ as site_main  # noqa: F401
    from sites import runtime  # noqa: F401

    try:
        import setproctitle  # noqa: F401 - loaded once here, used in each child
    except ImportError:  # pragma: no cover - a dependency
        pass
    # What is imported stays shared with the children: the collector leaves it alone instead
    # of touching (and so copying) every page of it in each child.
    gc.collect()
    gc.freeze()

    path = lab / "zygote.sock"
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(64)
    listener.settimeout(CHECK_EVERY)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the children: no zombies
    stopping = False

    def on_term(_sig: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    tmp = lab / f".zygote.pid.{os.getpid()}.tmp"
    tmp.write_text(f"{os.getpid()}\n")
    os.replace(tmp, lab / "zygote.pid")
    print(f"site forkserver {os.getpid()} ready on {path}", flush=True)
    try:
        while not stopping and (lab / "lab.json").exists():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except InterruptedError:
                continue
            with conn:
                conn.settimeout(10)
                try:
                    request = _read(conn)
                    ready_r, ready_w = os.pipe()
                    pid = os.fork()
                    if pid == 0:
                        os.close(ready_r)
                        _child(request, listener, conn, ready_w)
                    os.close(ready_w)
                    try:
                        _wait_ready(ready_r)
                    finally:
                        os.close(ready_r)
                    conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    try:
                        conn.sendall(json.dumps({"error": repr(exc)}).encode() + b"\n")
                    except OSError:
                        pass
    finally:
        listener.close()
        path.unlink(missing_ok=True)
    print(f"site forkserver {os.getpid()} stopped", flush=True)
    return 0


def _wait_ready(fd: int, timeout: float = 10.0) -> None:
    """Until the child wrote its byte (or closed the pipe, dying): a bounded wait."""
    readable, _, _ = select.select([fd], [], [], timeout)
    if readable:
        os.read(fd, 1)


def _read(conn: socket.socket) -> dict[str, Any]:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST:
            raise ValueError("request too large")
    request = json.loads(data)
    if not isinstance(request, dict) or not isinstance(request.get("argv"), list) \
            or not isinstance(request.get("env"), dict):
        raise TypeError("not a spawn request")
    return request


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sites.zygote",
                                     description="The lab's site forkserver (the orchestrator starts it).")
    parser.add_argument("--lab", required=True, type=Path)
    args = parser.parse_args(argv)
    return serve(args.lab.resolve())


if __name__ == "__main__":
    sys.exit(main())
