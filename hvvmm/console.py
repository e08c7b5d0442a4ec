"""The guest's serial console on the host side: the captured output and the input pump."""

from __future__ import annotations

import logging
import os
import select
import threading
from typing import BinaryIO, Callable

log = logging.getLogger(__name__)


class ConsoleBuffer:
    """The UART's output: kept in memory (bounded) and copied to an optional stream."""

    def __init__(self, limit: int, sink: BinaryIO | None):
        self._data = bytearray()
        self._limit = limit
        self._sink = sink
        self._lock = threading.Lock()
        self.dropped = 0

    def write(self, data: bytes) -> int:
        with self._lock:
            room = max(self._limit - len(self._data), 0)
            self._data += data[:room]
            if len(data) > room:
                if not self.dropped:
                    log.warning("console capture is full (%d bytes); later guest output is not "
                                "kept in memory", self._limit)
                self.dropped += len(data) - room
        sink = self._sink
        if sink is not None:
            try:
                sink.write(data)
            except (OSError, ValueError) as exc:  # a closed pipe or file: stop copying, keep capturing
                self._sink = None
                log.warning("guest console output stream failed (%s); output is still captured",
                            exc)
        return len(data)

    def flush(self) -> None:
        if self._sink is not None:
            try:
                self._sink.flush()
            except (OSError, ValueError):  # the stream went away (closed pipe, closed file)
                pass

    def getvalue(self) -> bytes:
        with self._lock:
            return bytes(self._data)


class InputPump:
    """Copies a host stream into the UART from a thread that can be stopped and joined."""

    def __init__(self, source: BinaryIO | int, deliver: Callable[[bytes], None]):
        self._fd = source if isinstance(source, int) else source.fileno()
        self._deliver = deliver
        self._wake_read, self._wake_write = os.pipe()
        self._thread = threading.Thread(target=self._main, name="hvvmm-console-input",
                                        daemon=True)
        self._thread.start()

    def _main(self) -> None:
        while True:
            ready, _, _ = select.select([self._fd, self._wake_read], [], [])
            if self._wake_read in ready:
                return
            try:
                data = os.read(self._fd, 4096)
            except OSError:
                return
            if not data:
                return  # end of input: the guest simply gets no more bytes
            self._deliver(data)

    def close(self) -> None:
        os.write(self._wake_write, b"x")
        self._thread.join()
        os.close(self._wake_read)
        os.close(self._wake_write)
