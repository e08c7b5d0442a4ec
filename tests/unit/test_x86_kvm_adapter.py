"""hvvmm/x86/kvm_adapter.py against a fake vCPU: what goes back to KVM after a completion, and
the one line that ends the run when hvvmm cannot complete an instruction."""

import logging
import struct
from types import SimpleNamespace

from x86fakes import P, RW, paged_memory, state_for

from hvvmm.x86 import Completer
from hvvmm.x86.kvm_adapter import MSR_FS_BASE, VcpuInstructionCompleter

RIP = 0x38_1000
GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


class FakeVcpu:
    """The :class:`hvvmm.kvm.Vcpu` methods the adapter calls, recording the writes."""

    def __init__(self, state):
        self.regs = SimpleNamespace(**{name: 0 for name in GPRS}, rip=RIP, rflags=2)
        segments = {}
        for name, seg in state.segments.items():
            segments[name] = SimpleNamespace(base=seg.base, limit=seg.limit, selector=0,
                                             type=seg.type, present=1, dpl=seg.dpl,
                                             db=int(seg.db), l=int(seg.long), unusable=0)
        self.sregs = SimpleNamespace(**segments, cr0=state.cr0, cr2=0, cr3=state.cr3,
                                     cr4=state.cr4, efer=state.efer, apic_base=0xFEE00900)
        area = bytearray(4096)
        struct.pack_into("<HHBxHQQII", area, 0, 0x37F, 0, 0, 0, 0, 0, 0x1F80, 0xFFFF)
        self.xsave = bytes(area)
        self.events = SimpleNamespace(exception=SimpleNamespace(injected=0, nr=0), flags=0)
        self.calls = []

    def get_regs(self):
        return SimpleNamespace(**vars(self.regs))

    def set_regs(self, regs):
        self.calls.append("set_regs")
        self.regs = regs

    def get_sregs(self):
        return SimpleNamespace(**vars(self.sregs))

    def set_sregs(self, sregs):
        self.calls.append("set_sregs")
        self.sregs = sregs

    def get_xsave(self):
        return self.xsave

    def set_xsave(self, area):
        self.calls.append("set_xsave")
        self.xsave = area

    def get_xcrs(self):
        return {0: 0x3}

    def set_msrs(self, msrs):
        self.calls.append(("set_msrs", dict(msrs)))

    def get_lapic(self):
        return bytes(1024)

    def inject_exception(self, vector, error_code=None):
        self.calls.append(("exception", vector, error_code))

    def inject_soft_interrupt(self, vector):
        self.calls.append(("soft-interrupt", vector))

    def get_vcpu_events(self):
        return self.events

    def set_vcpu_events(self, events):
        self.calls.append("set_vcpu_events")


def make(ud_queued_by_kvm=False, cpl=0):
    memory, tables = paged_memory("long4")
    for page in range(0, 0x40_0000, 0x1000):
        tables.map(page, page, P | RW)
    state = state_for(tables)
    state.segments["ss"].dpl = cpl
    vcpu = FakeVcpu(state)
    thread = SimpleNamespace(vcpu=vcpu, index=0)
    completer = VcpuInstructionCompleter(Completer(), memory, log=logging.getLogger("test"),
                                         ud_queued_by_kvm=ud_queued_by_kvm)
    return completer, thread, vcpu, memory


def exit_with(hex_bytes):
    return SimpleNamespace(instruction_bytes=bytes.fromhex(hex_bytes))


def test_popcnt_writes_the_registers_back():
    completer, thread, vcpu, _ = make()
    vcpu.regs.rcx = 0xFF
    assert completer(thread, exit_with("f3480fb8c1")) is None
    assert vcpu.regs.rax == 8 and vcpu.regs.rip == RIP + 5
    assert vcpu.calls == ["set_regs"]


def test_ldmxcsr_goes_back_through_xsave_with_the_sse_bit():
    completer, thread, vcpu, memory = make()
    vcpu.regs.rsp = 0x30_0000
    memory.write_u32(0x30_0004, 0x7F80)
    assert completer(thread, exit_with("0fae542404")) is None
    assert struct.unpack_from("<I", vcpu.xsave, 24)[0] == 0x7F80
    assert struct.unpack_from("<Q", vcpu.xsave, 512)[0] & 0x3 == 0x3
    assert "set_xsave" in vcpu.calls


def test_page_fault_sets_cr2_and_injects_pf():
    completer, thread, vcpu, _ = make()
    vcpu.regs.rax = 0x7F00_0000_0000
    assert completer(thread, exit_with("0fae10")) is None
    assert vcpu.sregs.cr2 == 0x7F00_0000_0000
    assert vcpu.calls == ["set_sregs", ("exception", 14, 0)]
    assert vcpu.regs.rip == RIP  # not written: RIP stays on the instruction


def test_int_n_and_wrfsbase():
    completer, thread, vcpu, _ = make()
    assert completer(thread, exit_with("cd41")) is None
    assert vcpu.calls == ["set_regs", ("soft-interrupt", 0x41)] and vcpu.regs.rip == RIP + 2
    vcpu.calls.clear()
    vcpu.sregs.cr4 |= 1 << 16
    vcpu.regs.rcx = 0x1234_5000
    assert completer(thread, exit_with("f3480faed1")) is None
    assert ("set_msrs", {MSR_FS_BASE: 0x1234_5000}) in vcpu.calls


def test_uncompletable_instruction_gives_one_line_with_bytes_and_rip():
    completer, thread, vcpu, _ = make()
    message = completer(thread, exit_with("0fc72f" + "90" * 12))
    assert message == ("vCPU 0 at rip 0x381000: KVM could not emulate the instruction "
                       "0f c7 2f (xsaves) and hvvmm cannot complete it: the compacted xsave "
                       "forms are not completed by hvvmm (boot Linux with noxsave)")
    message = completer(thread, exit_with("0f0b9090"))
    assert "0f 0b 90 90" in message and "rip 0x381000" in message and "\n" not in message
    assert vcpu.calls == []


def test_user_mode_instruction_that_cannot_complete_gets_ud_as_kvm_would():
    completer, thread, vcpu, _ = make(ud_queued_by_kvm=True, cpl=3)
    vcpu.events.exception.injected, vcpu.events.exception.nr = 1, 6
    assert completer(thread, exit_with("0f0b")) is None
    assert ("exception", 6, None) in vcpu.calls


def test_a_ud_queued_by_kvm_is_dropped_after_a_completion():
    completer, thread, vcpu, _ = make(ud_queued_by_kvm=True)
    vcpu.events.exception.injected, vcpu.events.exception.nr = 1, 6
    assert completer(thread, exit_with("9b")) is None
    assert vcpu.events.exception.injected == 0 and "set_vcpu_events" in vcpu.calls


def test_xrstor_goes_back_through_set_xsave():
    completer, thread, vcpu, memory = make()
    vcpu.sregs.cr4 |= 1 << 18  # OSXSAVE
    memory.write_u32(0x30_0018, 0x1F00)           # MXCSR in the guest's area at 0x300000
    memory.write(0x30_00A0, b"\x42" * 16)         # XMM0
    memory.write_u64(0x30_0200, 0x2)              # XSTATE_BV: SSE
    vcpu.regs.rdi, vcpu.regs.rax = 0x30_0000, 0x3
    assert completer(thread, exit_with("480fae2f")) is None
    assert "set_xsave" in vcpu.calls
    assert vcpu.xsave[160:176] == b"\x42" * 16
    assert struct.unpack_from("<I", vcpu.xsave, 24)[0] == 0x1F00
    assert vcpu.regs.rip == RIP + 4
