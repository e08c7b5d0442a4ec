"""One test group per handler of hvvmm/x86/complete.py, on a fake register file and bytearray
guest memory behind hand-built page tables (no /dev/kvm)."""

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from x86fakes import P, RW, paged_memory, protected_state, state_for

from hvvmm.x86 import COMPLETED, FAULTED, CannotComplete, Completer
from hvvmm.x86.paging import US
from hvvmm.x86.state import (AC, CF, CR0_EM, CR0_MP, CR0_NE, CR0_TS, CR4_FSGSBASE, CR4_OSFXSR,
                             CR4_OSXSAVE, CR4_PCIDE, OF, PF, SF, ZF, Segment)

RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI = range(8)
RIP = 0x38_1000
DATA = 0x30_0000      # identity-mapped, writable
READ_ONLY = 0x20_0000  # identity-mapped, read-only 4 KiB page
UNMAPPED = 0x7F00_0000_0000
NOT_RAM = 0x50_0000       # mapped to guest-physical 2 GiB, where there is no RAM


@pytest.fixture
def machine():
    """(state, memory, completer): 64-bit mode, the first 4 MiB identity-mapped."""
    memory, tables = paged_memory("long4")
    for page in range(0, 0x40_0000, 0x1000):
        flags = P if page == READ_ONLY else P | RW
        tables.map(page, page, flags)
    tables.map(NOT_RAM, 0x8000_0000, P | RW)
    state = state_for(tables)
    state.rip = RIP
    state.gprs[RSP] = DATA + 0x800
    return state, memory, Completer(random_bytes=lambda n: bytes(range(1, n + 1)))


def run(machine, hex_bytes, **gprs):
    state, memory, completer = machine
    for name, value in gprs.items():
        state.gprs[globals()[name.upper()]] = value
    return completer.complete(state, memory, bytes.fromhex(hex_bytes) + b"\x90" * 4)


def assert_fault(machine, completion, vector, error_code=None):
    state = machine[0]
    assert completion.outcome == FAULTED
    assert state.event.vector == vector and state.event.kind == "exception"
    if error_code is not None:
        assert state.event.error_code == error_code
    assert state.rip == RIP  # faults leave RIP on the instruction


# -- software interrupts -----------------------------------------------------------------------

def test_int3_injects_bp_after_the_instruction(machine):
    completion = run(machine, "cc")
    state, _, completer = machine
    assert completion.outcome == COMPLETED and state.rip == RIP + 1
    assert (state.event.kind, state.event.vector) == ("exception", 3)
    assert completer.counts == {"int3": 1}


def test_int_n_is_a_software_interrupt(machine):
    run(machine, "cd80")
    state = machine[0]
    assert state.rip == RIP + 2 and (state.event.kind, state.event.vector) == ("soft-interrupt",
                                                                               0x80)


def test_into_is_invalid_in_64_bit_mode(machine):
    assert_fault(machine, run(machine, "ce"), 6)


def test_int1_is_db(machine):
    run(machine, "f1")
    assert machine[0].event.vector == 1 and machine[0].rip == RIP + 1


# -- popcnt ------------------------------------------------------------------------------------

def test_popcnt_register_flags_and_zero_extension(machine):
    state = machine[0]
    state.rflags |= CF | OF | SF | PF | ZF
    state.gprs[RCX] = 0xFFFF_0000_0000_00F0
    run(machine, "f3480fb8c1", rax=0xDEAD)                  # popcnt rax, rcx
    assert state.gprs[RAX] == 20 and not state.rflags & (CF | OF | SF | PF | ZF)
    state.gprs[RAX] = 0xFFFF_FFFF_FFFF_FFFF
    state.rip = RIP
    run(machine, "f30fb8c1")                               # popcnt eax, ecx: zero-extends
    assert state.gprs[RAX] == 4
    state.rip = RIP
    run(machine, "66f30fb8c1", rax=0x1111_2222_3333_4444)  # popcnt ax, cx: keeps the rest
    assert state.gprs[RAX] == 0x1111_2222_3333_0004
    state.rip = RIP
    state.gprs[RCX] = 0
    run(machine, "f3480fb8c1")
    assert state.gprs[RAX] == 0 and state.rflags & ZF and state.rip == RIP + 5


