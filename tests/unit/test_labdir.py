"""The lab directory's files that other processes poll are replaced in one step."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from emulator.lab import LabDir


def test_a_pid_file_being_rewritten_is_never_read_empty(tmp_path: Path) -> None:
    # The recovery CLI polls the agent's pid file while the agent rewrites it at start-up: a
    # reader that saw it truncated took the agent for dead (a CI failure, "exited in phase
    # announce").
    lab_dir = LabDir(tmp_path)
    lab_dir.site_dir("CEN").mkdir(parents=True)
    lab_dir.write_pid("CEN", os.getpid())
    seen: list[str] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            seen.append(lab_dir.pid_file("CEN").read_text())

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for _ in range(3000):
            lab_dir.write_pid("CEN", os.getpid())
    finally:
        done.set()
        reader.join()
    assert seen and all(text.split()[0] == str(os.getpid()) for text in seen)
    assert [p.name for p in lab_dir.site_dir("CEN").iterdir()] == ["site.pid"], "no temporary file left"
