"""Thin wrappers over the KVM file descriptors: :class:`Kvm` (/dev/kvm), :class:`Vm`, :class:`Vcpu`.

Each method is one ioctl with its arguments checked and its failure turned into :class:`KvmError`
naming the ioctl and the errno. Nothing here knows about devices, guests or Hyper-V.
"""

from __future__ import annotations

import errno
import functools
import os
import signal
import struct
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, NamedTuple, Protocol, Sequence

from ._kvm import ffi, lib
from .exits import InterruptedExit, VcpuExit, decode_exit

KVM_REQUIRED_API_VERSION = 12

# Kicks a vCPU thread out of KVM_RUN (see hvvmm_install_kick_handler in _build.py).
KICK_SIGNAL = signal.SIGRTMIN + 7


class KvmCpuidEntry(NamedTuple):
    """One ``struct kvm_cpuid_entry2`` as plain data: ``function`` is the leaf (EAX in),
    ``index`` the subleaf (ECX in), ``flags`` KVM's (bit 0: the index is significant). The CPUID
    policy (``hvvmm.cpuid``) builds its own entries from these; this layer knows no policy."""

    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int


class CpuidLeaf(Protocol):
    """What :meth:`Vcpu.set_cpuid` reads from each entry (``hvvmm.cpuid.CpuidEntry`` has it)."""

    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int


class KvmError(OSError):
    """An ioctl on a KVM file descriptor failed."""

    def __init__(self, what: str, err: int):
        super().__init__(err, f"{what} failed: {os.strerror(err)}")
        self.what = what


class KvmUnavailableError(RuntimeError):
    """/dev/kvm cannot be used; the message says why and what to do."""


def _check(result: int, what: str) -> int:
    if result < 0:
        raise KvmError(what, -result)
    return result


@dataclass(frozen=True)
class MsrFilterRange:
    """MSRs ``[base, base+count)`` whose ``flags`` (KVM_MSR_FILTER_READ/WRITE) accesses are denied,
    so they exit to user space. hvvmm only ever denies ranges; everything else stays with KVM."""

    base: int
    count: int
    flags: int