def test_popcnt_memory_operands(machine):
    state, memory, _ = machine
    memory.write_u64(DATA + 0x10, 0x0101_0101_0101_0101)
    run(machine, "f3480fb8442408", rsp=DATA + 8)            # popcnt rax, [rsp+8]
    assert state.gprs[RAX] == 8
    # popcnt rbx, [rip+disp]: disp relative to the next instruction (RIP + 9)
    state.rip = RIP
    memory.write_u64(DATA, 0b111)
    disp = DATA - (RIP + 9)
    run(machine, "f3480fb81d" + (disp & 0xFFFF_FFFF).to_bytes(4, "little").hex())
    assert state.gprs[RBX] == 3


def test_lock_prefix_on_popcnt_is_ud(machine):
    assert_fault(machine, run(machine, "f0f3480fb8c1"), 6)


# -- x87 ---------------------------------------------------------------------------------------

def test_fwait(machine):
    state = machine[0]
    assert run(machine, "9b").outcome == COMPLETED and state.rip == RIP + 1
    state.rip = RIP
    state.fpu.fsw = 0x81  # IE + ES: an unmasked exception is pending
    assert_fault(machine, run(machine, "9b"), 16)
    state.cr0 &= ~CR0_NE  # FERR# style: hvvmm lets the wait complete
    assert run(machine, "9b").outcome == COMPLETED
    state.rip = RIP
    state.cr0 |= CR0_MP | CR0_TS
    assert_fault(machine, run(machine, "9b"), 7)


def test_fninit_and_fnclex(machine):
    state = machine[0]
    fpu = state.fpu
    fpu.fcw, fpu.fsw, fpu.ftwx, fpu.last_ip, fpu.mxcsr = 0x27F, 0x80C1, 0xFF, 0x1234, 0x7F80
    run(machine, "dbe3")
    assert (fpu.fcw, fpu.fsw, fpu.ftwx, fpu.last_ip, fpu.mxcsr) == (0x37F, 0, 0, 0, 0x7F80)
    assert "fpu" in state.dirty and state.rip == RIP + 2
    fpu.fsw = 0xB8FF
    state.rip = RIP
    run(machine, "dbe2")
    assert fpu.fsw == 0x3800  # TOP stays; flags, SF, ES and B cleared
    state.rip = RIP
    state.cr0 |= CR0_EM
    assert_fault(machine, run(machine, "dbe3"), 7)


# -- MXCSR -------------------------------------------------------------------------------------

def test_ldmxcsr_and_stmxcsr_through_memory(machine):
    state, memory, _ = machine
    memory.write_u32(DATA + 0x804, 0x7F80)
    run(machine, "0fae542404")                              # ldmxcsr [rsp+4]
    assert state.fpu.mxcsr == 0x7F80 and "fpu" in state.dirty and state.rip == RIP + 5
    state.rip = RIP
    run(machine, "0fae5c2410")                              # stmxcsr [rsp+16]
    assert memory.read_u32(DATA + 0x810) == 0x7F80


def test_ldmxcsr_faults(machine):
    state, memory, _ = machine
    memory.write_u32(DATA + 0x804, 0x1_0000)
    assert_fault(machine, run(machine, "0fae542404"), 13, 0)   # reserved bit
    state.fpu.mxcsr_mask = 0xFFBF
    memory.write_u32(DATA + 0x804, 0x40)                       # DAZ without DAZ support
    assert_fault(machine, run(machine, "0fae542404"), 13, 0)
    completion = run(machine, "0fae10", rax=UNMAPPED)          # ldmxcsr [rax]
    assert_fault(machine, completion, 14, 0)
    assert state.event.cr2 == UNMAPPED
    state.cr0 |= CR0_TS
    assert_fault(machine, run(machine, "0fae542404"), 7)
    state.cr4 &= ~CR4_OSFXSR
    assert_fault(machine, run(machine, "0fae542404"), 6)


