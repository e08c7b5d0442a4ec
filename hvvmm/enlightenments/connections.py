"""HvCallPostMessage and HvCallSignalEvent: connections, ports and message queues (part of
hv-synic, see :mod:`hvvmm.enlightenments.synic`).

TLFS ``inter-partition-communication.md`` "Ports and Connections" and "Message Buffers" ([I]),
``hypercalls/HvCallPostMessage.md`` and ``hypercalls/HvCallSignalEvent.md``; QEMU
``hw/hyperv/hyperv.c`` (PostMessage/SignalEvent handling).

hvvmm has one partition, so a *connection* (24-bit id, what the guest names in a hypercall) leads
straight to its *port*, which the VMM sets up at run time (a test device, a test harness through
``machine.hyperv``):

* a **message port** delivers to SIM slot ``sint`` of VP ``vp`` (``HV_ANY_VP``: the first VP whose
  SynIC and SIM page are enabled, chosen when the message is queued [I]), or hands the message to a
  Python ``handler(vp_index, message_type, payload)`` (a host-side port) on the calling vCPU's
  thread;
* an **event port** sets flag ``base_flag + FlagNumber`` of SINT ``sint`` in VP ``vp``'s SIEF page
  (``FlagNumber`` < ``flag_count``), or calls ``handler(vp_index, flag_number)``.

A handler returns None (SUCCESS) or an ``HV_STATUS``; it must not block.

Queues [I]: "for each virtual processor ... one queue of message buffers for each SINTx", delivered
in order; a guest message takes one of its port's sixteen buffers until it reaches the SIM slot
("a full port gives INSUFFICIENT_BUFFERS"). A message that meets a busy slot stays queued (the slot
gets MessagePending) and is retried when the guest writes EOM, or when the SynIC becomes able to
take it (SCONTROL/SIMP enabled, SINT unmasked); the call still returns SUCCESS (kvm-unit-tests
``hyperv_connections`` "send message to busy slot"). Messages the host posts use the same queues
with sixteen buffers per (VP, SINT). "Breaking a connection will not affect undelivered (queued)
messages" [I].

HvCallPostMessage (0x005C, memory input only, 256 bytes: u32 ConnectionId, u32 RsvdZ, u32
MessageType, u32 PayloadSize, 240 bytes of payload) and HvCallSignalEvent (0x005D, 8 bytes: u32
ConnectionId, u16 FlagNumber, u16 RsvdZ; fast or memory). Statuses, in the order checked (the
TLFS leaves the order of error conditions open except that ACCESS_DENIED comes first):

1. ACCESS_DENIED: the PostMessages/SignalEvents privilege is not granted -- hv-synic is off (the
   dispatcher answers it, see ``denied_when_off``).
2. INVALID_HYPERCALL_INPUT: a reserved field is not zero (the RsvdZ words, bits 31:24 of the
   ConnectionId; KVM likewise for SignalEvent). Also the dispatcher's, e.g. fast PostMessage.
3. INVALID_CONNECTION_ID: no connection with that id.
4. INVALID_PORT_ID: the id names a connection of the other kind ("not a message/event type
   port").
5. INVALID_PARAMETER: PostMessage with MessageType 0 or with its most significant bit set (those
   types are the hypervisor's), or PayloadSize > 240; SignalEvent with FlagNumber >= the port's flag
   count. (QEMU answers INVALID_HYPERCALL_INPUT for the size; KVM and QEMU refuse any non-zero
   FlagNumber with INVALID_PORT_ID: Linux ``arch/x86/kvm/hyperv.c`` ``kvm_hvcall_signal_event()``,
   QEMU ``hw/hyperv/hyperv.c``. hvvmm follows the TLFS.)
6. INVALID_VP_INDEX: an ``HV_ANY_VP`` port and no VP can take it ("there are no available VPs").
7. INVALID_SYNIC_STATE: the target VP's SynIC or its SIM (SIEF) page is disabled; for SignalEvent
   also a masked SINT ("If the SINTx is masked, HvSignalEvent returns
   HV_STATUS_INVALID_SYNIC_STATE").
8. INSUFFICIENT_BUFFERS: PostMessage while the port's sixteen buffers are all queued.

Then SUCCESS. A SignalEvent whose flag is already set succeeds without an interrupt [I].
"""

