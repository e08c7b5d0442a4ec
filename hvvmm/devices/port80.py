"""The POST-code port (0x80): a sink that remembers the last code written.

Firmware writes progress codes to port 0x80 (a "POST card" displays them) and Linux writes it as an
I/O delay (``outb_p``), so it must exist and be cheap. Writes are recorded in :attr:`last_code`;
each distinct code is logged once at debug level. Reads return all ones of the access size, as a
port with nothing to read back. Source: the IBM PC/AT convention; QEMU ``hw/i386/pc.c``
(``ioport80`` is a write sink).
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

POST_CODE_PORT = 0x80
POST_CODE_PORT_COUNT = 1


class PostCodePort:
    """Port 0x80. :attr:`last_code` is the last value written (``None`` before any)."""

    def __init__(self) -> None:
        self.last_code: int | None = None
        self.write_count = 0
        self._seen: set[int] = set()

    def read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        value &= (1 << (8 * size)) - 1
        self.last_code = value
        self.write_count += 1
        if value not in self._seen and len(self._seen) < 256:
            self._seen.add(value)
            log.debug("POST code %#x (each code logged once)", value)
