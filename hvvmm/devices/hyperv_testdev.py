"""QEMU's hyperv-testdev: the port the kvm-unit-tests Hyper-V tests drive the SynIC with.

As QEMU ``hw/hyperv/hyperv_testdev.c`` (``-device hyperv-testdev``; driven by kvm-unit-tests
``x86/hyperv_synic.c`` and ``x86/hyperv_connections.c``): a 4-byte port-I/O region at
:data:`HYPERV_TESTDEV_BASE` (0x3000);
a 32-bit write of ``conn_id << 24 | control << 16 | vp_index << 8 | sint`` performs one control:

1. ``SINT_ROUTE_CREATE``: a route to (vp, sint), needed by 3.
2. ``SINT_ROUTE_DESTROY``.
3. ``SINT_ROUTE_SET_SINT``: raise that SINT's interrupt (no message, no flag; nothing if the SINT
   is masked).
4. ``MSG_CONN_CREATE``: message connection ``conn_id``: every HvCallPostMessage on it is posted
   back, same type and payload, to SIM slot ``sint`` of ``vp`` (busy slot: queued, MessagePending,
   delivered after EOM).
5. ``MSG_CONN_DESTROY`` (``conn_id``).
6. ``EVT_CONN_CREATE``: event connection ``conn_id``: HvCallSignalEvent on it sets event flag
   number ``conn_id`` of SINT ``sint`` on ``vp`` and raises the SINT if the flag was clear (QEMU
   "signal the same event flag we've got"); its flag count is 1.
7. ``EVT_CONN_DESTROY`` (``conn_id``).

Reads return 0. QEMU accepts only 4-byte accesses; other writes are ignored here too. Where QEMU
asserts (a route or connection that does not exist, one created twice), this device logs once and
ignores the write: a guest must not be able to kill the VMM.

The device is a plain state machine over a :class:`SynicControl` (the partition's
:class:`~hvvmm.enlightenments.connections.Connections`); :class:`hvvmm.machine.Machine` adds it
with ``MachineConfig(hyperv_testdev=True)`` (``hvvmm run --hyperv-testdev``).
"""

from __future__ import annotations

import enum
import logging
from typing import Protocol

from hvvmm.enlightenments.synic import check_sint
from hvvmm.logonce import LogOnce

log = logging.getLogger(__name__)

HYPERV_TESTDEV_BASE = 0x3000
HYPERV_TESTDEV_PORT_COUNT = 4


class HvTestDevControl(enum.IntEnum):
    """QEMU's ``HV_TEST_DEV_*`` controls."""

    SINT_ROUTE_CREATE = 1
    SINT_ROUTE_DESTROY = 2
    SINT_ROUTE_SET_SINT = 3
    MSG_CONN_CREATE = 4
    MSG_CONN_DESTROY = 5
    EVT_CONN_CREATE = 6
    EVT_CONN_DESTROY = 7


def decode(value: int) -> tuple[int, int, int, int]:
    """``(conn_id, control, vp_index, sint)`` of a control word (each one byte, as QEMU)."""
    return (value >> 24) & 0xFF, (value >> 16) & 0xFF, (value >> 8) & 0xFF, value & 0xFF


def encode(control: int, vp_index: int, sint: int, conn_id: int = 0) -> int:
    """The control word a guest writes (kvm-unit-tests ``synic_ctl``)."""
    return ((conn_id & 0xFF) << 24) | ((control & 0xFF) << 16) | ((vp_index & 0xFF) << 8) \
        | (sint & 0xFF)


class SynicControl(Protocol):
    """What the device needs from the SynIC (implemented by ``Connections``)."""

    def raise_sint(self, vp: int, sint: int) -> bool: ...

    def register_message_connection(self, connection_id: int, *, vp: int, sint: int): ...

    def register_event_connection(self, connection_id: int, *, vp: int, sint: int,
                                  flag: int): ...

    def unregister_message_connection(self, connection_id: int) -> bool: ...

    def unregister_event_connection(self, connection_id: int) -> bool: ...


class HypervTestDev:
    """hyperv-testdev (a :class:`hvvmm.bus.BusDevice`)."""

    def __init__(self, synic: SynicControl):
        self._synic = synic
        self.routes: set[tuple[int, int]] = set()
        self.message_connections: dict[int, tuple[int, int]] = {}  # conn_id -> (vp, sint)
        self.event_connections: dict[int, tuple[int, int]] = {}
        self.writes = 0
        self.ignored = 0
        self._log_once = LogOnce(log, max_keys=64)

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes += 1
        if offset != 0 or size != 4:
            self._ignore(("access", offset, size), "a %d-byte write at offset %d (only 32-bit "
                         "writes at offset 0 are controls)", size, offset)
            return
        conn_id, control, vp, sint = decode(value)
        try:
            self._control(control, vp, sint, conn_id)
        except ValueError as error:  # a VP or SINT out of range, a duplicate connection
            self._ignore(("error", control), "control %d (vp %d, sint %d, conn %#x) refused: %s",
                         control, vp, sint, conn_id, error)

    def _control(self, control: int, vp: int, sint: int, conn_id: int) -> None:
        if control == HvTestDevControl.SINT_ROUTE_CREATE:
            self.routes.add((vp, check_sint(sint)))  # a bad SINT now, a bad VP when used
        elif control == HvTestDevControl.SINT_ROUTE_DESTROY:
            if (vp, sint) not in self.routes:
                self._ignore(("no_route", vp, sint), "no SINT route vp %d sint %d to destroy",
                             vp, sint)
            self.routes.discard((vp, sint))
        elif control == HvTestDevControl.SINT_ROUTE_SET_SINT:
            if (vp, sint) not in self.routes:
                self._ignore(("no_route", vp, sint), "no SINT route vp %d sint %d to raise", vp,
                             sint)
                return
            self._synic.raise_sint(vp, sint)
        elif control == HvTestDevControl.MSG_CONN_CREATE:
            self._synic.register_message_connection(conn_id, vp=vp, sint=sint)
            self.message_connections[conn_id] = (vp, sint)
        elif control == HvTestDevControl.MSG_CONN_DESTROY:
            if self.message_connections.pop(conn_id, None) is None:
                self._ignore(("no_msg_conn", conn_id), "no message connection %#x", conn_id)
                return
            self._synic.unregister_message_connection(conn_id)
        elif control == HvTestDevControl.EVT_CONN_CREATE:
            self._synic.register_event_connection(conn_id, vp=vp, sint=sint, flag=conn_id)
            self.event_connections[conn_id] = (vp, sint)
        elif control == HvTestDevControl.EVT_CONN_DESTROY:
            if self.event_connections.pop(conn_id, None) is None:
                self._ignore(("no_evt_conn", conn_id), "no event connection %#x", conn_id)
                return
            self._synic.unregister_event_connection(conn_id)
        else:
            self._ignore(("control", control), "unknown control %d", control)

    def _ignore(self, key: tuple, message: str, *args: object) -> None:
        self.ignored += 1
        self._log_once(key, logging.WARNING, "hyperv-testdev: " + message + " (ignored)", *args)

    def reset(self) -> None:
        """Forget the routes and take down the connections this device created."""
        for conn_id in list(self.message_connections):
            self._synic.unregister_message_connection(conn_id)
        for conn_id in list(self.event_connections):
            self._synic.unregister_event_connection(conn_id)
        self.routes.clear()
        self.message_connections.clear()
        self.event_connections.clear()
