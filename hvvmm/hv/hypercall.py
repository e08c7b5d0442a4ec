"""The hypercall ABI and a table-driven dispatcher (OpenVMM ``hv1_hypercall`` in Python).

How the call trapped is not this module's business: the vCPU layer wraps the calling vCPU in a
:class:`HypercallRegisters` and calls :meth:`HypercallDispatcher.dispatch`. The dispatcher decodes
the calling convention (TLFS ``hypercall-interface.md``), validates the input value and the
parameter lists, reads the input from guest memory or registers, calls the handler registered for
the code in a :class:`HypercallTable`, writes the output, and composes the result value. A handler
never sees registers or guest memory: it gets a :class:`HypercallRequest` and returns a
:class:`HypercallResult` (or raises :class:`HypercallError`).

Validation order (TLFS "Hypercall Interface", Linux ``arch/x86/kvm/hyperv.c`` ``kvm_hv_hypercall()``
and OpenVMM ``vm/hv1/hv1_hypercall/src/support.rs``; the TLFS itself says the order of error
conditions is undefined, apart from preferring ACCESS_DENIED to status that reveals state):

1. Real mode, or CPL != 0 -> inject #UD, no register changes (TLFS "Legal Hypercall Environments").
2. Code not in the table, or its ``available`` is false -> INVALID_HYPERCALL_CODE (TLFS common
   status codes: "The hypercall code is not recognized").
3. ``access_allowed`` false (privilege not granted) -> ACCESS_DENIED (TLFS "Ordering of Error
   Conditions": ACCESS_DENIED is preferred over other errors).
4. A reserved bit of the input value set (31:27 including IsNested, 47:44, 63:60) ->
   INVALID_HYPERCALL_INPUT (TLFS common status codes; Linux ``HV_HYPERCALL_RSVD_MASK``).
5. Shape: rep count or rep start on a simple call, rep count 0 on a rep call, rep start >= rep
   count, a variable header on a call that takes none -> INVALID_HYPERCALL_INPUT (TLFS common status
   codes; TLFS "Variable Sized Hypercall Input Headers").
6. Fast bit on a call without a register form -> INVALID_HYPERCALL_INPUT (TLFS gives no status;
   see :meth:`HypercallDispatcher._check_fast`). Fast input needing XMM registers without
   CPUID 0x40000003 EDX bit 4, or fast output without EDX bit 15 -> #UD (TLFS "XMM Fast Hypercall
   Input/Output"). Then a block larger than the registers -> INVALID_HYPERCALL_INPUT.
7. Memory lists: GPA not 8-byte aligned, list crossing a page boundary, or list not inside guest
   RAM -> INVALID_ALIGNMENT (TLFS common status codes, all three rows). A GPA is ignored when its
   list is empty (TLFS "Alignment Requirements").
8. The handler.

Continuation (TLFS "Hypercall Continuation"; RIP back at the page's first byte): a rep call that
made progress but did not finish (per-entry rep budget, time budget, or the handler stopping early),
or a handler returning ``HV_STATUS_TIME_OUT``, does not complete: the dispatcher writes the input
value with the new rep start index back (RCX, or EDX:EAX in 32-bit mode), leaves the result register
alone and calls :meth:`HypercallRegisters.retry`, so the guest re-executes the call.
"""

from __future__ import annotations

import enum
import logging
import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Iterator, Protocol, Union

from hvvmm.hv.hvdef import (
    HV_HYPERCALL_CODE_MASK,
    HV_HYPERCALL_FAST_BIT,
    HV_HYPERCALL_FAST_PAIR_SIZE,
    HV_HYPERCALL_MAX_FAST_PAIRS,
    HV_HYPERCALL_MAX_REP_COUNT,
    HV_HYPERCALL_MAX_VARHEAD_QWORDS,
    HV_HYPERCALL_NESTED,
    HV_HYPERCALL_PARAM_ALIGN,
    HV_HYPERCALL_REP_COMP_MASK,
    HV_HYPERCALL_REP_COMP_OFFSET,
    HV_HYPERCALL_REP_START_MASK,
    HV_HYPERCALL_REP_START_OFFSET,
    HV_HYPERCALL_RESULT_MASK,
    HV_HYPERCALL_RSVD_MASK,
    HV_HYPERCALL_VARHEAD_MASK,
    HV_HYPERCALL_VARHEAD_OFFSET,
    HV_PAGE_SIZE,
    HV_U64_MASK,
    HypercallCode,
    HvStatus,
    hypercall_name,
    status_name,
)
from hvvmm.logonce import LogOnce
from hvvmm.memory import GuestMemoryError

if TYPE_CHECKING:
    from hvvmm.memory import GuestMemory

log = logging.getLogger(__name__)

_U32 = 0xFFFF_FFFF
_XMM_MASK = (1 << 128) - 1
_NAMED_CODES = frozenset(int(code) for code in HypercallCode)
# Input-value bits that take a call off HypercallDispatcher.dispatch_simple: variable header size,
# rep count, rep start and the reserved bits (everything but the code and the fast bit).
NOT_SIMPLE_CONTROL_BITS = HV_U64_MASK & ~(HV_HYPERCALL_CODE_MASK | HV_HYPERCALL_FAST_BIT)

# --------------------------------------------------------------------------------------------
# Input value and result value
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HypercallInput:
    """The 64-bit hypercall input value ("control"), TLFS "Hypercall Inputs".

    ``reserved`` holds the raw bits of :data:`HV_HYPERCALL_RSVD_MASK` (which includes IsNested,
    bit 31) so that ``HypercallInput.from_value(v).to_value() == v`` for every 64-bit ``v``.
    """

    code: int
    fast: bool = False
    variable_header_size: int = 0  # QWORDs
    rep_count: int = 0
    rep_start: int = 0
    reserved: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.code <= HV_HYPERCALL_CODE_MASK:
            raise ValueError(f"hypercall code {self.code!r} out of range")
        if not 0 <= self.variable_header_size <= HV_HYPERCALL_MAX_VARHEAD_QWORDS:
            raise ValueError(f"variable header size {self.variable_header_size!r} out of range")
        if not 0 <= self.rep_count <= HV_HYPERCALL_MAX_REP_COUNT:
            raise ValueError(f"rep count {self.rep_count!r} out of range")
        if not 0 <= self.rep_start <= HV_HYPERCALL_MAX_REP_COUNT:
            raise ValueError(f"rep start {self.rep_start!r} out of range")
        if self.reserved & ~HV_HYPERCALL_RSVD_MASK:
            raise ValueError(f"reserved {self.reserved:#x} has non-reserved bits")

    @classmethod
    def from_value(cls, value: int) -> "HypercallInput":
        """Decode any int (masked to 64 bits); never raises."""
        value &= HV_U64_MASK
        return cls(
            code=value & HV_HYPERCALL_CODE_MASK,
            fast=bool(value & HV_HYPERCALL_FAST_BIT),
            variable_header_size=(value & HV_HYPERCALL_VARHEAD_MASK) >> HV_HYPERCALL_VARHEAD_OFFSET,
            rep_count=(value & HV_HYPERCALL_REP_COMP_MASK) >> HV_HYPERCALL_REP_COMP_OFFSET,
            rep_start=(value & HV_HYPERCALL_REP_START_MASK) >> HV_HYPERCALL_REP_START_OFFSET,
            reserved=value & HV_HYPERCALL_RSVD_MASK,
        )

    def to_value(self) -> int:
        """Compose the 64-bit input value."""
        return (self.code
                | (HV_HYPERCALL_FAST_BIT if self.fast else 0)
                | (self.variable_header_size << HV_HYPERCALL_VARHEAD_OFFSET)
                | (self.rep_count << HV_HYPERCALL_REP_COMP_OFFSET)
                | (self.rep_start << HV_HYPERCALL_REP_START_OFFSET)
                | self.reserved)

    @property
    def is_nested(self) -> bool:
        """Bit 31 (TLFS "Is Nested"). hvvmm is not a nested hypervisor: treated as reserved."""
        return bool(self.reserved & HV_HYPERCALL_NESTED)

    @property
    def has_reserved_bits(self) -> bool:
        return self.reserved != 0

    def with_rep_start(self, rep_start: int) -> "HypercallInput":
        return replace(self, rep_start=rep_start)