def test_stmxcsr_to_a_read_only_page_is_pf_write(machine):
    completion = run(machine, "0fae18", rax=READ_ONLY)
    assert_fault(machine, completion, 14, 0x3)


# -- clac / stac -------------------------------------------------------------------------------

def test_clac_stac(machine):
    state = machine[0]
    run(machine, "0f01cb")
    assert state.rflags & AC and state.rip == RIP + 3
    state.rip = RIP
    run(machine, "0f01ca")
    assert not state.rflags & AC
    state.rip = RIP
    state.segments["ss"].dpl = 3
    assert_fault(machine, run(machine, "0f01cb"), 6)


# -- FS/GS base --------------------------------------------------------------------------------

def test_rd_wr_fs_gs_base(machine):
    state = machine[0]
    state.cr4 |= CR4_FSGSBASE
    run(machine, "f3480faed1", rcx=0x7FFF_1234_5000)          # wrfsbase rcx
    assert state.segments["fs"].base == 0x7FFF_1234_5000 and "fs_base" in state.dirty
    state.rip = RIP
    state.segments["gs"].base = 0xFFFF_8880_0000_1000
    run(machine, "f3480faecb")                                 # rdgsbase rbx
    assert state.gprs[RBX] == 0xFFFF_8880_0000_1000
    state.rip = RIP
    run(machine, "f30faecb")                                   # rdgsbase ebx: zero-extends
    assert state.gprs[RBX] == 0x0000_1000
    state.rip = RIP
    assert_fault(machine, run(machine, "f3480faed1", rcx=0x8000_0000_0000_0000), 13, 0)
    state.cr4 &= ~CR4_FSGSBASE
    assert_fault(machine, run(machine, "f3480faec3"), 6)


# -- rdrand / rdseed ---------------------------------------------------------------------------

def test_rdrand_rdseed(machine):
    state = machine[0]
    state.rflags |= ZF | OF
    run(machine, "480fc7f0")                                   # rdrand rax
    assert state.gprs[RAX] == int.from_bytes(bytes(range(1, 9)), "little")
    assert state.rflags & CF and not state.rflags & (ZF | OF)
    state.rip = RIP
    run(machine, "660fc7f9", rcx=0xAAAA_BBBB_CCCC_DDDD)         # rdseed cx
    assert state.gprs[RCX] == 0xAAAA_BBBB_CCCC_0201


# -- cmpxchg8b / cmpxchg16b --------------------------------------------------------------------

def test_cmpxchg16b_equal_and_not_equal(machine):
    state, memory, completer = machine
    entered = []

    @contextlib.contextmanager
    def exclusive():
        entered.append(True)
        yield

    completer._exclusive = exclusive
    memory.write(DATA, (1).to_bytes(8, "little") + (2).to_bytes(8, "little"))
    run(machine, "f0480fc70f", rdi=DATA, rax=1, rdx=2, rbx=3, rcx=4)
    assert memory.read(DATA, 16) == (3).to_bytes(8, "little") + (4).to_bytes(8, "little")
    assert state.rflags & ZF and entered == [True]
    state.rip = RIP
    run(machine, "f0480fc70f", rdi=DATA, rax=9, rdx=9, rbx=5, rcx=6)
    assert not state.rflags & ZF and (state.gprs[RAX], state.gprs[RDX]) == (3, 4)
    assert memory.read(DATA, 16) == (3).to_bytes(8, "little") + (4).to_bytes(8, "little")
    assert completer.counts["cmpxchg16b"] == 2


