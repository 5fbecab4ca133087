"""What a site does with data it has accepted off a link: the rules above sequencing.

- Site data (inventory, discovery, status, SCF copies) is versioned by its origin: an older
  version than the one held is neither stored nor forwarded; an SCF at the serial already
  held is a repeat (but a recovering site forwards it: its parent reinitialized its copy).
- A site control change at or below the last processed delta serial is discarded: "already
  processed as part of an older delta site control file".
"""

from __future__ import annotations

from emulator.protocol.envelope import DataClass


def keep_site_data(data_class: DataClass, version: int, held: int | None, *, recovering: bool) -> bool:
    """Whether accepted site data is stored and forwarded up."""
    if held is None:
        return True
    if version < held:
        return False
    if data_class is DataClass.SCF and version == held:
        return recovering
    return True


def apply_control_change(delta_serial: int, last_processed: int) -> bool:
    """Whether a delta site control file is processed (else ignored as older)."""
    return delta_serial > last_processed