class Kvm:
    """The /dev/kvm system file descriptor."""

    def __init__(self, path: str = "/dev/kvm"):
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailableError(
                f"{path} does not exist: KVM is not available on this host (load the kvm_intel or "
                "kvm_amd module; inside a VM, enable nested virtualization)") from None
        except PermissionError:
            raise KvmUnavailableError(
                f"permission denied opening {path}: run as a user in the group that owns it "
                "(usually 'kvm') or as root") from None
        except OSError as exc:
            raise KvmUnavailableError(f"cannot open {path}: {exc.strerror}") from None
        try:
            api_version = lib.hvvmm_ioctl_value(self.fd, lib.KVM_GET_API_VERSION, 0)
            if api_version < 0:  # e.g. ENOTTY: HVVMM_KVM_DEVICE names some other file
                raise KvmUnavailableError(
                    f"{path} is not a KVM device (it does not answer KVM_GET_API_VERSION: "
                    f"{os.strerror(-api_version)})")
            self.api_version = api_version
            if self.api_version != KVM_REQUIRED_API_VERSION:
                raise KvmUnavailableError(f"{path} speaks KVM API version {self.api_version}; "
                                          f"hvvmm needs {KVM_REQUIRED_API_VERSION}")
            self.vcpu_mmap_size = _check(
                lib.hvvmm_ioctl_value(self.fd, lib.KVM_GET_VCPU_MMAP_SIZE, 0),
                "KVM_GET_VCPU_MMAP_SIZE")
        except BaseException:
            os.close(self.fd)
            raise

    def check_extension(self, cap: int) -> int:
        """The value KVM reports for capability ``cap`` (0 = absent)."""
        result = lib.hvvmm_ioctl_value(self.fd, lib.KVM_CHECK_EXTENSION, cap)
        return max(result, 0)

    def supported_cpuid(self) -> list[KvmCpuidEntry]:
        """``KVM_GET_SUPPORTED_CPUID``: what the host and KVM can give a guest."""
        count = 128
        while True:
            buf = ffi.new("struct kvm_cpuid2 *", {"nent": count, "entries": count})
            result = lib.hvvmm_ioctl(self.fd, lib.KVM_GET_SUPPORTED_CPUID, buf)
            if result == -errno.E2BIG and count < 4096:
                count *= 2
                continue
            _check(result, "KVM_GET_SUPPORTED_CPUID")
            return [KvmCpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                    for e in (buf.entries[i] for i in range(buf.nent))]

    def create_vm(self) -> "Vm":
        return Vm(self)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Kvm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Vm:
    """A KVM virtual machine file descriptor."""

    def __init__(self, kvm: Kvm):
        self.kvm = kvm
        self.fd = _check(lib.hvvmm_ioctl_value(kvm.fd, lib.KVM_CREATE_VM, 0), "KVM_CREATE_VM")
        os.set_inheritable(self.fd, False)

    def _ioctl(self, request: int, arg, what: str) -> int:
        return _check(lib.hvvmm_ioctl(self.fd, request, arg), what)

    def _ioctl_value(self, request: int, arg: int, what: str) -> int:
        return _check(lib.hvvmm_ioctl_value(self.fd, request, arg), what)

    def set_user_memory_region(self, slot: int, gpa: int, size: int, host_address: int,
                               readonly: bool = False) -> None:
        """Map ``size`` bytes of host memory at ``host_address`` to guest-physical ``gpa``
        (size 0 deletes the slot)."""
        region = ffi.new("struct kvm_userspace_memory_region *", {
            "slot": slot, "flags": lib.KVM_MEM_READONLY if readonly else 0,
            "guest_phys_addr": gpa, "memory_size": size, "userspace_addr": host_address})
        self._ioctl(lib.KVM_SET_USER_MEMORY_REGION, region, "KVM_SET_USER_MEMORY_REGION")

    def set_tss_address(self, address: int) -> None:
        self._ioctl_value(lib.KVM_SET_TSS_ADDR, address, "KVM_SET_TSS_ADDR")

    def set_identity_map_address(self, address: int) -> None:
        self._ioctl(lib.KVM_SET_IDENTITY_MAP_ADDR, ffi.new("__u64 *", address),
                    "KVM_SET_IDENTITY_MAP_ADDR")

    def create_irqchip(self) -> None:
        """In-kernel PIC, IOAPIC and per-vCPU LAPICs. Must precede vCPU creation."""
        self._ioctl_value(lib.KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP")

    def create_pit2(self) -> None:
        config = ffi.new("struct kvm_pit_config *", {"flags": lib.KVM_PIT_SPEAKER_DUMMY})
        self._ioctl(lib.KVM_CREATE_PIT2, config, "KVM_CREATE_PIT2")

    def set_pit_reinject(self, reinject: bool) -> None:
        """Whether the in-kernel PIT re-injects ticks the guest missed (KVM's default; QEMU's
        kvm-pit lost_tick_policy "delay") or drops them ("discard")."""
        control = ffi.new("struct kvm_reinject_control *", {"pit_reinject": 1 if reinject else 0})
        self._ioctl(lib.KVM_REINJECT_CONTROL, control, "KVM_REINJECT_CONTROL")

    def set_irq_line(self, irq: int, level: bool) -> None:
        """Drive GSI ``irq`` (PIC and IOAPIC pin) to ``level``."""
        line = ffi.new("struct kvm_irq_level *", {"irq": irq, "level": 1 if level else 0})
        self._ioctl(lib.KVM_IRQ_LINE, line, "KVM_IRQ_LINE")

    def irq_line(self, gsi: int) -> "GsiLine":
        """GSI ``gsi`` as a device's interrupt line (:class:`hvvmm.bus.IrqLine`)."""
        return GsiLine(self, gsi)

    def signal_msi(self, address: int, data: int) -> int:
        """Inject a message-signalled interrupt; returns >0 if delivered, 0 if blocked."""
        msi = ffi.new("struct kvm_msi *", {"address_lo": address & 0xFFFF_FFFF,
                                           "address_hi": address >> 32, "data": data})
        return self._ioctl(lib.KVM_SIGNAL_MSI, msi, "KVM_SIGNAL_MSI")

    def ioeventfd(self, fd: int, address: int, length: int, *, pio: bool,
                  datamatch: int | None = None, deassign: bool = False) -> None:
        """Have KVM signal eventfd ``fd`` for a guest write of ``length`` bytes at ``address``
        (port I/O if ``pio``, else MMIO), optionally only when the value is ``datamatch``; the
        write then never exits to user space. ``deassign`` removes the same registration."""
        flags = ((lib.KVM_IOEVENTFD_FLAG_PIO if pio else 0)
                 | (lib.KVM_IOEVENTFD_FLAG_DATAMATCH if datamatch is not None else 0)
                 | (lib.KVM_IOEVENTFD_FLAG_DEASSIGN if deassign else 0))
        request = ffi.new("struct kvm_ioeventfd *", {
            "datamatch": datamatch or 0, "addr": address, "len": length, "fd": fd,
            "flags": flags})
        self._ioctl(lib.KVM_IOEVENTFD, request, "KVM_IOEVENTFD")

    def enable_cap(self, cap: int, *args: int) -> None:
        request = ffi.new("struct kvm_enable_cap *", {"cap": cap, "args": list(args)})
        self._ioctl(lib.KVM_ENABLE_CAP, request, f"KVM_ENABLE_CAP({cap})")

    def set_msr_filter(self, denied: Sequence[MsrFilterRange]) -> None:
        """Allow every MSR except the ``denied`` ranges, whose accesses exit to user space."""
        if len(denied) > lib.KVM_MSR_FILTER_MAX_RANGES:
            raise ValueError(f"at most {lib.KVM_MSR_FILTER_MAX_RANGES} MSR filter ranges")
        msr_filter = ffi.new("struct kvm_msr_filter *")
        msr_filter.flags = lib.KVM_MSR_FILTER_DEFAULT_ALLOW
        # cffi frees an ffi.new() buffer with its Python object, and the struct only holds raw
        # pointers: keep every bitmap referenced until the ioctl, which copies them.
        bitmaps = []
        for i, entry in enumerate(denied):
            if entry.count <= 0:
                raise ValueError("an MSR filter range needs at least one MSR")
            bitmap = ffi.new("__u8[]", (entry.count + 7) // 8)  # all zero: deny
            bitmaps.append(bitmap)
            msr_filter.ranges[i].flags = entry.flags
            msr_filter.ranges[i].nmsrs = entry.count
            msr_filter.ranges[i].base = entry.base
            msr_filter.ranges[i].bitmap = bitmap
        self._ioctl(lib.KVM_X86_SET_MSR_FILTER, msr_filter, "KVM_X86_SET_MSR_FILTER")
        del bitmaps  # only now may they go

    def create_vcpu(self, index: int) -> "Vcpu":
        return Vcpu(self, index)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


GPR_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11",
             "r12", "r13", "r14", "r15", "rip", "rflags")
GPR_INDEX = {name: index for index, name in enumerate(GPR_NAMES)}


def _sync_layout():
    """The struct format of the sync-regs area of kvm_run, from the compiler's offsets, and where
    it starts: the GPRs (struct kvm_regs, 18 x u64 in GPR_NAMES order), then the few sregs fields
    a hypercall needs (CS.base, CS.L, SS.DPL, CR0, EFER), all in one unpack."""
    base = lib.HVVMM_SYNC_REGS_OFFSET
    regs = base + ffi.offsetof("struct kvm_sync_regs", "regs")
    if [ffi.offsetof("struct kvm_regs", name) for name in GPR_NAMES] != \
            [8 * i for i in range(len(GPR_NAMES))]:
        raise ImportError("struct kvm_regs does not have the layout hvvmm reads")
    sregs = base + ffi.offsetof("struct kvm_sync_regs", "sregs")
    fields = sorted([
        (sregs + ffi.offsetof("struct kvm_sregs", "cs", "base"), "Q", "cs_base"),
        (sregs + ffi.offsetof("struct kvm_sregs", "cs", "l"), "B", "cs_l"),
        (sregs + ffi.offsetof("struct kvm_sregs", "ss", "dpl"), "B", "ss_dpl"),
        (sregs + ffi.offsetof("struct kvm_sregs", "cr0"), "Q", "cr0"),
        (sregs + ffi.offsetof("struct kvm_sregs", "efer"), "Q", "efer"),
    ])
    if tuple(name for _, _, name in fields) != ("cs_base", "cs_l", "ss_dpl", "cr0", "efer"):
        raise ImportError("struct kvm_sregs does not have the field order hvvmm reads")
    fmt, position = f"<{len(GPR_NAMES)}Q", regs + 8 * len(GPR_NAMES)
    for offset, code, _ in fields:
        if offset < position:
            raise ImportError("the sync-regs sregs fields do not follow the GPRs")
        fmt += f"{offset - position}x{code}"
        position = offset + struct.calcsize("<" + code)
    return struct.Struct(fmt), regs


_SYNC_ALL, _SYNC_GPRS_OFFSET = _sync_layout()
_DIRTY_REGS_OFFSET = ffi.offsetof("struct kvm_run", "kvm_dirty_regs")
_U64 = struct.Struct("<Q")
# kvm_run.msr.error (u8) and .data (u64), answered by struct rather than cffi proxies.
_MSR_ERROR_OFFSET = ffi.offsetof("struct kvm_run", "msr", "error")
_MSR_DATA_OFFSET = ffi.offsetof("struct kvm_run", "msr", "data")
if lib.hvvmm_install_run_exits() < 0:
    raise ImportError("hvvmm.kvm._kvm: run_exits could not be installed")
from ._kvm import run_exits as _run_exits  # noqa: E402 -- put there by the call above


class PythonGate:
    """What the vCPUs of one machine share so that a thread back from ``KVM_RUN`` spins, without
    the GIL, while another one runs Python, rather than sleep on the GIL
    (:meth:`Vcpu.join_python_gate`); ``spin_ns`` bounds each wait."""

    def __init__(self, spin_ns: int = 20_000):
        self.struct = ffi.new("struct hvvmm_python_gate *")
        self.struct.spin_ns = spin_ns

    @property
    def running_python(self) -> int:
        """vCPU threads counted as running Python now."""
        return self.struct.in_python


class Vcpu:
    """A vCPU file descriptor and its shared ``kvm_run`` page."""

    def __init__(self, vm: Vm, index: int):
        self.vm = vm
        self.index = index
        self.fd = _check(lib.hvvmm_ioctl_value(vm.fd, lib.KVM_CREATE_VCPU, index),
                         f"KVM_CREATE_VCPU({index})")
        os.set_inheritable(self.fd, False)
        # Mapped in C rather than with Python's mmap: exit data views into this page must never
        # pin it (a Python mmap refuses to close while any view exists).
        self._run_size = vm.kvm.vcpu_mmap_size
        run_page = lib.hvvmm_map_shared(self.fd, self._run_size)
        if run_page == ffi.NULL:
            err = ffi.errno
            os.close(self.fd)
            raise KvmError("mmap of the kvm_run page", err)
        self._run_page = run_page
        self.run_struct = ffi.cast("struct kvm_run *", run_page)
        self._run_view = memoryview(ffi.buffer(run_page, self._run_size))
        self._init_loop()

    def _init_loop(self) -> None:
        """The state of the packed run loop (``struct hvvmm_vcpu_loop`` in ``_build.py``)."""
        self._loop = loop = ffi.new("struct hvvmm_vcpu_loop *")
        loop.fd, loop.run, loop.run_size, loop.hypercall_port = (
            getattr(self, "fd", -1), self.run_struct, self._run_size, -1)
        self._loop_view = memoryview(ffi.buffer(loop))
        self._constant_msr_slots: dict[int, int] = {}  # MSR index -> slot
        self.python_gate: PythonGate | None = None  # join_python_gate

    # -- running ------------------------------------------------------------------------------

    def run(self) -> VcpuExit:
        """One ``KVM_RUN`` (the GIL is released while it runs); returns the decoded exit."""
        if self._loop.hc_success:
            lib.hvvmm_apply_hypercall_success(self._loop)
        result = lib.hvvmm_run(self.fd)
        while result == -errno.EAGAIN:
            # An AP leaving wait-for-SIPI (INIT/SIPI processed in the kernel): just run again.
            result = lib.hvvmm_run(self.fd)
        if result < 0:
            if result == -errno.EINTR:
                self.run_struct.immediate_exit = 0
                return InterruptedExit()
            raise KvmError("KVM_RUN", -result)
        return decode_exit(self.run_struct, self._run_view)

    def packed_runner(self) -> Callable[[], int]:
        """One ``KVM_RUN`` for the vCPU loop's fast path (GIL released), as a C-level callable
        with its argument bound (the loop calls it once per exit). A single port access of 1, 2
        or 4 bytes and an MSR exit come back as one int (layout: ``hvvmm_run_packed`` in
        ``_build.py``; no exit object is built); any other exit as 0, to be read with
        :meth:`last_exit`; a failed ``KVM_RUN`` as ``-errno`` (:meth:`last_exit` turns it into
        the exit or the error :meth:`run` gives). Reads of the MSRs given to
        :meth:`set_constant_msr` are answered inside the call and never come back."""
        return functools.partial(lib.hvvmm_run_packed, self._loop)

    def exit_runner(self, routes: dict,
                    hypercall_exit: Callable[[int, int, int], int | None] | None,
                    msr_exit: Callable[[int], int | None] | None) -> Callable[[], int]:
        """:meth:`packed_runner` that also hands the exits Python has a handler for to that
        handler itself, in C, and comes back only with the others (``run_exits`` in
        ``_build.py``): a hypercall exit to ``hypercall_exit(packed, first, second)`` (the
        register pair of a ``PACKED_HC_SIMPLE`` call; its answer ``HC_SUCCESS_32/64`` has the
        success result written), an MSR exit to
        ``msr_exit(packed)``, a port access whose packed form above bit 32 is in ``routes`` to
        that route (``Bus.cache_route``). A handler's exception comes out of the call."""
        return functools.partial(_run_exits, int(ffi.cast("uintptr_t", self._loop)), routes,
                                 hypercall_exit, msr_exit)

    def set_hypercall_port(self, port: int | None) -> None:
        """Mark a 1-byte OUT to ``port`` in packed exits (``PACKED_HYPERCALL``, and the decoded
        call with ``PACKED_HC_SIMPLE``); None: none."""
        self._loop.hypercall_port = -1 if port is None else port

    def join_python_gate(self, gate: "PythonGate") -> None:
        """Spin briefly, without the GIL, while another vCPU of ``gate`` runs Python, before
        taking the GIL after an exit (``struct hvvmm_python_gate`` in ``_build.py`` says why).
        Call before the vCPU runs."""
        self._loop.gate = gate.struct
        self.python_gate = gate  # keeps the shared struct alive

    def leave_python_gate(self) -> None:
        """This vCPU's thread stops counting as running Python until its next exit (call it
        before it blocks or ends)."""
        lib.hvvmm_python_gate_leave(self._loop)

    # -- constant MSRs answered by the packed loop --------------------------------------------

    def set_constant_msr(self, index: int, value: int) -> bool:
        """From now on the packed loop answers RDMSR ``index`` with ``value`` itself, counting
        each read (:meth:`constant_msr_hits`). Call on the vCPU's own thread. False when every
        slot is taken (the reads keep coming back)."""
        if lib.hvvmm_set_constant_msr(self._loop, index, value & 0xFFFF_FFFF_FFFF_FFFF):
            return False
        self._constant_msr_slots.setdefault(index, len(self._constant_msr_slots))
        return True

    def disable_constant_msrs(self) -> None:
        """Every MSR read comes back to Python again (any thread; a read being answered at this
        moment may still be answered in the loop)."""
        lib.hvvmm_disable_constant_msrs(self._loop)

    def constant_msr_hits(self) -> dict[int, int]:
        """MSR index -> reads the packed loop answered itself so far (any thread)."""
        return {index: lib.hvvmm_constant_msr_hits(self._loop, slot)
                for index, slot in list(self._constant_msr_slots.items())}

    def last_exit(self, packed: int) -> VcpuExit:
        """The exit :meth:`run` would have returned for the ``KVM_RUN`` that gave ``packed``."""
        if packed < 0:
            if packed == -errno.EINTR:
                self.run_struct.immediate_exit = 0
                return InterruptedExit()
            raise KvmError("KVM_RUN", -packed)
        return decode_exit(self.run_struct, self._run_view)

    def msr_value(self) -> int:
        """The value a packed WRMSR exit writes."""
        return _U64.unpack_from(self._run_view, _MSR_DATA_OFFSET)[0]

    def complete_rdmsr(self, value: int) -> None:
        """Answer a packed RDMSR exit: the guest reads ``value``."""
        view = self._run_view
        view[_MSR_ERROR_OFFSET] = 0
        _U64.pack_into(view, _MSR_DATA_OFFSET, value & 0xFFFF_FFFF_FFFF_FFFF)

    def complete_msr(self, ok: bool) -> None:
        """Finish a packed MSR exit's access (``ok``) or refuse it (KVM injects #GP)."""
        self._run_view[_MSR_ERROR_OFFSET] = 0 if ok else 1

    def complete_in(self, offset: int, size: int, value: int) -> None:
        """Answer the port read of a packed IN exit at ``offset``, the data offset it carries."""
        self._run_view[offset:offset + size] = value.to_bytes(size, "little")

    def request_immediate_exit(self) -> None:
        """Make the next (or current, together with a kick signal) ``KVM_RUN`` return EINTR."""
        self.run_struct.immediate_exit = 1

    # -- sync regs: registers in the kvm_run page, saving GET/SET ioctls on hot exits ------------

    def enable_sync_regs(self, mask: int) -> None:
        """Ask KVM to copy the ``mask`` (KVM_SYNC_X86_*) register sets into kvm_run on each exit."""
        self.run_struct.kvm_valid_regs = mask

    def sync_values(self) -> tuple[int, ...]:
        """The sync-regs area in one unpack: the GPRs in ``GPR_NAMES`` order, then CS.base,
        CS.L, SS.DPL, CR0 and EFER (valid after an exit with KVM_SYNC_X86_REGS |
        KVM_SYNC_X86_SREGS enabled)."""
        return _SYNC_ALL.unpack_from(self._run_view, _SYNC_GPRS_OFFSET)

    def sync_gpr(self, index: int) -> int:
        """GPR ``index`` (``GPR_NAMES`` order) in the sync-regs area, as it is now."""
        return _U64.unpack_from(self._run_view, _SYNC_GPRS_OFFSET + 8 * index)[0]

    def put_sync_gpr(self, index: int, value: int) -> None:
        """Store GPR ``index`` in the sync-regs area without marking it for KVM: call
        :meth:`mark_sync_gprs_dirty` once after the last one."""
        _U64.pack_into(self._run_view, _SYNC_GPRS_OFFSET + 8 * index,
                       value & 0xFFFF_FFFF_FFFF_FFFF)

    def mark_sync_gprs_dirty(self) -> None:
        """KVM loads every GPR from the sync-regs area at the next entry."""
        view = self._run_view
        _U64.pack_into(view, _DIRTY_REGS_OFFSET,
                       _U64.unpack_from(view, _DIRTY_REGS_OFFSET)[0] | lib.KVM_SYNC_X86_REGS)

    def write_sync_gprs(self, values: Mapping[int, int]) -> None:
        """Set GPRs (``GPR_NAMES`` index -> value) in the sync-regs area; KVM loads all GPRs
        from there on the next entry."""
        view = self._run_view
        for index, value in values.items():
            _U64.pack_into(view, _SYNC_GPRS_OFFSET + 8 * index, value & 0xFFFF_FFFF_FFFF_FFFF)
        self.mark_sync_gprs_dirty()

    # -- register state -----------------------------------------------------------------------

    def _ioctl(self, request: int, arg, what: str) -> int:
        return _check(lib.hvvmm_ioctl(self.fd, request, arg), what)

    def get_regs(self):
        regs = ffi.new("struct kvm_regs *")
        self._ioctl(lib.KVM_GET_REGS, regs, "KVM_GET_REGS")
        return regs

    def set_regs(self, regs) -> None:
        self._ioctl(lib.KVM_SET_REGS, regs, "KVM_SET_REGS")

    def get_sregs(self):
        sregs = ffi.new("struct kvm_sregs *")
        self._ioctl(lib.KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
        return sregs

    def set_sregs(self, sregs) -> None:
        self._ioctl(lib.KVM_SET_SREGS, sregs, "KVM_SET_SREGS")

    def get_fpu(self):
        fpu = ffi.new("struct kvm_fpu *")
        self._ioctl(lib.KVM_GET_FPU, fpu, "KVM_GET_FPU")
        return fpu

    def set_fpu(self, fpu) -> None:
        self._ioctl(lib.KVM_SET_FPU, fpu, "KVM_SET_FPU")

    def _get_state(self, struct: str, request: int, what: str) -> bytes:
        """A state structure that user space handles as opaque bytes, read with ``request``."""
        state = ffi.new(f"struct {struct} *")
        self._ioctl(request, state, what)
        return bytes(ffi.buffer(state))

    def _set_state(self, struct: str, request: int, what: str, data: bytes) -> None:
        state = ffi.new(f"struct {struct} *")
        if len(data) != ffi.sizeof(state[0]):
            raise ValueError(f"{what} takes {ffi.sizeof(state[0])} bytes (got {len(data)})")
        ffi.buffer(state)[:] = data
        self._ioctl(request, state, what)

    def get_xsave(self) -> bytes:
        """``KVM_GET_XSAVE``: the first 4 KiB of the guest's XSAVE area in the standard
        (non-compacted) layout (SDM vol. 1 13.4): legacy region, header, then the components."""
        return self._get_state("kvm_xsave", lib.KVM_GET_XSAVE, "KVM_GET_XSAVE")

    def set_xsave(self, area: bytes) -> None:
        """``KVM_SET_XSAVE`` with an area as :meth:`get_xsave` returns it."""
        self._set_state("kvm_xsave", lib.KVM_SET_XSAVE, "KVM_SET_XSAVE", area)

    def get_xcrs(self) -> dict[int, int]:
        """``KVM_GET_XCRS``: the extended control registers (XCR0 = index 0) by index."""
        xcrs = ffi.new("struct kvm_xcrs *")
        self._ioctl(lib.KVM_GET_XCRS, xcrs, "KVM_GET_XCRS")
        count = min(xcrs.nr_xcrs, len(xcrs.xcrs))
        return {xcrs.xcrs[i].xcr: xcrs.xcrs[i].value for i in range(count)}

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        indices = list(indices)
        msrs = ffi.new("struct kvm_msrs *", {"nmsrs": len(indices), "entries": len(indices)})
        for i, index in enumerate(indices):
            msrs.entries[i].index = index
        done = self._ioctl(lib.KVM_GET_MSRS, msrs, "KVM_GET_MSRS")
        if done != len(indices):
            raise KvmError(f"KVM_GET_MSRS(MSR {indices[done]:#x})", errno.EINVAL)
        return {msrs.entries[i].index: msrs.entries[i].data for i in range(done)}

    def set_msrs(self, values: Mapping[int, int]) -> None:
        items = list(values.items())
        msrs = ffi.new("struct kvm_msrs *", {"nmsrs": len(items), "entries": len(items)})
        for i, (index, value) in enumerate(items):
            msrs.entries[i].index = index
            msrs.entries[i].data = value
        done = self._ioctl(lib.KVM_SET_MSRS, msrs, "KVM_SET_MSRS")
        if done != len(items):
            raise KvmError(f"KVM_SET_MSRS(MSR {items[done][0]:#x})", errno.EINVAL)

    def set_cpuid(self, entries: Sequence[CpuidLeaf]) -> None:
        table = ffi.new("struct kvm_cpuid2 *", {"nent": len(entries), "entries": len(entries)})
        for i, entry in enumerate(entries):
            target = table.entries[i]
            target.function = entry.function
            target.index = entry.index
            target.flags = entry.flags
            target.eax, target.ebx, target.ecx, target.edx = (entry.eax, entry.ebx, entry.ecx,
                                                              entry.edx)
        self._ioctl(lib.KVM_SET_CPUID2, table, "KVM_SET_CPUID2")

    def get_lapic(self) -> bytes:
        return self._get_state("kvm_lapic_state", lib.KVM_GET_LAPIC, "KVM_GET_LAPIC")

    def set_lapic(self, registers: bytes) -> None:
        self._set_state("kvm_lapic_state", lib.KVM_SET_LAPIC, "KVM_SET_LAPIC", registers)

    def get_mp_state(self) -> int:
        """``KVM_GET_MP_STATE``: KVM_MP_STATE_RUNNABLE, _HALTED (after HLT, with the in-kernel
        LAPIC), _INIT_RECEIVED (an AP waiting for SIPI), ..."""
        state = ffi.new("struct kvm_mp_state *")
        self._ioctl(lib.KVM_GET_MP_STATE, state, "KVM_GET_MP_STATE")
        return state.mp_state

    def set_mp_state(self, mp_state: int) -> None:
        state = ffi.new("struct kvm_mp_state *", {"mp_state": mp_state})
        self._ioctl(lib.KVM_SET_MP_STATE, state, "KVM_SET_MP_STATE")

    def get_vcpu_events(self):
        events = ffi.new("struct kvm_vcpu_events *")
        self._ioctl(lib.KVM_GET_VCPU_EVENTS, events, "KVM_GET_VCPU_EVENTS")
        return events

    def set_vcpu_events(self, events) -> None:
        self._ioctl(lib.KVM_SET_VCPU_EVENTS, events, "KVM_SET_VCPU_EVENTS")

    def inject_exception(self, vector: int, error_code: int | None = None) -> None:
        """Queue exception ``vector`` for delivery on the next entry."""
        events = self.get_vcpu_events()
        events.exception.injected = 1
        events.exception.nr = vector
        events.exception.has_error_code = 0 if error_code is None else 1
        events.exception.error_code = error_code or 0
        events.flags = 0  # do not touch NMI/SIPI/shadow state
        self.set_vcpu_events(events)

    def inject_soft_interrupt(self, vector: int) -> None:
        """Queue software interrupt ``vector`` (INT n) for delivery on the next entry. Delivered
        with the RIP as it is then: set RIP past the INT first. (On VMX/SVM KVM adds the length
        of the last exiting instruction to a soft event's return address; this is for hosts
        whose KVM emulates guest ring 0, where INT n exits as an emulation failure.)"""
        events = self.get_vcpu_events()
        events.interrupt.injected = 1
        events.interrupt.nr = vector
        events.interrupt.soft = 1
        events.flags = 0  # do not touch NMI/SIPI/shadow state
        self.set_vcpu_events(events)

    def tsc_khz(self) -> int | None:
        """The guest TSC frequency, if KVM reports it."""
        result = lib.hvvmm_ioctl_value(self.fd, lib.KVM_GET_TSC_KHZ, 0)
        return result if result > 0 else None

    def close(self) -> None:
        if self.fd < 0:
            return
        self._run_view.release()
        lib.hvvmm_unmap(self._run_page, self._run_size)
        self._run_page = self.run_struct = None
        os.close(self.fd)
        self.fd = -1


class PinnedBuffer:
    """The host address of a writable Python buffer (an mmap of guest RAM or an overlay page),
    kept valid until :meth:`release`: what ``KVM_SET_USER_MEMORY_REGION`` needs."""

    def __init__(self, buffer):
        self._cdata = ffi.from_buffer(buffer, require_writable=True)
        self.address = int(ffi.cast("uintptr_t", self._cdata))

    def release(self) -> None:
        if self._cdata is not None:
            ffi.release(self._cdata)
            self._cdata = None


def atomic_fetch_or_u8(address: int, mask: int) -> int:
    """Atomically OR ``mask`` into the byte at host ``address`` (memory shared with the guest);
    returns the old byte."""
    return lib.hvvmm_atomic_fetch_or_u8(address, mask)


def install_kick_handler() -> None:
    """Install the no-op handler for :data:`KICK_SIGNAL` (idempotent)."""
    _check(lib.hvvmm_install_kick_handler(KICK_SIGNAL), "sigaction")


class GsiLine:
    """One in-kernel PIC/IOAPIC input, driven by a device through ``set_level``."""

    def __init__(self, vm: Vm, gsi: int):
        self._vm = vm
        self._gsi = gsi

    def set_level(self, level: bool) -> None:
        self._vm.set_irq_line(self._gsi, level)
