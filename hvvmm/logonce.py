"""Logging for events the guest triggers: once per distinct cause, with bounded memory.

The guest decides how often an event happens and which values it carries (ports, addresses, MSR
indices), so a VMM that logs each one floods its log, and one that remembers each cause it has
logged lets the guest grow that memory without bound. :class:`LogOnce` does neither.
"""

from __future__ import annotations

import logging
import threading
from typing import Hashable


class LogOnce:
    """Log each distinct guest-triggered cause once at its level, then at DEBUG only.

    ``key`` identifies the cause (an MSR index and reason, a call code, ...). At most
    ``max_keys`` causes are remembered, because the guest chooses the keys; after that every
    message goes to DEBUG, and one warning says so. Thread-safe (vCPU threads share it).
    """

    def __init__(self, logger: logging.Logger, max_keys: int = 1024):
        self._logger = logger
        self._max_keys = max_keys
        self._seen: set[Hashable] = set()
        self._lock = threading.Lock()
        self._overflowed = False

    def __call__(self, key: Hashable, level: int, message: str, *args: object,
                 exc_info: bool | BaseException = False) -> bool:
        """Log; returns True when this was the first time for ``key`` (logged at ``level``)."""
        with self._lock:
            first = key not in self._seen
            if first:
                if len(self._seen) >= self._max_keys:
                    first = False
                    overflow_now = not self._overflowed
                    self._overflowed = True
                else:
                    self._seen.add(key)
                    overflow_now = False
            else:
                overflow_now = False
        if overflow_now:
            self._logger.warning("more than %d distinct guest-triggered events; further ones are "
                                 "logged at DEBUG only", self._max_keys)
        if first:
            self._logger.log(level, message + " (logged once)", *args, exc_info=exc_info)
        else:
            self._logger.debug(message, *args, exc_info=exc_info)
        return first

    def forget(self) -> None:
        """Start over (e.g. after a VM reset, so the next boot's events are logged again)."""
        with self._lock:
            self._seen.clear()
            self._overflowed = False