def test_cmpxchg16b_alignment_and_write_permission(machine):
    assert_fault(machine, run(machine, "f0480fc70f", rdi=DATA + 8), 13, 0)
    # Not equal, yet a read-only operand faults as a write (the CPU always writes it).
    assert_fault(machine, run(machine, "f0480fc70f", rdi=READ_ONLY, rax=1), 14, 0x3)


def test_cmpxchg8b(machine):
    state, memory, _ = machine
    memory.write_u64(DATA, 0x0000_0002_0000_0001)
    run(machine, "0fc70f", rdi=DATA, rax=1, rdx=2, rbx=0xB, rcx=0xC)
    assert memory.read_u64(DATA) == 0x0000_000C_0000_000B and state.rflags & ZF


# -- invpcid -----------------------------------------------------------------------------------

def test_invpcid(machine):
    state, memory, _ = machine
    memory.write(DATA, bytes(16))
    completion = run(machine, "660f388207", rdi=DATA, rax=2)     # invpcid rax, [rdi]
    assert completion.outcome == COMPLETED and state.flush_tlb and state.rip == RIP + 5
    state.flush_tlb, state.rip = False, RIP
    assert_fault(machine, run(machine, "660f388207", rdi=DATA, rax=4), 13, 0)
    memory.write(DATA, (5).to_bytes(8, "little") + bytes(8))      # PCID 5, CR4.PCIDE clear
    assert_fault(machine, run(machine, "660f388207", rdi=DATA, rax=1), 13, 0)
    state.cr4 |= CR4_PCIDE
    assert run(machine, "660f388207", rdi=DATA, rax=1).outcome == COMPLETED
    state.flush_tlb, state.rip = False, RIP
    memory.write(DATA, (5).to_bytes(8, "little") + (1 << 63).to_bytes(8, "little"))
    assert_fault(machine, run(machine, "660f388207", rdi=DATA, rax=0), 13, 0)  # non-canonical
    memory.write(DATA, (1 << 12).to_bytes(8, "little") + bytes(8))
    assert_fault(machine, run(machine, "660f388207", rdi=DATA, rax=2), 13, 0)  # reserved
    state.segments["ss"].dpl = 3
    assert_fault(machine, run(machine, "660f388207", rdi=DATA, rax=2), 13, 0)
    assert not state.flush_tlb


# -- what is not completed, and fetching ---------------------------------------------------------

# -- XSAVE / XRSTOR / XGETBV -------------------------------------------------------------------

AVX_OFFSET = 576  # CPUID 0xD.2 EBX on every CPU with AVX


def xsave_machine(machine, xcr0=0x7, in_use=0x7):
    state, memory, completer = machine
    state.cr4 |= CR4_OSXSAVE
    state._xcr0 = xcr0
    completer.xsave_layout = {2: (AVX_OFFSET, 256)}
    area = bytearray(4096)
    area[0:2] = (0x037F).to_bytes(2, "little")
    area[24:32] = (0x7F80).to_bytes(4, "little") + (0xFFFF).to_bytes(4, "little")
    area[160 + 16 * 3:160 + 16 * 4] = b"\x33" * 16          # XMM3
    area[AVX_OFFSET:AVX_OFFSET + 16] = b"\xAA" * 16          # YMM0 upper half
    area[512:520] = in_use.to_bytes(8, "little")
    state._xsave = area
    return state, memory


def test_xsave_writes_the_selected_components_and_xstate_bv(machine):
    state, memory = xsave_machine(machine, in_use=0x6)
    memory.write(DATA + 512, (1 << 5 | 1).to_bytes(8, "little"))  # bit 5: not in RFBM, kept
    run(machine, "480fae27", rdi=DATA, rax=0x7, rdx=0)            # xsave64 [rdi]
    assert memory.read_u32(DATA + 24) == 0x7F80 and memory.read_u16(DATA) == 0x037F
    assert memory.read(DATA + 160 + 48, 16) == b"\x33" * 16
    assert memory.read(DATA + AVX_OFFSET, 16) == b"\xAA" * 16
    assert memory.read_u64(DATA + 512) == (1 << 5) | 0x6           # XSTATE_BV[i] = XINUSE[i]
    assert state.rip == RIP + 4 and "xsave" not in state.dirty