def compose_result(status: int, reps_completed: int = 0) -> int:
    """The 64-bit hypercall result value: status in 15:0, total reps completed in 43:32."""
    return ((status & HV_HYPERCALL_RESULT_MASK)
            | ((reps_completed << HV_HYPERCALL_REP_COMP_OFFSET) & HV_HYPERCALL_REP_COMP_MASK))


def decode_result(value: int) -> tuple[int, int]:
    """``(status, reps_completed)`` of a result value; the ignored bits are dropped."""
    return (value & HV_HYPERCALL_RESULT_MASK,
            (value & HV_HYPERCALL_REP_COMP_MASK) >> HV_HYPERCALL_REP_COMP_OFFSET)


# --------------------------------------------------------------------------------------------
# The caller, as the dispatcher sees it
# --------------------------------------------------------------------------------------------


class HypercallRegisters(Protocol):
    """The calling vCPU. Implemented by the vCPU layer over KVM_GET/SET_REGS, SREGS and XSAVE.

    GPR names are the 64-bit ones the conventions use: ``"rax"``, ``"rbx"``, ``"rcx"``,
    ``"rdx"``, ``"rsi"``, ``"rdi"``, ``"r8"``. In the 32-bit convention the dispatcher reads the
    low 32 bits and writes zero-extended 32-bit values. The 64-bit convention applies iff
    :meth:`is_long_mode` (EFER.LMA && CS.L); otherwise the 32-bit one (TLFS).

    ``get_xmm``/``set_xmm`` (128-bit ints, XMM0 = 0 .. XMM5 = 5) are called only for XMM fast
    input/output, so an ordinary call never needs the XSAVE area.

    :meth:`retry` means "return to the guest with RIP at the start of the hypercall page so it
    re-executes the call" (TLFS "Hypercall Continuation"). On completion the dispatcher never
    touches RIP: KVM skips the OUT only if RIP is unchanged (Linux ``arch/x86/kvm/x86.c``
    ``complete_fast_pio_out()``).
    """

    def is_long_mode(self) -> bool: ...

    def is_protected_mode(self) -> bool: ...

    def cpl(self) -> int: ...

    def get_gpr(self, name: str) -> int: ...

    def set_gpr(self, name: str, value: int) -> None: ...

    def get_xmm(self, index: int) -> int: ...

    def set_xmm(self, index: int, value: int) -> None: ...

    def retry(self) -> None: ...


# --------------------------------------------------------------------------------------------
# Handler interface
# --------------------------------------------------------------------------------------------


class HypercallError(Exception):
    """Raised by a handler to return ``status``. For rep calls, ``reps_completed`` and ``output``
    mean what they mean in :class:`HypercallResult` (the output elements of the reps completed
    before the error are still written)."""

    def __init__(self, status: int, reps_completed: int | None = None, output: bytes = b"",
                 message: str = ""):
        self.status = int(status)
        self.reps_completed = reps_completed
        self.output = output
        super().__init__(message or status_name(self.status))


@dataclass(frozen=True)
class HypercallResult:
    """What a handler returns.

    * Simple call: ``output`` is at most ``output_size`` bytes (zero-padded); written only on
      success. ``status = HV_STATUS_TIME_OUT`` asks for a continuation (the call is re-executed).
    * Rep call: ``reps_completed`` is absolute (from the start of the list, as in the result value);
      ``None`` means "what :meth:`HypercallRequest.rep_inputs` handed out and got back".
      ``output`` is the concatenated output elements ``rep_start .. reps_completed - 1``; they are
      written whatever the status. SUCCESS with ``reps_completed < rep_count`` continues the call.
    """

    status: int = HvStatus.HV_STATUS_SUCCESS
    output: bytes = b""
    reps_completed: int | None = None


HandlerReturn = Union[HypercallResult, None]
Handler = Callable[["HypercallRequest"], HandlerReturn]
# One entry of HypercallDispatcher.simple_calls: (io, long_mode, first, second) -> status.
PreparedSimpleCall = Callable[["HypercallRegisters", bool, int, int], Union[int, None]]
# What a PreparedSimpleCall returns for a call that succeeded, its result left to the caller
# (statuses are 16 bits: this is none of them).
SUCCESS_NOT_WRITTEN = 1 << 16


def write_success_result(io: "HypercallRegisters", long_mode: bool) -> None:
    """The result value of a simple call that succeeded: HV_STATUS_SUCCESS, no reps, which is 0
    in RAX, or in EDX:EAX (TLFS "Hypercall Outputs")."""
    if long_mode:
        io.set_gpr("rax", 0)
    else:
        io.set_gpr("rdx", 0)
        io.set_gpr("rax", 0)