from __future__ import annotations

import logging
import struct
import threading
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Union

from hvvmm.enlightenments.synic import (
    check_sint,
    HV_EVENT_FLAGS_COUNT,
    HV_MESSAGE_HEADER_SIZE,
    HV_MESSAGE_PAYLOAD_MAX,
    HVMSG_NONE,
    Delivery,
    VpSynic,
    build_message,
)
from hvvmm.hv.hvdef import HvStatus, HypercallCode
from hvvmm.hv.hypercall import HypercallError, HypercallRequest, HypercallResult, HypercallSpec

if TYPE_CHECKING:
    from hvvmm.enlightenments.synic import SynicState
    from hvvmm.logonce import LogOnce
    from hvvmm.hv.partition import Partition

log = logging.getLogger(__name__)

HV_CONNECTION_ID_MASK = 0x00FF_FFFF  # HV_CONNECTION_ID: 23:0 Id, 31:24 reserved
HV_ANY_VP = 0xFFFF_FFFF
HV_PORT_MESSAGE_BUFFERS = 16  # TLFS: "the hypervisor will allocate sixteen (16) message buffers"
HOST_MESSAGE_BUFFERS = 16  # per (VP, SINT) for messages the host posts
HV_MESSAGE_TYPE_HYPERVISOR_BIT = 1 << 31  # types with the MSB set are the hypervisor's
POST_MESSAGE_INPUT = struct.Struct("<IIII")  # ConnectionId, RsvdZ, MessageType, PayloadSize
POST_MESSAGE_INPUT_SIZE = 16 + HV_MESSAGE_PAYLOAD_MAX  # 256
SIGNAL_EVENT_INPUT = struct.Struct("<IHH")  # ConnectionId, FlagNumber, RsvdZ

MessageHandler = Callable[[int, int, bytes], Union[int, None]]  # (vp, type, payload) -> status
EventHandler = Callable[[int, int], Union[int, None]]  # (vp, flag number) -> status


class ConnectionSetupError(ValueError):
    """A connection cannot be registered as asked (bad id or target, id already in use)."""


class MessageQueueFull(RuntimeError):
    """The host posted more messages to one SINT than it holds while the slot stays busy."""


@dataclass(frozen=True, eq=False)
class MessagePort:
    """Where a message connection leads: SIM slot ``sint`` of ``vp`` or ``handler``."""

    connection_id: int
    vp: int | None = None
    sint: int | None = None
    port_id: int = 0
    handler: MessageHandler | None = None


@dataclass(frozen=True, eq=False)
class EventPort:
    """Where an event connection leads: flags ``base_flag`` .. ``base_flag + flag_count - 1`` of
    SINT ``sint`` of ``vp``, or ``handler``."""

    connection_id: int
    vp: int | None = None
    sint: int | None = None
    base_flag: int = 0
    flag_count: int = 1
    handler: EventHandler | None = None


class _Queued:
    __slots__ = ("message", "owner", "delivered")

    def __init__(self, message: bytes, owner: object):
        self.message = message
        self.owner = owner  # whose buffer it takes: a MessagePort, or ("host", vp, sint)
        self.delivered = False