def test_xsave_with_rfbm_sse_only_leaves_avx_and_x87_alone(machine):
    state, memory = xsave_machine(machine)
    memory.fill(DATA, 1024, 0x5A)
    run(machine, "480fae27", rdi=DATA, rax=0x2, rdx=0)
    assert memory.read(DATA + 160 + 48, 16) == b"\x33" * 16
    assert memory.read_u32(DATA + 24) == 0x7F80                   # MXCSR goes with SSE
    assert memory.read(DATA, 2) == b"\x5A\x5A" and memory.read(DATA + AVX_OFFSET, 2) == b"\x5A\x5A"


def test_xsave_faults(machine):
    state, memory = xsave_machine(machine)
    assert_fault(machine, run(machine, "480fae27", rdi=DATA + 32, rax=7), 13, 0)  # alignment
    state.cr0 |= CR0_TS
    assert_fault(machine, run(machine, "480fae27", rdi=DATA, rax=7), 7)
    state.cr4 &= ~CR4_OSXSAVE
    assert_fault(machine, run(machine, "480fae27", rdi=DATA, rax=7), 6)


def test_xrstor_loads_present_components_and_inits_the_others(machine):
    state, memory = xsave_machine(machine)
    memory.fill(DATA, 1024)
    memory.write_u32(DATA + 24, 0x1F80)
    memory.write(DATA + 160 + 48, b"\x77" * 16)
    memory.write(DATA + AVX_OFFSET, b"\x99" * 16)                # ignored: XSTATE_BV[2] = 0
    memory.write_u64(DATA + 512, 0x2)
    run(machine, "480fae2f", rdi=DATA, rax=0x7, rdx=0)            # xrstor64 [rdi]
    area = state.xsave_area
    assert area[160 + 48:160 + 64] == b"\x77" * 16 and area[24:28] == (0x1F80).to_bytes(4, "little")
    assert area[AVX_OFFSET:AVX_OFFSET + 16] == bytes(16)           # AVX: initial state
    assert area[0:2] == (0x037F).to_bytes(2, "little")             # x87: initial FCW
    assert int.from_bytes(area[512:520], "little") == 0x2
    assert "xsave" in state.dirty and state.rip == RIP + 4


def test_xrstor_faults_and_the_compacted_form(machine):
    state, memory = xsave_machine(machine, xcr0=0x3)
    memory.fill(DATA, 1024)
    memory.write_u64(DATA + 512, 0x4)                             # AVX, not in XCR0
    assert_fault(machine, run(machine, "480fae2f", rdi=DATA, rax=3), 13, 0)
    memory.write_u64(DATA + 512, 0x3)
    memory.write_u64(DATA + 528, 1)                               # header bytes 16-23
    assert_fault(machine, run(machine, "480fae2f", rdi=DATA, rax=3), 13, 0)
    memory.write_u64(DATA + 528, 0)
    memory.write_u32(DATA + 24, 0x10000)                          # reserved MXCSR bit
    assert_fault(machine, run(machine, "480fae2f", rdi=DATA, rax=3), 13, 0)
    memory.write_u32(DATA + 24, 0x1F80)
    memory.write_u64(DATA + 520, 1 << 63)                         # XCOMP_BV[63]: compacted
    with pytest.raises(CannotComplete, match="compacted"):
        run(machine, "480fae2f", rdi=DATA, rax=3)
    assert state.rip == RIP


def test_xgetbv(machine):
    state, _ = xsave_machine(machine, xcr0=0x7, in_use=0x3)
    run(machine, "0f01d0", rcx=0, rax=0xFFFF_FFFF_0000_0000)
    assert (state.gprs[RAX], state.gprs[RDX], state.rip) == (0x7, 0, RIP + 3)
    state.rip = RIP
    run(machine, "0f01d0", rcx=1)
    assert state.gprs[RAX] == 0x3
    state.rip = RIP
    assert_fault(machine, run(machine, "0f01d0", rcx=2), 13, 0)