class HypercallRequest:
    """One entry into a handler. Input only; the handler returns its output.

    ``header`` is the fixed header (``spec.input_size`` bytes), ``variable_header`` the
    variable header (8 x variable-header-size bytes). For rep calls the elements
    ``0 .. rep_count - 1`` are readable with :meth:`rep_input`; this entry should process
    ``rep_start .. rep_end - 1`` (``rep_end`` applies the dispatcher's per-entry rep budget) and
    may stop earlier once :meth:`budget_exhausted` is true. :meth:`rep_inputs` does both.

    A request is valid for the handler call it is handed to: the compact path hands the same
    object to the next simple call of that code on that VP (no allocation per call), so a
    handler that needs the input later keeps ``header``, not the request.
    """

    __slots__ = ("vp_index", "code", "name", "fast", "long_mode", "header", "variable_header",
                 "rep_count", "rep_start", "rep_end", "rep_input_size", "rep_output_size",
                 "deadline", "progress", "_rep_data", "_clock")

    def __init__(self, *, vp_index: int, code: int, name: str, fast: bool, long_mode: bool,
                 header: bytes, variable_header: bytes = b"", rep_count: int = 0,
                 rep_start: int = 0, rep_end: int = 0, rep_input_size: int = 0,
                 rep_output_size: int = 0, rep_data: bytes = b"", deadline: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.vp_index = vp_index
        self.code = code
        self.name = name
        self.fast = fast
        self.long_mode = long_mode
        self.header = header
        self.variable_header = variable_header
        self.rep_count = rep_count
        self.rep_start = rep_start
        self.rep_end = rep_end
        self.rep_input_size = rep_input_size
        self.rep_output_size = rep_output_size
        self.deadline = deadline
        self.progress = rep_start  # absolute index of the next rep not yet completed
        self._rep_data = rep_data
        self._clock = clock

    @property
    def input(self) -> bytes:
        """Fixed header followed by the variable header."""
        return self.header + self.variable_header

    def rep_input(self, index: int) -> bytes:
        """Input element ``index`` (0 .. rep_count - 1); empty for calls without input elements."""
        if not 0 <= index < self.rep_count:
            raise IndexError(f"rep index {index} outside 0..{self.rep_count - 1}")
        size = self.rep_input_size
        return self._rep_data[index * size:(index + 1) * size]

    def budget_exhausted(self) -> bool:
        """True once this entry's time budget is spent (never without a budget)."""
        return self.deadline is not None and self._clock() >= self.deadline

    def rep_inputs(self) -> Iterator[tuple[int, bytes]]:
        """Yield ``(index, element)`` from ``progress`` up to ``rep_end``; stop early when the
        time budget is spent (after at least one element: TLFS guarantees at least one rep
        attempt). An element counts as completed when the handler asks for the next one, so a
        handler that returns or raises inside the loop has completed the elements before it."""
        first = True
        while self.progress < self.rep_end:
            if not first and self.budget_exhausted():
                return
            first = False
            index = self.progress
            yield index, self.rep_input(index)
            self.progress = index + 1

    def __repr__(self) -> str:
        reps = f" reps {self.rep_start}..{self.rep_end}/{self.rep_count}" if self.rep_count else ""
        return (f"<HypercallRequest vp{self.vp_index} {self.name}({self.code:#06x})"
                f"{' fast' if self.fast else ''}{reps} header={len(self.header)}B"
                f" var={len(self.variable_header)}B>")


class HypercallKind(enum.Enum):
    SIMPLE = "simple"
    REP = "rep"


def _flag(value: bool | Callable[[], bool]) -> bool:
    return bool(value()) if callable(value) else bool(value)


@dataclass(frozen=True, kw_only=True)
class HypercallSpec:
    """Declarative description of one hypercall (OpenVMM ``HypercallData`` plus policy).

    Sizes are in bytes. ``input_size`` is the fixed input header; a variable header, when
    ``variable_header_allowed``, follows it; rep input elements follow the headers. Simple calls
    have ``output_size`` bytes of output; rep calls have ``rep_output_size`` bytes per element.

    ``fast_allowed``: the register ("fast") form is accepted. ``xmm_fast_allowed``: with it, a fast
    input larger than 16 bytes may use XMM0-5 (needs the dispatcher's ``xmm_fast_input``).
    ``available`` (flag or callable): the call exists for this VM; false -> INVALID_HYPERCALL_CODE.
    ``access_allowed`` (flag or callable): the privilege is granted; false -> ACCESS_DENIED.
    """

    code: int
    handler: Handler
    name: str = ""
    kind: HypercallKind = HypercallKind.SIMPLE
    input_size: int = 0
    output_size: int = 0
    rep_input_size: int = 0
    rep_output_size: int = 0
    fast_allowed: bool = False
    xmm_fast_allowed: bool = True
    variable_header_allowed: bool = False
    available: bool | Callable[[], bool] = True
    access_allowed: bool | Callable[[], bool] = True

    def __post_init__(self) -> None:
        if not 0 <= self.code <= HV_HYPERCALL_CODE_MASK:
            raise ValueError(f"hypercall code {self.code!r} out of range")
        if not self.name:
            object.__setattr__(self, "name", hypercall_name(self.code))
        if min(self.input_size, self.output_size, self.rep_input_size, self.rep_output_size) < 0:
            raise ValueError(f"{self.name}: negative size")
        if self.input_size % 8 or self.output_size % 8:
            # TLFS: input and output structures are padded to a multiple of 8 bytes.
            raise ValueError(f"{self.name}: header sizes must be multiples of 8")
        if self.input_size > HV_PAGE_SIZE or self.output_size > HV_PAGE_SIZE:
            raise ValueError(f"{self.name}: a header larger than a page")
        if self.kind is HypercallKind.SIMPLE:
            if self.rep_input_size or self.rep_output_size:
                raise ValueError(f"{self.name}: a simple call has no rep elements")
        elif self.kind is HypercallKind.REP:
            if self.output_size:
                raise ValueError(f"{self.name}: a rep call has no fixed output (TLFS)")
            if not (self.rep_input_size or self.rep_output_size):
                raise ValueError(f"{self.name}: a rep call needs input or output elements")
        else:
            raise ValueError(f"{self.name}: bad kind {self.kind!r}")
        if not callable(self.handler):
            raise ValueError(f"{self.name}: handler is not callable")
        # Prepared once, for HypercallDispatcher.dispatch_simple (not a field: a derived cache).
        object.__setattr__(self, "simple_entry", _simple_entry(self))

    @property
    def is_rep(self) -> bool:
        return self.kind is HypercallKind.REP

    def is_available(self) -> bool:
        return _flag(self.available)

    def is_access_allowed(self) -> bool:
        return _flag(self.access_allowed)


class HypercallTableError(ValueError):
    pass


def _simple_entry(spec: HypercallSpec) -> tuple | None:
    """What :meth:`HypercallDispatcher.dispatch_simple` needs of ``spec``, prepared when the
    spec is built (the spec stays the one source): ``(handler, name, input_size, output_size,
    fast_ok, available, access_allowed)``, a tuple because it is unpacked on every call.
    ``fast_ok``: the register form without XMM registers (input in RDX:R8 at most, no output).
    ``available``/``access_allowed``: the callable to ask on every call, or None for a constant
    true flag. None for a rep call and for a code the dispatcher always rejects (constant false
    flag): those take the general path."""
    if spec.is_rep or not callable(spec.available) and not spec.available \
            or not callable(spec.access_allowed) and not spec.access_allowed:
        return None
    return (spec.handler, spec.name, spec.input_size, spec.output_size,
            spec.fast_allowed and spec.output_size == 0
            and spec.input_size <= HV_HYPERCALL_FAST_PAIR_SIZE,
            spec.available if callable(spec.available) else None,
            spec.access_allowed if callable(spec.access_allowed) else None)


class HypercallTable:
    """Call code -> :class:`HypercallSpec`. Each code is registered once."""

    def __init__(self, specs: tuple[HypercallSpec, ...] | list[HypercallSpec] = ()):
        self._specs: dict[int, HypercallSpec] = {}
        # Emptied whenever a code is registered: what dispatchers prepared from the table.
        self._derived: list[dict] = []
        for spec in specs:
            self.register(spec)

    def register(self, spec: HypercallSpec) -> HypercallSpec:
        other = self._specs.get(spec.code)
        if other is not None:
            raise HypercallTableError(f"hypercall {spec.code:#06x} ({spec.name}) is already "
                                      f"registered as {other.name}")
        self._specs[spec.code] = spec
        for derived in self._derived:
            derived.clear()
        return spec

    def get(self, code: int) -> HypercallSpec | None:
        return self._specs.get(code)

    def __contains__(self, code: object) -> bool:
        return code in self._specs

    def __iter__(self) -> Iterator[HypercallSpec]:
        return iter(sorted(self._specs.values(), key=lambda spec: spec.code))

    def __len__(self) -> int:
        return len(self._specs)


# --------------------------------------------------------------------------------------------
# Outcome
# --------------------------------------------------------------------------------------------


class HypercallOutcome:
    """What one :meth:`HypercallDispatcher.dispatch` did, for the vCPU layer and ``--trace``.

    ``inject_ud``: the caller must inject #UD (no register was changed). ``retried``: the call was
    continued (input value rewritten, :meth:`HypercallRegisters.retry` called, no result written).
    Otherwise ``status``/``result_value`` were written to RAX (EDX:EAX).

    One object per call, filled in as the dispatcher goes (the dispatcher's working state lives in
    the underscored slots): a hypercall is a hot path, so it allocates as little as it can.
    """

    __slots__ = ("vp_index", "control", "code", "name", "long_mode", "fast", "rep_count",
                 "rep_start", "input_gpa", "output_gpa", "status", "reps_completed",
                 "result_value", "retried", "inject_ud", "reason",
                 "_io", "_spec", "_variable_header_size", "_reserved", "_input_len",
                 "_output_len", "_input_pairs")

    def __init__(self, vp_index: int, control: int, long_mode: bool,
                 io: "HypercallRegisters | None" = None):
        control &= HV_U64_MASK
        self.vp_index = vp_index
        self.control = control
        self.long_mode = long_mode
        self.code = control & HV_HYPERCALL_CODE_MASK
        self.name = ""
        self.fast = bool(control & HV_HYPERCALL_FAST_BIT)
        self.rep_count = (control & HV_HYPERCALL_REP_COMP_MASK) >> HV_HYPERCALL_REP_COMP_OFFSET
        self.rep_start = (control & HV_HYPERCALL_REP_START_MASK) >> HV_HYPERCALL_REP_START_OFFSET
        self.input_gpa: int | None = None
        self.output_gpa: int | None = None
        self.status: int | None = None
        self.reps_completed = 0
        self.result_value: int | None = None
        self.retried = False
        self.inject_ud = False
        self.reason = ""  # why the call was rejected (empty when the handler ran and succeeded)
        self._io = io
        self._spec: "HypercallSpec | None" = None
        self._variable_header_size = ((control & HV_HYPERCALL_VARHEAD_MASK)
                                      >> HV_HYPERCALL_VARHEAD_OFFSET)
        self._reserved = control & HV_HYPERCALL_RSVD_MASK
        self._input_len = 0
        self._output_len = 0
        self._input_pairs = 0

    @property
    def completed(self) -> bool:
        """A result value was written (neither #UD nor continuation)."""
        return self.status is not None

    @property
    def status_name(self) -> str:
        return "-" if self.status is None else status_name(self.status)

    def __repr__(self) -> str:
        return f"<HypercallOutcome {self}>"

    def __str__(self) -> str:
        parts = [f"vp{self.vp_index} {self.name}({self.code:#06x})",
                 "x64" if self.long_mode else "x86"]
        if self.fast:
            parts.append("fast")
        if self._variable_header_size:
            parts.append(f"var={self._variable_header_size}")
        if self.rep_count or self.rep_start:
            parts.append(f"rep {self.rep_start}/{self.rep_count}")
        if self.input_gpa is not None:
            parts.append(f"in={self.input_gpa:#x}")
        if self.output_gpa is not None:
            parts.append(f"out={self.output_gpa:#x}")
        if self.inject_ud:
            parts.append("-> #UD")
        elif self.retried:
            parts.append(f"-> continue at rep {self.reps_completed}")
        else:
            parts.append(f"-> {self.status_name}")
            if self.rep_count:
                parts.append(f"reps={self.reps_completed}")
        if self.reason:
            parts.append(f"({self.reason})")
        return " ".join(parts)




# --------------------------------------------------------------------------------------------
# Dispatcher
# --------------------------------------------------------------------------------------------


class _Reject(Exception):
    """Internal: stop validation with ``status`` (or #UD when ``status`` is None)."""

    def __init__(self, status: int | None, reason: str):
        self.status = status
        self.reason = reason
        super().__init__(reason)


class _HandlerBug(Exception):
    """Internal: a handler returned something inconsistent with its spec."""


class SimpleCalls(dict):
    """Input value -> the prepared compact path of one VP
    (:meth:`HypercallDispatcher.simple_calls`), filled on first use. Only registered codes are
    kept (bounded by the table, not by what the guest tries); emptied when the table changes."""

    def __init__(self, dispatcher: "HypercallDispatcher", vp_index: int, tally: Counter | None):
        super().__init__()
        self._dispatcher = dispatcher
        self._vp_index = vp_index
        self._tally = tally
        # Successes are counted in one-int cells, not in ``tally`` (a Counter with tuple keys
        # costs several times more per call): (counter key, cell) of each prepared call.
        self._successes: list[tuple[tuple[int, int], list[int]]] = []
        dispatcher.table._derived.append(self)

    def __missing__(self, control: int) -> PreparedSimpleCall | None:
        dispatcher = self._dispatcher
        call = dispatcher._prepare_simple(control, self._vp_index, self._tally, self)
        if (control & HV_HYPERCALL_CODE_MASK) in dispatcher.table:
            self[control] = call
        return call

    def success_cell(self, key: tuple[int, int]) -> list[int]:
        """A new cell counting the successes ``tally`` would count under ``key``."""
        cell = [0]
        if self._tally is not None:
            self._successes.append((key, cell))
        return cell

    def pending_counts(self) -> Counter:
        """The successes counted in cells, by ``tally`` key: add them to ``tally``. The cells
        of calls dropped by a table change stay here (one per code and change), so a call
        in flight during the change is never lost."""
        counts: Counter = Counter()
        for key, cell in list(self._successes):
            counts[key] += cell[0]
        return +counts


class HypercallDispatcher:
    """Decode, validate and dispatch one hypercall per :meth:`dispatch` call.

    ``xmm_fast_input`` / ``xmm_fast_output`` mirror CPUID 0x40000003 EDX bits 4 / 15.
    ``max_reps_per_entry`` and ``time_budget`` (seconds) bound one entry of a rep call; when a
    call makes progress but does not finish, it is continued (TLFS: "the hypervisor attempts to
    limit hypercall execution to 50us"). ``None`` means unbounded. ``log_once`` is the
    partition's rate limiter for guest-triggered log lines.
    """

    def __init__(self, table: HypercallTable, memory: "GuestMemory", *,
                 xmm_fast_input: bool = False, xmm_fast_output: bool = False,
                 max_reps_per_entry: int | None = None, time_budget: float | None = None,
                 log_once: LogOnce | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if max_reps_per_entry is not None and max_reps_per_entry < 1:
            raise ValueError("max_reps_per_entry must be at least 1")
        if time_budget is not None and time_budget <= 0:
            raise ValueError("time_budget must be positive")
        self.table = table
        self.memory = memory
        self.xmm_fast_input = xmm_fast_input
        self.xmm_fast_output = xmm_fast_output
        self.max_reps_per_entry = max_reps_per_entry
        self.time_budget = time_budget
        self._clock = clock
        self._spec_of = table._specs.get
        self._uncounted: dict[int, SimpleCalls] = {}  # dispatch_simple's, by VP
        # The guest picks the codes: logging once per code must not grow without bound.
        self._log_once = log_once if log_once is not None else LogOnce(log)

    # -- public -------------------------------------------------------------------------------

    def dispatch(self, io: HypercallRegisters, vp_index: int) -> HypercallOutcome:
        """Handle the hypercall the vCPU behind ``io`` is making. Never raises for guest input."""
        long_mode = bool(io.is_long_mode())
        call = HypercallOutcome(vp_index, self._read_control(io, long_mode), long_mode, io)
        try:
            if not io.is_protected_mode():
                raise _Reject(None, "real mode")
            cpl = io.cpl()
            if cpl != 0:
                raise _Reject(None, f"CPL {cpl}")
            outcome = self._dispatch_checked(call)
        except _Reject as reject:
            if reject.status is None:
                log.debug("vp%d %s: #UD (%s)", vp_index, hypercall_name(call.code),
                          reject.reason)
                call.inject_ud = True
                call.reason = reject.reason
            else:
                log.debug("vp%d %s: %s (%s)", vp_index, hypercall_name(call.code),
                          status_name(reject.status), reject.reason)
                # Nothing ran: reps completed 0, as KVM and OpenVMM report for rejected calls.
                self._complete(call, reject.status, 0, reject.reason)
            outcome = call
        if not call.name:
            call.name = call._spec.name if call._spec is not None else hypercall_name(call.code)
        call._io = None  # do not keep the vCPU's registers alive through the outcome
        return outcome

    def dispatch_simple(self, io: HypercallRegisters, vp_index: int, long_mode: bool,
                        control: int, first: int, second: int) -> int | None:
        """The compact path for the common shape: a simple call (no rep fields, no variable
        header, no reserved bits) that is available and allowed, either memory-based with its
        lists valid, or fast with its input in the first register pair and no output. Returns
        the status written as the result, or -1 when the handler asked for a continuation; None
        when the call does not have that shape, and then nothing was read or written: call
        :meth:`dispatch`, which answers it (and every rejection) the general way.

        The caller has done the checks that come before the code (protected mode, CPL 0; TLFS
        "Legal Hypercall Environments") and read the convention's registers: ``control`` is the
        input value (RCX, or EDX:EAX), ``first``/``second`` the input/output GPAs or the fast
        register pair (RDX/R8, or EBX:ECX/EDI:ESI). Everything the handler sees and everything
        written back is what :meth:`dispatch` would do; ``tests/unit/test_hypercall_simple.py``
        checks the two against each other."""
        if control & NOT_SIMPLE_CONTROL_BITS:
            return None
        calls = self._uncounted.get(vp_index)
        if calls is None:
            calls = self._uncounted[vp_index] = self.simple_calls(vp_index, None)
        call = calls[control]
        if call is None:
            return None
        status = call(io, long_mode, first, second)
        if status == SUCCESS_NOT_WRITTEN:
            write_success_result(io, long_mode)
            return HvStatus.HV_STATUS_SUCCESS
        return status

    def simple_calls(self, vp_index: int, tally: Counter | None) -> SimpleCalls:
        """The compact path of :meth:`dispatch_simple` for VP ``vp_index``, prepared per input
        value on first use: ``calls[control]`` (a call code and the fast bit, nothing else: the
        caller checked) is None when such calls never take it, else
        ``call(io, long_mode, first, second)``, which answers as :meth:`dispatch_simple` does,
        except that for a call that succeeded without the general completion it writes no
        result and returns :data:`SUCCESS_NOT_WRITTEN`: the caller writes it
        (:func:`write_success_result`, or the VMM's own faster way). Each call it answers is
        counted for ``tally`` (if given) under ``(code, status)``, ``(code, None)`` for a
        continuation, as :class:`~hvvmm.hv.partition.Partition` counts them: failures in
        ``tally`` itself, successes in :meth:`SimpleCalls.pending_counts`.

        The calls are derived from the table (the one source) and dropped when it changes. A
        call reuses one :class:`HypercallRequest` (no allocation per call: see there)."""
        return SimpleCalls(self, vp_index, tally)

    def _prepare_simple(self, control: int, vp_index: int, tally: Counter | None,
                        calls: SimpleCalls) -> PreparedSimpleCall | None:
        """One compact path: for ``control`` on VP ``vp_index``, everything it needs bound
        once."""
        code = control & HV_HYPERCALL_CODE_MASK
        spec = self._spec_of(code)
        if spec is None or spec.simple_entry is None:
            return None
        handler, name, input_size, output_size, fast_ok, available, access_allowed = \
            spec.simple_entry
        fast = bool(control & HV_HYPERCALL_FAST_BIT)
        if fast and not fast_ok:
            return None
        memory = self.memory
        contains, read, write = memory.contains, memory.read, memory.write
        # Lists inside the RAM at GPA 0 (every one, on a PC layout) are checked and copied
        # here; anything else through the bounds-checked GuestMemory calls.
        low_ram, low_end = memory.window_at_zero()
        time_budget, clock = self.time_budget, self._clock
        finish_general = self._finish_simple_general
        # Both powers of two: masks, which the lists' GPAs (u64, never negative) are tested with.
        page, align_mask, page_mask = HV_PAGE_SIZE, HV_HYPERCALL_PARAM_ALIGN - 1, HV_PAGE_SIZE - 1
        request = HypercallRequest(vp_index=vp_index, code=code, name=name, fast=fast,
                                   long_mode=False, header=b"", clock=clock)
        successes = calls.success_cell((code, HvStatus.HV_STATUS_SUCCESS))

        def call(io: HypercallRegisters, long_mode: bool, first: int,
                 second: int) -> int | None:
            if available is not None and not available():
                return None
            if access_allowed is not None and not access_allowed():
                return None
            if fast:
                header = ((first & HV_U64_MASK) | (second & HV_U64_MASK) << 64).to_bytes(
                    16, "little")[:input_size] if input_size else b""
            else:
                # TLFS "Alignment Requirements": aligned, inside one page, inside RAM.
                if input_size:
                    if first & align_mask or (first & page_mask) + input_size > page:
                        return None
                    if first + input_size <= low_end:
                        header = bytes(low_ram[first:first + input_size])
                    elif contains(first, input_size):
                        header = read(first, input_size)
                    else:
                        return None
                else:
                    header = b""
                if output_size and (second & align_mask
                                    or (second & page_mask) + output_size > page
                                    or second + output_size > low_end
                                    and not contains(second, output_size)):
                    return None
            request.long_mode = long_mode
            request.header = header
            if time_budget is not None:
                request.deadline = clock() + time_budget
            try:
                result = handler(request)
            except HypercallError as error:
                result = HypercallResult(status=error.status, output=error.output,
                                         reps_completed=error.reps_completed)
            except Exception:  # noqa: BLE001 -- a handler bug must not take the VMM down
                return self._simple_outcome_status(self._handler_failed(self._simple_outcome(
                    io, vp_index, long_mode, control, first, second, spec)), tally)
            if result is None:
                output = b""
            elif type(result) is HypercallResult and not result.reps_completed:
                output = result.output
                if result.status or type(output) is not bytes or len(output) > output_size:
                    # A failure status (or an odd one, or a handler bug): the general completion.
                    return finish_general(io, vp_index, long_mode, control, first, second, spec,
                                          request, result, tally)
            else:
                return finish_general(io, vp_index, long_mode, control, first, second, spec,
                                      request, result, tally)
            if output_size:  # never on a fast call here (fast_ok: no output)
                # TLFS: output is valid only on success; padding may be overwritten with zeros.
                if len(output) < output_size:
                    output = output.ljust(output_size, b"\0")
                try:
                    if second + output_size <= low_end:
                        low_ram[second:second + output_size] = output
                    else:
                        write(second, output)
                except GuestMemoryError:  # RAM went away meanwhile: the general completion
                    return finish_general(io, vp_index, long_mode, control, first, second, spec,
                                          request, result, tally)
            successes[0] += 1
            return SUCCESS_NOT_WRITTEN

        return call

    def _simple_outcome(self, io: HypercallRegisters, vp_index: int, long_mode: bool,
                        control: int, first: int, second: int,
                        spec: HypercallSpec) -> HypercallOutcome:
        """The outcome :meth:`dispatch` would have built up to the handler, for the rare
        completions :meth:`dispatch_simple` leaves to the general code."""
        call = HypercallOutcome(vp_index, control, long_mode, io)
        call._spec = spec
        call.name = spec.name
        call._input_len = spec.input_size
        call._output_len = spec.output_size
        if call.fast:
            call._input_pairs = -(-spec.input_size // HV_HYPERCALL_FAST_PAIR_SIZE)
        else:
            call.input_gpa, call.output_gpa = first & HV_U64_MASK, second & HV_U64_MASK
        return call

    @staticmethod
    def _simple_outcome_status(call: HypercallOutcome, tally: Counter | None) -> int:
        """The status a compact call that ended in the general completion returns (-1: it was
        continued), counted in ``tally`` as Partition counts it."""
        call._io = None
        status = -1 if call.status is None else call.status
        if tally is not None:
            tally[(call.code, None if status < 0 else status)] += 1
        return status

    def _finish_simple_general(self, io: HypercallRegisters, vp_index: int, long_mode: bool,
                               control: int, first: int, second: int, spec: HypercallSpec,
                               request: HypercallRequest, result: HandlerReturn,
                               tally: Counter | None = None) -> int:
        call = self._simple_outcome(io, vp_index, long_mode, control, first, second, spec)
        try:
            try:
                self._finish(call, request, result)
            except _Reject:
                raise
            except Exception:  # noqa: BLE001 -- as in _run_handler
                self._handler_failed(call)
        except _Reject as reject:  # as in dispatch (only an output write can raise it here)
            log.debug("vp%d %s: %s (%s)", vp_index, hypercall_name(call.code),
                      status_name(reject.status), reject.reason)
            self._complete(call, reject.status, 0, reject.reason)
        return self._simple_outcome_status(call, tally)

    # -- decoding -----------------------------------------------------------------------------

    @staticmethod
    def _read_control(io: HypercallRegisters, long_mode: bool) -> int:
        if long_mode:
            return io.get_gpr("rcx") & HV_U64_MASK
        return ((io.get_gpr("rdx") & _U32) << 32) | (io.get_gpr("rax") & _U32)

    @staticmethod
    def _read_gpas(io: HypercallRegisters, long_mode: bool) -> tuple[int, int]:
        if long_mode:
            return io.get_gpr("rdx") & HV_U64_MASK, io.get_gpr("r8") & HV_U64_MASK
        return (((io.get_gpr("rbx") & _U32) << 32) | (io.get_gpr("rcx") & _U32),
                ((io.get_gpr("rdi") & _U32) << 32) | (io.get_gpr("rsi") & _U32))

    @staticmethod
    def _write_pair64(io: HypercallRegisters, long_mode: bool, high: str, low: str,
                      name64: str, value: int) -> None:
        if long_mode:
            io.set_gpr(name64, value & HV_U64_MASK)
        else:
            io.set_gpr(high, (value >> 32) & _U32)
            io.set_gpr(low, value & _U32)

    def _write_result(self, call: HypercallOutcome, value: int) -> None:
        # x64: RAX; x86: EDX:EAX (TLFS "Hypercall Outputs").
        self._write_pair64(call._io, call.long_mode, "rdx", "rax", "rax", value)

    def _write_control(self, call: HypercallOutcome, value: int) -> None:
        # x64: RCX; x86: EDX:EAX (TLFS "Volatile Registers": rep calls rewrite the input value).
        self._write_pair64(call._io, call.long_mode, "rdx", "rax", "rcx", value)

    # Fast register block: pair 0 = (RDX, R8) or (EBX:ECX, EDI:ESI); pair k = XMM(k-1).
    @staticmethod
    def _read_pair(io: HypercallRegisters, long_mode: bool, index: int) -> bytes:
        if index == 0:
            if long_mode:
                lo, hi = io.get_gpr("rdx"), io.get_gpr("r8")
            else:
                lo = ((io.get_gpr("rbx") & _U32) << 32) | (io.get_gpr("rcx") & _U32)
                hi = ((io.get_gpr("rdi") & _U32) << 32) | (io.get_gpr("rsi") & _U32)
            return ((lo & HV_U64_MASK).to_bytes(8, "little")
                    + (hi & HV_U64_MASK).to_bytes(8, "little"))
        return (io.get_xmm(index - 1) & _XMM_MASK).to_bytes(16, "little")

    @staticmethod
    def _write_pair(io: HypercallRegisters, long_mode: bool, index: int, data: bytes) -> None:
        if index == 0:
            assert long_mode, "fast output is x64 only (checked in _check_fast)"
            io.set_gpr("rdx", int.from_bytes(data[:8], "little"))
            io.set_gpr("r8", int.from_bytes(data[8:16], "little"))
        else:
            io.set_xmm(index - 1, int.from_bytes(data[:16], "little"))

    # -- validation and dispatch --------------------------------------------------------------

    def _dispatch_checked(self, call: HypercallOutcome) -> HypercallOutcome:
        spec = self.table.get(call.code)
        # 2. unknown or unavailable code
        if spec is None or not spec.is_available():
            # Once per TLFS-named code; the unnamed ones (the guest can sweep 65,536 codes)
            # share one key, so they cannot use up the shared log-once budget.
            named = call.code in _NAMED_CODES
            self._log_once(("hypercall_unknown", call.code if named else None), logging.WARNING,
                           "vp%d: hypercall %s not implemented or not available%s",
                           call.vp_index, hypercall_name(call.code),
                           "" if named else " (codes without a TLFS name: one warning for all)")
            raise _Reject(HvStatus.HV_STATUS_INVALID_HYPERCALL_CODE,
                          "unknown code" if spec is None else "not available")
        call._spec = spec
        call.name = spec.name
        # 3. privilege
        if not spec.is_access_allowed():
            raise _Reject(HvStatus.HV_STATUS_ACCESS_DENIED, "privilege not granted")
        # 4. reserved bits (bit 31, IsNested, included: hvvmm is not nested; KVM does the same)
        if call._reserved:
            raise _Reject(HvStatus.HV_STATUS_INVALID_HYPERCALL_INPUT,
                          f"reserved bits {call._reserved:#x}")
        # 5. shape
        self._check_shape(call)
        var_len = call._variable_header_size * 8
        if spec.is_rep:
            call._input_len = spec.input_size + var_len + spec.rep_input_size * call.rep_count
            call._output_len = spec.rep_output_size * call.rep_count
        else:
            call._input_len = spec.input_size + var_len
            call._output_len = spec.output_size
        # 6./7. convention-specific checks and input
        if call.fast:
            self._check_fast(call)
            block = b"".join(self._read_pair(call._io, call.long_mode, i)
                             for i in range(call._input_pairs))
            data = block[:call._input_len]
        else:
            call.input_gpa, call.output_gpa = self._read_gpas(call._io, call.long_mode)
            self._check_list(call.input_gpa, call._input_len, "input")
            self._check_list(call.output_gpa, call._output_len, "output")
            data = self.memory.read(call.input_gpa, call._input_len) if call._input_len else b""
        return self._run_handler(call, data)

    @staticmethod
    def _check_shape(call: HypercallOutcome) -> None:
        spec = call._spec
        assert spec is not None
        if spec.is_rep:
            if call.rep_count == 0:
                raise _Reject(HvStatus.HV_STATUS_INVALID_HYPERCALL_INPUT,
                              "rep call with rep count 0")
            if call.rep_start >= call.rep_count:
                raise _Reject(HvStatus.HV_STATUS_INVALID_HYPERCALL_INPUT,
                              f"rep start {call.rep_start} >= rep count {call.rep_count}")
        elif call.rep_count or call.rep_start:
            raise _Reject(HvStatus.HV_STATUS_INVALID_HYPERCALL_INPUT, "rep fields on a simple call")
        if call._variable_header_size and not spec.variable_header_allowed:
            raise _Reject(HvStatus.HV_STATUS_INVALID_HYPERCALL_INPUT,
                          "variable header on a call without one")

    def _check_fast(self, call: HypercallOutcome) -> None:
        """Fast-convention checks.

        The TLFS names no status for the fast bit on a call that has no register form. hvvmm
        answers INVALID_HYPERCALL_INPUT: the input value is malformed for this call, and that is
        the common status for a malformed input value. QEMU answers INVALID_HYPERCALL_CODE for a
        fast HvCallPostMessage and KVM INVALID_PARAMETER for a fast extended call; OpenVMM accepts
        the fast form for every call whose input fits.
        """
        spec = call._spec
        assert spec is not None
        pair = HV_HYPERCALL_FAST_PAIR_SIZE
        if not spec.fast_allowed:
            raise _Reject(HvStatus.HV_STATUS_INVALID_HYPERCALL_INPUT, "no fast form")
        input_pairs = -(-call._input_len // pair)
        output_pairs = -(-call._output_len // pair)
        # TLFS: using XMM input (a block beyond RDX/R8) without CPUID 0x40000003 EDX bit 4 -> #UD.
        # The TLFS register table gives XMM0-5 for x86 callers as well, so 32-bit callers get
        # them too (OpenVMM allows one register pair in 32-bit mode).
        if input_pairs > 1 and not self.xmm_fast_input:
            raise _Reject(None, "XMM fast input not available")
        if output_pairs:
            # TLFS: fast output is "only supported on x64 platforms"; without EDX bit 15 -> #UD.
            if not self.xmm_fast_output:
                raise _Reject(None, "XMM fast output not available")
            if not call.long_mode:
                raise _Reject(HvStatus.HV_STATUS_INVALID_HYPERCALL_INPUT,
                              "fast output from 32-bit mode")
        if input_pairs > 1 and not spec.xmm_fast_allowed:
            raise _Reject(HvStatus.HV_STATUS_INVALID_HYPERCALL_INPUT, "no XMM fast form")
        if input_pairs + output_pairs > HV_HYPERCALL_MAX_FAST_PAIRS:
            raise _Reject(HvStatus.HV_STATUS_INVALID_HYPERCALL_INPUT,
                          f"{call._input_len}B in + {call._output_len}B out exceed the fast "
                          "registers")
        call._input_pairs = input_pairs

    def _check_list(self, gpa: int, length: int, what: str) -> None:
        """TLFS "Alignment Requirements" and common status codes: every failure here is
        INVALID_ALIGNMENT. (OpenVMM answers INVALID_HYPERCALL_INPUT for a straddling or
        inaccessible list; the TLFS table lists both under INVALID_ALIGNMENT.)"""
        if not length:
            return  # "the hypervisor ignores the corresponding GPA pointer"
        if gpa % HV_HYPERCALL_PARAM_ALIGN:
            raise _Reject(HvStatus.HV_STATUS_INVALID_ALIGNMENT,
                          f"{what} GPA {gpa:#x} not 8-aligned")
        if gpa % HV_PAGE_SIZE + length > HV_PAGE_SIZE:
            raise _Reject(HvStatus.HV_STATUS_INVALID_ALIGNMENT,
                          f"{what} list {gpa:#x}+{length:#x} crosses a page")
        if not self.memory.contains(gpa, length):
            raise _Reject(HvStatus.HV_STATUS_INVALID_ALIGNMENT,
                          f"{what} list {gpa:#x}+{length:#x} not in guest RAM")

    def _run_handler(self, call: HypercallOutcome, data: bytes) -> HypercallOutcome:
        spec = call._spec
        assert spec is not None
        var_len = call._variable_header_size * 8
        if spec.is_rep:
            rep_end = call.rep_count
            if self.max_reps_per_entry is not None:
                rep_end = min(rep_end, call.rep_start + self.max_reps_per_entry)
        else:
            rep_end = 0
        deadline = self._clock() + self.time_budget if self.time_budget is not None else None
        request = HypercallRequest(
            vp_index=call.vp_index, code=call.code, name=spec.name, fast=call.fast,
            long_mode=call.long_mode, header=bytes(data[:spec.input_size]),
            variable_header=bytes(data[spec.input_size:spec.input_size + var_len]),
            rep_count=call.rep_count, rep_start=call.rep_start, rep_end=rep_end,
            rep_input_size=spec.rep_input_size, rep_output_size=spec.rep_output_size,
            rep_data=bytes(data[spec.input_size + var_len:]), deadline=deadline, clock=self._clock)
        try:
            try:
                result = spec.handler(request)
            except HypercallError as error:
                result = HypercallResult(status=error.status, output=error.output,
                                         reps_completed=error.reps_completed)
            return self._finish(call, request, result)
        except _Reject:
            raise
        except Exception:  # noqa: BLE001 -- a handler bug must not take the VMM down
            return self._handler_failed(call)

    def _finish(self, call: HypercallOutcome, request: HypercallRequest,
                result: HandlerReturn) -> HypercallOutcome:
        spec = call._spec
        assert spec is not None
        if result is None:
            result = HypercallResult()
        if not isinstance(result, HypercallResult):
            raise _HandlerBug(f"returned {type(result).__name__}, not HypercallResult")
        status = int(result.status)
        if not 0 <= status <= HV_HYPERCALL_RESULT_MASK:
            raise _HandlerBug(f"status {status!r} out of range")
        if spec.is_rep:
            return self._finish_rep(call, request, result, status)
        return self._finish_simple(call, result, status)

    def _finish_simple(self, call: HypercallOutcome, result: HypercallResult, status: int) -> HypercallOutcome:
        spec = call._spec
        assert spec is not None
        output = bytes(result.output)
        if len(output) > spec.output_size:
            raise _HandlerBug(f"{len(output)}B of output for a {spec.output_size}B output")
        if result.reps_completed:
            raise _HandlerBug("reps completed on a simple call")
        if status == HvStatus.HV_STATUS_TIME_OUT:
            # A simple call that needs more time (TLFS continuation of multi-state simple calls).
            return self._continue(call, 0)
        if status == HvStatus.HV_STATUS_SUCCESS and spec.output_size:
            # TLFS: output is valid only on success; padding may be overwritten with zeros.
            self._write_output(call, 0, output.ljust(spec.output_size, b"\0"))
        return self._complete(call, status, 0)

    def _finish_rep(self, call: HypercallOutcome, request: HypercallRequest, result: HypercallResult,
                    status: int) -> HypercallOutcome:
        spec = call._spec
        assert spec is not None
        done = request.progress if result.reps_completed is None else int(result.reps_completed)
        if not call.rep_start <= done <= call.rep_count:
            raise _HandlerBug(f"reps completed {done} outside {call.rep_start}..{call.rep_count}")
        output = bytes(result.output)
        expected = (done - call.rep_start) * spec.rep_output_size
        if len(output) != expected:
            raise _HandlerBug(f"{len(output)}B of rep output for {done - call.rep_start} reps "
                              f"({expected}B expected)")
        if status == HvStatus.HV_STATUS_SUCCESS and done < call.rep_count and done == call.rep_start:
            # Linux loops forever on SUCCESS without progress (hv_do_rep_hypercall() in
            # arch/x86/include/asm/mshyperv.h); TIME_OUT is the way
            # to ask for a retry without progress.
            raise _HandlerBug("SUCCESS without progress")
        # OpenVMM: "for rep hypercalls, always write back the completed number of reps".
        if output:
            self._write_output(call, call.rep_start * spec.rep_output_size, output)
        if status == HvStatus.HV_STATUS_TIME_OUT:
            if done == call.rep_count:  # nothing left to continue with
                return self._complete(call, HvStatus.HV_STATUS_SUCCESS, done)
            return self._continue(call, done)
        if status == HvStatus.HV_STATUS_SUCCESS and done < call.rep_count:
            return self._continue(call, done)
        return self._complete(call, status, done)

    def _write_output(self, call: HypercallOutcome, offset: int, data: bytes) -> None:
        if not data:
            return
        if call.fast:
            self._write_fast_output(call, offset, data)
            return
        assert call.output_gpa is not None
        try:
            self.memory.write(call.output_gpa + offset, data)
        except GuestMemoryError as error:  # validated before the handler ran; RAM went away?
            raise _Reject(HvStatus.HV_STATUS_INVALID_ALIGNMENT, str(error)) from error

    def _write_fast_output(self, call: HypercallOutcome, offset: int, data: bytes) -> None:
        """Write ``data`` at byte ``offset`` of the output block, which starts at the register
        pair after the input (TLFS "XMM Fast Hypercall Output"). A partly covered first pair is
        merged with its current value so earlier completed rep elements survive."""
        pair = HV_HYPERCALL_FAST_PAIR_SIZE
        first = offset // pair
        last = -(-(offset + len(data)) // pair)
        buf = bytearray((last - first) * pair)
        if offset % pair:
            buf[:pair] = self._read_pair(call._io, call.long_mode, call._input_pairs + first)
        start = offset - first * pair
        buf[start:start + len(data)] = data
        for i in range(last - first):
            self._write_pair(call._io, call.long_mode, call._input_pairs + first + i,
                             bytes(buf[i * pair:(i + 1) * pair]))

    def _handler_failed(self, call: HypercallOutcome) -> HypercallOutcome:
        """A handler raised (other than :class:`HypercallError`) or broke its contract.

        The TLFS has no "internal error" status. hvvmm returns INVALID_HYPERCALL_INPUT: it is one
        of the common status codes every hypercall may return (TLFS "Common Hypercall Status
        Codes"), so no guest sees a status its documentation does not allow for the call; outputs
        are indeterminate on failure (TLFS "Output Parameter Validity on Failed Hypercalls"), so
        nothing more is written, and rep calls report the rep start index as completed.
        INVALID_HYPERCALL_CODE was rejected because guests read it as "not implemented" and turn
        the feature off for good, hiding the bug. Logged with the traceback once per code.
        """
        self._log_once(("hypercall_handler_failed", call.code), logging.ERROR,
                       "vp%d: handler for %s failed; returning HV_STATUS_INVALID_HYPERCALL_INPUT",
                       call.vp_index, hypercall_name(call.code), exc_info=True)
        return self._complete(call, HvStatus.HV_STATUS_INVALID_HYPERCALL_INPUT, call.rep_start,
                              "handler failed")

    # -- completion ---------------------------------------------------------------------------

    def _complete(self, call: HypercallOutcome, status: int, reps: int,
                  reason: str = "") -> HypercallOutcome:
        value = compose_result(status, reps)
        self._write_result(call, value)
        call.status = int(status)
        call.reps_completed = reps
        call.result_value = value
        call.reason = reason
        return call

    def _continue(self, call: HypercallOutcome, reps: int) -> HypercallOutcome:
        control = call.control
        if call.rep_count:  # the new rep start index goes back into the input value
            control = ((control & ~HV_HYPERCALL_REP_START_MASK)
                       | (reps << HV_HYPERCALL_REP_START_OFFSET))
        self._write_control(call, control)
        call._io.retry()
        call.reps_completed = reps
        call.retried = True
        return call