class Connections:
    """The partition's connection table and per-(VP, SINT) message queues."""

    def __init__(self, synics: "SynicState", log_once: "LogOnce"):
        self._synics = synics
        self._log_once = log_once
        self._lock = threading.Lock()  # table and queues; taken before a VP's SynIC lock
        self._message_ports: dict[int, MessagePort] = {}
        self._event_ports: dict[int, EventPort] = {}
        self._queues: dict[tuple[int, int], deque[_Queued]] = {}
        self._in_use: dict[object, int] = {}
        for vp in synics.vps:
            vp.add_eom_listener(lambda index=vp.vp_index: self.retry(index))

    @property
    def vp_count(self) -> int:
        return len(self._synics.vps)

    # -- registration (host side) ---------------------------------------------------------------

    def register_message_connection(self, connection_id: int, *, vp: int | None = None,
                                    sint: int | None = None,
                                    handler: MessageHandler | None = None,
                                    port_id: int | None = None) -> MessagePort:
        """PostMessage on ``connection_id`` delivers to SIM slot ``sint`` of ``vp`` (or
        ``HV_ANY_VP``), or calls ``handler(vp_index, message_type, payload)``. ``port_id`` is
        the message header's Sender field (default: the connection id)."""
        self._check_id(connection_id)
        self._check_target(vp, sint, handler)
        port = MessagePort(connection_id, vp, sint,
                           connection_id if port_id is None else int(port_id), handler)
        with self._lock:
            if connection_id in self._message_ports:
                raise ConnectionSetupError(f"message connection {connection_id:#x} already "
                                           "exists")
            self._message_ports[connection_id] = port
        return port

    def register_event_connection(self, connection_id: int, *, vp: int | None = None,
                                  sint: int | None = None, flag: int = 0, flag_count: int = 1,
                                  handler: EventHandler | None = None) -> EventPort:
        """SignalEvent on ``connection_id`` with FlagNumber n (< ``flag_count``) sets flag
        ``flag + n`` of SINT ``sint`` on ``vp`` (or ``HV_ANY_VP``), or calls
        ``handler(vp_index, n)``."""
        self._check_id(connection_id)
        self._check_target(vp, sint, handler)
        if not isinstance(flag_count, int) or not 1 <= flag_count <= HV_EVENT_FLAGS_COUNT:
            raise ConnectionSetupError(f"flag count {flag_count!r} outside 1..2048")
        if not isinstance(flag, int) or not 0 <= flag <= HV_EVENT_FLAGS_COUNT - flag_count:
            raise ConnectionSetupError(f"flags {flag!r}+{flag_count} do not fit 0..2047")
        port = EventPort(connection_id, vp, sint, flag, flag_count, handler)
        with self._lock:
            if connection_id in self._event_ports:
                raise ConnectionSetupError(f"event connection {connection_id:#x} already exists")
            self._event_ports[connection_id] = port
        return port

    def unregister_message_connection(self, connection_id: int) -> bool:
        with self._lock:
            return self._message_ports.pop(connection_id, None) is not None

    def unregister_event_connection(self, connection_id: int) -> bool:
        with self._lock:
            return self._event_ports.pop(connection_id, None) is not None

    def unregister_connection(self, connection_id: int) -> bool:
        """Remove the message and the event connection with this id; True if there was one.
        Messages already queued are still delivered [I]."""
        removed_message = self.unregister_message_connection(connection_id)
        return self.unregister_event_connection(connection_id) or removed_message

    def message_connections(self) -> dict[int, MessagePort]:
        with self._lock:
            return dict(self._message_ports)

    def event_connections(self) -> dict[int, EventPort]:
        with self._lock:
            return dict(self._event_ports)

    def _check_id(self, connection_id: int) -> None:
        if not isinstance(connection_id, int) or not 0 <= connection_id <= HV_CONNECTION_ID_MASK:
            raise ConnectionSetupError(f"connection id {connection_id!r} is not a 24-bit value")

    def _check_target(self, vp: int | None, sint: int | None, handler: object) -> None:
        if handler is not None:
            if vp is not None or sint is not None:
                raise ConnectionSetupError("a connection goes to a handler or to a VP and SINT, "
                                           "not both")
            if not callable(handler):
                raise ConnectionSetupError("the handler is not callable")
            return
        if vp is None or sint is None:
            raise ConnectionSetupError("a connection needs a handler, or a VP and a SINT")
        if not isinstance(vp, int) or not (0 <= vp < self.vp_count or vp == HV_ANY_VP):
            raise ConnectionSetupError(f"VP {vp!r} outside 0..{self.vp_count - 1} (or HV_ANY_VP)")
        try:
            check_sint(sint)
        except ValueError as error:
            raise ConnectionSetupError(str(error)) from None

    # -- host-side sending ----------------------------------------------------------------------

    def post_message(self, vp: int, sint: int, message_type: int, payload: bytes = b"", *,
                     sender: int = 0) -> bool:
        """Queue a message from the host for SIM slot ``sint`` of ``vp`` (any non-zero type,
        hypervisor types included). True if it is in the slot now; False if it waits behind a
        busy slot (or a disabled SynIC/SIMP, a masked SINT) and is delivered after the guest's
        EOM. Raises :class:`MessageQueueFull` when sixteen messages already wait there."""
        synic = self._synics.synic(vp)
        message = build_message(message_type, bytes(payload), sender=sender)
        entry = self._enqueue(synic.vp_index, check_sint(sint), message, ("host", vp, sint),
                              HOST_MESSAGE_BUFFERS)
        if entry is None:
            raise MessageQueueFull(f"{HOST_MESSAGE_BUFFERS} host messages already wait for "
                                   f"vp{vp} SINT{sint}")
        return entry.delivered

    def signal_event(self, vp: int, sint: int, flag: int) -> bool:
        """Set event flag ``flag`` of SINT ``sint`` on ``vp`` from the host; True if it was newly
        set (the SINT raised), False if it was already set or the SynIC cannot take it."""
        return self._synics.synic(vp).signal_event(sint, flag)

    def raise_sint(self, vp: int, sint: int) -> bool:
        """Raise SINT ``sint`` of ``vp`` without a message or flag (see
        :meth:`VpSynic.raise_sint`)."""
        return self._synics.synic(vp).raise_sint(sint)

    def queued(self, vp: int, sint: int) -> int:
        """Messages waiting for SIM slot ``sint`` of ``vp``."""
        with self._lock:
            return len(self._queues.get((vp, sint), ()))

    # -- queues ---------------------------------------------------------------------------------

    def _enqueue(self, vp: int, sint: int, message: bytes, owner: object,
                 capacity: int) -> _Queued | None:
        with self._lock:
            if self._in_use.get(owner, 0) >= capacity:
                return None
            entry = _Queued(message, owner)
            self._queues.setdefault((vp, sint), deque()).append(entry)
            self._in_use[owner] = self._in_use.get(owner, 0) + 1
            self._drain_locked(vp, sint)
        return entry

    def _drain_locked(self, vp: int, sint: int) -> None:
        queue = self._queues.get((vp, sint))
        if queue is None:
            return
        synic = self._synics.vps[vp]
        while queue:
            entry = queue[0]
            try:
                outcome = synic.post(sint, entry.message)
            except Exception:  # noqa: BLE001 -- keep the queue; never fail the EOM write
                self._log_once(("message_delivery_failed", vp), logging.ERROR,
                               "vp%d: delivering a queued message to SINT%d failed", vp, sint,
                               exc_info=True)
                return
            if outcome is not Delivery.DONE:
                break  # a busy slot now carries MessagePending: the guest will write EOM
            queue.popleft()
            entry.delivered = True
            left = self._in_use[entry.owner] - 1
            if left:
                self._in_use[entry.owner] = left
            else:
                del self._in_use[entry.owner]
        if not queue:
            del self._queues[(vp, sint)]

    def retry(self, vp: int) -> None:
        """Try every queued message of ``vp`` again (EOM listener, on the VP's thread)."""
        with self._lock:
            for queue_vp, sint in [key for key in self._queues if key[0] == vp]:
                self._drain_locked(queue_vp, sint)

    def reset(self) -> None:
        """VM reset: "All message queues of a virtual processor are empty upon ... reset" [I]. The
        connections (VMM configuration) stay."""
        with self._lock:
            self._queues.clear()
            self._in_use.clear()

    # -- the hypercalls -------------------------------------------------------------------------

    def _resolve(self, vp: int | None, accepts: Callable[[VpSynic], bool]) -> VpSynic | None:
        if vp == HV_ANY_VP:
            return next((synic for synic in self._synics.vps if accepts(synic)), None)
        if vp is None or not 0 <= vp < self.vp_count:
            return None
        return self._synics.vps[vp]

    def _find_port(self, connection: int, reserved: int, ports: dict, other_kind: dict):
        """The port behind ``connection`` in ``ports``, checked in TLFS order: reserved input
        bits, then an id the other kind of port owns (INVALID_PORT_ID), then an unknown id
        (INVALID_CONNECTION_ID)."""
        if reserved or connection & ~HV_CONNECTION_ID_MASK:
            raise HypercallError(HvStatus.HV_STATUS_INVALID_HYPERCALL_INPUT,
                                 message="reserved input bits set")
        with self._lock:
            port = ports.get(connection)
            owned_by_other_kind = connection in other_kind
        if port is None:
            raise HypercallError(HvStatus.HV_STATUS_INVALID_PORT_ID if owned_by_other_kind
                                 else HvStatus.HV_STATUS_INVALID_CONNECTION_ID)
        return port

    def hv_post_message(self, request: HypercallRequest) -> HypercallResult:
        connection, reserved, message_type, payload_size = \
            POST_MESSAGE_INPUT.unpack_from(request.header, 0)
        port = self._find_port(connection, reserved, self._message_ports, self._event_ports)
        if message_type == HVMSG_NONE or message_type & HV_MESSAGE_TYPE_HYPERVISOR_BIT \
                or payload_size > HV_MESSAGE_PAYLOAD_MAX:
            raise HypercallError(HvStatus.HV_STATUS_INVALID_PARAMETER)
        payload = bytes(request.header[HV_MESSAGE_HEADER_SIZE:
                                       HV_MESSAGE_HEADER_SIZE + payload_size])
        if port.handler is not None:
            return _handler_result(port.handler(request.vp_index, message_type, payload))
        synic = self._resolve(port.vp, VpSynic.accepts_messages)
        if synic is None:
            raise HypercallError(HvStatus.HV_STATUS_INVALID_VP_INDEX)
        if not synic.accepts_messages():
            raise HypercallError(HvStatus.HV_STATUS_INVALID_SYNIC_STATE)
        assert port.sint is not None
        message = build_message(message_type, payload, sender=port.port_id)
        if self._enqueue(synic.vp_index, port.sint, message, port,
                         HV_PORT_MESSAGE_BUFFERS) is None:
            raise HypercallError(HvStatus.HV_STATUS_INSUFFICIENT_BUFFERS)
        return HypercallResult()

    def hv_signal_event(self, request: HypercallRequest) -> HypercallResult:
        connection, flag_number, reserved = SIGNAL_EVENT_INPUT.unpack_from(request.header, 0)
        port = self._find_port(connection, reserved, self._event_ports, self._message_ports)
        if flag_number >= port.flag_count:
            raise HypercallError(HvStatus.HV_STATUS_INVALID_PARAMETER)
        if port.handler is not None:
            return _handler_result(port.handler(request.vp_index, flag_number))
        synic = self._resolve(port.vp, VpSynic.accepts_events)
        if synic is None:
            raise HypercallError(HvStatus.HV_STATUS_INVALID_VP_INDEX)
        assert port.sint is not None
        outcome = synic.set_event_flag(port.sint, port.base_flag + flag_number)
        if outcome not in (Delivery.DONE, Delivery.BUSY):  # BUSY: already set, no interrupt
            raise HypercallError(HvStatus.HV_STATUS_INVALID_SYNIC_STATE, message=outcome.value)
        return HypercallResult()


def _handler_result(status: int | None) -> HypercallResult:
    return HypercallResult(status=HvStatus.HV_STATUS_SUCCESS if status is None else int(status))


def register_hypercalls(partition: "Partition", connections: Connections) -> None:
    """Called from hv-synic's ``attach``: the calls belong to its declaration."""
    partition.register_hypercall(HypercallSpec(
        code=HypercallCode.HvCallPostMessage, handler=connections.hv_post_message,
        input_size=POST_MESSAGE_INPUT_SIZE))  # memory only: 256 bytes do not fit registers
    partition.register_hypercall(HypercallSpec(
        code=HypercallCode.HvCallSignalEvent, handler=connections.hv_signal_event,
        input_size=8, fast_allowed=True))  # Linux and Windows use the fast form