def test_compacted_xsave_forms_cannot_complete_and_leave_the_state(machine):
    state = machine[0]
    with pytest.raises(CannotComplete) as info:
        run(machine, "0fc72f")                                    # xsaves [rdi]
    assert info.value.instruction.mnemonic == "xsaves" and "noxsave" in str(info.value)
    assert state.rip == RIP and state.event is None


def test_unknown_opcode_cannot_complete(machine):
    with pytest.raises(CannotComplete, match="not one hvvmm completes"):
        run(machine, "0f0b")  # ud2


def test_operand_outside_ram_cannot_complete(machine):
    state, memory, _ = machine
    with pytest.raises(CannotComplete):
        run(machine, "0fae10", rax=NOT_RAM)
    assert state.rip == RIP


def test_instruction_bytes_are_fetched_when_the_exit_has_none(machine):
    state, memory, completer = machine
    memory.write(RIP, bytes.fromhex("f3480fb8c1"))
    state.gprs[RCX] = 0b1011
    completion = completer.complete(state, memory, None)
    assert completion.instruction.mnemonic == "popcnt" and state.gprs[RAX] == 3


def test_protected_mode_with_32_bit_paging():
    memory, tables = paged_memory("legacy32")
    for page in range(0, 0x40_0000, 0x1000):
        tables.map(page, page, P | RW | US)
    state = state_for(tables)
    state.rip = RIP
    memory.write_u32(DATA, 0xFF)
    state.gprs[RBX] = DATA
    completion = Completer().complete(state, memory, bytes.fromhex("f30fb803"))  # popcnt eax,[ebx]
    assert completion.outcome == COMPLETED and state.gprs[RAX] == 8 and state.rip == RIP + 4
    # CS.D = 0: 16-bit defaults, RIP wraps at 64 KiB
    state16 = protected_state(paging=False)
    state16.segments["cs"] = Segment(db=False)
    state16.rip = 0xFFFF
    Completer().complete(state16, memory, bytes.fromhex("cc"))
    assert state16.rip == 0


# -- nothing a guest supplies may crash the VMM --------------------------------------------------

_KNOWN_PREFIXES = ["", "66", "f3", "f2", "f0", "48", "4f", "67", "65", "2e"]
_KNOWN_OPCODES = ["cc", "cd", "ce", "f1", "9b", "db", "0f01", "0fae", "0fc7", "0fb8", "0f3882"]


@settings(max_examples=300)
@given(prefix=st.lists(st.sampled_from(_KNOWN_PREFIXES), max_size=3),
       opcode=st.sampled_from(_KNOWN_OPCODES), tail=st.binary(min_size=0, max_size=12),
       gprs=st.lists(st.integers(0, (1 << 64) - 1), min_size=16, max_size=16),
       cr4_bits=st.integers(0, (1 << 22) - 1))
def test_any_bytes_and_registers_complete_fault_or_refuse(prefix, opcode, tail, gprs, cr4_bits):
    memory, tables = paged_memory("long4")
    for page in range(0, 0x40_0000, 0x20_0000):
        tables.map(page, page, P | RW, level=2)
    state = state_for(tables)
    state.rip = RIP
    state.gprs = list(gprs)
    state.cr4 = (state.cr4 | cr4_bits) & ~(1 << 12)  # LA57 would need 5-level tables
    code = bytes.fromhex("".join(prefix) + opcode) + tail
    try:
        completion = Completer(xsave_layout={2: (576, 256)}).complete(state, memory, code)
    except CannotComplete:
        return
    if completion.outcome == FAULTED:
        assert state.rip == RIP and state.event.kind == "exception"
    else:
        assert state.rip == RIP + completion.instruction.length
